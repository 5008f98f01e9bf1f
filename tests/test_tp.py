"""Tensor-parallel DiT on CPU/gloo: parity with one rank, the collective budget, sharded loading.

One spawned world per size (`worlds`): each rank runs every case of that size in one process, since
starting ranks (importing torch, transformers and diffusers) costs more than the cases themselves.
"""
import contextlib

import pytest
import torch

from k4flash.dit import DiffusionTransformer3D
from k4flash.tiny import TINY_DIT_PARAMS, tiny_dit_state_dict
from parallel import allowed_tp_degrees, parallelize_dit, validate_tp_degree

from parity import assert_parity, assert_parity_fails
from parallel.spawn import run_ranks

# Sharded forwards against one rank: float32 sums in another order
FORWARD_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 8, 12, 16, generator=g)
    text = torch.randn(1, 24, TINY_DIT_PARAMS["in_text_dim"], generator=g)
    return x, text, torch.tensor([749.0])


def _sharded_forward(runtime, state, compiled=False, model=None):
    """This rank's output of one forward (after a warm-up), its collectives, its parameter count. model: an
    already sharded model (else the one-rank model built from state, then parallelized)."""
    from parallel import comm
    if model is None:
        model = DiffusionTransformer3D(**TINY_DIT_PARAMS).eval()
        model.load_state_dict(state)
        parallelize_dit(model, runtime.dit_mesh)
    if compiled:  # aot_eager: dynamo's graphs without inductor's code generation (fast on CPU)
        model.compile_blocks(backend="aot_eager")
    local_params = sum(p.numel() for p in model.parameters())
    x, text, t = _inputs()
    with torch.no_grad():
        model(x, text, t)  # warm-up, then count one forward
        comm.STATS.reset()
        out = model(x, text, t)
    return out, dict(comm.STATS.calls), local_params


@pytest.fixture(scope="module")
def one_rank_forward():
    """(output, parameter count) of the unsharded tiny DiT on _inputs(): the reference of every forward here."""
    model = DiffusionTransformer3D(**TINY_DIT_PARAMS).eval()
    model.load_state_dict(tiny_dit_state_dict(0))
    with torch.no_grad():
        return model(*_inputs()), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("world", [2, 4, 8])
def test_sharded_forward_equals_one_rank_within_budget(world, worlds, one_rank_forward):
    expected, full_params = one_rank_forward
    results = [rank["forward"] for rank in worlds(world)]
    num_blocks = 2 * TINY_DIT_PARAMS["num_blocks"]
    for out, calls, local_params in results:
        assert_parity(out, expected, **FORWARD_TOLERANCE, what="velocity")
        assert calls == {"all_reduce": 2 * num_blocks, "all_gather": 1}  # 2 per block + 1 per forward
        assert local_params < full_params * 0.75
    assert all(torch.equal(results[0][0], r[0]) for r in results)  # every rank holds the same velocity


def test_degrees_that_do_not_divide_are_named():
    assert allowed_tp_degrees(TINY_DIT_PARAMS, limit=8) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match=r"degree 3 does not divide the DiT \(heads=8, ff_dim=256.*allowed degrees: \[1, 2, 4, 8"):
        validate_tp_degree(TINY_DIT_PARAMS, 3)
    published = dict(model_dim=3072, ff_dim=12288, axes_dims=(16, 24, 24))
    assert 8 in allowed_tp_degrees(published) and 5 not in allowed_tp_degrees(published)


def _pipeline_run(runtime, weights, request):
    from k4flash import get_T2V_pipeline  # WORLD_SIZE > 1: builds this rank's sharded pipeline
    pipe = get_T2V_pipeline("cpu", cache_dir=weights, dit_params=TINY_DIT_PARAMS, download=False)
    loaded = {"text_encoder": pipe.text_encoder is not None, "vae": pipe.vae is not None}
    gen = pipe.generate(**request, progress=False)
    return gen.latents, gen.frames, loaded


# A short video through TP=2 (frames compared), an image through TP=4 (latents; decode is the slow part on CPU).
REQUESTS = {2: dict(text="a red square", time_length=1, width=512, height=512, seed=11),
            4: dict(text="a red square", time_length=0, width=672, height=384, seed=12)}


@pytest.fixture(scope="module")
def one_rank_pipe(tiny_weights):
    from k4flash import get_T2V_pipeline
    return get_T2V_pipeline("cpu", cache_dir=tiny_weights, dit_params=TINY_DIT_PARAMS, download=False)


