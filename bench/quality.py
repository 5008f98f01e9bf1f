"""How far `dit.quantize=fp8` takes a video from bf16: the DiT's output per step, the final latents, the frames.

    python -m bench.quality [--size mid|smoke|tiny|published] [--skips "none;0;-1;0,-1;0,1,-1"]
                            [--inits gaussian outliers] [--weights DIR] [--device cpu|cuda] [--seed 42]
                            [--threads 1] [--json F] [--md F]

The reference is the bf16 DiT under autocast, as the pipeline runs it (on the CPU too); each candidate is a copy
of the same weights through `k4flash.fp8.quantize_dit(fp8_skip)`. Both run the 4-step sampler
(`k4flash.sampler.sample`) from the same seed on the same random text embedding (`bench.configs.dit_inputs`).

Per step, the DiT output's relative error ‖v_fp8 − v_bf16‖ / ‖v_bf16‖ on the same input (the reference
trajectory's latent at that step), and on the candidate's own trajectory (the error accumulated so far); then the
final latents' relative error, and the decoded uint8 frames' PSNR (255 peak) and largest |difference| in levels.
The VAE: at smoke and mid the tiny CogVideoX VAE (k4flash.tiny: the real 8x/4x compression, 8-16 channels), in
float32; at the published size a random published VAE in bf16 (bench.random_weights).

Weights are random (`--inits`): `gaussian` is bench.random_weights' N(0, 1/fan_in) with every block's gates opened
to 1 (there they start near 0, which would hide the blocks and their FP8 error); `outliers` adds to it what
trained transformers are known to have: in every quantized linear 1 % of the output rows and 1 % of the input
columns x10-x50, and 1 % of the channels of the LayerNorms in front of the QKV and MLP layers x10-x50, so every
token carries a few outlier channels. Neither is the real checkpoint's structure (README "Quality"). With
`--weights DIR` (a folder in the published layout, of --size's shape) the checkpoint's own T5 encodes PROMPT, its
DiT is the reference and each candidate is loaded from it as a `dit.quantize=fp8` run loads it; its VAE decodes.

Every row of a CPU run is held to BOUNDS (tests/test_quality.py, quoted by the README). The report also applies
SKIP_RULE to the rows to say which `dit.fp8_skip` is worth its bf16 blocks.
"""
import argparse
import copy
import math

import torch

from bench.configs import DIT_CONFIGS, VAE_CONFIGS, autocast_for, dit_inputs
from bench.random_weights import build_random_dit, build_random_vae
from bench.report import Report, add_output_args
from k4flash.dit import Modulation
from k4flash.fp8 import QUANTIZED_LAYERS, quantize_dit
from k4flash.sampler import load_schedule, sample
from k4flash.vae import decode_latents

SIZES = ("tiny", "smoke", "mid", "published")  # of bench.configs.DIT_CONFIGS; published only with --device cuda
INITS = ("gaussian", "outliers")
DEFAULT_SKIPS = "none;0;-1;0,-1;0,1,-1"
PROMPT = "a red fox runs through fresh snow"  # with --weights: the checkpoint's T5 encodes it
OUTLIER_FRACTION, OUTLIER_GAIN = 0.01, (10.0, 50.0)
# Every row of a CPU run (smoke or mid, both inits, every fp8_skip) stays within these: README "Quality" quotes
# bounds_text(), and tests/test_quality.py holds the smoke run and the tiny checkpoint to them.
BOUNDS = dict(dit_rel_err=0.2, latents_rel_err=0.1, psnr_db=27.0, max_abs_diff=128)
# A dit.fp8_skip earns its bf16 blocks when each removes at least SKIP_RULE times its even share (1 / blocks) of
# the DiT output's squared error on the reference's inputs (mean over the steps), under every init; the best such
# set is the choice, else none.
SKIP_RULE = 2.0


