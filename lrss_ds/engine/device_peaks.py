"""Peak device memory of each phase of a run (train steps, evaluation), from the accelerator's counters.

The accelerator counts the peak of memory allocated to tensors and of memory its caching
allocator reserved (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` on CUDA) since
its last reset. :meth:`PhasePeaks.phase` resets both when a phase starts, so a training step's
figure never holds an evaluation's peak and the other way round. The CPU accelerator answers these
calls with the process's RSS, a host figure; on it every figure here is :data:`NOT_MEASURED`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from lrss_ds.units import GIB
NOT_MEASURED = "n/a (CPU)"


def _accelerator() -> Any:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


class PhasePeaks:
    """Device memory peaks per named phase: of the windows since the last :meth:`take`, and of the run.

    Use::

        peaks = PhasePeaks()
        with peaks.phase("train"):
            train_step(...)
        log(peaks.line(peaks.take("train")))
        metrics["device"] = peaks.summary()
    """

    def __init__(self) -> None:
        self.window: dict[str, dict[str, float]] = {}
        self.run: dict[str, dict[str, float]] = {}

    @staticmethod
    def measured() -> bool:
        """True when the accelerator has device memory of its own (not the CPU accelerator)."""
        return _accelerator().device_name() != "cpu"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Reset the accelerator's peaks, run the body, fold the peaks it reached into ``name``'s."""
        if not self.measured():
            yield
            return
        accelerator = _accelerator()
        accelerator.reset_peak_memory_stats()
        try:
            yield
        finally:
            reached = {
                "max_allocated_gib": accelerator.max_memory_allocated() / GIB,
                "max_reserved_gib": accelerator.max_memory_reserved() / GIB,
            }
            for table in (self.window, self.run):
                old = table.setdefault(name, dict(reached))
                for key, value in reached.items():
                    old[key] = max(old[key], value)

    def take(self, name: str) -> dict[str, float] | str:
        """``name``'s peaks since the last call (GiB), and start a new window; :data:`NOT_MEASURED` on CPU."""
        if not self.measured():
            return NOT_MEASURED
        return self.window.pop(name, {"max_allocated_gib": 0.0, "max_reserved_gib": 0.0})

    def summary(self) -> dict[str, dict[str, float]] | str:
        """Every phase's peaks over the whole run (GiB), for ``metrics.json``; :data:`NOT_MEASURED` on CPU."""
        return {name: dict(peaks) for name, peaks in self.run.items()} if self.measured() else NOT_MEASURED

    @staticmethod
    def line(peaks: dict[str, float] | str) -> str:
        """``device max alloc/reserved 1.23/1.50G`` (or ``device n/a (CPU)``) for a log line."""
        if isinstance(peaks, str):
            return f"device {peaks}"
        return f"device max alloc/reserved {peaks['max_allocated_gib']:.2f}/{peaks['max_reserved_gib']:.2f}G"
