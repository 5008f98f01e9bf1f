"""Sequence-parallel TP, Ulysses and hybrid meshes on CPU/gloo (docs/parallel.md "Sequence sharding").

Every plan against one rank (tiny and mid configs, 2 and 4 ranks, token counts that need padding,
an image and a video), each check shown to fail when a collective is dropped or a slice shifted;
the collectives each rank counts against the cost model's prediction; one rank's FLOPs and
memory-bound bytes against the meta-device count the planner uses. One spawned world per size.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel import cost
from k4flash.dit import DiffusionTransformer3D
from k4flash.tiny import TINY_DIT_PARAMS, fill_deterministic_
from parallel.plan import allowed_ulysses_degrees, validate_plan_degrees, validate_world

from parity import assert_parity, parity_holds
from parallel.spawn import free_port, run_ranks

ENTRY = Path(__file__).resolve().parents[1] / "run_inference_distil.py"
MID_PARAMS = dict(in_visual_dim=16, in_text_dim=64, out_visual_dim=16, time_dim=128, patch_size=(1, 2, 2),
                  model_dim=256, ff_dim=1024, num_blocks=2, axes_dims=(8, 12, 12))  # 8 heads of 32
CONFIGS = {"tiny": TINY_DIT_PARAMS, "mid": MID_PARAMS}
# (config, latent (F, H, W), text tokens): S = N + L divides by neither 2 nor 4 in the padded cases.
INPUTS = {
    "video": ("tiny", (3, 8, 12), 21),  # 72 + 21 = 93 tokens
    "image": ("tiny", (1, 8, 12), 23),  # 24 + 23 = 47 tokens
    "even": ("tiny", (2, 8, 12), 16),  # 48 + 16 = 64 tokens: no padding
    "mid": ("mid", (3, 16, 24), 37),  # 288 + 37 = 325 tokens
}
# (ulysses, tp, sequence_parallel) per world size
PLANS = {2: [(1, 2, False), (1, 2, True), (2, 1, False)],
         4: [(1, 4, True), (4, 1, False), (2, 2, False), (2, 2, True)]}
BREAKS = ("all_to_all", "reduce_scatter", "all_gather", "shifted_shard", "all_reduce")


def _state(config):
    return fill_deterministic_(DiffusionTransformer3D(**CONFIGS[config]), seed=1).state_dict()


def _inputs(name):
    config, latent, text = INPUTS[name]
    g = torch.Generator().manual_seed(5)
    params = CONFIGS[config]
    return (torch.randn(1, *latent, params["in_visual_dim"], generator=g),
            torch.randn(1, text, params["in_text_dim"], generator=g), torch.tensor([749.0]))


def _broken(name):
    """A context in which one collective (or the shard index) is wrong but every shape still fits."""
    import contextlib

    from parallel import comm, sequence

    @contextlib.contextmanager
    def patch(module, attr, fn):
        saved = getattr(module, attr)
        setattr(module, attr, fn)
        try:
            yield
        finally:
            setattr(module, attr, saved)

    if name == "all_to_all":  # blocks stay where they are
        return patch(comm, "all_to_all", lambda tensor, group: tensor.contiguous())
    if name == "reduce_scatter":  # this rank's slice of its own partial sum, never added to the others'
        def local_slice(tensor, group):
            k = torch.distributed.get_world_size(group)
            return tensor.unflatten(1, (k, -1))[:, torch.distributed.get_group_rank(group, torch.distributed.get_rank())]
        return patch(comm, "reduce_scatter_tokens", local_slice)
    if name == "all_gather":  # this rank's tokens repeated in place of its peers'
        return patch(comm, "all_gather_tokens", lambda tensor, group: tensor.repeat(
            1, torch.distributed.get_world_size(group), 1))
    if name == "all_reduce":
        return patch(comm, "all_reduce_sum", lambda tensor, group: tensor)
    if name == "shifted_shard":  # each rank takes its neighbour's tokens
        original = sequence.SequenceShards.split

        def shifted(self, tokens):
            self.index = (self.index + 1) % self.count
            try:
                return original(self, tokens)
            finally:
                self.index = (self.index - 1) % self.count
        return patch(sequence.SequenceShards, "split", shifted)
    raise KeyError(name)


def _world_cases(runtime):
    """Every plan of this world size on every input, plus the broken variants; on this rank."""
    from parallel import comm
    from parallel.rank_work import measure_rank_work
    from parallel.runtime import model_group_meshes
    from parallel.tp import parallelize_dit

    world, out = runtime.world_size, {}
    for ulysses, tp, sp in PLANS[world]:
        _, mesh = model_group_meshes("cpu", world, ulysses, tp)
        models = {}
        for config in CONFIGS:
            model = DiffusionTransformer3D(**CONFIGS[config]).eval()
            model.load_state_dict(_state(config))
            models[config] = parallelize_dit(model, mesh, sequence_parallel=sp)
        for name in INPUTS:
            model, inputs = models[INPUTS[name][0]], _inputs(name)
            comm.STATS.reset()
            with torch.no_grad():
                output = model(*inputs)
            work = measure_rank_work(model, inputs, bytes_per_element=4) if name in ("video", "mid") else None
            out[(ulysses, tp, sp, name)] = dict(output=output, calls=dict(comm.STATS.calls), bytes=comm.STATS.bytes,
                                                work=work)
        for name in BREAKS:
            with _broken(name), torch.no_grad():
                out[(ulysses, tp, sp, "broken", name)] = models["tiny"](*_inputs("video"))
    return out


@pytest.fixture(scope="module")
def worlds():
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = run_ranks(world, _world_cases, tp=world)
        return cache[world]
    return get


@pytest.fixture(scope="module")
def one_rank():
    out = {}
    for name in INPUTS:
        model = DiffusionTransformer3D(**CONFIGS[INPUTS[name][0]]).eval()
        model.load_state_dict(_state(INPUTS[name][0]))
        with torch.no_grad():
            out[name] = model(*_inputs(name))
    return out


def _tolerance(want):
    """Every plan against one rank: within 1e-5 of the output's largest magnitude (float32 sums in another order)."""
    return dict(atol=1e-5 * want.abs().max().item())


