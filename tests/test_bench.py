"""The benchmark suite: every command runs end-to-end in a small mode and reports what it claims;
the cost model's formulas agree with torch's flop counter and with the collectives the TP plan sends;
bench/ stands on its own (no import of tests/, no sys.path edits, each shared helper defined once).

No timed assertions: timings are only checked to exist and be positive.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k4flash.dit import DiffusionTransformer3D
from k4flash.published import PUBLISHED_DIT_PARAMS
from k4flash.tiny import TINY_DIT_PARAMS, fill_deterministic_
from parallel import cost, counting

from parity import assert_parity

ROOT = Path(__file__).resolve().parents[1]


def _run(main, args, tmp_path, name):
    json_path, md_path = tmp_path / f"{name}.json", tmp_path / f"{name}.md"
    data = main([*args, "--json", str(json_path), "--md", str(md_path)])
    on_disk = json.loads(json_path.read_text())
    assert on_disk["name"] == name and on_disk["tables"]
    assert on_disk["metadata"]["torch"] == torch.__version__ and len(on_disk["metadata"]["loadavg_end"]) == 3
    markdown = md_path.read_text()
    assert markdown.count("\n|---|") == len(on_disk["tables"])  # one Markdown table per table
    return data, markdown


def _rows(data, table=0):
    return data["tables"][table]["rows"]


@pytest.mark.parametrize("params, latent, text_tokens", [
    (TINY_DIT_PARAMS, (3, 8, 12), 20),
    (dict(TINY_DIT_PARAMS, model_dim=96, ff_dim=384, time_dim=48, num_blocks=2, in_text_dim=40), (2, 6, 4), 7),
])
def test_analytic_dit_flops_equal_the_flop_counter_on_real_tensors(params, latent, text_tokens):
    model = fill_deterministic_(DiffusionTransformer3D(**params), seed=0).eval()
    x = torch.randn(1, *latent, params["in_visual_dim"])
    text = torch.randn(1, text_tokens, params["in_text_dim"])
    counted = counting.count_flops(lambda: model(x, text, torch.tensor([749.0])))
    analytic = cost.dit_flops(params, latent, text_tokens)
    assert any("scaled_dot_product" in op for op in counted["by_op"])  # CPU SDPA is counted, not skipped
    assert counted["total"] == pytest.approx(analytic["total"], rel=0.01)
    assert analytic["linear"] + analytic["attention"] == analytic["total"] and analytic["attention"] > 0


def test_published_size_figures():
    """The cost model's attention FLOPs at the published geometry equal what the flop counter sees the model's own
    attention call do (meta tensors, 25,200 visual + 224 text tokens, 24 heads of 128), times 42 blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    from k4flash.dit_math import joint_attention

    flops = cost.dit_flops(PUBLISHED_DIT_PARAMS)
    assert (flops["visual_tokens"], flops["text_tokens"]) == (25_200, 224)
    heads = PUBLISHED_DIT_PARAMS["model_dim"] // 128
    with torch.device("meta"):
        qkv = torch.empty(1, heads, 25_200 + 224, 128, dtype=torch.bfloat16)  # (B, heads, S, head_dim)
    with FlopCounterMode(display=False) as counter:
        joint_attention(qkv, qkv, qkv)
    assert flops["attention"] == 2 * PUBLISHED_DIT_PARAMS["num_blocks"] * counter.get_total_flops()
    # the collectives' count and payload: test_published_width_collectives_counted_on_the_meta_device
    one, eight = cost.predict(tp=1, vae=dict(conv_flops=0, elementwise_bytes=0)), \
        cost.predict(tp=8, vae=dict(conv_flops=0, elementwise_bytes=0))
    assert eight["dit_step_compute_s"] == pytest.approx(one["dit_step_compute_s"] / 8)
    assert eight["dit_step_comm_s"] > 0 == one["dit_step_comm_s"]


