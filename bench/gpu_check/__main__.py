"""`python -m bench.gpu_check`: exit status 0 when every check passes, 1 when one fails (2: CUDA asked for and
none visible)."""
import sys

from bench.gpu_check.command import main

if __name__ == "__main__":
    sys.exit(0 if main()["settings"]["checks_passed"] else 1)