def parse_skips(text: str) -> list:
    """"none;0,-1;0" → [(), (0, -1), (0,)]."""
    return [() if part.strip() == "none" else tuple(int(i) for i in part.split(","))
            for part in text.split(";") if part.strip()]


def skip_label(skip) -> str:
    return ",".join(map(str, skip)) if skip else "none"


@torch.no_grad()
def open_gates_(model):
    """Every Modulation's gates (chunks 2 and 5 of its 6) biased to 1: each block's update enters the residual in
    full, as in a trained DiT, instead of the ~1 % the small random modulation weights alone give it."""
    for module in model.modules():
        if isinstance(module, Modulation):
            bias = module.out_layer.bias
            width = bias.numel() // 6
            bias[2 * width:3 * width] = 1.0
            bias[5 * width:6 * width] = 1.0
    return model


@torch.no_grad()
def inject_outliers_(model, seed: int):
    """Outlier rows and columns in every quantized linear, outlier channels in the LayerNorms feeding them."""
    generator = torch.Generator().manual_seed(seed)

    def pick(size, device):
        count = max(1, round(OUTLIER_FRACTION * size))
        gain = torch.empty(count).uniform_(*OUTLIER_GAIN, generator=generator)
        return torch.randperm(size, generator=generator)[:count].to(device), gain.to(device)

    for name, module in model.named_modules():
        if name.endswith(QUANTIZED_LAYERS):
            weight = module.weight
            rows, gain = pick(weight.shape[0], weight.device)
            weight[rows] *= gain.to(weight.dtype)[:, None]
            cols, gain = pick(weight.shape[1], weight.device)
            weight[:, cols] *= gain.to(weight.dtype)
        elif name.endswith(("self_attention_norm", "feed_forward_norm")):
            channels, gain = pick(module.weight.numel(), module.weight.device)
            module.weight[channels] *= gain.to(module.weight.dtype)
    return model


class Models:
    """The reference DiT, each candidate, the text embedding and the VAE: random (an init) or a checkpoint's."""

    def __init__(self, size, device, seed, weights=None):
        self.size, self.device, self.seed, self.weights = size, device, seed, weights
        self.config = DIT_CONFIGS[size]
        self.vae_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        if weights is None:
            from k4flash.tiny import ensure_tiny_weights
            self.vae = (build_random_vae(VAE_CONFIGS["published"], device, self.vae_dtype) if size == "published"
                        else self._load_vae(ensure_tiny_weights() / "vae"))
            self.text = dit_inputs(self.config, device, torch.bfloat16, seed=seed)[1]
            return
        from k4flash.text_encoder import T5TextEncoder
        from k4flash.weights import resolve_weight_paths

        self.paths = resolve_weight_paths(weights, download=False)
        encoder = T5TextEncoder(self.paths.text_encoder, self.paths.tokenizer, device=device, dtype=torch.bfloat16)
        self.text = encoder([PROMPT])
        encoder.release()
        self.vae = self._load_vae(self.paths.vae)

    def _load_vae(self, path):
        from k4flash.vae import load_vae
        return load_vae(path, device=self.device, dtype=self.vae_dtype)

    def reference(self, init):
        if self.weights is not None:
            return self._load_dit()
        model = open_gates_(build_random_dit(self.config["params"], self.device, torch.bfloat16, seed=self.seed))
        return inject_outliers_(model, self.seed + 1) if init == "outliers" else model

    def candidate(self, reference, skip):
        """As a dit.quantize=fp8 run builds it: from the checkpoint, or the reference's weights quantized."""
        if self.weights is not None:
            return self._load_dit(quantize="fp8", fp8_skip=skip)
        return quantize_dit(copy.deepcopy(reference), skip)

    def _load_dit(self, **quantization):
        from k4flash.weights import load_dit
        return load_dit(self.config["params"], self.paths.dit, self.device, torch.bfloat16, **quantization)


def rel_err(candidate, reference) -> float:
    reference = reference.double()
    return ((candidate.double() - reference).norm() / reference.norm()).item()


