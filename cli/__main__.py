"""`python -m cli` is the `stylebot` command."""

import signal
import sys

# Starting takes seconds (imports, models): a SIGTERM meanwhile ends the process quietly, with
# nothing to hand back yet. The serving loops install their own handlers once they run.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

from cli import run  # noqa: E402  (after the handler: this import is the slow part)

run()
