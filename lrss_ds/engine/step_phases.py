"""Marks where the trainer's step passes from forward and loss to backward to the optimizer step, without copying the step."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

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


__all__ = ["PHASES", "step_phases"]
