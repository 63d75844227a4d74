"""When training stops: after ``train.iterations``, or earlier when a CPU-time or wall-time budget is spent.

``train.iterations`` is always the cap and the LR schedule's time axis (``poly`` ends there,
``step`` milestones count on it); ``train.budget_cpu_s`` / ``train.budget_wall_s`` stop the run at
the first iteration boundary after that much time, with the final BatchNorm recalibration,
evaluation and checkpoint then as after the last iteration. So that a budgeted run ends its
schedule, set ``train.iterations`` near the steps the budget affords (the log's step rate
says how many) or use ``schedule.policy: constant``.

What counts: from the start of the training loop (after set-up and any resume) to the end of
the iteration, everything in the loop: steps, periodic evaluations and checkpoints. CPU time is
the training process's own (all its threads, ``time.process_time``), not its DataLoader
workers'. The time spent is saved in each checkpoint, so a resumed run continues the same
budget. Ranks agree on the stop (a collective), so they stop at the same iteration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lrss_ds.engine import comm

# What stopped a run, in the order of precedence when several apply at one iteration.
STOP_REASONS = ("iterations", "budget_cpu_s", "budget_wall_s")


def cpu_clock() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    return time.process_time()


def wall_clock() -> float:
    """Monotonic wall-clock seconds."""
    return time.perf_counter()


@dataclass
class TrainingBudget:
    """The stopping rule of one run and the time it has spent.

    Args:
        iterations: optimizer steps at most.
        cpu_s: CPU seconds of the training process at most (None: no such budget).
        wall_s: wall-clock seconds at most (None: no such budget).
        spent_cpu_s / spent_wall_s: already spent by the run before a resume.
    """

    iterations: int
    cpu_s: float | None = None
    wall_s: float | None = None
    spent_cpu_s: float = 0.0
    spent_wall_s: float = 0.0
    stopped_by: str | None = None
    _started: tuple[float, float] | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, train: Any, spent: dict[str, float] | None = None) -> "TrainingBudget":
        """The budget of a ``TrainConfig``, continuing ``spent`` (a checkpoint's :meth:`spent`)."""
        spent = spent or {}
        return cls(train.iterations, train.budget_cpu_s, train.budget_wall_s,
                   float(spent.get("cpu_s", 0.0)), float(spent.get("wall_s", 0.0)))

    def start(self) -> None:
        """Start the clocks (at the start of the training loop)."""
        self._started = (cpu_clock(), wall_clock())

    def spent(self) -> dict[str, float]:
        """CPU and wall seconds spent so far, earlier sessions included."""
        cpu, wall = self.spent_cpu_s, self.spent_wall_s
        if self._started is not None:
            cpu += cpu_clock() - self._started[0]
            wall += wall_clock() - self._started[1]
        return {"cpu_s": cpu, "wall_s": wall}

    def local_reason(self, iteration: int) -> str | None:
        """What would stop this rank after ``iteration`` steps (None: go on)."""
        spent = self.spent()
        if iteration >= self.iterations:
            return "iterations"
        if self.cpu_s is not None and spent["cpu_s"] >= self.cpu_s:
            return "budget_cpu_s"
        if self.wall_s is not None and spent["wall_s"] >= self.wall_s:
            return "budget_wall_s"
        return None

    def stop_reason(self, iteration: int) -> str | None:
        """What stops the run after ``iteration`` steps, agreed by all ranks (a collective).

        Each rank's clocks differ; the stop is the first reason (in :data:`STOP_REASONS` order)
        that any rank has, so every rank stops at the same iteration for the same reason.
        """
        reason = self.local_reason(iteration)
        code = 0 if reason is None else STOP_REASONS.index(reason) + 1
        if comm.world_size() > 1:
            # "go on" (0) must lose to any reason: reduce the minimum, with 0 sent as the largest
            value = comm.all_reduce(torch.tensor([code or len(STOP_REASONS) + 1], dtype=torch.int32),
                                    op=dist.ReduceOp.MIN)
            code = int(value.item()) % (len(STOP_REASONS) + 1)
        self.stopped_by = STOP_REASONS[code - 1] if code else None
        return self.stopped_by

    def describe(self) -> str:
        """One line for the log: the limits and what was spent."""
        spent = self.spent()
        limits = [f"{self.iterations} iterations"]
        if self.cpu_s is not None:
            limits.append(f"{spent['cpu_s']:.0f}/{self.cpu_s:g} CPU-s")
        if self.wall_s is not None:
            limits.append(f"{spent['wall_s']:.0f}/{self.wall_s:g} wall-s")
        return ", ".join(limits)

    def summary(self) -> dict[str, Any]:
        """For ``metrics.json``: what stopped the run, the budgets and the time spent."""
        return {"stopped_by": self.stopped_by,
                "budget": {"iterations": self.iterations, "cpu_s": self.cpu_s, "wall_s": self.wall_s,
                           "spent": self.spent()}}
