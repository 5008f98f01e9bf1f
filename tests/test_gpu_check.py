"""bench.gpu_check, the GPU acceptance command, on a machine without one.

`--smoke` runs every one-GPU section's code path on the CPU (tiny config, fp32): the report must
hold each section with finite figures that agree with each other, the default SDPA kernel must
match math, and bf16 must measurably differ from fp32. The pieces only a GPU exercises are
checked on stand-ins: the host-sync counting on synthetic profiler events, the tensor-parallel
parity on two gloo ranks, and the verdicts on failing figures. Without CUDA and without
--smoke the command refuses with one line and status 2; otherwise its status is the checks' verdict.
No timed assertions.
"""
import dataclasses
import importlib.util
import json
import math
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from bench.gpu_check import checks, command, peaks, sampler, sections
from bench.gpu_check import fp8 as fp8_section
from bench.gpu_check import tp as tp_section
from k4flash.dit_math import DEFAULT_SDPA_BACKENDS
from k4flash.tiny import TINY_DIT_PARAMS
from parallel import cost
from parity import break_env
from readme_commands import readme_command

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("1.", "2.", "2b.", "3.", "4.", "5.", "6.", "7.", "10.", "12.", "Checks")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run for the module: (JSON on disk, Markdown on disk)."""
    out = tmp_path_factory.mktemp("gpu_check")
    readme = readme_command("python -m bench.gpu_check --smoke").text.split()  # the README's CPU command, smaller
    command.main([*readme[3:], "--warmup", "1", "--repeats", "2", "--vae-repeats", "1", "--out", str(out)])
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def _tables(data):
    """Section number (or "Checks") → its rows."""
    return {table["title"].split(" ", 1)[0]: table["rows"] for table in data["tables"]}


def _numbers(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [value]


def test_smoke_report_has_every_section_with_finite_figures(smoke):
    data, markdown = smoke
    tables = _tables(data)
    assert set(tables) == set(SECTIONS)
    assert markdown.count("\n|---|") == len(SECTIONS)  # one Markdown table per section
    for name, rows in tables.items():
        assert rows, name
        numbers = [n for row in rows for key, v in row.items() if key != "passed" for n in _numbers(v)]
        assert numbers and all(math.isfinite(n) for n in numbers), (name, rows)
    notes = " ".join(data["notes"])
    assert "section 8 (tp) skipped: one rank" in notes and "section 9 (faults) skipped: one rank" in notes
    assert data["settings"]["config"] == "tiny" and data["settings"]["dtype"] == "float32"


def test_smoke_figures_agree_with_each_other(smoke):
    tables = _tables(smoke[0])
    eager, compiled = tables["3."]
    assert eager["variant"] == "eager" and "aot_eager" in compiled["variant"]
    flops = cost.dit_flops(TINY_DIT_PARAMS, (3, 8, 12), 20)["total"]
    for row in (eager, compiled):
        assert row["output_finite"] and 0 < row["min_s"] <= row["median_s"]
        assert row["tflops"] == pytest.approx(flops / row["median_s"] / 1e12)
        assert row["four_steps_s"] == pytest.approx(4 * row["median_s"])
    (vae,) = tables["4."]
    # 3 latent frames of 8 x 12 → 4·(3-1)+1 frames of 64 x 96 in one chunk (2 per chunk; the odd one joins the first)
    assert (vae["frames"], vae["chunks"], vae["output_finite"]) == ("9x64x96", 1, True)
    memory = tables["5."]
    # dit: build, eager, compiled; backends: build, forwards, kernels; sampler: build, run; vae; pipeline;
    # fp8: build, eager, compiled, rebuild, quantize_dit, eager, compiled
    assert len(memory) == 17 and all(r["peak_gib"] >= r["start_gib"] > 0 for r in memory)
    (sampler,) = tables["6."]
    assert sampler["steps"] == 4 and sampler["latents_finite"] and sampler["profiler"] == "CPU only"
    assert sampler["syncs_total"] == sampler["dtoh_copies"] == sampler["warned_in_loop"] == 0  # no CUDA on a CPU
    for row in tables["7."]:
        assert row["total_s"] == pytest.approx(row["t5_s"] + row["denoise_s"] + row["vae_s"])
        assert row["vae_s"] == vae["median_s"] and row["vs_seed"] == pytest.approx(11.0 / row["total_s"])
    assert tables["7."][-1]["denoise_s"] == sampler["sampler_s"]


def test_default_sdpa_backend_matches_math_and_bf16_is_bounded(smoke):
    fp32, bf16 = _tables(smoke[0])["2."]
    assert fp32["allowed"] == ", ".join(DEFAULT_SDPA_BACKENDS)  # the model's default choice was measured
    assert fp32["kernel"] == "flash" and fp32["finite"]  # the CPU flash kernel, against the math one
    assert fp32["max_rel_err"] < 1e-4 and fp32["rel_l2_err"] < 1e-4
    # bf16 really ran in bf16: measurably off fp32 (an 8-bit mantissa), yet within the bound
    assert 1e-4 < bf16["rel_l2_err"] < checks.BF16_REL_L2 and bf16["dtype"] == "bfloat16"


def test_each_sdpa_kernel_alone_is_timed_and_checked_or_said_unavailable(smoke):
    rows = {row["kernel"]: row for row in _tables(smoke[0])["2b."]}
    assert set(rows) == {"cudnn", "flash", "efficient"}
    assert not rows["cudnn"]["available"] and not rows["efficient"]["available"]  # CUDA-only kernels, on a CPU
    flash = rows["flash"]
    assert flash["available"] and flash["fastest"] and flash["median_s"] > 0
    assert 0 < flash["rel_l2_err"] < 1e-5  # fp32: only the summation order differs from math


def test_the_pipeline_runs_end_to_end_in_every_offload_mode_with_the_same_latents(smoke):
    rows = _tables(smoke[0])["10."]
    assert [row["offload"] for row in rows] == ["none", "after_encode", "cpu"]
    for row in rows:
        assert row["latents_equal_none"] and row["latents_finite"] and row["written"] == "png"  # an image: a PNG
        assert row["total_s"] == pytest.approx(row["text_encode_s"] + row["denoise_s"] + row["decode_s"] +
                                               row["write_s"])


def test_the_fp8_section_runs_every_quantized_matmul_in_fp8_within_its_bound(tmp_path):
    """`--smoke --sections fp8`: the tiny DiT in fp32 and quantized in place, eager and compiled (aot_eager): each
    quantized layer one aten._scaled_mm (none in the reference), an error that is there and small, fewer bytes."""
    data = command.main(["--smoke", "--sections", "fp8", "--warmup", "1", "--repeats", "2", "--json",
                         str(tmp_path / "c.json")])
    tables = _tables(data)
    assert set(tables) == {"5.", "12.", "Checks"}
    rows = {row["variant"]: row for row in tables["12."]}
    assert list(rows) == ["float32 eager", "float32 torch.compile (aot_eager)", "fp8 eager",
                          "fp8 torch.compile (aot_eager)"]
    ref, fp8 = rows["float32 eager"], rows["fp8 eager"]
    layers = 4 * 2 * TINY_DIT_PARAMS["num_blocks"]  # 4 linears in each block but those fp8_skip names (none)
    assert fp8["scaled_mm_calls"] == fp8["scaled_mm_expected"] == layers and ref["scaled_mm_calls"] == 0
    assert fp8["fp8_skip"] == "[]" and fp8["fp8_skip_from"] == fp8_section.default_fp8_skip()[1]
    assert 0.5 < fp8["fp8_flop_share"] < 1  # the blocks' big matmuls are most of the tiny DiT's FLOPs too
    low, high = checks.FP8_REL_L2
    for row in rows.values():
        assert row["output_finite"] and row["median_s"] > 0 and row["peak_gib"] > 0
        assert row["speedup"] == pytest.approx(rows[f"float32 {row['variant'].split(' ', 1)[1]}"]["median_s"] /
                                               row["median_s"])
        if row["dtype"] == "fp8 e4m3":
            assert low < row["rel_l2_err"] < high and row["weights_ratio"] < checks.FP8_WEIGHT_RATIO
            assert fp8["weights_gib"] == row["weights_gib"] < ref["weights_gib"]
    assert rows["float32 torch.compile (aot_eager)"]["rel_l2_err"] < 1e-5  # aot_eager runs the same kernels
    verdicts = [row for row in tables["Checks"] if "fp8" in row["check"]]
    assert len(verdicts) == 8 and data["settings"]["checks_passed"] is True
    assert [row["passed"] for row in verdicts] == [True] * 6 + [None] * 2  # peak memory and speed-up: GPU only


def test_the_fp8_section_reads_fp8_skip_from_the_config_schema_or_says_why_not(monkeypatch):
    """dit.fp8_skip's default is launch/config.py's, which needs hydra-core; without it: none, and the reason."""
    if importlib.util.find_spec("hydra") is not None:
        from launch.config import DiTConfig
        assert fp8_section.default_fp8_skip() == (DiTConfig().fp8_skip, "launch.config DiTConfig")
    monkeypatch.setitem(sys.modules, "launch.config", None)  # what `import launch.config` meets without hydra
    skip, source = fp8_section.default_fp8_skip()
    assert skip == [] and source.startswith("[] (launch.config not importable: ")


def test_checks_pass_on_the_cpu_and_gpu_only_ones_are_not_applied(smoke):
    data, markdown = smoke
    checks = {row["check"].split(":")[0] if row["check"].startswith("sampler") else row["check"]: row
              for row in _tables(data)["Checks"]}
    assert data["settings"]["checks_passed"] is True
    assert all(row["passed"] is None for row in _tables(data)["Checks"] if row["check"].startswith("sampler"))
    assert checks["end-to-end estimate, best row s"]["passed"] is None  # the seed's 11 s is an H100 figure
    assert checks["every DiT and VAE output finite"]["passed"] is True
    assert "| fp32 flash vs fp32 math: max rel err |" in markdown


def test_a_failing_figure_fails_its_check():
    backends = [dict(kernel="efficient", finite=True, max_rel_err=2e-3, rel_l2_err=1e-6),
                dict(kernel="flash", finite=True, max_rel_err=0.01, rel_l2_err=0.02)]
    sdpa = [dict(kernel="cudnn", dtype="bfloat16", available=True, within_bound=False, rel_l2_err=0.05),
            dict(kernel="flash", dtype="bfloat16", available=False)]
    figures = dict(backends=backends, sdpa=sdpa, steps=[dict(output_finite=True)], vae=dict(output_finite=True),
                    sampler=dict(latents_finite=True, syncs_in_loop=1, syncs_total=2, warned_before_loop=0,
                                 warned_in_loop=0, warned_after_loop=1),
                    end_to_end=[dict(total_s=12.0)],
                    pipeline=[dict(offload="none", latents_equal_none=True, latents_finite=True, total_s=10.5),
                              dict(offload="cpu", latents_equal_none=False, latents_finite=True, total_s=14.0)],
                    tp=[{}, dict(rel_l2_err=0.01, speedup=0.9)],
                    plans=[dict(plan="ulysses=2", rel_l2_err=0.2), dict(plan="tp=2, sequence parallel", note="heads"),
                           dict(plan="VAE decode, rows split over 2", max_frame_diff=7)],
                    faults=[dict(fault="hang:1:2", exit_status=-9, capped=True, names_culprit=False,
                                 fault_to_exit_s=None)],
                    fp8=[dict(variant="bfloat16 eager", mode="eager", dtype="bfloat16", median_s=1.0, peak_gib=13.0,
                              scaled_mm_calls=0, speedup=1.0, output_finite=True),
                         # as quantize_dit not applied would look: no _scaled_mm, the reference's output and bytes
                         dict(variant="fp8 eager", mode="eager", dtype="fp8 e4m3", median_s=1.1, rel_l2_err=0.0,
                              weights_ratio=1.0, peak_gib=13.0, scaled_mm_calls=0, scaled_mm_expected=168,
                              speedup=0.9, output_finite=True),
                         dict(variant="torch.compile", mode="compiled", note="--no-compile")])
    verdicts = {row["check"]: row["passed"] for row in
                checks.check_rows(torch.device("cuda"), "published", figures, 2, 60.0)}
    assert verdicts == {
        "every DiT and VAE output finite": True,
        "fp32 efficient vs fp32 math: max rel err": False,  # 2e-3 > 1e-3
        "bf16 flash vs fp32 math: rel L2 err": True,
        "SDPA kernels alone within their error bound": False,  # the one available kernel is off by 5e-2
        "SDPA cudnn alone: rel L2 err vs fp32 math": False,
        "sampler: host syncs in the step loop (profiler)": False,
        "sampler: host syncs in the whole call (profiler; the finite check)": False,
        "sampler: sync warnings in the step loop (sync debug mode)": True,
        "sampler: sync warnings in the whole call (sync debug mode)": True,
        "end-to-end estimate, best row s": False,  # 12 s > the seed's 11 s
        "pipeline, offload=none: latents equal offload=none's and finite": True,
        "pipeline, offload=cpu: latents equal offload=none's and finite": False,  # streamed T5 changed the video
        "pipeline end to end, offload=none, total s": True,  # 10.5 s, within the seed's 11 s
        "tp=2 vs tp=1: rel L2 err": True,
        "tp=2 speed-up over tp=1": False,
        "ulysses=2 vs one rank: rel L2 err": False,  # 0.2 > 0.05 (a plan not run adds no check)
        "VAE decode, rows split over 2: max frame difference from one rank": False,  # 7 levels > 2
        "hang:1:2: non-zero exit within the cap": False,  # capped: it ran past the wall-clock cap
        "hang:1:2: one error line, naming rank 1": False,
        "hang:1:2: seconds from the fault to the exit": False,
        "fp8: aten._scaled_mm calls in one forward (one per quantized layer)": False,
        "fp8: aten._scaled_mm calls in the bfloat16 forward": True,
        "fp8 eager vs bfloat16 eager: rel L2 err (FP8 changed the output)": False,
        "fp8 eager vs bfloat16 eager: rel L2 err": True,
        "fp8: weight bytes / bfloat16's": False,
        "fp8: eager step peak memory / bfloat16's": False,
        "fp8 speed-up over bfloat16, eager": False,
    }


@pytest.mark.parametrize("breakage, error", [
    ("decode_raises", "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"),
    # A crash in native code (a sticky CUDA error, a segfault): only a section in its own process survives it.
    ("decode_aborts", "its process was killed by SIGABRT before reporting"),
])
def test_a_section_that_fails_or_crashes_fails_its_check_and_the_others_still_report(tmp_path, monkeypatch,
                                                                                    breakage, error):
    for name, value in break_env(breakage).items():  # breaks k4flash.vae in the section processes only
        monkeypatch.setenv(name, value)
    data = command.main(["--smoke", "--no-compile", "--warmup", "1", "--repeats", "1", "--sections",
                         "dit,backends,sampler,vae", "--json", str(tmp_path / "c.json")])
    tables = _tables(data)
    assert data["settings"]["checks_passed"] is False
    assert "4." not in tables and "7." not in tables  # no decode, so no end-to-end estimate either
    assert {"1.", "2.", "2b.", "3.", "5.", "6.", "Checks"} <= set(tables)
    (failed,) = [row for row in tables["Checks"] if row["passed"] is False]
    assert failed["check"] == "section 4 ran"
    assert failed["value"].startswith(error), failed["value"]
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["checks_passed"] is False


def test_a_killed_run_leaves_a_report_of_every_finished_section(tmp_path):
    """kill -9 of the command after its first section: the report on disk is whole and holds that section, and
    the section then running dies with the command rather than holding the GPU."""
    out = tmp_path / "out"
    command_line = [sys.executable, "-m", "bench.gpu_check", "--smoke", "--no-compile", "--warmup", "1", "--repeats",
                    "1", "--sections", "dit,sampler,vae", "--out", str(out)]
    check = subprocess.Popen(command_line, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out / "gpu_check.json").exists():
            time.sleep(0.1)
        assert (out / "gpu_check.json").exists(), "no report after the first section"
        check.kill()
        check.wait(30)
    finally:
        check.kill()
    data = json.loads((out / "gpu_check.json").read_text())
    tables = _tables(data)
    assert {"1.", "3.", "5.", "Checks"} <= set(tables) and "4." not in tables
    assert "**1. DiT at the geometry of the run**" in (out / "gpu_check.md").read_text()
    deadline = time.monotonic() + 10  # SIGKILL on the parent's death is immediate; its teardown takes a moment
    while True:
        survivors = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid).count(str(out))]
        if not survivors or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert survivors == [], f"section processes outlived the command: {survivors}"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_the_budget_skips_what_does_not_fit_and_the_report_says_so(tmp_path):
    """The README's subset-within-a-budget command, on the CPU: dit fits, faults (estimated 120 s) does not."""
    readme = readme_command("python -m bench.gpu_check --sections dit,vae --budget-s 300").text.split()
    options = [*readme[3:], "--smoke", "--no-compile", "--warmup", "1", "--repeats", "1", "--gpus", "2", "--out",
               str(tmp_path)]
    options[options.index("dit,vae")] = "dit,faults"
    options[options.index("300")] = "60"
    data = command.main(options)
    tables = _tables(data)
    assert {"1.", "3."} <= set(tables) and "9." not in tables
    notes = " ".join(data["notes"])
    assert "section 9 (faults) skipped: its estimate, 120 s, exceeds the" in notes, notes
    assert data["settings"]["checks_passed"] is True and data["settings"]["budget_s"] == 60