def frame_figures(candidate, reference) -> dict:
    """PSNR (dB, 255 peak), max and mean |difference| in uint8 levels of two frame tensors."""
    diff = candidate.float() - reference.float()
    mse = diff.pow(2).mean().item()
    return dict(psnr_db=10 * math.log10(255 ** 2 / mse) if mse else math.inf,
                max_abs_diff=int(diff.abs().max()), mean_abs_diff=diff.abs().mean().item())


class Run:
    """One DiT through the sampler: the latent each step was given and the velocity it returned."""

    def __init__(self, model, text, device, schedule, shape, seed):
        self.model, self.text, self.device = model, text, device
        self.autocast = autocast_for(device, torch.bfloat16)
        self.inputs, self.velocities = [], []
        self.latents = sample(self._record, shape, schedule, seed, device=device)

    def velocity(self, latent, timestep):
        t = torch.full((1,), float(timestep), device=self.device)
        with self.autocast():  # as the pipeline's denoise: the bf16 DiT under autocast
            return self.model(latent[None].to(torch.bfloat16), self.text, t)[0]

    def _record(self, latent, timestep):
        velocity = self.velocity(latent, timestep)
        self.inputs.append(latent.clone())
        self.velocities.append(velocity.float())
        return velocity


def quality_rows(models: Models, init: str, skips, schedule) -> list:
    """One row per fp8_skip for one init (or the checkpoint)."""
    config, device, seed = models.config, models.device, models.seed
    shape = (*config["latent"], config["params"]["in_visual_dim"])
    reference_model = models.reference(init)
    reference = Run(reference_model, models.text, device, schedule, shape, seed)
    reference_frames = decode_latents(models.vae, reference.latents)
    blocks = 2 * config["params"]["num_blocks"]
    rows = []
    for skip in skips:
        candidate = Run(models.candidate(reference_model, skip), models.text, device, schedule, shape, seed)
        # Step 1's input is the same latent on both trajectories; from step 2 on, the candidate is also run on the
        # reference's latent, so the error is this step's alone, not what the earlier steps carried in.
        same_input = [candidate.velocities[0]] + [candidate.velocity(latent, t).float() for latent, t in
                                                  zip(reference.inputs[1:], schedule.timesteps[1:])]
        kept = len({i % blocks for i in skip})
        row = dict(init=init, fp8_skip=skip_label(skip), skip=list(skip), kept=kept, blocks=blocks,
                   bf16_blocks=f"{kept}/{blocks}",
                   dit_rel_err=[rel_err(v, r) for v, r in zip(same_input, reference.velocities)],
                   dit_rel_err_trajectory=[rel_err(v, r) for v, r in zip(candidate.velocities, reference.velocities)],
                   latents_rel_err=rel_err(candidate.latents, reference.latents),
                   **frame_figures(decode_latents(models.vae, candidate.latents), reference_frames))
        del candidate
        row["within_bounds"] = not bound_failures(row)
        rows.append(row)
    none = next((r for r in rows if not r["skip"]), None)
    for row in rows:
        if none is not None and row["kept"]:
            # Independent errors add in quadrature: a block's share is of the squared error (1: an even share).
            removed = 1 - _energy(row) / _energy(none)
            row["removed_share"] = removed / (row["kept"] / blocks)
    return rows


def _energy(row) -> float:
    return sum(e * e for e in row["dit_rel_err"]) / len(row["dit_rel_err"])


def bound_failures(row) -> list:
    """The BOUNDS a row breaks (by key); [] when within all of them."""
    figures = dict(dit_rel_err=max(row["dit_rel_err"]), latents_rel_err=row["latents_rel_err"],
                   psnr_db=-row["psnr_db"], max_abs_diff=row["max_abs_diff"])
    limits = dict(BOUNDS, psnr_db=-BOUNDS["psnr_db"])
    return [key for key in BOUNDS if not figures[key] <= limits[key]]


