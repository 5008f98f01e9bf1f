"""torchrun for k4flash jobs: exit with the ranks' documented status, and keep the screen to their error line.

    python -m launch.torchrun [torchrun options] run_inference_distil.py [overrides]

Bare torchrun exits 1 whatever its ranks said and prints its own report of every failed rank
(a ChildFailedError traceback, ~40 lines, with the ranks it stopped shown as SIGTERM). This is
torchrun itself (torch.distributed.run), started the same way, with two differences:
- its exit status is rank 0's documented one (0, 1, 2, 3, 130, 143: README "When things go wrong"),
  or 3 when a rank crashed or was killed without one;
- its failure report and its per-process logging are left out when rank 0 has already printed the
  one `error:` line; for a crash it prints one line naming the rank instead.
launch/torchrun.sh and launch/slurm.sbatch start jobs through it.
"""
import logging
import os
import signal
import sys

from parallel.status import DOCUMENTED, ExitStatus


def job_status(exit_codes: dict) -> tuple:
    """(status, message or None) from the failed ranks of this node: {global rank: exit code, negative for
    a signal}.

    - Rank 0 prints the job's `error:` line, so its documented status is the job's.
    - Statuses 1, 2 and 3 are decided alike on every rank (the same input, the summed failures, the same
      broken group); when the launcher stopped rank 0 after it printed (a SIGTERM once another rank
      exited first), the lowest such rank's status is the job's.
    - A rank that exited otherwise (a crash, a signal other than the launcher's SIGTERM) makes it 3, with
      one line naming the rank.
    - On a node without rank 0 that saw no crash: the failure its ranks exited with (3 when node 0 was lost and
      this node's first rank printed the line), else 0: rank 0's node reports the job.
    """
    stopped = (-signal.SIGTERM, -signal.SIGINT, ExitStatus.INTERRUPTED, ExitStatus.TERMINATED)
    if exit_codes.get(0) in DOCUMENTED:
        return exit_codes[0], None
    crashes = sorted((r, c) for r, c in exit_codes.items() if c not in DOCUMENTED and c not in stopped)
    causes = sorted((r, c) for r, c in exit_codes.items()
                    if c in (ExitStatus.PROMPT_FAILED, ExitStatus.BAD_INPUT, ExitStatus.DISTRIBUTED))
    if crashes:
        rank, code = crashes[0]
        try:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
                f"exited with status {code} (a crash: its output is above)"
        except ValueError:
            how = f"was killed by signal {-code}"
        return ExitStatus.DISTRIBUTED, f"rank {rank} {how}"
    if 0 not in exit_codes:
        return (causes[0][1] if causes else 0), None
    if causes:
        return causes[0][1], None
    code = exit_codes[0]  # stopped by a signal: report it as the ranks do
    return {-signal.SIGINT: ExitStatus.INTERRUPTED, -signal.SIGTERM: ExitStatus.TERMINATED}.get(code, code), None


def _quiet_agent_logs() -> None:
    """The agent logs each process it stops or sees fail (W/E lines); the ranks' own lines say it better."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from parallel.layout import LaunchConflict, node_claim

    # torchrun sets this for its workers with a banner on every launch; the same value, without the banner.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _quiet_agent_logs()
    try:
        with node_claim(args):  # two launchers started as node 0: an `error:` line each, not a 600 s wait
            run(args)
    except LaunchConflict as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    except ChildFailedError as err:
        status, message = job_status({rank: failure.exitcode for rank, failure in err.failures.items()})
        if message:
            print(f"error: {message}", file=sys.stderr)
        return status
    except SignalException as err:  # the launcher itself was stopped; it has stopped the ranks, which reported
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
