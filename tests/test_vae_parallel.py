"""Row-parallel VAE decode (parallel/vae.py) on CPU/gloo: 2 and 4 ranks give the one-rank frames.

Each world size is one spawn (importing diffusers costs ~10 s of CPU per rank on a small machine);
the module fixtures run every case there and the tests below check the pieces.
"""
import logging
import unittest.mock

import pytest
import torch

from k4flash.tiny import TINY_DIT_PARAMS, TINY_VAE_CONFIG, fill_deterministic_
from k4flash.vae import decode_scaled, scaled_latents, to_uint8_frames
from parity import assert_parity, assert_parity_fails
from parallel.spawn import run_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Wider than the tiny VAE, 2 resnets per level (3 per up block), 8 groups of 2-8 channels, and the same
# 3 spatial up levels (2 of them temporal): every layer type of the published decoder.
MID_VAE_CONFIG = dict(TINY_VAE_CONFIG, block_out_channels=(16, 32, 32, 64), layers_per_block=2, norm_num_groups=8)
VAE_CONFIGS = {"tiny": (TINY_VAE_CONFIG, 1), "mid": (MID_VAE_CONFIG, 3)}  # config, weight seed

# name → (VAE, latent frames F, latent height h, latent width w, latent seed). F = 3 → 9 frames in one chunk,
# F = 5 → 17 frames in two chunks (the causal cache crosses a chunk), F = 1 → an image.
CASES = {
    "tiny-video": ("tiny", 3, 8, 6, 0),
    "tiny-two-chunks": ("tiny", 5, 8, 6, 1),
    "tiny-image": ("tiny", 1, 8, 6, 2),
    "mid-video": ("mid", 3, 8, 6, 3),
    "mid-image": ("mid", 1, 8, 6, 4),
    "fallback": ("tiny", 3, 6, 6, 5),  # h = 6 on 4 ranks: 3 ranks decode, 2 rows each
}
WORLD_CASES = {2: ["tiny-video", "tiny-two-chunks", "tiny-image", "mid-video", "mid-image"],
               4: ["tiny-video", "tiny-image", "mid-video", "fallback"]}
FLOAT_TOLERANCE = 3e-6  # README and docs/parallel.md: the split decode matches one rank to ≤ 3e-6


def build_vae(name):
    """A VAE with deterministic random weights; the last conv is scaled down so outputs sit mostly in [-1, 1]."""
    from diffusers import AutoencoderKLCogVideoX

    config, seed = VAE_CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        vae = AutoencoderKLCogVideoX(**config)
    fill_deterministic_(vae, seed)
    with torch.no_grad():
        for parameter in vae.decoder.conv_out.parameters():
            parameter.mul_(0.3)
    return vae.eval().requires_grad_(False)


def case_latents(case):
    _, frames, height, width, seed = CASES[case]
    return torch.randn(frames, height, width, 16, generator=torch.Generator().manual_seed(seed))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _local_only_all_gather(tensor, group):
    """all_gather_list without the exchange: every 'neighbour' sends zeros (no halo rows)."""
    return [torch.zeros_like(tensor) for _ in range(torch.distributed.get_world_size(group))]


# comm function → its stand-in that skips the exchange (the halo rows; the GroupNorm statistics)
DROPPED_COLLECTIVES = {"all_gather_list": _local_only_all_gather, "all_reduce_sum": lambda tensor, group: tensor}


