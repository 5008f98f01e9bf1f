"""A run's life on its ranks: the mesh, the heartbeats, and every way it can end, as one exit status.

`on_the_mesh` joins the process group of the run's Plan with a heartbeat thread watching the other
ranks (parallel/health.py), runs the body and, on any failure, has rank 0 name the rank at fault.
`ending` maps how the run ended to the status of parallel/status.py and rank 0's `error:` line.
"""
import logging
import signal
import sys
import threading

from parallel.status import ExitStatus

from .checks import UsageError

log = logging.getLogger("k4flash")
INPUT_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError)


class DistributedFailure(RuntimeError):
    """Another rank died, hung or failed; the message names it (exit status 3)."""


class Terminated(BaseException):
    """SIGTERM (the launcher or the scheduler stopping this rank): unwind like Ctrl-C, cleaning up."""


_UNWINDING = threading.Event()  # set while a failure is being reported: a late SIGTERM must not cut it short


def _raise_terminated(signum, frame):
    if not _UNWINDING.is_set():
        _UNWINDING.set()
        raise Terminated(f"received {signal.Signals(signum).name}")


def catch_sigterm(on: bool) -> None:
    """SIGTERM raises Terminated in the main thread (on), or is the default again (off)."""
    if on:
        _UNWINDING.clear()
    signal.signal(signal.SIGTERM, _raise_terminated if on else signal.SIG_DFL)


def on_the_mesh(cfg, plan, body, grace_s=None):
    """body(runtime, health) on this rank of the plan's mesh, heartbeats watching; failures of other ranks are
    re-raised as DistributedFailure naming the culprit (rank 0). grace_s: how long the main thread may take to
    unwind after SIGTERM before the heartbeat thread exits for it (a server drains)."""
    from parallel.health import GRACE_S, RankHealth
    from parallel.runtime import init_runtime

    runtime = init_runtime(cfg.device, cfg.parallel.timeout_s, plan=plan)
    health = None
    if runtime.distributed:
        from k4flash.outputs import discard_in_flight
        health = RankHealth.start(runtime.rank, runtime.world_size, timeout_s=cfg.parallel.timeout_s,
                                  watch=runtime.peers(), on_exit=discard_in_flight, grace_s=grace_s or GRACE_S)
    try:
        return body(runtime, health)
    except BaseException as err:
        if health is None:
            raise
        _UNWINDING.set()  # torchrun SIGTERMs the survivors when a rank dies: finish naming it first
        health.report(err)
        if not health.claim():  # the heartbeat thread is already ending the process with its verdict
            threading.Event().wait()
        if runtime.is_main and _is_distributed_failure(err):
            raise DistributedFailure(health.explain(err)) from err
        raise
    finally:
        if health is not None:
            health.stop()


def _is_distributed_failure(err: BaseException) -> bool:
    """What rank 0 reports as a multi-rank failure (exit 3, the culprit named): a broken collective, SIGTERM,
    or an error on a rank that is not bad input, a failed prompt (non-finite latents) or Ctrl-C."""
    from parallel.health import is_collective_failure

    if is_collective_failure(err) or isinstance(err, Terminated):
        return True
    return not isinstance(err, INPUT_ERRORS + (FloatingPointError, KeyboardInterrupt, DistributedFailure))


def ending(err: BaseException = None, failed_prompts: int = 0) -> tuple:
    """(exit status, rank 0's error line or None) for a run that raised `err` (None: it returned, with
    `failed_prompts` failed). Anything else is re-raised: a bug gets its traceback."""
    if err is None:
        if failed_prompts:
            return ExitStatus.PROMPT_FAILED, f"{failed_prompts} prompt(s) failed; re-run the same command to retry them"
        return ExitStatus.OK, None
    if isinstance(err, INPUT_ERRORS):
        return ExitStatus.BAD_INPUT, str(err)
    if isinstance(err, FloatingPointError):  # k4flash.sampler.NonFiniteLatentsError: the latents hold NaN/inf
        return ExitStatus.PROMPT_FAILED, str(err)
    if isinstance(err, DistributedFailure):
        return ExitStatus.DISTRIBUTED, f"distributed run failed: {err}"
    if isinstance(err, KeyboardInterrupt):
        return ExitStatus.INTERRUPTED, "interrupted; finished outputs are kept, re-run the same command to resume"
    if isinstance(err, Terminated):
        return ExitStatus.TERMINATED, f"terminated ({err}); finished outputs are kept, re-run to resume"
    if isinstance(err, Exception):
        from parallel.health import is_collective_failure

        if is_collective_failure(err):
            return ExitStatus.DISTRIBUTED, f"distributed run failed: {str(err).splitlines()[0]}"
    raise err


def shutdown_if_started() -> None:
    """Destroy the process group if one was formed; bad input never imported parallel.runtime (nor torch)."""
    if "parallel.runtime" in sys.modules:
        from parallel.runtime import shutdown_runtime
        shutdown_runtime()
