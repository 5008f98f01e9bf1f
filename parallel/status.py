"""The exit statuses of a k4flash job: one table, read by the CLI, the heartbeat thread and the torchrun wrapper
(README "When things go wrong"). No torch."""
import signal
from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    PROMPT_FAILED = 1  # a prompt failed (a batch writes the others; re-running retries it)
    BAD_INPUT = 2  # refused before any weights load or process group forms
    DISTRIBUTED = 3  # another rank died, hung or raised; rank 0 names it
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    TERMINATED = 143  # SIGTERM (128 + SIGTERM)


DOCUMENTED = {ExitStatus.PROMPT_FAILED: "a prompt failed", ExitStatus.BAD_INPUT: "bad input",
              ExitStatus.DISTRIBUTED: "a rank failed", ExitStatus.INTERRUPTED: "interrupted",
              ExitStatus.TERMINATED: "terminated"}
SIGNAL_STATUS = {signal.SIGINT: ExitStatus.INTERRUPTED, signal.SIGTERM: ExitStatus.TERMINATED}
