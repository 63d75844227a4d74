"""Turn SIGTERM into ``SystemExit`` so that a killed command runs its clean-up like Ctrl-C does."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from types import FrameType
from typing import Iterator

EXIT_TERMINATED = 128 + signal.SIGTERM
"""Exit code of a command stopped by SIGTERM (the shell's convention for death by that signal)."""


@contextlib.contextmanager
def terminate_as_exit(command: str) -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit(143)`` in the main thread.

    Why: SIGTERM's default action ends the process at once, so ``finally`` blocks never run and
    temporary files and child processes outlive it; as an exception it unwinds like
    ``KeyboardInterrupt`` does for Ctrl-C. Python runs the handler between bytecodes, so a
    long call into C (a GDAL copy) finishes first. Further SIGTERMs are ignored while the
    clean-up runs (SIGKILL still ends it). Outside the main thread nothing changes.

    Args:
        command: the command name for the one line printed on SIGTERM (``"lrss-ds predict"``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        print(f"{command}: terminated (SIGTERM); cleaning up", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