@pytest.mark.parametrize("world", sorted(REQUESTS))
def test_tp_pipeline_gives_the_one_rank_video(world, worlds, one_rank_pipe):
    expected = one_rank_pipe.generate(**REQUESTS[world], progress=False)
    results = [rank["pipeline"] for rank in worlds(world)]
    for rank, (latents, frames, loaded) in enumerate(results):
        assert_parity(latents, expected.latents, **FORWARD_TOLERANCE, what="latents")
        # T5 lives on rank 0 only; the VAE on every rank, which decodes a band of rows (vae.parallel, default on)
        assert loaded == {"text_encoder": rank == 0, "vae": True}
        assert (frames is not None) == (rank == 0)
    assert_parity(results[0][1], expected.frames, atol=1, what="frames")  # one level: float32 rounding at .5


def _load_shard(runtime, checkpoint):
    """This rank's loaded shard, and the forward of the model it makes."""
    from parallel.load import load_dit_sharded
    model = load_dit_sharded(TINY_DIT_PARAMS, checkpoint, runtime.dit_mesh).eval()
    return {k: v.clone() for k, v in model.state_dict().items()}, _sharded_forward(runtime, None, model=model)[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_weights):
    """The tiny DiT as the published .pt, and as a .pt whose .safetensors sibling is the one read."""
    from parallel.convert import convert
    state = tiny_dit_state_dict(0)
    folders = {fmt: tmp_path_factory.mktemp(fmt) for fmt in ("pt", "safetensors")}
    for folder in folders.values():
        torch.save(state, folder / "kandinsky4_distil_512.pt")
    converted = convert(folders["safetensors"] / "kandinsky4_distil_512.pt")
    assert converted == folders["safetensors"] / "kandinsky4_distil_512.safetensors"
    (folders["safetensors"] / "kandinsky4_distil_512.pt").write_bytes(b"not read: the safetensors sibling is preferred")
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):  # a whole weights folder for the pipeline
        (folders["safetensors"] / component).symlink_to(tiny_weights / component, target_is_directory=True)
    return {fmt: folder / "kandinsky4_distil_512.pt" for fmt, folder in folders.items()}


def _without_reduction():
    """Negative control: every row-parallel all-reduce keeps this rank's partial sum (the call still counted)."""
    from unittest import mock

    from parallel import comm

    def counted_but_not_reduced(tensor, group):
        comm._record("all_reduce", tensor, group)
        return tensor
    return mock.patch.object(comm, "all_reduce_sum", counted_but_not_reduced)


def _neighbours_slice():
    """Negative control: each rank loads the next rank's rows of every column-parallel tensor. (Shifting the
    row-parallel columns as well would only relabel the ranks: the same sum.)"""
    from unittest import mock

    from parallel import load, tp
    take = load.take_shard
    return mock.patch.object(load, "take_shard", lambda read, style, kind, shape, rank, world: take(
        read, style, kind, shape, rank if style == tp.ROWWISE else (rank + 1) % world, world))


class _CountingSafetensors:
    """safetensors.safe_open, counting the bytes each slice copies out of the file (safetensors reads only the
    requested region): what a rank reads from disk, whatever the loader does with it afterwards. Only files
    named `only` when given (the DiT's, not the VAE's)."""

    def __init__(self, safe_open, counter, only=None):
        self.safe_open, self.counter, self.only = safe_open, counter, only

    def __call__(self, *args, **kwargs):
        opened = self.safe_open(*args, **kwargs)
        if self.only is not None and not str(args[0] if args else kwargs["filename"]).endswith(self.only):
            return opened
        return _CountingFile(opened, self.counter)


class _CountingFile:
    def __init__(self, file, counter):
        self.file, self.counter = file, counter

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_slice(self, key):
        return _CountingSlice(self.file.get_slice(key), self.counter)


class _CountingSlice:
    def __init__(self, piece, counter):
        self.piece, self.counter = piece, counter

    def get_shape(self):
        return self.piece.get_shape()

    def get_dtype(self):
        return self.piece.get_dtype()

    def __getitem__(self, index):
        tensor = self.piece[index]
        self.counter[0] += tensor.numel() * tensor.element_size()
        return tensor


def _bytes_read(runtime, checkpoint):
    """Bytes this rank copies out of the .safetensors file while loading its shard, and the shard's own bytes."""
    from unittest import mock

    import safetensors

    from parallel.load import load_dit_sharded
    read_bytes = [0]
    with mock.patch.object(safetensors, "safe_open", _CountingSafetensors(safetensors.safe_open, read_bytes)):
        model = load_dit_sharded(TINY_DIT_PARAMS, checkpoint, runtime.dit_mesh)
    return read_bytes[0], sum(p.numel() * p.element_size() for p in model.parameters())