def test_published_width_collectives_counted_on_the_meta_device():
    """The 85 collectives per forward at tp = 8, counted on the real plan code at the published width and depth
    (21 block pairs, meta tensors), not restated from the formula."""
    from parallel.plan import Plan
    from parallel.rank_work import rank_work

    counted = rank_work(PUBLISHED_DIT_PARAMS, Plan(tp=8))
    assert counted["calls"] == {"all_reduce": 84, "all_gather": 1}  # README: 85 collectives per forward
    assert cost.dit_plan_comm(PUBLISHED_DIT_PARAMS, 8)["collectives"] == 85
    assert counted["comm_bytes"] == cost.dit_plan_comm(PUBLISHED_DIT_PARAMS, 8)["payload_bytes"]
    # bf16 shards of the 5.57 B weights; what each rank keeps whole (embeddings, norms, biases) is ~2 %
    assert 2 * 5_570_276_928 < counted["weight_bytes"] * 8 < 2 * 5_570_276_928 * 1.03


@pytest.mark.slow
def test_cost_model_command(tmp_path):
    from bench.cost_model import main
    data, markdown = _run(main, [], tmp_path, "cost_model")
    flop_rows = {r["part"]: r["tflop"] for r in _rows(data, 0)}
    assert flop_rows["total, FlopCounterMode (meta)"] == pytest.approx(flop_rows["total"], rel=0.01)
    plans = _rows(data, 1)
    assert {r["gpus"] for r in plans} == {1, 2, 4, 8}
    for row in plans:  # every plan splits the FLOPs; the counted eager traffic is above the fused floor
        assert row["rank_tflop"] * row["gpus"] == pytest.approx(flop_rows["total"] / 1e12, rel=0.01)
        assert row["eager_gb"] > row["fused_gb"] > 0 and row["end_to_end_s"] > row["fused_end_to_end_s"]
    vae_row, t5_row, t5_meta = _rows(data, 2)
    assert vae_row["tflop"] == cost.PUBLISHED_VAE_DECODE["conv_flops"]  # the stored count is the meta run's
    assert vae_row["bytes"] == cost.PUBLISHED_VAE_DECODE["elementwise_bytes"]
    assert sum(p.numel() for p in counting.published_vae().parameters()) == cost.VAE_PARAMS
    assert t5_meta["tflop"] == pytest.approx(t5_row["tflop"], rel=0.01)
    choices = {r["gpus"]: r for r in _rows(data, 3)}
    assert set(choices) == {f"{n} x {gb} GB" for n in (1, 2, 4, 8) for gb in (80, 24)}
    assert {r["quantize"] for r in _rows(data, 3)} == {"none"}  # the planner never turns FP8 on
    # one 24 GB GPU: the DiT leaves the GPU for the decode (its 11.8 GB peak), copied out and back per video
    one = choices["1 x 24 GB"]
    assert (one["plan"], one["offload"], one["dit_offload"]) == ("tp=1", "after_encode", "during_decode")
    assert one["gpu_memory_gb"] <= 24 and one["dit_offload_s"] == pytest.approx(2 * 11.14 / 25, rel=0.01)
    for name, choice in choices.items():
        world, memory = int(name.split()[0]), float(name.split()[2])
        # The plan table is with T5 and the DiT resident: a choice that keeps both is the fastest plan that fits
        # there; one that offloads either does so because no plan fits with both resident.
        fitting = [r for r in plans if r["gpus"] == world and r["gpu_memory_gb"] <= memory]
        if choice["offload"] == choice["dit_offload"] == "none":
            assert choice["end_to_end_s"] == pytest.approx(min(r["end_to_end_s"] for r in fitting), rel=0.011)
        else:
            assert not [r for r in fitting if r["plan"] == choice["plan"]]
    assert "parallel.plan=auto" in markdown
    bf16, bf16_fused, fp8, fp8_fused = _rows(data, 4)  # one H100, with and without FP8
    assert (bf16["quantize"], fp8["quantize"], fp8_fused["mode"]) == ("none", "fp8", "fused (compile)")
    assert bf16["end_to_end_s"] == pytest.approx(plans[0]["end_to_end_s"]) and bf16["fp8_tflop"] == 0
    assert fp8["compute_s"] < bf16["compute_s"] and fp8["memory_s"] > bf16["memory_s"]  # FP8 rate; quantize passes
    assert fp8_fused["end_to_end_s"] < bf16_fused["end_to_end_s"] and fp8["dit_gb"] == pytest.approx(6.39, abs=0.01)