def _decode_cases(runtime, cases, tiny_weights):
    """Every case on every rank; rank 0 returns its results, the others whether they got None."""
    from parallel import comm
    from parallel.vae import decode_latents_parallel, parallelize_vae

    logs = _Collect()
    logging.getLogger("k4flash").addHandler(logs)
    vaes = {name: build_vae(name) for name in VAE_CONFIGS}
    plans = {name: parallelize_vae(vae, runtime) for name, vae in vaes.items()}
    out = {}
    for case in cases:
        vae, latents = vaes[CASES[case][0]], case_latents(case)
        comm.STATS.reset()
        video = decode_latents_parallel(vae, latents, as_float=True)
        calls = dict(comm.STATS.calls)
        frames = decode_latents_parallel(vae, latents)
        out[case] = dict(video=video, frames=frames, calls=calls)

    # Negative controls, applied from outside: with one collective dropped (the call kept, its result
    # local only) the split must visibly break.
    for dropped in DROPPED_COLLECTIVES:
        with unittest.mock.patch.object(comm, dropped, DROPPED_COLLECTIVES[dropped]):
            out[f"no-{dropped}"] = decode_latents_parallel(vaes["tiny"], case_latents("tiny-video"), as_float=True)

    # Wrapped but outside a parallel decode, and after remove(): the plain one-rank decode.
    latents = case_latents("tiny-video")
    out["wrapped-one-rank"] = decode_scaled(vaes["tiny"], scaled_latents(vaes["tiny"], latents))
    plans["tiny"].remove()
    out["removed-one-rank"] = decode_scaled(vaes["tiny"], scaled_latents(vaes["tiny"], latents))
    out["removed-state-keys"] = sorted(vaes["tiny"].state_dict())
    out["logs"] = logs.messages

    if tiny_weights is not None:
        out["pipeline"] = _pipeline_cases(runtime, tiny_weights)
    if runtime.rank == 0:
        return out
    # The other ranks: whether each decode returned None there, and what their pipelines loaded.
    flags = {case: out[case]["video"] is None and out[case]["frames"] is None for case in cases}
    if tiny_weights is not None:
        flags["pipeline"] = {on: {k: run[k] for k in ("vae_loaded", "frames")} for on, run in out["pipeline"].items()}
    return flags


def _pipeline_cases(runtime, tiny_weights):
    """The tiny pipeline at TP=2 with vae_parallel on, then off (the same latents: the DiT does not change)."""
    from parallel import comm
    from parallel.rank_pipeline import load_rank_pipeline

    # An image: the video path is test_tp's (frames vs a one-rank pipeline); this one counts and compares.
    request = dict(text="a red square", time_length=0, width=512, height=512, seed=11, progress=False)
    result = {}
    for vae_parallel in (True, False):
        pipe = load_rank_pipeline("cpu", cache_dir=tiny_weights, dit_params=TINY_DIT_PARAMS, download=False,
                                  runtime=runtime, vae_parallel=vae_parallel)
        comm.STATS.reset()
        gen = pipe.generate(**request)
        result[vae_parallel] = dict(latents=gen.latents, frames=gen.frames, calls=dict(comm.STATS.calls),
                                    timings=gen.timings, vae_loaded=pipe.vae is not None)
    return result


def _reference(case):
    vae = build_vae(CASES[case][0])
    with torch.no_grad():
        video = decode_scaled(vae, scaled_latents(vae, case_latents(case)))
    return video, to_uint8_frames(video)


@pytest.fixture(scope="module")
def references():
    return {case: _reference(case) for case in CASES}


@pytest.fixture(scope="module")
def two_ranks(tiny_weights):
    return run_ranks(2, _decode_cases, WORLD_CASES[2], tiny_weights)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(4, _decode_cases, WORLD_CASES[4], None)


@pytest.fixture(params=[2, 4])
def world_results(request):
    return request.param, request.getfixturevalue({2: "two_ranks", 4: "four_ranks"}[request.param])


def test_references_are_meaningful(references):
    """The one-rank outputs use the range (not saturated, not flat): differences would show."""
    for video, frames in references.values():
        assert 0.3 < video.std() < 0.8 and (video.abs() < 1).float().mean() > 0.9
        assert ((frames > 0) & (frames < 255)).float().mean() > 0.8


