"""What `run_inference_distil.py` does with its argv and its Hydra config: fit the argv, then run the mode and
exit with a status that says what happened.

The jobs are elsewhere: checks before loading (launch/checks.py), config → plan (launch/planning.py),
the run's life on the mesh and its ending (launch/lifecycle.py), the prompt loop (launch/generate.py),
the server (launch/serve.py).
"""
import logging
import os
import sys
import threading
import time

from parallel.plan import env_world
from parallel.status import ExitStatus

from .batch import StorageStop
from .checks import check_config
from .lifecycle import catch_sigterm, ending, shutdown_if_started

log = logging.getLogger("k4flash")

# Ranks other than 0 neither create a Hydra run directory nor write .hydra/ or a log file, even when
# the user asks for them (hydra.run.dir=...): the job's one folder is rank 0's, never one per rank.
NON_MAIN_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
                           "hydra/hydra_logging=none")


def prepare_argv(argv: list) -> None:
    """Fit a launcher's argv for Hydra: drop torch.distributed.launch's flag, quiet non-main ranks."""
    strip_launcher_args(argv)
    if int(os.environ.get("RANK", "0")) != 0 and not any(a.startswith("--") for a in argv[1:]):
        argv.extend(NON_MAIN_RANK_OVERRIDES)


def strip_launcher_args(argv: list) -> None:
    """Remove `--local-rank=N` / `--local_rank N` (torch.distributed.launch) from argv, keeping LOCAL_RANK."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        for flag in ("--local-rank", "--local_rank"):
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                del argv[i:i + 2]
                break
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                del argv[i]
                break
        else:
            i += 1


def run(cfg) -> None:
    """Run the configured generation(s) or server and exit with a status that says what happened.

    0 done · 1 a prompt failed (batch: the others are written; non-finite latents), or the outputs' disk refused a
    write (full, over quota, read-only: the run stops, finished outputs kept; re-run to resume) · 2 bad
    input, before anything loads · 3 another rank died, hung or failed (rank 0 names it)
    · 130 Ctrl-C · 143 SIGTERM (parallel/status.py). Every failure is one `error:` line from rank 0,
    finished outputs are kept, nothing half-written is left, and the process group is destroyed on
    every path. Under torchrun every rank runs this; each model group's first rank writes.
    """
    is_main = env_world()[0] == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    on_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    if on_main_thread:
        catch_sigterm(True)
    try:
        check_config(cfg)
        if cfg.mode == "serve":
            from .serve import serve_from_config
            failed = serve_from_config(cfg)
        else:
            from .generate import generate_from_config
            failed = generate_from_config(cfg)
        code, message = ending(failed_prompts=failed)
    except BaseException as err:  # noqa: B902 (every ending has its status; `ending` re-raises the rest)
        if isinstance(err, SystemExit):
            raise
        code, message = (ExitStatus.PROMPT_FAILED, str(err)) if isinstance(err, StorageStop) else ending(err)
    finally:
        if on_main_thread:
            catch_sigterm(False)
        shutdown_if_started()
    if code:
        if is_main:
            sys.stderr.write(f"error: {message}\n")  # one write, never split by another rank's (see health._exit)
            sys.stderr.flush()
        elif code in (ExitStatus.BAD_INPUT, ExitStatus.PROMPT_FAILED):
            # Every rank refuses bad input (or ends a failed batch) at once; the first to exit makes torchrun SIGTERM
            # the others, which would cut rank 0 off before its line. The other ranks leave rank 0 a moment to print it.
            time.sleep(1.0)
        sys.exit(code)
