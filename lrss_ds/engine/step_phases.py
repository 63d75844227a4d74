"""Marks where the trainer's step passes from forward and loss to backward to the optimizer step, without copying the step."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from lrss_ds.engine.resident_memory import PeakMemory, lifetime_peak_bytes

PHASES: tuple[str, ...] = ("forward", "backward", "step")
"""The phases of :func:`lrss_ds.engine.trainer.train_step`: forward and loss, ``engine.backward``,
``engine.step``."""


@contextlib.contextmanager
def step_phases(engine: Any, on_end: Callable[[str], None]) -> Iterator[None]:
    """Call ``on_end(phase)`` as each phase of the trainer steps run inside the block ends.

    ``engine.backward`` and ``engine.step`` are wrapped for the block: "forward" ends when
    backward starts, "backward" when the optimizer step starts, "step" when it returns; the
    next micro-batch's forward starts there. A forward that is not followed by a backward (a
    non-finite loss drops the micro-batch) ends at the block's exit.

    Args:
        engine: the DeepSpeed engine (anything with ``backward`` and ``step``).
        on_end: called with the name of the phase that just ended (see :data:`PHASES`).
    """
    current = "forward"
    begun = True  # the block starts with a forward; after a step returns, the next has not begun
    backward, step = engine.backward, engine.step

    def move_to(phase: str) -> None:
        nonlocal current, begun
        on_end(current)
        current, begun = phase, True

    def marked_backward(*args: Any, **kwargs: Any) -> Any:
        move_to("backward")
        return backward(*args, **kwargs)

    def marked_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal begun
        move_to("step")
        result = step(*args, **kwargs)
        move_to("forward")
        begun = False
        return result

    engine.backward, engine.step = marked_backward, marked_step
    try:
        yield
    finally:
        del engine.backward, engine.step  # the engine's own methods again
    if begun:
        on_end(current)


class PhasePeaks:
    """Seconds and memory peaks per phase over the steps run under it (an ``on_end`` for :func:`step_phases`).

    Per phase, over every step: wall seconds (summed), peak RSS (the resettable high-water mark;
    only where it can be reset), the accelerator allocator's allocated and reserved peaks (when
    ``device`` is CUDA) and,
    while :attr:`simulator` is set, the simulated device and host peaks. Resetting the
    high-water mark lowers ``ru_maxrss``: :attr:`process_peak_bytes` keeps every peak seen
    before a reset.

    Args:
        device: the engine's device (CUDA peaks are read and reset per phase there).
    """

    def __init__(self, device: Any = None) -> None:
        self.on_cuda = getattr(device, "type", None) == "cuda"
        self.device = device
        self.process_peak_bytes = lifetime_peak_bytes()
        self.rss = PeakMemory()
        self.simulator: Any = None
        self.seconds: dict[str, float] = {}
        self.rss_bytes: dict[str, int] = {}
        self.accelerator_bytes: dict[str, int] = {}
        self.accelerator_reserved_bytes: dict[str, int] = {}
        self.simulated_device_bytes: dict[str, int] = {}
        self.simulated_host_bytes: dict[str, int] = {}
        self.started = time.perf_counter()

    def begin_step(self, simulator: Any = None) -> None:
        """Start a step's clock; ``simulator`` (a ``DeviceMemorySimulator`` or None) is read per phase."""
        self.simulator = simulator
        self.started = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.started
        self.started = now
        peak = self.rss.bytes()
        self.rss.restart()
        self.process_peak_bytes = max(self.process_peak_bytes, peak)
        if self.rss.source == "VmHWM":
            _keep_max(self.rss_bytes, phase, peak)
        if self.on_cuda:
            import torch

            _keep_max(self.accelerator_bytes, phase, torch.cuda.max_memory_allocated(self.device))
            _keep_max(self.accelerator_reserved_bytes, phase, torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.simulator is not None:
            _keep_max(self.simulated_device_bytes, phase, self.simulator.peak_device_bytes)
            _keep_max(self.simulated_host_bytes, phase, self.simulator.peak_host_bytes)
            self.simulator.reset_peaks()

    def process_peak(self) -> int:
        """This process's peak resident set, resets included."""
        return max(self.process_peak_bytes, self.rss.bytes())


def _keep_max(peaks: dict[str, int], phase: str, value: int) -> None:
    peaks[phase] = max(peaks.get(phase, 0), int(value))


__all__ = ["PHASES", "PhasePeaks", "step_phases"]
