"""Fitting smaller GPUs: text-encoder offload gives the same latents, T5 is gone before the DiT loads, the
block streamer holds two blocks at most, the memory model's parts are counted, and the planner uses it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel import cost, counting
from k4flash.published import PUBLISHED_DIT_PARAMS
from k4flash.tiny import TINY_DIT_PARAMS

from parity import assert_parity
from parallel.spawn import free_port

ENTRY = Path(__file__).resolve().parents[1] / "run_inference_distil.py"
REQUEST = dict(text="a red square", time_length=0, width=512, height=512, seed=5, progress=False)


def _pipe(tiny_weights, offload):
    from k4flash.pipeline import load_pipeline
    return load_pipeline("cpu", cache_dir=tiny_weights, dit_params=TINY_DIT_PARAMS, download=False,
                         text_encoder_offload=offload)


@pytest.fixture(scope="module")
def none_latents(tiny_weights):
    return _pipe(tiny_weights, "none").generate(**REQUEST).latents


@pytest.mark.parametrize("offload", ["after_encode", "cpu"])
def test_offload_gives_the_same_latents(offload, tiny_weights, none_latents):
    latents = _pipe(tiny_weights, offload).generate(**REQUEST).latents
    assert_parity(latents, none_latents, atol=0, what="latents")


def test_after_encode_frees_t5_before_the_dit_loads(tiny_weights, none_latents):
    pipe = _pipe(tiny_weights, "after_encode")
    assert not isinstance(pipe._dit, torch.nn.Module)  # loaded T5 first; the DiT waits
    (embed,) = pipe.encode_prompts([REQUEST["text"]])
    assert pipe.text_encoder.released and not isinstance(pipe._dit, torch.nn.Module)
    latents = pipe.generate(**REQUEST, text_embed=embed).latents
    assert isinstance(pipe._dit, torch.nn.Module)
    assert_parity(latents, none_latents, atol=0, what="latents")
    with pytest.raises(RuntimeError, match=r"released after encoding \(text_encoder.offload=after_encode\)"):
        pipe.generate(**dict(REQUEST, text="another prompt"))


def test_block_streamer_holds_at_most_two_blocks_and_changes_nothing(tiny_weights):
    from k4flash.text_encoder import BlockStreamer, T5TextEncoder

    resident = T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer", offload="none")
    host = T5TextEncoder(tiny_weights / "text_encoder", tiny_weights / "tokenizer", offload="cpu")
    # A GPU's copies, on a CPU: the same hooks run, with .to(device) a copy to the same device.
    host.streamer = streamer = BlockStreamer(host.encoder, "cpu")
    most, fetched = [0], []
    fetch = streamer._fetch

    def counted_fetch(index):
        fetch(index)
        fetched.append(index)
        most[0] = max(most[0], len(streamer.on_device))
    streamer._fetch = counted_fetch
    prompts = ["a red square", "two blue circles"]
    assert_parity(host(prompts), resident(prompts), atol=0, what="text embedding")
    stages = len(streamer.stages)  # embedding, 2 blocks, final norm: each fetched, the next one prefetched
    assert most[0] == 2 and sorted(set(fetched) - {stages}) == list(range(stages))
    assert streamer.on_device == {} and streamer.hooks == []  # nothing left on the device, no hook left behind


@pytest.mark.slow
def test_a_batch_with_after_encode_gives_the_batch_without(tmp_path, tiny_cache):
    """Every prompt encoded first, T5 freed, then each video: under tp = 2 too."""
    prompts = '{"prompt": "a red square", "seed": 3, "time_length": 0, "width": 512, "height": 512}\n' \
              '{"prompt": "a blue circle", "seed": 4, "time_length": 0, "width": 672, "height": 384}\n'
    (tmp_path / "prompts.jsonl").write_text(prompts)
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for offload in ("none", "after_encode"):
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
        result = subprocess.run([sys.executable, *launcher, str(ENTRY), "model=tiny", "prompts_file=prompts.jsonl",
                                 f"output_dir=out_{offload}", "save_latents=true", "progress=false",
                                 f"text_encoder.offload={offload}"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    outputs = sorted((tmp_path / "out_none").glob("*.latents.safetensors"))
    assert len(outputs) == 2
    for one in outputs:
        got = load_file(str(tmp_path / "out_after_encode" / one.name))["latents"]
        assert_parity(got, load_file(str(one))["latents"], atol=0, what=f"latents of {one.name}")


# --- the memory model -------------------------------------------------------------------------------------------

def test_stored_vae_decode_peaks_are_the_meta_runs():
    assert counting.vae_decode_peak_bytes(bands=8) * 8 == cost.VAE_DECODE_PEAK["video"]
    assert counting.vae_decode_peak_bytes((1, 48, 84), bands=8) * 8 == cost.VAE_DECODE_PEAK["image"]
    assert cost.scaled_vae_decode_peak(bands=4) == cost.VAE_DECODE_PEAK["video"] / 4


def test_live_peak_counts_what_is_alive_at_once():
    x = torch.empty(1000, 1000, device="meta")  # 4 MB, made outside: not counted
    tracker = counting.LivePeak()
    with tracker:
        y = x * 2  # 4 MB
        z = y + 1  # 8 MB alive
        del y
        view = z.view(-1)  # a view: no new storage
        w = z * 3  # 8 MB again
        del z, view, w
    assert (tracker.peak, tracker.live) == (8_000_000, 0)


def test_dit_activations_split_with_the_tokens():
    from parallel.plan import Plan
    from parallel.rank_work import rank_activation_peak

    one = rank_activation_peak(PUBLISHED_DIT_PARAMS, Plan())
    assert 2e9 < one < 3e9  # about 2-3 GB at 25k tokens (flash attention: no S x S scores)
    split = [rank_activation_peak(PUBLISHED_DIT_PARAMS, plan) for plan in (Plan(1, 8), Plan(8, 1, True))]
    assert max(split) < one / 3
    # plain TP splits only what lies between its column and row layers: every rank keeps the whole sequence
    assert rank_activation_peak(PUBLISHED_DIT_PARAMS, Plan(8)) > 1.5 * max(split)


def test_memory_model_stages_follow_the_offload_and_the_rank():
    from parallel.plan import Plan
    from parallel.planner import rank_memory

    plan = Plan(tp=2)
    none, after, host = (rank_memory(PUBLISHED_DIT_PARAMS, plan, offload) for offload in
                         ("none", "after_encode", "cpu"))
    t5 = 2 * cost.t5_encoder_params(**cost.T5_XXL)
    assert none["text_encoder"] == t5 and after["text_encoder"] == host["text_encoder"] == 0
    assert none["stages"]["denoise"] - after["stages"]["denoise"] == pytest.approx(t5 * 1.1)
    # after_encode: T5 works before the DiT is loaded; cpu: two blocks at a time beside it
    assert after["stages"]["encode"] < none["stages"]["encode"] - none["dit_weights"]
    assert host["stages"]["encode"] < none["stages"]["encode"] - t5
    other = rank_memory(PUBLISHED_DIT_PARAMS, plan, "none", group_main=False)
    assert other["text_encoder"] == 0 and other["vae"] > 0  # the VAE decodes a band on every rank
    one_band = rank_memory(PUBLISHED_DIT_PARAMS, plan, "none", vae_parallel=False)
    assert one_band["vae_activations"] == 2 * none["vae_activations"]


def test_the_planner_offloads_t5_only_when_it_must():
    from parallel.planner import choose_plan

    plan, offload, rows = choose_plan(PUBLISHED_DIT_PARAMS, 1, 80)
    assert (plan.tp, plan.ulysses, offload) == (1, 1, "none")
    plan, offload, rows = choose_plan(PUBLISHED_DIT_PARAMS, 2, 24)
    assert offload != "none" and all(not r["fits"] for r in rows if r["offload"] == "none")
    with pytest.raises(ValueError, match=r"no plan of the DiT on 1 GPU\(s\) fits 24 GB per GPU \(the smallest needs "
                                         r"2\d\.\d GB\)"):
        choose_plan(PUBLISHED_DIT_PARAMS, 1, 24)
