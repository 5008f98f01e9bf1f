"""dit.offload=during_decode: the DiT leaves its device for the VAE decode, freed before a run's last decode and
parked in host memory (one packed buffer, k4flash/host_memory.py) before the others, and comes back for the next
denoise; the latents and frames are those of dit.offload=none, bit for bit, at one rank and on two."""
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k4flash import fp8
from k4flash.dit import DiffusionTransformer3D
from k4flash.host_memory import PACK_ALIGN, HostParking
from k4flash.tiny import TINY_DIT_PARAMS, tiny_dit_state_dict

from parity import assert_parity, assert_parity_fails

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "run_inference_distil.py"
PROMPTS = [("a red square", 3), ("a blue circle", 4), ("a green triangle", 5)]
IMAGE = dict(time_length=0, width=512, height=512, progress=False)


def _pipe(tiny_weights, dit_offload, **options):
    from k4flash.pipeline import load_pipeline
    return load_pipeline("cpu", cache_dir=tiny_weights, dit_params=TINY_DIT_PARAMS, download=False,
                         dit_offload=dit_offload, **options)


def _storage(t):
    return t.untyped_storage().data_ptr()


def _watch_decode(pipe, look):
    """Record look(pipe) at the start of every decode."""
    seen, decode = [], pipe.decode

    def watched(latents):
        seen.append(look(pipe))
        return decode(latents)
    pipe.decode = watched
    return seen


def _where(pipe):
    """Where the pipeline's DiT is: "freed", "host" (every tensor a view of the parking's buffer) or "device"."""
    if pipe._dit is None:
        return "freed"
    parking = pipe.dit_parking
    tensors = [*pipe._dit.parameters(), *pipe._dit.buffers()]
    if parking is not None and parking.parked and all(_storage(t) == _storage(parking.buffer) for t in tensors):
        return "host"
    return "device"


def _generations(pipe, lasts=(False, False, False)):
    return [pipe.generate(text, seed=seed, last=last, **IMAGE) for (text, seed), last in zip(PROMPTS, lasts)]


def _assert_same(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert_parity(g.latents, w.latents, atol=0, what=f"latents of prompt {i}")
        assert_parity(g.frames, w.frames, atol=0, what=f"frames of prompt {i}")


@pytest.fixture(scope="module")
def resident(tiny_weights):
    """The three prompts' generations with dit.offload=none: the reference."""
    generations = _generations(_pipe(tiny_weights, "none"))
    assert all(not {"dit_offload_s", "dit_free_s", "dit_restore_s"} & set(g.timings) for g in generations)
    return generations


def test_one_video_frees_the_dit_before_its_decode_and_changes_no_bit(tiny_weights, resident):
    pipe = _pipe(tiny_weights, "during_decode")
    dit = weakref.ref(pipe.dit)
    seen = _watch_decode(pipe, lambda p: (p._dit, dit()))
    generation = pipe.generate(PROMPTS[0][0], seed=PROMPTS[0][1], last=True, **IMAGE)
    assert seen == [(None, None)]  # during the decode nothing holds the DiT any more
    assert "dit_free_s" in generation.timings and "dit_offload_s" not in generation.timings
    _assert_same([generation], resident[:1])
    with pytest.raises(RuntimeError, match=r"the DiT was freed .* load the pipeline again"):
        pipe.generate("another prompt", seed=1, **IMAGE)


def test_a_batch_parks_the_dit_in_host_memory_for_each_decode_and_changes_no_bit(tiny_weights, resident):
    """The DiT's tensors are views of one host buffer during every decode, on the device again (the same module)
    for each denoise; the last prompt frees it, as launch/generate.py asks for a batch's last one."""
    pipe = _pipe(tiny_weights, "during_decode")
    dit = pipe.dit
    denoised = []
    velocity_dit = DiffusionTransformer3D.forward

    def forward(module, *args):
        denoised.append((_where(pipe), module is dit))
        return velocity_dit(module, *args)
    seen = _watch_decode(pipe, _where)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DiffusionTransformer3D, "forward", forward)
        generations = _generations(pipe, lasts=(False, False, True))
    assert seen == ["host", "host", "freed"]
    assert denoised and set(denoised) == {("device", True)}
    assert [sorted(k for k in g.timings if k.startswith("dit_")) for g in generations] == [
        ["dit_offload_s"], ["dit_offload_s", "dit_restore_s"], ["dit_free_s", "dit_restore_s"]]
    _assert_same(generations, resident)