def bounds_text() -> str:
    """The bounds as the README states them (tests/test_quality.py checks that the README holds this text)."""
    b = BOUNDS
    return (f"DiT output's relative error ≤ {b['dit_rel_err']} at every step, final latents' relative error ≤ "
            f"{b['latents_rel_err']}, frames' PSNR ≥ {b['psnr_db']} dB and max |diff| ≤ {b['max_abs_diff']} levels")


def choose_skip(rows):
    """SKIP_RULE over the rows of every init: (the fp8_skip chosen, or None without a `none` row; the worst-init
    score of each candidate)."""
    scores = {}
    for row in rows:
        if row.get("removed_share") is not None:
            scores[row["fp8_skip"]] = min(scores.get(row["fp8_skip"], math.inf), row["removed_share"])
    if not any(not row["skip"] for row in rows):
        return None, scores
    worthy = {label: score for label, score in scores.items() if score >= SKIP_RULE}
    return (max(worthy, key=worthy.get) if worthy else "none"), scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="mid")
    parser.add_argument("--skips", default=DEFAULT_SKIPS, help='dit.fp8_skip choices, ";"-separated ("none": [])')
    parser.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    parser.add_argument("--weights", help="a weights folder (the published layout) instead of random weights: its "
                                          "DiT (of --size's shape), T5 and VAE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (one: see bench.dit_forward)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (no GPU visible); --device cpu runs smoke, mid, tiny")
    if args.size == "published" and device.type != "cuda":
        parser.error("--size published runs on a GPU (--device cuda): 5.5 B parameters in bf16")
    try:
        skips = parse_skips(args.skips)
    except ValueError:
        parser.error(f"--skips {args.skips!r}: block indices separated by commas, choices by semicolons")
    models = Models(args.size, device, args.seed, args.weights)
    schedule = load_schedule()
    inits = ["checkpoint"] if args.weights else args.inits
    rows = [row for init in inits for row in quality_rows(models, init, skips, schedule)]
    for row in rows:
        for key in ("dit_rel_err", "dit_rel_err_trajectory"):
            row.update({f"{key}_{i}": value for i, value in enumerate(row[key])})
    config = models.config
    report = Report("quality", size=args.size, weights=args.weights or "random", device=str(device), seed=args.seed,
                    latent=config["latent"], blocks=2 * config["params"]["num_blocks"],
                    model_dim=config["params"]["model_dim"], reference="bf16 under autocast", bounds=BOUNDS,
                    skip_rule=SKIP_RULE)
    first = [("init", "init", None), ("fp8_skip", "fp8_skip", None), ("bf16_blocks", "bf16 blocks", None)]
    steps = list(enumerate(schedule.timesteps))
    report.table("DiT output's relative error to bf16 per step: on the reference's latent, then on its own trajectory",
                 first + [(f"dit_rel_err_{i}", f"t={t}", ".1e") for i, t in steps]
                 + [(f"dit_rel_err_trajectory_{i}", f"own, t={t}", ".1e") for i, t in steps if i], rows)
    report.table("Final latents and decoded frames against bf16", first + [
        ("latents_rel_err", "latents rel err", ".1e"), ("psnr_db", "PSNR dB", ".1f"),
        ("max_abs_diff", "max abs diff (levels)", None), ("mean_abs_diff", "mean abs diff", ".2f"),
        ("removed_share", "DiT error removed / even share", ".2f"), ("within_bounds", "within bounds", None)], rows)
    choice, scores = choose_skip(rows)
    report.settings["fp8_skip_choice"] = choice
    report.note("bounds (every row of a smoke or mid CPU run, and the tiny checkpoint's): " + bounds_text())
    if choice is not None:
        report.note(f"dit.fp8_skip by the rule (each bf16 block removes ≥ {SKIP_RULE}x its even share of the DiT "
                    f"output's squared error, under every init): {choice}; worst-init shares: "
                    + ", ".join(f"{label} {score:.2f}" for label, score in scores.items()))
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
