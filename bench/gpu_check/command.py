"""The command line of the check: its options, and one run from them to the report (whose settings say whether
every check passed: `python -m bench.gpu_check` exits with it).

Each section runs in a process of its own (bench/gpu_check/child.py). After each one the command prints that
section's tables on stderr and rewrites the JSON and Markdown report, so a run cut short (a timeout, an OOM kill,
the GPU lent for fewer minutes than hoped) leaves a valid report holding every finished section.
"""
import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import gpu_check
from bench.gpu_check.checks import check_rows
from bench.gpu_check.end_to_end import end_to_end_rows
from bench.gpu_check.run import CONFIGS, DEADLINE_ENV, STARTED_ENV, log, resolve_run
from bench.gpu_check.sections import BY_NAME, Figures, missing_modules
from bench.gpu_check.tables import add_tables, section_tables
from bench.report import Report, add_output_args, table_lines

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("gpu_check_report")


def _section_names(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed sections are {', '.join(BY_NAME)} (comma-separated)")
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=gpu_check.__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run on the CPU with the tiny config (= --device cpu)")
    parser.add_argument("--device", default="cuda", help="cuda (cuda:0) or cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="default: published on CUDA, tiny on the CPU")
    parser.add_argument("--sections", type=_section_names, default=list(BY_NAME),
                        help=f"comma-separated, run in this order: {','.join(BY_NAME)} (default: all)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget: a section whose estimate does not fit what is left is skipped, "
                             "one still running when it is spent is stopped; the report is written either way")
    parser.add_argument("--section-cap-s", type=float, default=900.0, help="the most one section may run")
    parser.add_argument("--gpus", type=int, default=None,
                        help="ranks for sections 8 and 9 (default: every visible GPU; 1 skips them)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU only: intra-op threads (tiny models on a busy machine are fastest on one)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vae-repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    parser.add_argument("--compile-backend", default=None, help="default: inductor; aot_eager on the CPU")
    parser.add_argument("--no-faults", action="store_true", help="skip section 9 (= leaving faults out of --sections)")
    parser.add_argument("--fault-timeout-s", type=float, default=60.0, help="parallel.timeout_s of the fault runs")
    parser.add_argument("--fault-cap-s", type=float, default=120.0, help="wall-clock cap of each fault run")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for the MFU column (default: bench/gpu_check/peaks.py by card name)")
    parser.add_argument("--out", type=Path, help=f"write DIR/gpu_check.json and DIR/gpu_check.md (default "
                                                 f"{DEFAULT_OUT}/ when neither --json nor --md is given)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    if args.no_faults and "faults" in args.sections:
        args.sections.remove("faults")
    return parser, args


class Progress:
    """What the run has so far (figures, errors, memory rows, notes), written out as a whole report at any time."""

    def __init__(self, run, args, json_path, md_path):
        self.run, self.args, self.json_path, self.md_path = run, args, json_path, md_path
        self.figures, self.memory, self.notes = Figures(), [], []

    def add(self, result: dict) -> None:
        self.figures.update(result["figures"])
        self.figures.errors.update(result["errors"])
        self.memory += result["memory"]
        if self.figures.get("steps") and self.figures.get("vae"):  # 7 follows from 3, 4 and (if it ran) 6
            self.figures["end_to_end"] = end_to_end_rows(self.figures["steps"], self.figures.get("sampler"),
                                                         self.figures["vae"])

    def report(self) -> Report:
        run, args = self.run, self.args
        report = Report("gpu_check", config=run.config_name, device=run.card,
                        dtype=str(run.dtype).replace("torch.", ""), latent="x".join(map(str, run.config["latent"])),
                        warmup=args.warmup, repeats=args.repeats, sections=",".join(args.sections),
                        budget_s=args.budget_s, compile_backend=None if args.no_compile else run.compile_backend,
                        gpus=run.world, peak_bf16_tflops=run.peak_flops / 1e12 if run.peak_flops else None)
        checks = check_rows(run.device, run.config_name, self.figures, run.world, args.fault_timeout_s,
                            self.figures.errors)
        report.settings["checks_passed"] = all(c["passed"] is not False for c in checks)
        add_tables(report, run, args, self.figures, self.memory, checks)
        for text in self.notes:
            report.note(text)
        if run.device.type != "cuda":
            report.note("CPU: the profiler records no CUDA calls, so the sync counts are 0 by construction; "
                        "checks marked - apply on a GPU only")
        report.note(f"FLOPs per step (cost.dit_flops): {run.flops['total'] / 1e12:.4g} TFLOP; T5 from cost.predict "
                    "(T5-XXL on an H100, the larger of compute and one read of its weights), not run")
        return report

    def write(self) -> dict:
        return self.report().write(self.json_path, self.md_path)

    def print_tables(self, keys) -> None:
        """The tables of these figures, as they stand, on stderr (the report itself goes to stdout at the end)."""
        for key, title, columns in section_tables(self.run, self.args):
            rows = self.figures.get(key) if key != "memory" else None
            if key in keys and rows:
                print("\n".join(["", *table_lines(title, columns, rows if isinstance(rows, list) else [rows])]),
                      file=sys.stderr, flush=True)


def run_isolated(section, argv, timeout_s) -> dict:
    """One section in its own process (and process group): its result, or one error saying how the process ended."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_section_") as tmp:
        result_path = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   K4FLASH_GPU_CHECK_PID=str(os.getpid()),  # child.PARENT_ENV
                   **{DEADLINE_ENV: repr(time.time() + timeout_s)})
        child = subprocess.Popen([sys.executable, "-m", "bench.gpu_check.child", section.name, str(result_path),
                                  *argv], env=env, stdout=2, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        tail = collections.deque(maxlen=20)

        def relay():  # its stderr shows live, and its last lines say why it died
            for line in child.stderr:
                sys.stderr.write(line)
                tail.append(line.rstrip("\n"))
        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        timed_out = False
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if child.poll() is None:  # timed out, or the command itself was interrupted: end the whole group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        reader.join(5)
        if result_path.exists():
            return json.loads(result_path.read_text())
    code = child.returncode
    how = (f"was stopped after {timeout_s:.0f} s (--budget-s / --section-cap-s)" if timed_out else
           f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
    last = next((line for line in reversed(tail) if line.strip()), "")
    return dict(figures={}, memory=[], errors={section.numbers.split(",")[0]: (
        f"its process {how} before reporting" + (f"; last line: {last.strip()}" if last else ""))[:300]})


def skip_reason(section, run, estimate, left):
    """Why `section` does not run (None: it runs); left: seconds of --budget-s left, None without a budget."""
    missing = missing_modules(section)
    if section.ranks and run.world <= 1:
        return "one rank (--gpus N, N > 1, runs it)"
    if missing:
        return f"needs {', '.join(missing)}, not installed (bench.wheelhouse fetches it)"
    if left is not None and estimate > left:
        return f"its estimate, {estimate} s, exceeds the {max(left, 0):.0f} s left of --budget-s"
    return None


def main(argv=None) -> dict:
    """One run of the check; returns the report's JSON-able dict (settings["checks_passed"]: the verdict)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ[STARTED_ENV] = repr(time.time())
    parser, args = parse_args(argv)
    run = resolve_run(parser, args)
    json_path, md_path = args.json, args.md
    if args.out or not (json_path or md_path):
        out = args.out or DEFAULT_OUT
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = json_path or out / "gpu_check.json", md_path or out / "gpu_check.md"
    progress = Progress(run, args, json_path, md_path)
    started = time.monotonic()
    for section in [BY_NAME[name] for name in args.sections]:
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - started)
        estimate = section.estimate(run.device.type, compiled=not args.no_compile)
        skipped = skip_reason(section, run, estimate, left)
        if skipped:
            progress.notes.append(f"section {section.numbers} ({section.name}) skipped: {skipped}")
            log(f"{section.name}: skipped, {skipped}")
        else:
            log(f"{section.name}: sections {section.numbers}, {section.what} (estimate {estimate} s)")
            clock = time.monotonic()
            cap = args.section_cap_s if left is None else min(args.section_cap_s, left)
            result = run_isolated(section, argv, cap)
            progress.add(result)
            progress.notes.append(f"section {section.numbers} ({section.name}): {time.monotonic() - clock:.0f} s "
                                  f"(estimate {estimate} s)")
            progress.print_tables({*result["figures"], "end_to_end"})
        progress.write()
    log("done")
    return progress.report().emit(json_path, md_path)
