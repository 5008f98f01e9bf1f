"""Our DiT and sampler against numbers computed by ai-forever/Kandinsky-4's own code (tests/golden/README.md).

The official DiT and renoise loop ran on the tiny published-layout weights; only their outputs are
committed (tests/golden/official.safetensors). A change to the tiny-weights builder makes these fail
loudly (the golden numbers belong to the old weights), never silently regenerate.
"""
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from k4flash.dit import DiffusionTransformer3D
from k4flash.sampler import load_schedule, sample
from k4flash.tiny import TINY_DIT_PARAMS, ensure_tiny_weights, tiny_dit_state_dict

from parity import assert_parity, parity_holds

GOLDEN = Path(__file__).parent / "golden" / "official.safetensors"
UNIT_ROUNDOFF = 2.0 ** -24  # float32


def reordering_bound(chained_terms: int) -> float:
    """How far two float32 computations of the same math may differ, relative to the output's largest magnitude,
    when their kernels sum in different orders (another CPU, another library build).

    A sum of K terms taken in another order moves by about sqrt(K)·u (rounding errors of either sign; K·u at
    worst), u = 2^-24; along a network the sums chain, so about sqrt(ΣK)·u for an output whose sums add to ΣK
    terms. The bound is 4x that typical figure: any float32 machine stays inside it, and a real change (a bf16
    rounding, 2^-9 ≈ 2e-3; a changed input) lands far outside (each golden check's negative control shows one).
    """
    return 4 * math.sqrt(chained_terms) * UNIT_ROUNDOFF


# Terms summed per output along each network (the tiny configs, k4flash/tiny.py):
# DiT, per block (2 blocks): QKV 128, q·k 16, attention over 72 + 20 tokens 92, output 128, MLP 128 + 256 = 748,
# plus the embeddings and modulation (text 32, patches 64, time 32, out layer 128): 2 · 748 + 256 ≈ 1,750 → 1.0e-5.
DIT_ROUNDING = reordering_bound(1750)
# T5, per layer (2 layers): q, k, v 32, q·k 8, attention over 224 tokens, output 32, gated MLP 32 + 64 = 392 → 6.7e-6
# (seen: 0 here; 5.8e-7 on another AMD EPYC, whose kernels differ).
T5_ROUNDING = reordering_bound(2 * 392)


def assert_same_trajectory(got, expected):
    """The DiT's inputs are rounded to bf16 each step (as the official loop does), so a 3e-7 difference between
    two DiT implementations can flip a value across a bf16 rounding boundary and move it by a bf16 step: bound
    the mean difference tightly (1e-5 of the mean; skipping the bf16 rounding alone gives 1.4e-3) and the
    largest one by a few bf16 steps."""
    difference = (got - expected).abs()
    assert (difference.mean() / expected.abs().mean()).item() <= 1e-5
    assert (difference.max() / expected.abs().max()).item() <= 2e-3


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), "pt") as f:
        metadata = f.metadata()
    return load_file(str(GOLDEN)), metadata


@pytest.fixture(scope="module")
def dit():
    model = DiffusionTransformer3D(**TINY_DIT_PARAMS).eval()
    model.load_state_dict(tiny_dit_state_dict(0))
    return model


def test_the_tiny_weights_are_the_ones_the_golden_numbers_came_from(golden):
    from golden.make_golden import tiny_builder_fingerprint  # tests/ is on pytest's pythonpath

    assert tiny_builder_fingerprint() == golden[1]["tiny_builder_sha256"], (
        "k4flash/tiny.py builds different DiT weights than tests/golden/official.safetensors was made from: "
        "regenerate it with the official code as tests/golden/README.md says (do not edit the numbers)")


