"""One section of the check in a process of its own, started by bench/gpu_check/command.py:

    python -m bench.gpu_check.child SECTION RESULT.json [the command's own options]

It writes RESULT.json ({"figures", "errors", "memory"}) when the section ends, raised or not; a process that dies
(a crash in native code, an out-of-memory kill, a timeout) writes nothing, and the command reports how it ended.
"""
import json
import os
import signal
import sys
from pathlib import Path


PARENT_ENV = "K4FLASH_GPU_CHECK_PID"


def die_with_parent() -> None:
    """SIGKILL this process when the command dies (a `kill -9` of the command must not leave a section holding the
    GPU): Linux's PR_SET_PDEATHSIG, set first thing; a parent already gone by then ends it at once."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the command's own cleanup is all there is
        return
    # The command's pid, from the command itself: one read here could already be the reaper's, had it died since
    # the fork.
    if os.getppid() != int(os.environ.get(PARENT_ENV, os.getppid())):
        os._exit(1)


def main(argv=None) -> int:
    die_with_parent()
    from bench.gpu_check.command import parse_args
    from bench.gpu_check.memory import StageMemory
    from bench.gpu_check.run import resolve_run
    from bench.gpu_check.sections import BY_NAME, Figures, error_line

    name, result_path, *options = sys.argv[1:] if argv is None else argv
    parser, args = parse_args(options)
    section = BY_NAME[name]
    run = resolve_run(parser, args)
    memory, figures = StageMemory(run.device), Figures()
    try:
        section.run(run, args, memory, figures)
    except Exception as err:  # noqa: BLE001 (a part outside a guard: the section's own failure, reported)
        import traceback
        traceback.print_exc()
        figures.errors[section.numbers.split(",")[0]] = error_line(err)
    result = Path(result_path)
    partial = result.with_suffix(".partial")
    partial.write_text(json.dumps(dict(figures=dict(figures), errors=figures.errors, memory=memory.rows),
                                  default=str))
    os.replace(partial, result)  # whole or absent: the command never reads half a result
    return 0


if __name__ == "__main__":
    sys.exit(main())
