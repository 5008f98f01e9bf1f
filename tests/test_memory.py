"""Fitting smaller GPUs: text-encoder offload gives the same latents, T5 is gone before the DiT loads, the
block streamer holds two blocks at most, the memory model's parts are counted, and the planner uses it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k4flash.dit import DiffusionTransformer3D
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

    plan, offload, dit_offload, rows = choose_plan(PUBLISHED_DIT_PARAMS, 1, 80)
    assert (plan.tp, plan.ulysses, offload, dit_offload) == (1, 1, "none", "none")
    plan, offload, dit_offload, rows = choose_plan(PUBLISHED_DIT_PARAMS, 2, 24)
    assert offload != "none" and dit_offload == "none"
    assert all(not r["fits"] for r in rows if r["offload"] == r["dit_offload"] == "none")
    with pytest.raises(ValueError, match=r"no plan of the DiT on 1 GPU\(s\) fits 24 GB per GPU \(the smallest needs "
                                         r"2\d\.\d GB\)"):
        choose_plan(PUBLISHED_DIT_PARAMS, 1, 24, dit_offloads=("none",))


# --- FP8 and dit.offload in the memory model and the planner -------------------------------------------------------

def _quantized_rank_bytes(params, plan, fp8_skip):
    """The weight bytes one rank holds: the whole DiT built on meta, quantized, sharded by the plan's code."""
    from k4flash.dit import DiffusionTransformer3D
    from k4flash.fp8 import quantize_dit
    from parallel.rank_work import _StandInMesh
    from parallel.tp import parallelize_dit

    with torch.device("meta"):
        model = DiffusionTransformer3D(**params).to(torch.bfloat16)
    quantize_dit(model, fp8_skip)
    if plan.group_size > 1:
        parallelize_dit(model, _StandInMesh(plan.ulysses, plan.tp), sequence_parallel=plan.sequence_parallel)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("tp, ulysses, fp8_skip", [(1, 1, ()), (1, 1, (0, -1)), (2, 1, (3,)), (2, 2, ())])
def test_fp8_weight_bytes_are_the_quantized_models(tp, ulysses, fp8_skip):
    from parallel.plan import Plan
    from parallel.planner import rank_memory

    plan = Plan(tp, ulysses)
    m = rank_memory(PUBLISHED_DIT_PARAMS, plan, quantize="fp8", fp8_skip=fp8_skip)
    assert m["dit_weights"] == _quantized_rank_bytes(PUBLISHED_DIT_PARAMS, plan, fp8_skip)
    if plan == Plan():  # README: 11.1 GB in bf16, 6.4 GB in FP8 (e4m3 + float32 row scales; the rest bf16)
        assert rank_memory(PUBLISHED_DIT_PARAMS, plan)["dit_weights"] == 11_140_553_856
        assert m["dit_weights"] == (6_388_857_984 if not fp8_skip else 6_615_129_216)