def test_the_dit_comes_back_for_a_direct_call_too(tiny_weights):
    pipe = _pipe(tiny_weights, "during_decode")
    pipe.generate(PROMPTS[0][0], seed=PROMPTS[0][1], **IMAGE)
    assert _where(pipe) == "host"
    dit = pipe.dit  # the property brings it back, for a caller of pipe.dit or pipe.denoise
    assert dit is pipe._dit and not pipe.dit_parking.parked and _where(pipe) == "device"


def test_a_parking_that_loses_bits_is_caught(tiny_weights, resident, monkeypatch):
    """Negative control: a DiT brought back with one weight changed gives other latents from the second prompt on,
    and the same comparison fails."""
    unpark = HostParking.unpark

    def lossy(self):
        unpark(self)
        next(self.module.parameters()).data.mul_(1.5)
    monkeypatch.setattr(HostParking, "unpark", lossy)
    got = _generations(_pipe(tiny_weights, "during_decode"), lasts=(False, True))
    assert_parity(got[0].latents, resident[0].latents, atol=0, what="latents of prompt 0")
    assert_parity_fails(got[1].latents, resident[1].latents, atol=0)


def test_an_fp8_dit_keeps_its_float8_weights_and_float32_scales_bit_for_bit(tiny_weights):
    none = _generations(_pipe(tiny_weights, "none", quantize="fp8"), lasts=(False, False))
    pipe = _pipe(tiny_weights, "during_decode", quantize="fp8")
    dtypes = {name: t.dtype for name, t in pipe.dit.named_parameters()}
    assert fp8.FP8 in dtypes.values() and any(n.endswith("weight_scale") for n in dtypes)
    got = _generations(pipe, lasts=(False, False))
    assert pipe.dit_parking.parked
    assert {name: t.dtype for name, t in pipe.dit.named_parameters()} == dtypes
    _assert_same(got, none)