def _pipeline_bytes_read(runtime, weights, whole_then_shard=False):
    """Bytes this rank copies out of the DiT's .safetensors while the model card's call (under a launcher: the
    rank's pipeline, through RankRole) builds its pipeline, and the bytes of the DiT it keeps. whole_then_shard:
    the negative control, a role that loads the whole DiT on every rank and shards it afterwards."""
    from unittest import mock

    import safetensors

    from k4flash import get_T2V_pipeline
    from k4flash.weights import load_dit
    from parallel.rank_pipeline import RankRole

    def whole_then_sharded(role, params, checkpoint, device, dtype, **quantization):
        return parallelize_dit(load_dit(params, checkpoint, device=device, dtype=dtype, **quantization),
                               role.runtime.dit_mesh)
    read_bytes = [0]
    counting = _CountingSafetensors(safetensors.safe_open, read_bytes, only="kandinsky4_distil_512.safetensors")
    with mock.patch.object(safetensors, "safe_open", counting), \
            mock.patch.object(RankRole, "load_dit", whole_then_sharded) if whole_then_shard else contextlib.nullcontext():
        pipe = get_T2V_pipeline("cpu", cache_dir=weights, dit_params=TINY_DIT_PARAMS, download=False)
    return read_bytes[0], sum(p.numel() * p.element_size() for p in pipe.dit.parameters())


def _world_cases(runtime, tiny_weights, checkpoints):
    """Every case of this world size, on this rank."""
    world = runtime.world_size
    out = {"forward": _sharded_forward(runtime, tiny_dit_state_dict(0))}
    if world in REQUESTS:
        out["pipeline"] = _pipeline_run(runtime, tiny_weights, REQUESTS[world])
    if world == 2:
        out["loaded"] = {fmt: _load_shard(runtime, path) for fmt, path in checkpoints.items()}
        with _without_reduction():
            out["forward_unreduced"] = _sharded_forward(runtime, tiny_dit_state_dict(0))
            out["pipeline_unreduced"] = _pipeline_run(runtime, tiny_weights, REQUESTS[world])
        with _neighbours_slice():
            out["loaded_shifted"] = _load_shard(runtime, checkpoints["safetensors"])
        out["bytes_read"] = _bytes_read(runtime, checkpoints["safetensors"].with_suffix(".safetensors"))
        weights = checkpoints["safetensors"].parent  # the .safetensors DiT beside the tiny T5, VAE and scheduler
        out["pipeline_bytes_read"] = _pipeline_bytes_read(runtime, weights)
        out["pipeline_bytes_read_whole"] = _pipeline_bytes_read(runtime, weights, whole_then_shard=True)
        out["compiled"] = _sharded_forward(runtime, tiny_dit_state_dict(0), compiled=True)
    return out


