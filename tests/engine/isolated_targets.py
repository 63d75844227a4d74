"""Tiny child-process targets for the run_isolated tests (imported by name in a fresh process)."""

from __future__ import annotations

import time

import numpy as np


def hold(mib: int, seconds: float = 0.2) -> dict:
    """Touch ``mib`` MiB, keep it ``seconds``, return a checksum."""
    block = np.ones(mib * 1024 * 1024 // 8)
    time.sleep(seconds)
    return {"sum": float(block[:4].sum()), "mib": mib}


def fail() -> dict:
    """Raise an ordinary error."""
    raise ValueError("broken on purpose")


def out_of_memory() -> dict:
    """Raise MemoryError as an allocation failure would."""
    raise MemoryError("cannot allocate")


def sleep(seconds: float) -> dict:
    """Sleep (for the timeout test)."""
    time.sleep(seconds)
    return {}


def hold_then_reset(mib: int) -> dict:
    """Touch ``mib`` MiB, free it, reset the high-water mark, and report the peak seen before
    (as a child measuring per-phase peaks does)."""
    from lrss_ds.engine.isolated import PROCESS_PEAK_KEY
    from lrss_ds.engine.resident_memory import PeakMemory

    peak = PeakMemory()
    block = np.ones(mib * 1024 * 1024 // 8)
    del block
    seen = peak.bytes()
    peak.restart()
    return {"source": peak.source, PROCESS_PEAK_KEY: seen}


def sleep_after_writing_pid(path: str, seconds: float) -> dict:
    """Write this process's pid to ``path``, then sleep (for the parent-death test)."""
    import os
    from pathlib import Path

    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return {}
