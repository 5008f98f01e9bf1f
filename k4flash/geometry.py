"""Video geometry and request validation (docs/model.md "Video geometry").

Everything here is cheap (no torch) and runs before any weights load, so bad input fails
in milliseconds with a one-line message naming the value and what is allowed.
"""
from .published import ROPE_MAX_POSITIONS

RESOLUTIONS = {
    512: ((512, 512), (352, 736), (736, 352), (384, 672), (672, 384), (480, 544), (544, 480)),
}
LATENT_CHANNELS = 16
VAE_SPATIAL_FACTOR = 8
FPS = 8
MAX_TIME_LENGTH = (ROPE_MAX_POSITIONS - 1) // 2  # F = 2·time_length + 1 latent frames ≤ 128 RoPE positions


def num_latent_frames(time_length: int) -> int:
    """Latent frames for a clip of `time_length` seconds; 0 means a single image."""
    return time_length * 8 // 4 + 1


def latent_shape(time_length: int, height: int, width: int) -> tuple:
    """(F, H/8, W/8, 16), the channel-last latent shape of one video."""
    return (num_latent_frames(time_length), height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR, LATENT_CHANNELS)


def validate_resolution(resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution={resolution!r} is not supported; allowed: {sorted(RESOLUTIONS)}")


def validate_seed(seed) -> None:
    """Raise ValueError unless `seed` is a non-negative int (what torch.Generator.manual_seed takes)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")


def validate_request(prompt, time_length, height, width, resolution: int = 512) -> None:
    """Raise ValueError (one line) for a prompt/duration/size the model cannot generate."""
    validate_resolution(resolution)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={prompt!r} is empty; give a non-empty text prompt")
    if isinstance(time_length, bool) or not isinstance(time_length, int):
        raise ValueError(f"time_length={time_length!r} must be a whole number of seconds (0 = one image)")
    if not 0 <= time_length <= MAX_TIME_LENGTH:
        raise ValueError(f"time_length={time_length} is out of range; allowed: 0..{MAX_TIME_LENGTH} seconds "
                         f"(0 = one image; RoPE covers {ROPE_MAX_POSITIONS} latent frames)")
    if (height, width) not in RESOLUTIONS[resolution]:
        allowed = ", ".join(f"{h}x{w}" for h, w in RESOLUTIONS[resolution])
        raise ValueError(f"height x width = {height}x{width} is not allowed at resolution {resolution}; "
                         f"allowed (height x width): {allowed}")


# Where T5 lives (k4flash/text_encoder.py): kept on the device, freed after encoding, or in host memory.
# Here, with the other cheap checks, so the app refuses a bad value before importing torch.
TEXT_ENCODER_OFFLOADS = ("none", "after_encode", "cpu")


def validate_offload(offload, allow_auto=False) -> str:
    allowed = (("auto",) if allow_auto else ()) + TEXT_ENCODER_OFFLOADS
    if offload not in allowed:
        raise ValueError(f"text_encoder.offload={offload!r}: allowed values are {list(allowed)}")
    return offload


QUANTIZE_CHOICES = ("none", "fp8")  # dit.quantize (k4flash/fp8.py)
DIT_OFFLOADS = ("none", "during_decode")  # dit.offload: where the DiT is while the VAE decodes


def validate_dit_offload(offload, allow_auto=False) -> str:
    allowed = DIT_OFFLOADS + (("auto",) if allow_auto else ())
    if offload not in allowed:
        raise ValueError(f"dit.offload={offload!r}: allowed values are {list(allowed)}")
    return offload


def validate_quantize(quantize: str, fp8_skip, num_blocks: int) -> None:
    """dit.quantize and dit.fp8_skip (block indices of a DiT with `num_blocks` pairs, negative from the end)."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"dit.quantize={quantize!r}: allowed values are {list(QUANTIZE_CHOICES)}")
    blocks = 2 * num_blocks
    bad = [i for i in fp8_skip if isinstance(i, bool) or not isinstance(i, int) or not -blocks <= i < blocks]
    if bad:
        raise ValueError(f"dit.fp8_skip={list(fp8_skip)}: {bad[0]!r} is not a block index; this DiT's blocks are "
                         f"0..{blocks - 1}, or -1..-{blocks} from the last (block pair i holds blocks 2i and 2i+1)")

