"""The tile store's layout on disk: its names, codecs and the metadata helpers its reader and writer share.

Layout (plain Zarr v3, readable with ``zarr.open_group`` alone)::

    STORE/zarr.json                root group; attrs["lrss_ds"] = dataset spec, pixel type
                                   ("dtype", one per store), scenes, splits, band statistics
                                   over the train split
    STORE/<scene>/zarr.json        one group per scene; attrs["lrss_ds"] = CRS WKT, affine
                                   transform, band names, nodata, source files + sha256,
                                   per-band running statistics, "complete": true (written
                                   last, once every chunk file and both arrays' metadata exist)
    STORE/<scene>/image            (bands, H, W) native dtype, chunks (bands, 512, 512), blosc-lz4
    STORE/<scene>/label            (H, W) uint8 class index (ignore_index where unlabeled)
    STORE/_partial/<scene>/        a scene being written; renamed to STORE/<scene> when complete
    STORE/.writer.lock             present while a writer holds the store (``store_lock``)

Chunks span all bands because a model always reads every band of a window: one chunk per tile
beats one per band (measured, benchmarks/results/tilestore_io.md). No sharding: zarr-python
cannot write part of a shard, and two writers of one shard silently lose data. ``TileStore``
reads the chunk files of this simple layout itself (``ChunkReader``), which is several times
faster than zarr-python's per-chunk machinery for window reads; any zarr client reads the same
arrays.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec

from lrss_ds.errors import ConfigError, StoreError

FORMAT_NAME = "lrss_ds.tilestore"
FORMAT_VERSION = 1
PARTIAL_DIR = "_partial"
REPLACED_PREFIX = ".replaced-"  # _partial/.replaced-<scene>: the old copy while a scene is swapped
DEFAULT_TILE = 512
ATTR_KEY = "lrss_ds"


CODECS = ("lz4", "zstd", "none")


def default_compressor(codec: str = "lz4") -> BloscCodec | None:
    """Return the chunk codec: blosc-lz4 (default, the fastest to decode), blosc-zstd or none.

    Args:
        codec: ``"lz4"``, ``"zstd"`` (smaller, several times slower to read) or ``"none"``
            (largest on disk; nothing to decode, so the fastest to read when pixels do compress).

    Raises:
        ConfigError: an unknown codec name.

    Byte shuffle is a no-op for 1-byte samples; for wider dtypes it groups the bytes of equal
    significance, which helps both codecs (zarr fills in ``typesize`` from the dtype).
    """
    if codec == "none":
        return None
    if codec not in CODECS:
        raise ConfigError("--codec", f"must be one of {', '.join(CODECS)}, not {codec!r}")
    return BloscCodec(cname=codec, clevel=5 if codec == "lz4" else 3, shuffle="shuffle")


@dataclass
class BandStats:
    """Per-band running statistics combined by Chan's parallel formula (float64, stable).

    Args:
        count: valid samples per band.
        mean: mean per band.
        m2: sum of squared deviations from the mean per band.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, bands: int) -> BandStats:
        """Return statistics of no samples for ``bands`` bands."""
        return cls(np.zeros(bands, np.float64), np.zeros(bands, np.float64), np.zeros(bands, np.float64))

    def add_block(self, block: np.ndarray, nodata: float | None = None) -> None:
        """Fold in one block ``(C, h, w)``; pixels equal to ``nodata`` are left out per band."""
        if block.dtype in (np.uint8, np.uint16):
            # Exact and fast for the common integer rasters: moments from a histogram.
            levels = np.arange(256 if block.dtype == np.uint8 else 65536, dtype=np.float64)
            for band in range(block.shape[0]):
                hist = np.bincount(block[band].ravel(), minlength=levels.size).astype(np.float64)
                if nodata is not None and not math.isnan(nodata) and 0 <= nodata < levels.size:
                    hist[int(nodata)] = 0.0
                n_b = float(hist.sum())
                if n_b == 0:
                    continue
                mean_b = float(hist @ levels) / n_b
                m2_b = float(hist @ np.square(levels - mean_b))
                self._merge(band, n_b, mean_b, m2_b)
            return
        for band in range(block.shape[0]):
            values = block[band].ravel()
            if nodata is not None:
                values = values[~np.isnan(values)] if math.isnan(nodata) else values[values != nodata]
            if values.size == 0:
                continue
            values = values.astype(np.float64)
            n_b = float(values.size)
            mean_b = float(values.mean())
            m2_b = float(np.square(values - mean_b).sum())
            self._merge(band, n_b, mean_b, m2_b)

    def _merge(self, band: int, n_b: float, mean_b: float, m2_b: float) -> None:
        n_a = self.count[band]
        n = n_a + n_b
        delta = mean_b - self.mean[band]
        self.mean[band] += delta * n_b / n
        self.m2[band] += m2_b + delta * delta * n_a * n_b / n
        self.count[band] = n

    def merge(self, other: BandStats) -> None:
        """Fold in another set of statistics of the same bands."""
        for band in range(len(self.count)):
            if other.count[band] > 0:
                self._merge(band, float(other.count[band]), float(other.mean[band]), float(other.m2[band]))

    def std(self) -> np.ndarray:
        """Return the population standard deviation per band (0 where no samples)."""
        return np.sqrt(np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 0))

    def to_dict(self) -> dict[str, list[float]]:
        """Return JSON-able lists."""
        return {"count": self.count.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, values: dict[str, list[float]]) -> BandStats:
        """Inverse of ``to_dict``."""
        return cls(*(np.asarray(values[k], np.float64) for k in ("count", "mean", "m2")))


