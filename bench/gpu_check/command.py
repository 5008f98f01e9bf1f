"""The command line of the check: its options, and one run from them to the report (whose settings say whether
every check passed: `python -m bench.gpu_check` exits with it)."""
import argparse
from pathlib import Path

from bench import gpu_check
from bench.gpu_check.checks import check_rows
from bench.gpu_check.memory import StageMemory
from bench.gpu_check.run import CONFIGS, log, resolve_run
from bench.gpu_check.sections import multi_rank_sections, one_device_sections
from bench.gpu_check.tables import add_tables
from bench.report import Report, add_output_args


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=gpu_check.__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run on the CPU with the tiny config (= --device cpu)")
    parser.add_argument("--device", default="cuda", help="cuda (cuda:0) or cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="default: published on CUDA, tiny on the CPU")
    parser.add_argument("--gpus", type=int, default=None,
                        help="ranks for sections 8 and 9 (default: every visible GPU; 1 skips them)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU only: intra-op threads (tiny models on a busy machine are fastest on one)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vae-repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    parser.add_argument("--compile-backend", default=None, help="default: inductor; aot_eager on the CPU")
    parser.add_argument("--no-faults", action="store_true", help="skip section 9")
    parser.add_argument("--fault-timeout-s", type=float, default=60.0, help="parallel.timeout_s of the fault runs")
    parser.add_argument("--fault-cap-s", type=float, default=120.0, help="wall-clock cap of each fault run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (H100: 989.4)")
    parser.add_argument("--out", type=Path, help="write DIR/gpu_check.json and DIR/gpu_check.md")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    return parser, args


def main(argv=None) -> dict:
    """One run of the check; returns the report's JSON-able dict (settings["checks_passed"]: the verdict)."""
    parser, args = parse_args(argv)
    run = resolve_run(parser, args)
    report = Report("gpu_check", config=run.config_name, device=run.card, dtype=str(run.dtype).replace("torch.", ""),
                    latent="x".join(map(str, run.config["latent"])), warmup=args.warmup, repeats=args.repeats,
                    compile_backend=None if args.no_compile else run.compile_backend, gpus=run.world)
    memory = StageMemory(run.device)
    sections = one_device_sections(run, args, memory)
    multi_rank_sections(run, args, sections, report)

    checks = check_rows(run.device, run.config_name, sections, run.world, args.fault_timeout_s, sections.errors)
    report.settings["checks_passed"] = all(c["passed"] is not False for c in checks)
    add_tables(report, run, args, sections, memory, checks)
    if run.device.type != "cuda":
        report.note("CPU: the profiler records no CUDA calls, so the sync counts are 0 by construction; "
                    "checks marked - apply on a GPU only")
    report.note(f"FLOPs per step (cost.dit_flops): {run.flops['total'] / 1e12:.4g} TFLOP; T5 from cost.predict "
                "(T5-XXL on an H100, the larger of compute and one read of its weights), not run")
    json_path, md_path = args.json, args.md
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = json_path or args.out / "gpu_check.json", md_path or args.out / "gpu_check.md"
    log("done")
    return report.emit(json_path, md_path)
