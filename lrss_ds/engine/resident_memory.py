"""This process's peak resident set: over its life, and over stretches of work (Linux's resettable high-water mark).

``ru_maxrss`` only ever grows, so it cannot tell which part of a training step set the peak.
Linux lets a process reset its high-water mark (write ``5`` to ``/proc/self/clear_refs``, read
``VmHWM`` from ``/proc/self/status``). A reset also lowers what ``getrusage`` and a parent's
``wait4`` report afterwards, so code that resets must keep the earlier peaks itself (as
:class:`PeakMemory` readers do by reading before they reset).
"""

from __future__ import annotations

import resource
from pathlib import Path

GIB = 1024**3


def lifetime_peak_bytes() -> int:
    """This process's peak resident set so far (``ru_maxrss``), in bytes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """This process's peak resident set over a stretch of work.

    On Linux the high-water mark is reset at construction and by :meth:`restart`; elsewhere the
    process-lifetime peak (``ru_maxrss``) is reported, and ``source`` says which.
    """

    def __init__(self) -> None:
        self.source = "VmHWM"
        self.restart()

    def restart(self) -> None:
        """Start a new stretch: the peak is counted from the current resident set."""
        if self.source != "VmHWM":
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.source = "ru_maxrss"

    def bytes(self) -> int:
        """Peak resident set since construction or the last :meth:`restart`, in bytes."""
        if self.source == "VmHWM":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return lifetime_peak_bytes()

    def gib(self) -> float:
        """:meth:`bytes` in GiB."""
        return self.bytes() / GIB


__all__ = ["PeakMemory", "lifetime_peak_bytes"]