def test_parking_packs_one_exact_buffer_once_and_moves_only_the_device():
    model = DiffusionTransformer3D(**TINY_DIT_PARAMS).eval().requires_grad_(False)
    model.load_state_dict(tiny_dit_state_dict(0))
    model = fp8.quantize_dit(model)  # e4m3 weights, float32 scales beside the float32 rest
    state = {k: v.clone() for k, v in model.state_dict().items()}
    allocations = []
    parking = HostParking(model, host_allocator=lambda n: allocations.append(n) or torch.empty(n, dtype=torch.uint8))
    tensors = [*model.parameters(), *model.buffers()]
    for _ in range(2):
        parking.park()
        parking.park()  # idempotent
        assert parking.parked and {_storage(t) for t in tensors} == {_storage(parking.buffer)}
        parking.unpark()
        assert not parking.parked and _storage(parking.buffer) not in {_storage(t) for t in tensors}
        for name, value in model.state_dict().items():
            assert value.dtype == state[name].dtype and value.shape == state[name].shape, name
            assert torch.equal(value.view(torch.uint8), state[name].view(torch.uint8)), name
    # One buffer for every park, exactly the tensors' bytes each rounded up to the alignment.
    assert allocations == [sum(-(-t.numel() * t.element_size() // PACK_ALIGN) * PACK_ALIGN for t in tensors)]
    assert {t.dtype for t in tensors} >= {fp8.FP8, torch.float32}


# --- through the command line ------------------------------------------------------------------------------------

def _env(tiny_cache):
    return dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(cwd, tiny_cache, *overrides, ranks=1):
    launcher = [str(ROOT / "launch" / "torchrun.sh")] if ranks > 1 else [sys.executable, str(ENTRY)]
    env = dict(_env(tiny_cache), NPROC_PER_NODE=str(ranks)) if ranks > 1 else _env(tiny_cache)
    result = subprocess.run([*launcher, "model=tiny", "progress=false", "save_latents=true", *overrides], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]


def _outputs(folder):
    """stem → (latents, PNG pixels, the sidecar's dit_* timing keys) of every image written under folder."""
    from PIL import Image
    import numpy as np

    found = {}
    for png in sorted(Path(folder).glob("*.png")):
        latents = load_file(str(png.with_name(png.stem + ".latents.safetensors")))["latents"]
        timings = json.loads(png.with_suffix(".json").read_text())["timings"]
        found[png.stem] = (latents, torch.from_numpy(np.asarray(Image.open(png)).copy()),
                           sorted(k for k in timings if k.startswith("dit_")))
    return found


def _compare(cwd, expected_keys):
    none, offloaded = _outputs(cwd / "none"), _outputs(cwd / "during_decode")
    assert sorted(none) == sorted(offloaded) and len(none) == len(expected_keys)
    for (stem, (latents, pixels, keys)), expected in zip(sorted(offloaded.items()), expected_keys):
        assert_parity(latents, none[stem][0], atol=0, what=f"latents of {stem}")
        assert_parity(pixels, none[stem][1], atol=0, what=f"pixels of {stem}")
        assert keys == expected and none[stem][2] == [], (stem, keys, none[stem][2])


@pytest.mark.slow
def test_the_cli_one_video_frees_the_dit_and_gives_the_same_image(tmp_path, tiny_cache):
    for offload in ("none", "during_decode"):
        _run(tmp_path, tiny_cache, "prompt=a red square", "seed=3", "time_length=0", "width=512", "height=512",
             f"save_path={offload}/red.png", f"dit.offload={offload}")
    _compare(tmp_path, [["dit_free_s"]])


def _write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": text, "seed": seed}) + "\n" for text, seed in prompts))


BATCH_KEYS = [["dit_offload_s"], ["dit_offload_s", "dit_restore_s"], ["dit_free_s", "dit_restore_s"]]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_cli_batch_parks_the_dit_between_prompts_and_gives_the_same_images(tmp_path, tiny_cache, ranks):
    """At 2 ranks (gloo, tp = 2 under launch/torchrun.sh) both ranks park and bring back their DiT shard and
    decode a band each (vae.parallel); the sidecars are the group main's."""
    _write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    for offload in ("none", "during_decode"):
        _run(tmp_path, tiny_cache, "prompts_file=prompts.jsonl", f"output_dir={offload}", "time_length=0",
             "width=512", "height=512", f"dit.offload={offload}", ranks=ranks)
    _compare(tmp_path, BATCH_KEYS)


@pytest.mark.slow
def test_a_server_parks_the_dit_between_videos_and_gives_the_clis_images(tmp_path, tiny_cache):
    from bench.server import Server

    _write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2])
    _run(tmp_path, tiny_cache, "prompts_file=prompts.jsonl", "output_dir=none", "time_length=0", "width=512",
         "height=512", "dit.offload=none")
    server = Server(tmp_path, tiny_cache, 1, "dit.offload=during_decode")
    try:
        ids = []
        for text, seed in PROMPTS[:2]:  # one after the other: the second needs the DiT back
            status, body, _ = server.request("POST", "/v1/videos", dict(prompt=text, seed=seed, seconds="0",
                                                                       size="512x512"), key=None)
            assert status == 200, body
            ids.append(json.loads(body)["id"])
            assert server.wait(ids[-1])["status"] == "completed"
    finally:
        assert server.stop() == 0, server.output()
    none = _outputs(tmp_path / "none")
    # A server never knows its last video: each one parks the DiT, and from the second on it comes back first.
    for video_id, (stem, (latents, _, _)), expected in zip(ids, sorted(none.items()), BATCH_KEYS[:2]):
        served = load_file(str(server.output_dir / f"{video_id}.latents.safetensors"))["latents"]
        assert_parity(served, latents, atol=0, what=f"latents of {video_id} ({stem})")
        timings = json.loads((server.output_dir / f"{video_id}.json").read_text())["timings"]
        assert sorted(k for k in timings if k.startswith("dit_")) == expected


@pytest.mark.parametrize("mode", ["generate", "serve"])
def test_a_bad_dit_offload_is_one_line_before_loading(tmp_path, tiny_cache, mode):
    result = subprocess.run([sys.executable, str(ENTRY), "model=tiny", f"mode={mode}", "dit.offload=bogus",
                             "prompt=a red square", "save_path=out/x.mp4"], cwd=tmp_path, env=_env(tiny_cache),
                            capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [
        "error: dit.offload='bogus': allowed values are ['none', 'during_decode', 'auto']"], result.stderr[-2000:]
    assert "Loading weights" not in result.stderr and list(tmp_path.iterdir()) == []