def test_the_cost_models_gpu_peaks_are_the_datasheet_table():
    """One set of datasheet figures: parallel/cost.py's H100 is bench/gpu_check/peaks.py's."""
    from bench.gpu_check.peaks import peak_tflops

    peaks = peak_tflops("NVIDIA H100 80GB HBM3")
    assert (cost.H100_SXM.peak_bf16_flops, cost.H100_SXM.peak_fp8_flops) == (peaks["bf16"] * 1e12,
                                                                            peaks["fp8"] * 1e12)


@pytest.mark.slow
def test_tp_command_counts_match_the_cost_model(tmp_path):
    from bench.configs import DIT_CONFIGS
    from bench.tp import main
    data, markdown = _run(main, ["--config", "tiny", "--degrees", "2", "--repeats", "1"], tmp_path, "tp")
    rows = {r["plan"]: r for r in _rows(data)}
    assert set(rows) == {"one rank", "tp", "tp+sp", "ulysses"}
    config = DIT_CONFIGS["tiny"]
    for name, (ulysses, tp, sp) in (("tp", (1, 2, False)), ("tp+sp", (1, 2, True)), ("ulysses", (2, 1, False))):
        predicted = cost.dit_plan_comm(config["params"], tp, ulysses, sp, config["latent"], config["text_tokens"],
                                       bytes_per_element=4)
        row = rows[name]
        assert row["bytes_per_rank"] == predicted["payload_bytes"] and row["calls"] == predicted["calls"]
        assert 1.9 < row["flops_split"] <= 2.05 and row["bytes_split"] > 1.1, row
        assert row["median_s"] > 0 and row["cpu_s"] > 0 and row["load_peak_rss_mb_per_rank"] > 0
    one = rows["one rank"]
    assert one["bytes_per_rank"] == 0 and one["speedup"] == 1.0 == one["flops_split"]
    assert rows["tp"]["param_bytes_per_rank"] < one["param_bytes_per_rank"] == rows["ulysses"]["param_bytes_per_rank"]
    assert "non-matmul bytes split" in markdown


def test_dit_forward_command_eager_reference_and_compiled(tmp_path):
    from bench.dit_forward import main
    data, markdown = _run(main, ["--config", "tiny", "--repeats", "2", "--compile", "--backend", "aot_eager"],
                          tmp_path, "dit_forward")
    eager, reference, compiled = _rows(data)
    assert "reference" in reference["variant"] and "compile" in compiled["variant"]
    assert reference["max_abs_diff"] < 1e-4 and compiled["max_abs_diff"] < 1e-5
    assert compiled["first_call_s"] > 0 and eager["vs_eager"] == 1.0
    assert "| ours, eager |" in markdown


@pytest.mark.slow
def test_pipeline_stages_command(tmp_path, tiny_cache, monkeypatch, one_torch_thread):
    from bench.pipeline_stages import main
    monkeypatch.setenv("K4FLASH_CACHE", str(tiny_cache))
    data, _ = _run(main, ["--repeats", "1", "--warmup", "0"], tmp_path, "pipeline_stages")
    rows = {r["key"]: r for r in _rows(data)}
    assert set(rows) == {"text_encode_s", "denoise_s", "decode_s", "write_s", "end_to_end_s", "load_s"}
    assert all(r["median_s"] > 0 for r in rows.values())
    # end-to-end is measured around the stages it contains
    assert rows["end_to_end_s"]["median_s"] >= rows["denoise_s"]["median_s"] + rows["decode_s"]["median_s"]


def test_gpu_dit_runs_its_code_path_on_cpu(tmp_path):
    from bench.gpu_dit import main
    data, _ = _run(main, ["--device", "cpu", "--config", "tiny", "--warmup", "1", "--repeats", "2"], tmp_path,
                   "gpu_dit")
    (row,) = _rows(data)
    assert row["output_finite"] and row["median_s"] > 0
    # Its FLOP figure is the flop counter's on the real module, not the bench's own formula restated.
    model = fill_deterministic_(DiffusionTransformer3D(**TINY_DIT_PARAMS), seed=0).eval()
    counted = counting.count_flops(lambda: model(torch.randn(1, 3, 8, 12, 16), torch.randn(1, 20, 32),
                                                 torch.tensor([749.0])))["total"]
    assert row["tflops"] * row["median_s"] * 1e12 == pytest.approx(counted, rel=0.01)


def test_gpu_dit_refuses_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "bench.gpu_dit"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA device" in result.stderr and "--device cpu --config tiny" in result.stderr


