"""BandSamples: whole scenes of a split, each read as one band of rows (one rank's share of a spatial group)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lrss_ds.data.samples import SceneSamples

Rows = tuple[int, int]
"""``(start, stop)``: a half-open range of scene rows."""


class BandSamples(SceneSamples):
    """The scenes of one split, each cut to the rows one rank of a spatial group holds.

    A windowed read of the tile store (``TileStore.read`` with a window) fetches only the
    chunks the band overlaps, so a rank never reads the whole scene. No halo rows are read
    here: the spatial layers receive the rows they read across a band boundary from the
    neighbouring ranks (``lrss_ds.parallel``), which already hold them.

    Args:
        store_path: the tile store directory.
        split: split name, or None for all scenes.
        band: ``band(height) -> (start, stop)``, this rank's rows of a scene of ``height`` rows
            (``lrss_ds.parallel.band_bounds``' entry for the rank); asked once per scene here.

    Items are :class:`SceneSamples`' whole-scene items restricted to the band: ``image``
    ``(C, stop - start, W)``, ``label`` ``(stop - start, W)`` and ``window``
    ``(start, 0, stop - start, W)``. Flips and turns would move pixels between bands and are
    refused.

    Raises:
        StoreError: missing store or split.
        ValueError: ``band`` gave an empty range or one outside the scene.
    """

    def __init__(self, store_path: str | Path, split: str | None, band: Callable[[int], Rows]) -> None:
        super().__init__(store_path, split, mode="whole")
        self.rows: list[Rows] = []
        for scene, (_, height, _) in zip(self.scenes, self.shapes):
            start, stop = (int(v) for v in band(height))
            if not 0 <= start < stop <= height:
                raise ValueError(f"band rows [{start}, {stop}) of scene {scene!r} are outside its {height} rows")
            self.rows.append((start, stop))

    def window(self, index: int) -> tuple[int, tuple[int, int, int, int]]:
        """``(scene number, (start, 0, stop - start, width))`` of item ``index``."""
        scene_no, (_, _, _, width) = super().window(index)
        start, stop = self.rows[scene_no]
        return scene_no, (start, 0, stop - start, width)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple) and key[1]:
            raise ValueError("a band of a scene cannot be flipped or turned on its own (train.augment none)")
        return super().__getitem__(key)