def test_split_decode_gives_the_one_rank_video(world_results, references):
    world, results = world_results
    for case in WORLD_CASES[world]:
        video, frames = results[0][case]["video"], results[0][case]["frames"]
        expected_video, expected_frames = references[case]
        assert video.shape == expected_video.shape and frames.shape == expected_frames.shape
        assert_parity(video, expected_video, atol=FLOAT_TOLERANCE, what=f"{case} video")
        # Only values within the float tolerance of a truncation boundary (k/255) may land one level apart.
        differing = frames != expected_frames
        assert_parity(frames, expected_frames, atol=1, what=f"{case} frames")
        assert differing.float().mean() < 1e-3, case
        if differing.any():
            levels = (expected_video.clamp(-1, 1)[differing.permute(0, 4, 1, 2, 3)] + 1) / 2 * 255
            assert (levels - levels.round()).abs().max() < FLOAT_TOLERANCE * 255 / 2, case
        for rank_result in results[1:]:  # frames come back on the group's first rank only
            assert rank_result[case] is True


def test_fallback_to_the_largest_divisor_of_the_latent_height(four_ranks):
    # h = 6 on 4 ranks: 3 ranks decode 2 rows each, the 4th returns at once, and rank 0 says so.
    assert [r["fallback"] is True for r in four_ranks[1:]] == [True, True, True]
    assert four_ranks[0]["fallback"]["calls"]["gather"] == 1
    assert any("latent height 6" in m and "decoding on 3 rank(s)" in m for m in four_ranks[0]["logs"])
    assert not any("latent height 8" in m for m in four_ranks[0]["logs"])


def test_dropping_halos_or_the_group_norm_all_reduce_breaks_it(world_results, references):
    world, results = world_results
    expected = references["tiny-video"][0]
    for dropped in DROPPED_COLLECTIVES:
        assert_parity_fails(results[0][f"no-{dropped}"], expected, atol=FLOAT_TOLERANCE)


def _decoder_collectives(vae):
    """One chunk: an all_gather of halo rows per 3×3 conv, an all_reduce per GroupNorm, one gather of the rows."""
    convs = sum(1 for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
                and m.kernel_size[-2] == 3)
    norms = sum(1 for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm))
    return {"all_gather": convs, "all_reduce": norms, "gather": 1}


def test_collectives_are_counted(two_ranks):
    assert two_ranks[0]["tiny-video"]["calls"] == _decoder_collectives(build_vae("tiny"))  # 25, 21, 1
    assert two_ranks[0]["mid-video"]["calls"] == _decoder_collectives(build_vae("mid"))


def test_wrapping_is_transparent_outside_a_split_and_removable(two_ranks, references):
    expected = references["tiny-video"][0]
    assert_parity(two_ranks[0]["wrapped-one-rank"], expected, atol=1e-5, what="wrapped, one rank")
    assert_parity(two_ranks[0]["removed-one-rank"], expected, atol=0, what="unwrapped")
    assert two_ranks[0]["removed-state-keys"] == sorted(build_vae("tiny").state_dict())


def test_pipeline_decodes_on_both_ranks_and_gives_the_one_rank_frames(two_ranks, tiny_weights):
    from k4flash.vae import decode_latents, load_vae

    runs, other_rank = two_ranks[0]["pipeline"], two_ranks[1]["pipeline"]
    vae = load_vae(tiny_weights / "vae")
    expected = decode_latents(vae, runs[True]["latents"])[0]  # one rank's decode of the same latents
    assert torch.equal(runs[True]["latents"], runs[False]["latents"])
    for vae_parallel, run in runs.items():
        assert run["frames"].shape == expected.shape == (1, 512, 512, 3)
        assert_parity(run["frames"], expected, atol=1, what=f"frames, vae.parallel={vae_parallel}")
        assert (run["frames"] != expected).float().mean() < 1e-4
        assert run["timings"]["decode_s"] > 0 and run["vae_loaded"]
    # On: rank 1 loads the VAE and decodes too, frames come back on rank 0. Off: as before the issue.
    assert other_rank == {True: {"vae_loaded": True, "frames": None}, False: {"vae_loaded": False, "frames": None}}
    decode_calls = {op: runs[True]["calls"][op] - runs[False]["calls"].get(op, 0) for op in runs[True]["calls"]}
    decode_calls = {op: count for op, count in decode_calls.items() if count}
    assert decode_calls == _decoder_collectives(vae)  # the DiT's and the text broadcast are the same in both


