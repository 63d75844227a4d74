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