@pytest.fixture(scope="module")
def worlds(tiny_weights, checkpoints):
    """worlds(k): the per-rank results of _world_cases on k spawned ranks (spawned once per module)."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = run_ranks(world, _world_cases, tiny_weights, checkpoints)
        return cache[world]
    return get


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_sharded_loading_reads_only_this_ranks_slice(fmt, worlds, one_rank_forward):
    state = tiny_dit_state_dict(0)
    loaded = [rank["loaded"][fmt][0] for rank in worlds(2)]
    qkv = "transformer_blocks.0.0.self_attention.to_query_key_value.weight"
    assert loaded[0][qkv].shape == (3 * 128 // 2, 128)
    # rank 1 holds the second half of q's rows, then of k's, then of v's (read from the file, not the plan)
    assert_parity(loaded[1][qkv][:64], state[qkv][64:128], atol=0, what="rank 1's q rows")
    assert_parity(loaded[1][qkv][64:128], state[qkv][192:256], atol=0, what="rank 1's k rows")
    # and what each rank loaded makes the one-rank model, forward for forward
    for rank in worlds(2):
        assert_parity(rank["loaded"][fmt][1], one_rank_forward[0], **FORWARD_TOLERANCE, what="velocity")


def test_each_tp_check_fails_when_the_reduction_is_dropped_or_the_slice_shifted(worlds, one_rank_pipe,
                                                                                 one_rank_forward):
    """Negative controls for the parity tests above: the same checks, with the feature broken, fail."""
    expected_video = one_rank_pipe.generate(**REQUESTS[2], progress=False)
    for rank in worlds(2):
        out, calls, _ = rank["forward_unreduced"]
        assert calls == {"all_reduce": 2 * 2 * TINY_DIT_PARAMS["num_blocks"], "all_gather": 1}  # still called...
        assert_parity_fails(out, one_rank_forward[0], **FORWARD_TOLERANCE)  # ...but each rank keeps its partial sum
        assert_parity_fails(rank["pipeline_unreduced"][0], expected_video.latents, **FORWARD_TOLERANCE)
        if rank["pipeline_unreduced"][1] is not None:  # rank 0's frames
            assert_parity_fails(rank["pipeline_unreduced"][1], expected_video.frames, atol=1)
        assert_parity_fails(rank["loaded_shifted"][1], one_rank_forward[0], **FORWARD_TOLERANCE)


def test_sharded_loading_reads_its_slice_and_no_more(worlds):
    """Measured, not compared with the plan's own slicing: each rank reads exactly the bytes it keeps, about
    half the file at tp = 2 (the replicated embeddings, norms and biases are read whole by both)."""
    full = sum(v.numel() * v.element_size() for v in tiny_dit_state_dict(0).values())
    for rank in worlds(2):
        read, kept = rank["bytes_read"]
        assert read == kept
        assert 0.5 * full < read < 0.6 * full, (read, full)


def test_the_pipeline_path_reads_each_ranks_slice_and_no_more(worlds):
    """What the CLI and the model card's call actually load under a launcher (RankRole through load_pipeline), not
    the sharded loader alone: each rank reads from the file only the bytes it keeps. Negative control: a role that
    loads the whole DiT on every rank and then shards it (same model, same forward) reads the whole file."""
    from k4flash.weights import DERIVED_KEYS

    full = sum(v.numel() * v.element_size() for k, v in tiny_dit_state_dict(0).items() if k not in DERIVED_KEYS)
    for rank in worlds(2):
        read, kept = rank["pipeline_bytes_read"]
        assert read == kept and 0.5 * full < read < 0.6 * full, (read, kept, full)
        read_whole, kept_whole = rank["pipeline_bytes_read_whole"]
        assert kept_whole == kept and read_whole == full  # the check above fails on it: read != kept


def test_compiled_blocks_under_tp_send_the_same_collectives_and_give_the_same_output(worlds):
    """README: with compile=true the collectives stay eager graph breaks, so the counts stay the same."""
    for rank in worlds(2):
        eager_out, eager_calls, _ = rank["forward"]
        compiled_out, compiled_calls, _ = rank["compiled"]
        assert compiled_calls == eager_calls == {"all_reduce": 2 * 2 * TINY_DIT_PARAMS["num_blocks"], "all_gather": 1}
        assert_parity(compiled_out, eager_out, **FORWARD_TOLERANCE, what="velocity")


def _process_group_ownership(runtime, weights, port):
    """On each rank: the model card's call under a launcher, first in a group the caller made (the harness's),
    then in none, so that the call makes its own; whether a group is initialised at each point."""
    import atexit
    import os

    import torch.distributed as dist

    from k4flash import get_T2V_pipeline
    from parallel.runtime import shutdown_runtime

    load = dict(cache_dir=weights, dit_params=TINY_DIT_PARAMS, download=False)
    seen = {}
    hooks, register = [], atexit.register  # this rank's process ends after the test: no need to restore it
    atexit.register = lambda fn, *args, **kwargs: hooks.append(fn.__qualname__) or register(fn, *args, **kwargs)
    with get_T2V_pipeline("cpu", **load) as pipe:
        pipe.generate("a red square", time_length=0, width=512, height=512, seed=1, progress=False)
    seen["caller's group, after close"] = dist.is_initialized()
    seen["caller's group, exit hooks"] = [name for name in hooks if name.startswith("Runtime.")]
    shutdown_runtime()  # the caller is done with its group; the next call finds none
    os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous: the old store went with the old group
    pipe = get_T2V_pipeline("cpu", **load)
    seen["library's group, loaded"] = dist.is_initialized()
    seen["library's group, exit hooks"] = [name for name in hooks if name.startswith("Runtime.")]
    pipe.generate("a red square", time_length=0, width=512, height=512, seed=1, progress=False)
    pipe.close()
    seen["library's group, after close"] = dist.is_initialized()
    pipe.close()  # idempotent
    return seen


def test_the_library_destroys_the_process_group_it_created_and_only_that(tiny_weights):
    from parallel.spawn import free_port

    for seen in run_ranks(2, _process_group_ownership, tiny_weights, free_port()):
        assert seen == {"caller's group, after close": True, "caller's group, exit hooks": [],
                        "library's group, loaded": True, "library's group, exit hooks": ["Runtime.close"],
                        "library's group, after close": False}