ALL = [(world, *plan) for world, plans in PLANS.items() for plan in plans]


@pytest.mark.slow
@pytest.mark.parametrize("world, ulysses, tp, sp", ALL)
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_every_plan_gives_the_one_rank_output(world, ulysses, tp, sp, name, worlds, one_rank):
    expected = one_rank[name]
    for rank in worlds(world):
        assert_parity(rank[(ulysses, tp, sp, name)]["output"], expected, **_tolerance(expected),
                      what=f"{name} on ulysses={ulysses} tp={tp} sp={sp}")


# which breaks touch a collective each plan uses (others leave the output as it was)
def _breaks_that_apply(ulysses, tp, sp):
    used = {"shifted_shard"} if ulysses > 1 or sp else set()
    if ulysses > 1:
        used |= {"all_to_all", "all_gather"}
    if tp > 1:
        used |= {"reduce_scatter", "all_gather"} if sp else {"all_reduce"}
    return sorted(used)


@pytest.mark.parametrize("world, ulysses, tp, sp", ALL)
def test_each_check_fails_when_a_collective_is_dropped_or_a_slice_shifted(world, ulysses, tp, sp, worlds, one_rank):
    expected = one_rank["video"]
    ranks = worlds(world)
    for name in BREAKS:
        holds = [parity_holds(rank[(ulysses, tp, sp, "broken", name)], expected, **_tolerance(expected))
                 for rank in ranks]
        if name in _breaks_that_apply(ulysses, tp, sp):
            assert not all(holds), name  # the parity check above fails on some rank
        else:
            assert all(holds), name  # this plan does not use it: unchanged


@pytest.mark.parametrize("world, ulysses, tp, sp", ALL)
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_collectives_counted_equal_the_cost_model(world, ulysses, tp, sp, name, worlds):
    config, latent, text = INPUTS[name]
    predicted = cost.dit_plan_comm(CONFIGS[config], tp, ulysses, sp, latent, text, bytes_per_element=4)
    for rank in worlds(world):
        measured = rank[(ulysses, tp, sp, name)]
        assert measured["calls"] == predicted["calls"]
        assert measured["bytes"] == predicted["payload_bytes"]