def test_a_section_past_its_time_is_stopped_and_named():
    result = command.run_isolated(sections.BY_NAME["dit"], ["--smoke", "--no-compile"], timeout_s=1.0)
    assert result["figures"] == {} and result["errors"] == {
        "1": "its process was stopped after 1 s (--budget-s / --section-cap-s) before reporting"}


def test_a_section_whose_package_is_missing_is_skipped_with_the_reason(tmp_path, monkeypatch):
    vae = sections.BY_NAME["vae"]
    monkeypatch.setitem(sections.BY_NAME, "vae", dataclasses.replace(vae, needs=("no_such_package_k4",)))
    data = command.main(["--smoke", "--sections", "vae", "--json", str(tmp_path / "c.json")])
    assert "section 4 (vae) skipped: needs no_such_package_k4, not installed" in " ".join(data["notes"])
    assert data["settings"]["checks_passed"] is True


def test_unknown_sections_are_refused_naming_the_allowed_ones():
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--sections", "dit,vea"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert "'dit,vea': allowed sections are dit, backends, sampler, vae, pipeline, fp8, tp, plans, faults" in \
        result.stderr


@pytest.mark.parametrize("card, bf16", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.05),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA B200", None)])
def test_peak_by_card_name(card, bf16):
    assert peaks.peak_tflops(card)["bf16"] == bf16
    assert peaks.peak_tflops(card, override=123.0)["bf16"] == 123.0