def test_fp8_counts_of_a_rank_equal_a_real_quantized_forward():
    """rank_work(quantize="fp8") extrapolates from one quantized pair; a real FP8 model with a block kept in bf16
    does the same FLOPs (its FP8 ones too), moves the same memory-bound bytes and holds the same weights."""
    from k4flash.fp8 import quantize_dit
    from k4flash.tiny import fill_deterministic_
    from parallel.plan import Plan
    from parallel.rank_work import measure_rank_work, rank_work

    params = dict(PUBLISHED_DIT_PARAMS, model_dim=128, ff_dim=512, time_dim=64, num_blocks=3, in_text_dim=48,
                  axes_dims=(16, 24, 24))
    latent, text = (2, 8, 12), 9
    model = quantize_dit(fill_deterministic_(DiffusionTransformer3D(**params), seed=0).eval(), (1, -2))
    inputs = (torch.randn(1, *latent, 16), torch.randn(1, text, 48), torch.tensor([500.0]))
    with torch.no_grad():
        model(*inputs)
    real = measure_rank_work(model, inputs, 4)
    counted = rank_work(params, Plan(), latent, text, dtype=torch.float32, quantize="fp8", fp8_skip=(1, -2))
    assert counted["quantized_blocks"] == 4 and real["fp8_flops"] > 0
    for key in ("flops", "fp8_flops", "memory_bytes", "fp8_input_elements"):
        assert counted[key] == real[key], key
    assert counted["weight_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_fp8_activations_count_what_the_fp8_matmul_allocates():
    """The FP8 forward's live tensors are counted from k4flash/fp8.py as it runs: on a GPU its e4m3 input copy
    and the quantization's float32 block; on a CPU (bench.memory) also PyTorch's CPU kernel's float32 copies of
    both operands, which `_cpu_scaled_mm` mirrors bit for bit."""
    from k4flash import fp8
    from parallel.plan import Plan
    from parallel.planner import rank_memory
    from parallel.rank_work import _cpu_scaled_mm, rank_activation_peak

    D, F = PUBLISHED_DIT_PARAMS["model_dim"], PUBLISHED_DIT_PARAMS["ff_dim"]
    assert rank_activation_peak(PUBLISHED_DIT_PARAMS, Plan(), quantized=True) \
        >= rank_activation_peak(PUBLISHED_DIT_PARAMS, Plan())
    small = (1, 64, 64)  # bench.memory's geometry: 1,024 + 224 tokens
    gpu, cpu = (rank_memory(PUBLISHED_DIT_PARAMS, Plan(), latent_fhw=small, device=device, quantize="fp8",
                            loads_vae=False)["dit_activations"] for device in ("cuda", "cpu"))
    bf16 = rank_memory(PUBLISHED_DIT_PARAMS, Plan(), latent_fhw=small, device="cpu", loads_vae=False)
    assert gpu > bf16["dit_activations"]  # at 1,248 tokens the e4m3 copy and the float32 block show
    assert cpu > gpu + 8 * D * F  # the CPU kernel's float32 weight and its scaled copy, for the largest layer
    x, (w, w_scale) = torch.randn(40, 96, dtype=torch.bfloat16), fp8.quantize_rows(torch.randn(24, 96))
    x_q, x_scale = fp8.quantize_rows(x)
    args = (x_q, w.t()), dict(scale_a=x_scale[:, None], scale_b=w_scale[None, :], out_dtype=torch.bfloat16)
    assert torch.equal(_cpu_scaled_mm(*args[0], **args[1]), torch._scaled_mm(*args[0], **args[1]))  # what it mirrors


def test_dit_offload_takes_the_dit_off_the_decode_stage_only():
    from parallel.plan import Plan
    from parallel.planner import rank_memory

    for plan, quantize in ((Plan(), "none"), (Plan(tp=2), "fp8")):
        kept = rank_memory(PUBLISHED_DIT_PARAMS, plan, "after_encode", quantize=quantize)
        off = rank_memory(PUBLISHED_DIT_PARAMS, plan, "after_encode", quantize=quantize, dit_offload="during_decode")
        assert off["stages"]["decode"] == pytest.approx(kept["stages"]["decode"] - 1.1 * kept["dit_weights"])
        assert (off["stages"]["encode"], off["stages"]["denoise"]) == (kept["stages"]["encode"],
                                                                     kept["stages"]["denoise"])


def test_dit_offload_costs_its_pcie_copies_in_a_batch_and_nothing_in_one_video():
    from parallel.plan import Plan
    from parallel.planner import predict_plan

    kept = predict_plan(PUBLISHED_DIT_PARAMS, Plan())
    batch = predict_plan(PUBLISHED_DIT_PARAMS, Plan(), dit_offload="during_decode")
    one = predict_plan(PUBLISHED_DIT_PARAMS, Plan(), dit_offload="during_decode", dit_reload=False)
    copies = 2 * 11_140_553_856 / cost.H100_SXM.pcie_bytes_per_s  # out to host memory and back, 0.89 s
    assert batch["dit_offload_s"] == pytest.approx(copies) and one["dit_offload_s"] == 0
    assert batch["end_to_end_s"] == pytest.approx(kept["end_to_end_s"] + copies)
    assert one["end_to_end_s"] == kept["end_to_end_s"]


def test_one_24_gb_gpu_fits_with_the_dit_offloaded_and_auto_offloads_only_when_needed():
    from parallel.planner import choose_plan

    plan, offload, dit_offload, rows = choose_plan(PUBLISHED_DIT_PARAMS, 1, 24)
    assert (str(plan), offload, dit_offload) == ("tp=1", "after_encode", "during_decode")
    assert not [r for r in rows if r["fits"] and r["dit_offload"] == "none"]  # needed: nothing fits without it
    for world, memory_gb in ((1, 40), (1, 80), (2, 24), (4, 24), (8, 80)):
        for reload in (True, False):  # a batch pays PCIe copies for it; one video frees the DiT at no cost
            assert choose_plan(PUBLISHED_DIT_PARAMS, world, memory_gb, dit_reload=reload)[2] == "none", (world,
                                                                                                        memory_gb)


def test_the_planner_never_turns_fp8_on_and_says_when_only_fp8_fits():
    from parallel.planner import choose_plan

    for world, memory_gb in ((1, 24), (2, 24), (1, 80)):
        rows = choose_plan(PUBLISHED_DIT_PARAMS, world, memory_gb)[3]
        assert {r["quantize"] for r in rows} == {"none"}
        assert {r["memory"]["quantize"] for r in rows} == {"none"}
    rows = choose_plan(PUBLISHED_DIT_PARAMS, 1, 24, quantize="fp8")[3]
    assert {r["quantize"] for r in rows} == {"fp8"}  # asked for: counted as given
    # Only FP8 fits: the refusal names it and what it would need, in one line.
    with pytest.raises(ValueError, match=r"^parallel.plan=auto: no plan of the DiT on 1 GPU\(s\) fits 15 GB per GPU "
                                         r"\(the smallest needs 16\.0 GB\); with dit.quantize=fp8 it would fit in "
                                         r"14\.0 GB \(changes the video; README \"FP8 DiT\"\), or use more GPUs$"):
        choose_plan(PUBLISHED_DIT_PARAMS, 1, 15)
    with pytest.raises(ValueError, match=r"the smallest needs 26\.2 GB\); with dit.quantize=fp8 it would fit in "
                                         r"21\.0 GB"):
        choose_plan(PUBLISHED_DIT_PARAMS, 1, 24, dit_offloads=("none",))
    with pytest.raises(ValueError) as refused:  # neither fits: no FP8 advice
        choose_plan(PUBLISHED_DIT_PARAMS, 1, 12)
    assert str(refused.value).endswith("use more GPUs") and "fp8" not in str(refused.value)
    with pytest.raises(ValueError) as refused:  # FP8 asked for already: nothing more to advise
        choose_plan(PUBLISHED_DIT_PARAMS, 1, 12, quantize="fp8")
    assert "with dit.quantize=fp8" not in str(refused.value)