def test_compiled_dit_equals_eager(one_torch_thread):
    """compile=true's code path (inductor, the default backend) against eager on the tiny DiT."""
    model = fill_deterministic_(DiffusionTransformer3D(**TINY_DIT_PARAMS), seed=0).eval()
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(1, 3, 8, 12, 16, generator=g), torch.randn(1, 20, TINY_DIT_PARAMS["in_text_dim"], generator=g)
    t = torch.tensor([749.0])
    with torch.no_grad():
        eager = model(x, text, t)
        keys = set(model.state_dict())
        model.compile_blocks()
        compiled = model(x, text, t)
    assert set(model.state_dict()) == keys  # the published keys still load into a compiled model
    assert_parity(compiled, eager, atol=1e-5, rtol=1e-5, what="velocity")
    assert eager.abs().max() > 0.1


def test_pipeline_compile_flag_compiles_the_blocks(tiny_weights):
    from k4flash import get_T2V_pipeline
    pipes = {flag: get_T2V_pipeline("cpu", cache_dir=tiny_weights, dit_params=TINY_DIT_PARAMS, download=False,
                                    compile=flag) for flag in (False, True)}
    # Behaviour, not a private attribute: a forward of the compiled pipeline's DiT makes dynamo compile a graph
    # (one for all the blocks: they share their code), the eager one's makes none.
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    inputs = (torch.randn(1, 1, 8, 12, 16), torch.randn(1, 20, 32), torch.tensor([749.0]))
    graphs = {}
    for flag, pipe in pipes.items():
        counters.clear()
        with torch.no_grad():
            pipe.dit(*inputs)
        graphs[flag] = counters["stats"]["unique_graphs"]
    assert graphs[False] == 0 and graphs[True] >= 1, graphs


@pytest.mark.slow
def test_vae_decode_command(tmp_path):
    from bench.vae_decode import main
    data, markdown = _run(main, ["--config", "tiny", "--ranks", "1", "2", "--repeats", "1"], tmp_path, "vae_decode")
    one, two = _rows(data)
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["median_s"] > 0 and two["median_s"] > 0
    assert one["calls"] == {} and two["calls"]["all_reduce"] > 0 and two["calls"]["gather"] == 1
    assert two["uint8_differing"] <= 1e-4 * 3 * 9 * 512 * 192  # the row split is exact up to float rounding
    assert two["peak_rss_mb_per_rank"] > 0 and "Row-parallel VAE decode" in markdown


def test_predicted_vae_time_splits_over_the_ranks():
    vae = dict(conv_flops=4.6e14, elementwise_bytes=1.5e12, frames=(1, 3, 97, 384, 672), row_parallel_collectives=900)
    one, eight = cost.predict(tp=8, vae=vae, vae_ranks=1), cost.predict(tp=8, vae=vae, vae_ranks=8)
    overhead = 900 * cost.H100_SXM.collective_latency_s + 3 * 97 * 384 * 672 / cost.H100_SXM.link_bytes_per_s
    assert eight["vae_s"] == pytest.approx(one["vae_s"] / 8 + overhead)


@pytest.mark.slow
def test_memory_command_smoke_is_within_the_model(tmp_path):
    from bench.memory import main
    data, markdown = _run(main, ["--size", "smoke", "--runs", "1:none", "2:after_encode", "--dir", str(tmp_path)],
                          tmp_path, "memory")
    rows = _rows(data)
    assert {(r["tp"], r["offload"]) for r in rows} == {(1, "none"), (2, "after_encode")}
    assert {r["phase"] for r in rows} == {"T5 load + encode", "DiT load", "DiT forward"}
    assert all(abs(r["error"]) < 0.2 and r["anon"] > r["baseline"] for r in rows), rows
    assert "Largest whole-run error" in markdown