def _event(name, start, end=None, device=DeviceType.CPU):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=start if end is None else end),
                           device_type=device)


def test_host_syncs_are_counted_before_inside_and_after_the_step_loop():
    """What a CUDA profile holds, by hand: runtime calls named as kineto names them, GPU-side copies and
    the GPU-side twin of each marker, which must not move the loop's bounds."""
    events = [
        _event(sampler.MARK_SAMPLER, 0, 100), _event(sampler.MARK_SAMPLER, 1, 300, DeviceType.CUDA),
        _event("cudaStreamSynchronize", 5, 15),  # before the loop (drawing the noise); a call counts where it starts
        *[_event(sampler.MARK_DIT, t, t + 10) for t in (10, 30, 50, 70)],
        *[_event(sampler.MARK_STEP_END, t) for t in (25, 45, 65, 85)],
        _event(sampler.MARK_STEP_END, 250, device=DeviceType.CUDA),
        _event("cudaMemcpyAsync", 39), _event("cudaStreamSynchronize_v3020", 40),  # a sync inside a step
        _event("cuCtxSynchronize", 80, 95), _event("cudaLaunchKernel", 61), _event("cudaStreamWaitEvent", 62),
        _event("cudaMemcpyAsync", 89), _event("cudaStreamSynchronize", 90),  # the final finite check
        _event("Memcpy DtoH (Device -> Pageable)", 91, 92, DeviceType.CUDA),
        _event("cudaDeviceSynchronize", 120),  # after the sampler's range: the bench's own sync
    ]
    counts = sampler.count_syncs(events)
    assert {k: v for k, v in counts.items() if k != "sampler_profiled_s"} == dict(
        syncs_before_loop=1, syncs_in_loop=2, syncs_after_loop=1, syncs_total=4, dtoh_copies=1)
    assert counts["sampler_profiled_s"] == pytest.approx(100e-6)