def test_vae_parallel_config_key_reaches_the_parallel_build(monkeypatch):
    from pathlib import Path

    from omegaconf import OmegaConf

    import parallel.rank_pipeline
    from launch.generate import build_pipeline
    from launch.config import ModelConfig, RunConfig, VAEConfig
    from parallel.runtime import Runtime

    assert RunConfig().vae.parallel is True  # on by default (the schema is the one source of defaults)
    seen = {}
    monkeypatch.setattr(parallel.rank_pipeline, "load_rank_pipeline", lambda device, **kwargs: seen.update(kwargs))
    for value in (True, False):
        cfg = OmegaConf.structured(RunConfig(model=ModelConfig(name="tiny"), vae=VAEConfig(parallel=value)))
        build_pipeline(cfg, Runtime(world_size=2), torch.float32, Path("weights"))
        assert seen["vae_parallel"] is value


@pytest.mark.parametrize("change", ["replicate padding", "stride 2", "unknown layer"])
def test_layers_the_row_split_cannot_make_exact_are_refused(change):
    from parallel.vae import RowParallelVAE, RowShardedGroupNorm

    vae = build_vae("tiny")
    conv = vae.decoder.up_blocks[0].resnets[0].conv1.conv
    if change == "replicate padding":
        conv.padding_mode = "replicate"
    elif change == "stride 2":
        conv.stride = (1, 2, 2)
    else:
        vae.decoder.conv_act = torch.nn.Upsample(scale_factor=2)  # a leaf that may mix rows
    paddings = [m.padding for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    with pytest.raises(NotImplementedError, match="decoder"):
        RowParallelVAE(vae, {1: None}, index=0, rank=0)
    # Refused before use, and left as loaded: no hooks, paddings and norms restored.
    assert not any(isinstance(m, RowShardedGroupNorm) for m in vae.modules())
    assert paddings == [m.padding for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert not any(m._forward_pre_hooks for m in vae.modules()) and not hasattr(vae, "_k4flash_row_parallel")


def _groups_made(runtime, heights):
    """Process groups this rank is in: after the mesh, after parallelize_vae, and after decodes at `heights`."""
    import torch.distributed as dist

    from parallel.vae import decode_latents_parallel, parallelize_vae

    def count():
        return len(dist.distributed_c10d._world.pg_map)

    counts = [count()]
    vae = build_vae("tiny")
    parallelize_vae(vae, runtime)
    counts.append(count())
    for height in heights:
        decode_latents_parallel(vae, torch.zeros(1, height, 4, 16))
        counts.append(count())
    return counts


@pytest.mark.parametrize("world, tp, heights, expected", [
    # One TP group is the world's own group; the group of 3 ranks (h = 6 on 4) is made once, at first use,
    # and only ranks 0-2 are in it.
    (4, 4, [8, 6, 6], [[1, 1, 1, 2, 2]] * 3 + [[1, 1, 1, 1, 1]]),
    (4, 2, [8], [[2, 2, 2]] * 4),  # the world's group and this rank's TP group; tp = 2 needs no smaller one
    (4, 1, [], [[1, 1]] * 4),  # pure data parallelism: no group beyond the world's
])
def test_communicators_are_made_only_where_needed(world, tp, heights, expected):
    """Groups per rank, counted (each is an NCCL communicator on GPU). Before: 4 at (4, tp 4), 3 at (4, tp 2),
    2 at (4, tp 1), 8 at (8, tp 8): a TP group duplicating the world, and every smaller VAE group up front."""
    assert run_ranks(world, _groups_made, heights, tp=tp) == expected