@pytest.mark.parametrize("world, ulysses, tp, sp", ALL)
@pytest.mark.parametrize("name", ["video", "mid"])
def test_meta_count_of_one_rank_equals_the_real_rank(world, ulysses, tp, sp, name, worlds):
    """The planner's meta-device count (parallel/rank_work.py) is what the busiest real rank does: FLOPs,
    memory-bound bytes and collectives, exactly. (The first rank is the busiest: the visual tokens
    lead the sequence, and only they go through the output layer.)"""
    from parallel.plan import Plan
    from parallel.rank_work import rank_work

    config, latent, text = INPUTS[name]
    counted = rank_work(CONFIGS[config], Plan(tp, ulysses, sp), latent, text, dtype=torch.float32)
    works = [rank[(ulysses, tp, sp, name)]["work"] for rank in worlds(world)]
    assert max(w["flops"] for w in works) == works[0]["flops"] == counted["flops"]
    assert max(w["memory_bytes"] for w in works) == works[0]["memory_bytes"] == counted["memory_bytes"]
    for work in works:
        assert work["calls"] == counted["calls"] and work["comm_bytes"] == counted["comm_bytes"]


def test_the_one_rank_count_equals_the_flop_formula_and_the_split_divides_the_work():
    from parallel.plan import Plan
    from parallel.rank_work import rank_work

    one = rank_work(MID_PARAMS, Plan(), (3, 16, 24), 37, dtype=torch.float32)
    assert one["flops"] == pytest.approx(cost.dit_flops(MID_PARAMS, (3, 16, 24), 37)["total"], rel=0.01)
    for plan in (Plan(4, 1, True), Plan(1, 4), Plan(2, 2, True)):
        split = rank_work(MID_PARAMS, plan, (3, 16, 24), 37, dtype=torch.float32)
        assert one["flops"] / split["flops"] > 3.8 and one["memory_bytes"] / split["memory_bytes"] > 3.2, plan
    plain = rank_work(MID_PARAMS, Plan(4), (3, 16, 24), 37, dtype=torch.float32)
    assert one["memory_bytes"] / plain["memory_bytes"] < 2  # plain TP repeats the elementwise work on every rank


def test_degrees_are_refused_before_loading_with_the_allowed_ones():
    assert allowed_ulysses_degrees(TINY_DIT_PARAMS, tp=2, limit=8) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"Ulysses degree 3 with tp=1 leaves 8/3 heads .*allowed ulysses degrees "
                                         r"at tp=1: \[1, 2, 4, 8"):
        validate_plan_degrees(TINY_DIT_PARAMS, 1, 3)
    with pytest.raises(ValueError, match=r"Ulysses degree 8 with tp=2 .*\[1, 2, 4\]"):
        validate_plan_degrees(TINY_DIT_PARAMS, 2, 8)
    published = dict(model_dim=3072, ff_dim=12288, axes_dims=(16, 24, 24))  # 48 heads
    assert allowed_ulysses_degrees(published, tp=2, limit=8) == [1, 2, 3, 4, 6, 8]
    assert validate_world(8, None, 2) == 4 and validate_world(8, 2, 2) == 2
    with pytest.raises(ValueError, match=r"parallel.tp=4 with parallel.ulysses=4 does not divide the world size 8; "
                                         r"allowed tp: \[1, 2\]"):
        validate_world(8, 4, 4)
    with pytest.raises(ValueError, match=r"parallel.ulysses=3 does not divide the world size 8"):
        validate_world(8, None, 3)


def test_a_2d_mesh_must_be_named_ulysses_tp():
    from parallel.tp import dit_mesh_coords

    class Mesh:
        ndim, mesh_dim_names = 2, ("dp", "tp")
    with pytest.raises(ValueError, match=r"mesh_dim_names \('ulysses', 'tp'\), got \('dp', 'tp'\)"):
        dit_mesh_coords(Mesh())