def check_scene_id(scene_id: str, where: str | Path) -> None:
    """Refuse a scene id that is not a plain name inside the store.

    Args:
        scene_id: the id (the image file's stem).
        where: the file the id came from, named in the error.

    Raises:
        StoreError: the id is empty, ``.``/``..``, contains a path separator, starts with ``.``
            or ``__`` (Zarr reserves it), or is the store's own ``_partial`` or ``zarr.json``.
    """
    bad = (
        not scene_id
        or scene_id in (".", "..", PARTIAL_DIR, "zarr.json")
        or "/" in scene_id
        or "\\" in scene_id
        or "\x00" in scene_id
        or scene_id.startswith(".")
        or scene_id.startswith("__")
        or scene_id.strip() != scene_id
    )
    if bad:
        raise StoreError(where, f"scene id {scene_id!r} would escape the store or clash with its layout; rename the file")


def pixel_dtype_of(meta: dict[str, Any], where: str | Path) -> np.dtype | None:
    """Return the pixel type of a store's root attributes ``meta`` (None: no scene yet).

    Raises:
        StoreError: the scenes mix pixel types (a store written before one type was enforced).
    """
    by_type: dict[str, str] = {}
    for scene, values in sorted((meta.get("scenes") or {}).items()):
        by_type.setdefault(values["dtype"], scene)
    if len(by_type) > 1:
        mix = ", ".join(f"{dtype} ({scene}, ...)" for dtype, scene in sorted(by_type.items()))
        raise StoreError(where, f"store mixes pixel types {mix}; re-ingest each type into a store of its own")
    if by_type:
        return np.dtype(next(iter(by_type)))
    return None if meta.get("dtype") is None else np.dtype(meta["dtype"])


def json_number(value: float | None) -> float | str | None:
    # JSON has no NaN: keep it as the string "nan".
    if value is None:
        return None
    return "nan" if math.isnan(value) else float(value)


def number_from_json(value: float | str | None) -> float | None:
    if value is None:
        return None
    return float(value)


def missing_chunks(array_dir: Path) -> list[str]:
    """Return the chunk keys (``c/0/1/2``) of the array at ``array_dir`` that have no file.

    Raises:
        StoreError: the array's metadata is missing or unreadable.
    """
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        shape = meta["shape"]
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StoreError(array_dir, f"array metadata missing or unreadable ({error.__class__.__name__})") from None
    grid = [math.ceil(n / c) for n, c in zip(shape, chunks)]
    return ["c/" + "/".join(map(str, index)) for index in np.ndindex(*grid)
            if not array_dir.joinpath("c", *map(str, index)).is_file()]
