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

from lrss_ds.units import GIB


def lifetime_peak_bytes() -> int:
    """This process's peak resident set so far (``ru_maxrss``), in bytes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def program_peak_bytes() -> int | None:
    """Peak resident set of the program this process runs, since its ``exec`` (``VmHWM``); ``None`` off Linux.

    Unlike ``ru_maxrss`` (and a parent's ``wait4``) it does not include the resident set of the
    process that started this one: Linux carries the pre-``exec`` high-water mark, which after
    ``vfork``/``fork`` is the parent's, into ``ru_maxrss`` (measured: a child whose own peak
    was 0.61 GiB, started from a pytest worker, reported 1.28 GiB there). A
    :class:`PeakMemory` reset lowers it too.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


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
            peak = program_peak_bytes()
            if peak is not None:
                return peak
        return lifetime_peak_bytes()

    def gib(self) -> float:
        """:meth:`bytes` in GiB."""
        return self.bytes() / GIB


__all__ = ["PeakMemory", "lifetime_peak_bytes", "program_peak_bytes"]
