"""The split of a scene into horizontal bands, one per rank of a spatial group."""

from __future__ import annotations

import math


def band_bounds(height: int, ranks: int, multiple: int) -> list[tuple[int, int]]:
    """Near-equal row bands ``[(start, stop), ...]`` of a scene, one per rank, top to bottom.

    Every band but the last holds a multiple of ``multiple`` rows (the network's total stride),
    so each strided layer keeps the band boundaries on its own grid; the last band ends at the
    scene's last row and is padded at the scene's edge as a one-rank run pads the scene. The
    bands differ by at most ``multiple`` rows, apart from the last one's cut.

    Args:
        height: rows of the scene.
        ranks: bands wanted.
        multiple: what each band's height (padded, for the last) is a multiple of.

    Returns:
        ``ranks`` half-open row ranges covering ``[0, height)``.

    Raises:
        ValueError: fewer than ``ranks`` units of ``multiple`` rows in the scene.
    """
    if ranks < 1 or multiple < 1:
        raise ValueError(f"band_bounds: ranks and multiple must be >= 1, got {ranks} and {multiple}")
    units = math.ceil(height / multiple)
    if units < ranks:
        raise ValueError(
            f"a scene of {height} rows holds {units} bands of {multiple} rows (the network's total stride), "
            f"fewer than the {ranks} spatial ranks; use fewer ranks or a taller scene"
        )
    base, extra = divmod(units, ranks)
    bounds = []
    start = 0
    for rank in range(ranks):
        stop = min(start + (base + (1 if rank < extra else 0)) * multiple, height)
        bounds.append((start, stop))
        start = stop
    return bounds