def test_tensor_parallel_section_on_two_gloo_ranks():
    one, two = tp_section.tensor_parallel_rows(2, "tiny", "cpu", warmup=1, repeats=2)
    assert (one["tp"], two["tp"]) == (1, 2) and one["speedup"] == 1.0
    assert two["finite"] and two["rel_l2_err"] < 1e-5 and two["max_rel_err"] < 1e-5  # fp32: only the order differs
    assert two["median_s"] > 0 and two["speedup"] == pytest.approx(one["median_s"] / two["median_s"])


def test_the_other_plans_and_the_row_split_vae_on_two_gloo_ranks():
    from bench.gpu_check import plans
    assert [label for label, _ in plans.plan_list(8)] == ["tp=8, sequence parallel", "ulysses=8", "ulysses=2 x tp=4"]
    rows = {row["plan"]: row for row in plans.plan_rows(2, "tiny", "cpu", warmup=1, repeats=2, vae_repeats=1)}
    assert set(rows) == {"tp=2, sequence parallel", "ulysses=2", "VAE decode, rows split over 2"}
    for label in ("tp=2, sequence parallel", "ulysses=2"):  # fp32: only the summation order differs
        assert rows[label]["finite"] and 0 < rows[label]["rel_l2_err"] < 1e-5, rows[label]
    vae = rows["VAE decode, rows split over 2"]
    assert vae["frames"] == "9x64x96" and vae["max_frame_diff"] <= checks.VAE_FRAME_DIFF["cpu"]
    verdicts = checks.check_rows(torch.device("cpu"), "tiny", {"plans": list(rows.values())}, 2, 60.0)
    assert all(row["passed"] for row in verdicts), verdicts


def test_refuses_without_cuda_and_without_smoke():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bench.gpu_check needs a CUDA device")
    assert "--smoke" in lines[0]


@pytest.mark.parametrize("passed, status", [(True, 0), (False, 1)])
def test_exit_status_is_the_checks_verdict(monkeypatch, passed, status):
    """`python -m bench.gpu_check` (bench/gpu_check/__main__.py) exits 0 when every check passed, 1 otherwise."""
    monkeypatch.setattr(command, "main", lambda: {"settings": {"checks_passed": passed}})
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("bench.gpu_check", run_name="__main__")
    assert exited.value.code == status