@pytest.mark.slow
def test_memory_command_fp8_smoke_is_within_the_model(tmp_path):
    """--quantize fp8: a random FP8 checkpoint, loaded and run as dit.quantize=fp8, next to rank_memory's FP8
    prediction (README: the published size within 5 %; the smoke size's few MB of weights sit on a 0.27 GiB
    process, so its bound is the bf16 smoke's)."""
    from safetensors import safe_open

    from bench.memory import main
    data, markdown = _run(main, ["--size", "smoke", "--quantize", "fp8", "--runs", "1:none", "2:after_encode",
                                 "--dir", str(tmp_path)], tmp_path, "memory")
    rows = _rows(data)
    assert {(r["tp"], r["offload"]) for r in rows} == {(1, "none"), (2, "after_encode")}
    assert all(abs(r["error"]) < 0.2 and r["anon"] > r["baseline"] for r in rows), rows
    assert "dit.quantize=fp8" in markdown
    # the prediction holds the FP8 model's weights: e4m3 and float32 row scales, counted on the quantized meta model
    from bench.memory import SIZES
    from k4flash.fp8 import quantize_dit
    with torch.device("meta"):
        smoke = quantize_dit(DiffusionTransformer3D(**SIZES["smoke"]["dit"]).to(torch.bfloat16))
    weights = sum(p.numel() * p.element_size() for p in smoke.parameters())
    (load,) = [r for r in rows if r["tp"] == 1 and r["phase"] == "DiT load"]
    assert (load["predicted"] - load["baseline"]) * 2**30 == pytest.approx(weights, rel=1e-9)
    with safe_open(str(tmp_path / "smoke" / "kandinsky4_distil_512.fp8.safetensors"), "pt") as f:
        weight = "transformer_blocks.0.0.feed_forward.in_layer.weight"
        assert f.get_slice(weight).get_dtype() == "F8_E4M3" and f"{weight}_scale" in f.keys()


@pytest.mark.slow
def test_serve_command_sweeps_with_cancels_and_loses_nothing(tmp_path):
    """A sweep over two levels on one server, every 2nd submission cancelled: each round accounts for every
    request, some are cancelled and some complete, and no cancelled video left its output file."""
    from bench.serve import main
    workdir = tmp_path / "work"
    data, markdown = _run(main, ["--sweep", "1,2", "--requests", "4", "--cancel-every", "2",
                                 "--workdir", str(workdir)], tmp_path, "serve")
    rows = _rows(data)
    assert [(r["ranks"], r["dp"], r["concurrency"], r["requests"]) for r in rows] == [(1, 1, 1, 4), (1, 1, 2, 4)]
    for row in rows:
        assert row["lost"] == 0 and row["lost_why"] == [] and row["every_request_ended"], row
        assert row["cancel_asked"] == 2 and row["cancel_refused"] == [] and row["failed"] == 0, row
        assert row["completed"] + row["cancelled"] == 4 and row["completed"] >= 2, row  # the uncancelled complete
        assert row["cancelled"] == row["cancelled_queued"] + row["cancelled_in_progress"], row
        assert row["p50_s"] > 0 and row["first_byte_ms"] > 0 and row["server_exit"] == 0
    assert sum(r["cancelled"] for r in rows) >= 1 and all(r["cancel_ms"] >= 0 for r in rows if r["cancelled"])
    assert sum(r["cancelled_in_progress"] for r in rows) >= 1  # the 2nd cancel of a round waits until it runs
    cancelled = [v for r in rows for v in r["cancelled_ids"]]
    served = workdir / "ranks1" / "served"
    assert all((served / f"{v}.record.json").exists() for v in cancelled)  # the ids are the server's
    on_disk = [json.loads(p.read_text())["status"] for p in served.glob("*.record.json")]  # the server's own tally
    assert sorted(on_disk) == sorted(["completed"] * sum(r["completed"] for r in rows) +
                                     ["cancelled"] * sum(r["cancelled"] for r in rows))
    assert not [p.name for v in cancelled for p in served.glob(f"{v}.*") if p.suffix in (".mp4", ".png")]
    assert "| 1 | 1 | 2 | 4 |" in markdown


# ---------------------------------------------------------------------------- bench/ stands on its own

BENCH_FILES = sorted((ROOT / "bench").rglob("*.py"))


