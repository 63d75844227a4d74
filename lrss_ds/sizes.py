"""Parse image sizes given on command lines (``HxW``, or one number for a square)."""

from __future__ import annotations

import re

from lrss_ds.errors import ConfigError

_SIZE = re.compile(r"\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*")


def parse_size(text: str, where: str = "--size", minimum: int = 1) -> tuple[int, int]:
    """Parse ``"HxW"`` (``x``, ``X`` or ``×``; one number for a square) into ``(height, width)``.

    Args:
        text: what the user wrote.
        where: the option to name in errors.
        minimum: the smallest side accepted, in pixels.

    Returns:
        ``(height, width)``.

    Raises:
        ConfigError: the text is not of that form, or a side is below ``minimum``.
    """
    match = _SIZE.fullmatch(text.lower())
    if not match:
        raise ConfigError(where, f"{text!r} is not a size; expected HxW, e.g. 6800x7200")
    height = int(match.group(1))
    width = int(match.group(2) or match.group(1))
    if min(height, width) < minimum:
        problem = "sides must be positive" if minimum == 1 else f"sides must be at least {minimum} px"
        raise ConfigError(where, f"{text!r}: {problem}")
    return height, width