def test_shards_put_padding_last_and_count_each_shards_visual_tokens():
    from parallel.sequence import SequenceShards

    counts = []
    for index in range(4):
        shards = SequenceShards([(None, index // 2, 2), (None, index % 2, 2)])  # (ulysses, tp): u-major
        part, local_visual = shards.shard(torch.arange(93.0)[None, :, None], num_visual=72)  # the DiT's seam
        assert (shards.count, shards.index, shards.padded, shards.local) == (4, index, 96, 24)
        counts.append(local_visual)
        assert part[0, :, 0].tolist() == [float(i) if i < 93 else 0.0 for i in range(24 * index, 24 * index + 24)]
    assert counts == [24, 24, 24, 0]


# --- the CLI under torchrun runs each plan with the one-rank latents ---------------------------------------------

PROMPTS = '{"prompt": "a red square", "seed": 3, "time_length": 0, "width": 512, "height": 512}\n' \
          '{"prompt": "a blue circle", "seed": 4, "time_length": 0, "width": 672, "height": 384}\n'
CLI_PLANS = {"one": (1, []), "ulysses2": (2, ["parallel.ulysses=2"]),
             "tp2sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
             "u2tp2sp": (4, ["parallel.ulysses=2", "parallel.sequence_parallel=true"]),
             "dp2_ulysses2": (4, ["parallel.ulysses=2", "parallel.tp=1"]), "auto": (4, ["parallel.plan=auto"])}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_cache):
    import os
    root = tmp_path_factory.mktemp("plans_cli")
    (root / "prompts.jsonl").write_text(PROMPTS)
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    runs = {}
    for name, (world, overrides) in CLI_PLANS.items():
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
                    str(free_port())] if world > 1 else []
        result = subprocess.run([sys.executable, *launcher, str(ENTRY), "model=tiny", f"prompts_file={root}/prompts.jsonl",
                                 f"output_dir={root / name}", "save_latents=true", "progress=false", *overrides],
                                cwd=root, env=env, capture_output=True, text=True, timeout=400)
        runs[name] = (result, root / name)
    return runs


@pytest.mark.slow  # six torchrun launches (17 ranks): minutes on 2 cores
@pytest.mark.parametrize("name", [n for n in CLI_PLANS if n != "one"])
def test_the_cli_runs_each_plan_with_the_one_rank_latents(name, cli_runs):
    result, out = cli_runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sorted(cli_runs["one"][1].glob("*.latents.safetensors"))
    assert len(expected) == 2
    for one in expected:
        want = load_file(str(one))["latents"]
        assert_parity(load_file(str(out / one.name))["latents"], want, **_tolerance(want), what=f"latents of {one.name}")
    log = result.stdout + result.stderr
    layout = {"ulysses2": "dp 1 x ulysses 2 x tp 1)", "tp2sp": "dp 1 x ulysses 1 x tp 2 + sequence parallel)",
              "u2tp2sp": "dp 1 x ulysses 2 x tp 2 + sequence parallel)", "dp2_ulysses2": "dp 2 x ulysses 2 x tp 1)"}
    if name == "auto":
        assert "parallel.plan=auto on 4 GPU(s), no memory limit:" in log and "choices considered" in log
    else:
        assert layout[name] in log, log[-2000:]
    if name == "dp2_ulysses2":  # the second model group (ranks 2-3) took the second prompt; its first rank wrote it
        assert "rank 2: wrote" in log and "batch finished in" in log


# --- the planner's offload and FP8 choices through launch/planning.py choose() ------------------------------------

def _choose(monkeypatch, overrides, device_type="cuda"):
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    from launch.config import register_configs
    from launch.planning import choose, request_plan

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    register_configs()
    with initialize_config_dir(config_dir=str(ENTRY.parent / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    video = SimpleNamespace(time_length=12, width=672, height=384)  # the published geometry
    return choose(cfg, request_plan(cfg), video, SimpleNamespace(type=device_type))


def test_choose_offloads_the_dit_only_when_the_gpu_needs_it_and_never_quantizes(monkeypatch, caplog):
    from parallel.plan import Plan

    with caplog.at_level("INFO", logger="k4flash"):
        assert _choose(monkeypatch, ["parallel.gpu_memory_gb=24"]) == (Plan(), "after_encode", "during_decode")
    assert "text_encoder.offload=auto, dit.offload=auto on 1 GPU(s), 24 GB each: tp=1, " \
           "text_encoder.offload=after_encode, dit.offload=during_decode (predicted 6.63 s per video" in caplog.text
    assert _choose(monkeypatch, ["parallel.gpu_memory_gb=80"]) == (Plan(), "none", "none")
    assert _choose(monkeypatch, ["parallel.gpu_memory_gb=24", "dit.quantize=fp8"]) == (Plan(), "after_encode", "none")
    assert _choose(monkeypatch, ["parallel.gpu_memory_gb=24", "prompts_file=p.jsonl"])[2] == "during_decode"
    assert _choose(monkeypatch, ["parallel.gpu_memory_gb=24"], "cpu") == (Plan(), "none", "none")  # no planner
    assert _choose(monkeypatch, ["dit.offload=during_decode", "text_encoder.offload=none"]) \
        == (Plan(), "none", "during_decode")  # given: kept
    from launch.checks import UsageError
    with pytest.raises(UsageError, match=r"with dit.quantize=fp8 it would fit in 14\.0 GB"):
        _choose(monkeypatch, ["parallel.plan=auto", "parallel.gpu_memory_gb=15"])


def test_fp8_matmuls_run_at_the_fp8_rate_and_their_flops_are_the_blocks_linears():
    from k4flash.published import PUBLISHED_DIT_PARAMS
    from parallel.plan import Plan
    from parallel.planner import predict_plan
    from parallel.rank_work import rank_work

    flops = cost.dit_flops(PUBLISHED_DIT_PARAMS)
    blocks = flops["qkv"] + flops["attention_out"] + flops["mlp"]  # the four quantized linears of every block
    gpu, mfu = cost.H100_SXM, 0.5
    for fp8_skip, kept in (((), 0), ((0, -1), 2)):
        fp8 = predict_plan(PUBLISHED_DIT_PARAMS, Plan(), gpu, mfu, quantize="fp8", fp8_skip=fp8_skip)
        assert fp8["rank_fp8_flops"] == pytest.approx(blocks * (42 - kept) / 42, rel=1e-9)
        assert fp8["dit_step_compute_s"] == pytest.approx(
            (fp8["rank_flops"] - fp8["rank_fp8_flops"]) / (gpu.peak_bf16_flops * mfu)
            + fp8["rank_fp8_flops"] / (gpu.peak_fp8_flops * mfu))
    bf16 = predict_plan(PUBLISHED_DIT_PARAMS, Plan(), gpu, mfu)
    assert bf16["rank_fp8_flops"] == 0 and fp8["rank_flops"] == bf16["rank_flops"]
    # eager: the input quantization's passes (k4flash/fp8.py quantize_rows: |max| per token, a float32 copy
    # divided and clamped in place, the e4m3 write; ~30 bytes per input element at their own sizes, ~20 if all
    # were counted at bf16's 2) and the bias add are memory-bound traffic the bf16 forward does not have
    inputs = rank_work(PUBLISHED_DIT_PARAMS, Plan(), quantize="fp8", fp8_skip=(0, -1))["fp8_input_elements"]
    S, D, F = 25_424, PUBLISHED_DIT_PARAMS["model_dim"], PUBLISHED_DIT_PARAMS["ff_dim"]
    assert inputs == 40 * S * (3 * D + F)  # QKV, attention out and MLP in take D features, MLP out F
    assert fp8["rank_memory_bound_bytes"] - bf16["rank_memory_bound_bytes"] > 30 * inputs
    with pytest.raises(ValueError, match="no FP8 tensor cores"):
        cost.predict(gpu=cost.GPU("A100", 312e12, 2e12, 300e9, 1e-5), rank_flops=1e12, rank_fp8_flops=1e11,
                     vae=cost.PUBLISHED_VAE_DECODE)