def _is_sys_path(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
        and node.value.id == "sys"


def _imports_tests(name) -> bool:
    return name == "tests" or name.startswith("tests.")


def _leans_on_the_checkout(tree) -> list:
    """(line, what) for each import of tests/ and each edit of sys.path in a parsed module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _imports_tests(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if _imports_tests(node.module or ""):
                found.append((node.lineno, f"from {node.module} import ..."))
            if node.module == "sys" and any(a.name == "path" for a in node.names):
                found.append((node.lineno, "from sys import path"))
        elif isinstance(node, ast.Call):  # importlib.import_module("tests...") / __import__("tests...")
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0] if node.args else None
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str) and _imports_tests(first.value):
                found.append((node.lineno, f"{name}({first.value!r})"))
            if isinstance(func, ast.Attribute) and _is_sys_path(func.value):  # sys.path.insert / append / ...
                found.append((node.lineno, f"sys.path.{func.attr}(...)"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if _is_sys_path(target) or (isinstance(target, ast.Subscript) and _is_sys_path(target.value)):
                    found.append((node.lineno, "sys.path = / sys.path[...] = / sys.path +="))
    return found


def test_the_scan_sees_an_import_of_tests_and_a_sys_path_edit():
    """The scan below fails for what it is meant to catch (and not for running a tests/ script by path)."""
    leaning = ast.parse("import tests.parity\nfrom tests import spawn\nimport sys\n"
                        "sys.path.insert(0, '.')\nsys.path[:0] = ['.']\nsys.path += ['.']\n"
                        "import importlib\nimportlib.import_module('tests.fault_worker')\n")
    assert sorted(line for line, _ in _leans_on_the_checkout(leaning)) == [1, 2, 4, 5, 6, 8]
    standing = ast.parse("import sys\nfrom pathlib import Path\nimport testsuite\n"
                         "command = [sys.executable, str(Path('tests') / 'fault_worker.py')]\n")
    assert _leans_on_the_checkout(standing) == []


def test_bench_never_imports_tests_nor_edits_sys_path():
    """The benchmarks run as `python -m bench.<name>` from the checkout's root: nothing in bench/ reaches into
    tests/ or puts a folder on sys.path."""
    assert ROOT / "bench" / "gpu_check" / "__main__.py" in BENCH_FILES  # the scan descends into packages
    offences = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in BENCH_FILES
                for line, what in _leans_on_the_checkout(ast.parse(path.read_text(), str(path)))]
    assert not offences, "bench/ must stand on its own:\n" + "\n".join(offences)


SHARED = {"DIT_CONFIGS", "VAE_CONFIGS", "CONFIGS", "TIMESTEP", "dit_inputs", "config_inputs", "autocast_for",
          "Timer", "timed", "time_calls", "measure", "slowest_rank_times", "synchronize", "build_random_dit",
          "build_random_vae", "status_kib", "status_mb", "reset_peak_rss", "in_fresh_process", "run_one_rank",
          "compare", "log"}


def test_each_shared_bench_helper_is_defined_once_and_no_module_is_long():
    definitions = {}
    for path in BENCH_FILES:
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{path.relative_to(ROOT)}: over 400 lines; split it"
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = {node.name}
            else:
                names = {t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)}
            for name in names & SHARED:
                definitions.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in definitions.items() if len(paths) > 1} == {}
    assert {"DIT_CONFIGS", "TIMESTEP", "dit_inputs", "Timer", "timed", "time_calls"} <= set(definitions)


def _peak_cpu_bytes(fn):
    """fn() under torch's profiler: (its result, the most CPU bytes it held at once, from the allocator's events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # + on allocation inside the op, − on free
        peak = max(peak, live)
    return result, peak


def test_random_published_dit_is_built_in_its_dtype_without_a_float32_copy():
    """bench.random_weights builds the published DiT for the GPU benchmarks: staged in float32 and then cast,
    it peaked at 3x its bf16 size (33 GB). It must hold about its own size, and draw the same weights."""
    from bench.configs import DIT_CONFIGS
    from bench.random_weights import build_random_dit

    params = DIT_CONFIGS["mid"]["params"]  # 26 M parameters: the model, not the bookkeeping, dominates
    model, peak = _peak_cpu_bytes(lambda: build_random_dit(params, "cpu", torch.bfloat16))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert peak <= 1.05 * weights + buffers, f"peak {peak / weights:.2f}x the bf16 weights"
    # The weights the float32-staged recipe drew (cast first, then drawn in bf16), value for value.
    with torch.device("meta"):
        staged = DiffusionTransformer3D(**params)
    staged.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in staged.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, (0.1 if "modulation" in name else 1.0) / param.shape[1] ** 0.5, generator=generator)
    built = dict(model.named_parameters())
    assert all(torch.equal(built[name], p) for name, p in staged.named_parameters() if p.ndim == 2)