@pytest.mark.parametrize("timestep", [999, 749, 249])
def test_dit_equals_the_official_dit(golden, dit, timestep):
    tensors, _ = golden
    expected = tensors[f"velocity_t{timestep}"]
    with torch.no_grad():
        got = dit(tensors["x"][None], tensors["text_embed"][None], torch.tensor([float(timestep)]))[0]
    assert expected.abs().max() > 1
    atol = DIT_ROUNDING * expected.abs().max().item()
    assert_parity(got, expected, atol=atol, what=f"velocity at t={timestep}")
    # Negative control: the same output with its inputs rounded to bf16 (a real precision change) fails.
    with torch.no_grad():
        rounded = dit(tensors["x"][None].bfloat16().float(), tensors["text_embed"][None].bfloat16().float(),
                      torch.tensor([float(timestep)]))[0]
    assert not parity_holds(rounded, expected, atol=atol)


def test_sampler_equals_the_official_renoise_loop(golden, dit):
    """The official loop hands the DiT bf16 latents and text (its CUDA autocast path), as our pipeline does with
    dtype=bfloat16; here the DiT itself runs in float32 on both sides."""
    tensors, metadata = golden
    schedule = load_schedule(ensure_tiny_weights() / "scheduler")
    assert ",".join(map(str, schedule.timesteps)) == metadata["scheduler_timesteps"]
    text = tensors["text_embed"].to(torch.bfloat16).float()[None]

    def velocity(latent, timestep):
        return dit(latent[None].to(torch.bfloat16).float(), text, torch.full((1,), float(timestep)))[0]
    with torch.no_grad():
        latents = sample(velocity, tuple(tensors["final_latents"].shape), schedule, int(metadata["pipeline_seed"]))
    expected = tensors["final_latents"]
    assert expected.abs().max() > 1
    assert_same_trajectory(latents, expected)


def test_prompt_to_frame_matches_the_official_flow(golden, dit):
    """One prompt and seed, stage by stage: T5, the sampler, the VAE, then the whole pipeline."""
    from k4flash import get_T2V_pipeline
    from k4flash.text_encoder import T5TextEncoder
    from k4flash.vae import decode_latents, load_vae

    tensors, metadata = golden
    weights = ensure_tiny_weights()
    prompt, seed = metadata["prompt"], int(metadata["prompt_seed"])
    # T5: the official embedder's hidden states (no mask, 224 tokens, the same tokenizer), to float32 rounding;
    # negative control: the same embedding rounded to bf16 fails that bound.
    embed = T5TextEncoder(weights / "text_encoder", weights / "tokenizer")([prompt])[0]
    atol = T5_ROUNDING * tensors["prompt_embed"].abs().max().item()
    assert_parity(embed, tensors["prompt_embed"], atol=atol, what="T5 embedding")
    assert not parity_holds(embed.bfloat16().float(), tensors["prompt_embed"], atol=atol)
    # The sampler from that embedding, the DiT's inputs rounded to bf16 as the official loop does.
    text = embed.to(torch.bfloat16).float()[None]
    schedule = load_schedule(weights / "scheduler")
    with torch.no_grad():
        latents = sample(lambda latent, t: dit(latent[None].to(torch.bfloat16).float(), text,
                                               torch.full((1,), float(t)))[0],
                         tuple(tensors["prompt_latents"].shape), schedule, seed)
    expected = tensors["prompt_latents"]
    assert_same_trajectory(latents, expected)
    # The VAE: our uint8 frame from the official latents, against the official conversion (ToPILImage's
    # truncation): a value on a level boundary may land one level apart.
    frame = decode_latents(load_vae(weights / "vae"), expected)[0, 0]
    official = tensors["prompt_frame"]
    assert official.float().std() > 10
    assert_parity(frame, official, atol=1, what="frame")
    # The whole pipeline in float32, which does not round the DiT's inputs to bf16: within a few levels.
    pipe = get_T2V_pipeline("cpu", cache_dir=weights, dit_params=TINY_DIT_PARAMS, download=False)
    generation = pipe.generate(prompt, time_length=0, width=512, height=512, seed=seed, progress=False)
    assert ((generation.latents - expected).abs().max() / expected.abs().max()).item() < 5e-3
    difference = (generation.frames[0].int() - official.int()).abs()
    assert difference.max() <= 3 and difference.float().mean() < 0.5
