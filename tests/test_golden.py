"""Our DiT and sampler against numbers computed by ai-forever/Kandinsky-4's own code (tests/golden/README.md).

The official DiT and renoise loop ran on the tiny published-layout weights; only their outputs are
committed (tests/golden/official.safetensors). A change to the tiny-weights builder makes these fail
loudly (the golden numbers belong to the old weights), never silently regenerate.
"""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from k4flash.dit import DiffusionTransformer3D
from k4flash.sampler import load_schedule, sample
from k4flash.tiny import TINY_DIT_PARAMS, ensure_tiny_weights, tiny_dit_state_dict

GOLDEN = Path(__file__).parent / "golden" / "official.safetensors"


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
    import sys
    sys.path.insert(0, str(GOLDEN.parent))
    from make_golden import tiny_builder_fingerprint

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
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


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
    assert ((latents - expected).abs().max() / expected.abs().max()).item() <= 1e-5
