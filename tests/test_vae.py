import pytest
import torch

from k4flash.vae import decode_latents, load_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vae(tiny_weights):
    return load_vae(tiny_weights / "vae")


def random_latents(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hand_decode(vae, latents, chunk):
    """docs/model.md "VAE decode" as the official code writes it: (F, h, w, 16) → (1, T, 8h, 8w, 3) uint8, truncated.

    `1 / s * x` before the permute, exactly: x / s differs by an ulp in ~9% of elements, which
    moves frames by a level; the comparisons below are bitwise.
    """
    z = ((1 / 0.7) * latents).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 16, F, h, w); 0.7 = CogVideoX-5b's factor
    vae.num_latent_frames_batch_size = chunk
    x = vae.decode(z).sample  # (1, 3, T, H, W)
    x = ((x.float() + 1) / 2).clamp(0, 1)
    return x, (x * 255).to(torch.uint8).permute(0, 2, 3, 4, 1)


def test_tiny_vae_config(vae):
    assert vae.config.latent_channels == 16
    assert vae.config.scaling_factor == 0.7
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


@torch.no_grad()
def test_decode_three_latent_frames_matches_spec_formula(vae):
    latents = random_latents(3, 8, 12, 16)
    frames = decode_latents(vae, latents)
    assert frames.shape == (1, 9, 64, 96, 3) and frames.dtype == torch.uint8 and frames.device.type == "cpu"
    x, expected = hand_decode(vae, latents, chunk=2)
    assert torch.equal(frames, expected)
    # Truncation, not rounding, and the frames are not just saturated: both would hide bugs.
    rounded = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert (frames != rounded).float().mean() > 0.2
    assert frames.float().std() > 20 and ((frames > 0) & (frames < 255)).float().mean() > 0.8


@torch.no_grad()
def test_decode_uses_two_frame_chunks(vae):
    latents = random_latents(5, 2, 4, 16, seed=1)  # small h, w: three decodes of 17 frames
    frames = decode_latents(vae, latents)
    assert frames.shape == (1, 17, 16, 32, 3)
    _, two_frame_chunks = hand_decode(vae, latents, chunk=2)
    _, one_chunk = hand_decode(vae, latents, chunk=5)
    assert torch.equal(frames, two_frame_chunks)
    assert not torch.equal(frames, one_chunk)  # the chunking is observable, so matching it matters


@torch.no_grad()
def test_decode_single_latent_frame_is_one_image(vae):
    latents = random_latents(1, 8, 12, 16, seed=2)
    frames = decode_latents(vae, latents)
    assert frames.shape == (1, 1, 64, 96, 3)
    assert torch.equal(frames, hand_decode(vae, latents, chunk=1)[1])


def test_decode_restores_chunk_size_and_accepts_a_batch(vae):
    vae.num_latent_frames_batch_size = 7
    latents = random_latents(2, 3, 4, 6, 16, seed=3)
    frames = decode_latents(vae, latents)
    assert vae.num_latent_frames_batch_size == 7
    assert frames.shape == (2, 9, 32, 48, 3)
    # Batched convolutions may round differently in the last bit: allow one uint8 step.
    single = decode_latents(vae, latents[1])
    assert (frames[1:].int() - single.int()).abs().max() <= 1


def test_decode_restores_chunk_size_on_error(vae, monkeypatch):
    vae.num_latent_frames_batch_size = 5

    def broken_decode(z):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(vae, "decode", broken_decode)
    with pytest.raises(RuntimeError, match="simulated"):
        decode_latents(vae, random_latents(3, 8, 12, 16))
    assert vae.num_latent_frames_batch_size == 5


@pytest.mark.parametrize("shape", [(3, 8, 12), (3, 8, 12, 4), (3, 16, 8, 12), (1, 1, 3, 8, 12, 16)])
def test_decode_rejects_bad_latent_shapes(vae, shape):
    with pytest.raises(ValueError, match="must be"):
        decode_latents(vae, torch.zeros(shape))


def test_bfloat16_vae_decodes_to_uint8(tiny_weights):
    vae = load_vae(tiny_weights / "vae", dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    latents = random_latents(1, 8, 12, 16)
    frames = decode_latents(vae, latents)
    assert frames.shape == (1, 1, 64, 96, 3) and frames.dtype == torch.uint8
    # The float32 VAE's frames, to bf16's precision: a few levels of 255 at most, not just the same shape.
    full = decode_latents(load_vae(tiny_weights / "vae"), latents)
    difference = (frames.int() - full.int()).abs()
    assert full.float().std() > 10 and difference.float().mean() < 2 and difference.max() <= 16


def test_load_vae_rejects_non_dtype(tiny_weights):
    with pytest.raises(TypeError, match="torch.dtype"):
        load_vae(tiny_weights / "vae", dtype="bf16")
