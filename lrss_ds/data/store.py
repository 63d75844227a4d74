"""TileStore: a Zarr v3 store of whole scenes (image + label), readable whole or by window.

Layout (plain Zarr v3, readable with ``zarr.open_group`` alone)::

    STORE/zarr.json                root group; attrs["lrss_ds"] = dataset spec, scenes, splits,
                                   band statistics over the train split
    STORE/<scene>/zarr.json        one group per scene; attrs["lrss_ds"] = CRS WKT, affine
                                   transform, band names, nodata, source files + sha256,
                                   per-band running statistics, "complete": true
    STORE/<scene>/image            (bands, H, W) native dtype, chunks (bands, 512, 512), blosc-lz4
    STORE/<scene>/label            (H, W) uint8 class index (ignore_index where unlabeled)
    STORE/_partial/<scene>/        a scene being written; renamed to STORE/<scene> when complete

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
import mmap
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from lrss_ds.data.catalog import DatasetSpec
from lrss_ds.errors import ConfigError, StoreError

FORMAT_NAME = "lrss_ds.tilestore"
FORMAT_VERSION = 1
PARTIAL_DIR = "_partial"
DEFAULT_TILE = 512
ATTR_KEY = "lrss_ds"
_BLOSC_HEADER = 16  # blosc1 frame header bytes
_BLOSC_MEMCPYED = 0x02  # header flag: payload stored as is

Window = tuple[int, int, int, int]


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


def _json_number(value: float | None) -> float | str | None:
    # JSON has no NaN: keep it as the string "nan".
    if value is None:
        return None
    return "nan" if math.isnan(value) else float(value)


def _from_json_number(value: float | str | None) -> float | None:
    if value is None:
        return None
    return float(value)


class ChunkReader:
    """Reads windows of a plain Zarr v3 array by decoding only the chunk files they overlap.

    zarr-python's read path costs about a millisecond of asyncio bookkeeping per chunk and per
    call, which halves the rate of 512x512 window reads (measured in
    benchmarks/results/tilestore_io.md). For the layout this store writes (regular chunks,
    default "/" chunk keys, ``bytes`` + optional ``blosc``, no sharding) the chunk files are
    read and decoded here directly, on a small thread pool (blosc and file reads release the
    GIL). Any other layout is read through zarr unchanged: ``ChunkReader.for_array`` returns
    None for it.

    Args:
        directory: the array's directory.
        shape, chunks: array and chunk shapes.
        dtype: array dtype.
        fill_value: value of chunks that were never written (zarr skips empty chunks).
        blosc: whether chunks are blosc frames (else raw bytes).
    """

    def __init__(self, directory: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
                 fill_value: Any, blosc: bool) -> None:
        self.directory = directory
        self.shape = shape
        self.chunks = chunks
        self.dtype = dtype
        self.fill_value = fill_value
        self.blosc = blosc
        self._chunk_bytes = int(np.prod(chunks)) * dtype.itemsize
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None

    @classmethod
    def for_array(cls, directory: Path) -> ChunkReader | None:
        """Return a reader for the array at ``directory``, or None if its layout is not the simple one."""
        try:
            meta = json.loads((directory / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        codecs = meta.get("codecs", [])
        names = [c.get("name") for c in codecs]
        key = meta.get("chunk_key_encoding", {})
        grid = meta.get("chunk_grid", {})
        if (meta.get("zarr_format") != 3 or meta.get("storage_transformers") or names not in (["bytes"], ["bytes", "blosc"])
                or key.get("name") != "default" or key.get("configuration", {}).get("separator", "/") != "/"
                or grid.get("name") != "regular"):
            return None
        dtype = np.dtype(meta.get("data_type", ""))  # raises TypeError for zarr-only types
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        if dtype.itemsize > 1 and endian != sys.byteorder:
            return None
        return cls(directory, tuple(meta["shape"]), tuple(grid["configuration"]["chunk_shape"]), dtype,
                   meta.get("fill_value", 0), blosc="blosc" in names)

    def _scratch(self) -> np.ndarray:
        # Per-thread scratch chunk: reusing it avoids a fresh mmap + page faults per chunk.
        chunk = getattr(self._local, "chunk", None)
        if chunk is None:
            chunk = self._local.chunk = np.empty(self.chunks, self.dtype)
        return chunk

    def _decode_into(self, index: tuple[int, ...], out: np.ndarray, region: tuple[slice, ...],
                     inside: tuple[slice, ...]) -> None:
        from numcodecs import blosc

        path = self.directory.joinpath("c", *map(str, index))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            out[region] = self.fill_value
            return
        if size == 0:
            raise OSError(f"{path}: empty chunk file")
        if not self.blosc and size != self._chunk_bytes:
            raise OSError(f"{path}: raw chunk of {size} bytes, expected {self._chunk_bytes}")
        # Read straight from the page cache through mmap: one copy fewer than read-then-decode.
        with open(path, "rb", buffering=0) as handle, \
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            if not self.blosc:
                offset = 0
            elif size == _BLOSC_HEADER + self._chunk_bytes and mapped[2] & _BLOSC_MEMCPYED:
                offset = _BLOSC_HEADER  # blosc kept this chunk as is (incompressible pixels)
            else:
                offset = None
            if offset is None:
                chunk = self._scratch()
                blosc.decompress(mapped, chunk)
                out[region] = chunk[inside]
            else:
                payload = np.frombuffer(mapped, self.dtype, offset=offset).reshape(self.chunks)
                out[region] = payload[inside]
                del payload  # the mmap cannot close while a view of it exists

    def read(self, box: tuple[slice, ...]) -> np.ndarray:
        """Return ``array[box]`` for a box of unit-step slices within the array."""
        starts = [b.start for b in box]
        stops = [b.stop for b in box]
        out = np.empty([e - s for s, e in zip(starts, stops)], self.dtype)
        ranges = [range(s // c, (e - 1) // c + 1) for s, e, c in zip(starts, stops, self.chunks)]
        jobs = []
        for index in np.ndindex(*[len(r) for r in ranges]):
            chunk_index = tuple(r[i] for r, i in zip(ranges, index))
            region, inside = [], []
            for ci, s, e, c in zip(chunk_index, starts, stops, self.chunks):
                lo, hi = max(s, ci * c), min(e, (ci + 1) * c)
                region.append(slice(lo - s, hi - s))
                inside.append(slice(lo - ci * c, hi - ci * c))
            jobs.append((chunk_index, tuple(region), tuple(inside)))
        # Even a single chunk is decoded on the pool: numcodecs' blosc uses its global context
        # and internal threads (behind a lock) when called from the main thread, which is
        # slower on a busy machine than one plain decode per pool thread.
        for future in [self._executor().submit(self._decode_into, idx, out, reg, ins) for idx, reg, ins in jobs]:
            future.result()
        return out

    def _executor(self) -> ThreadPoolExecutor:
        # A pool does not survive fork: make a new one in a child process.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
            self._pool_pid = os.getpid()
        return self._pool


class TileStore:
    """A tile store opened for reading (see the module docstring for the layout).

    Open with ``TileStore.open(path)``. Arrays are opened lazily and cached per instance, so an
    instance created inside a DataLoader worker holds no state inherited over ``fork``.
    """

    def __init__(self, path: Path, root: zarr.Group, meta: dict[str, Any]) -> None:
        self.path = path
        self._root = root
        self._meta = meta
        self._spec = DatasetSpec.from_dict(meta["dataset"], where=f"{path}: dataset")
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._readers: dict[tuple[str, str], ChunkReader | None] = {}
        self._scene_attrs: dict[str, dict[str, Any]] = {}

    # ---------------------------------------------------------------- opening and metadata
    @classmethod
    def open(cls, path: str | Path) -> TileStore:
        """Open an existing store read-only.

        Args:
            path: the store directory.

        Returns:
            The store.

        Raises:
            StoreError: the path does not exist or is not a tile store.
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(path, "no tile store here (missing zarr.json); create one with `lrss-ds ingest`")
        try:
            root = zarr.open_group(str(path), mode="r")
        except Exception as error:  # zarr raises several types for a damaged root
            raise StoreError(path, f"cannot open as a Zarr v3 group: {error}") from None
        meta = dict(root.attrs).get(ATTR_KEY)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise StoreError(path, "is a Zarr group but not an lrss_ds tile store")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise StoreError(path, f"store format version {meta['version']} is newer than this lrss_ds reads")
        return cls(path, root, meta)

    @property
    def spec(self) -> DatasetSpec:
        """The dataset spec the store was ingested with."""
        return self._spec

    @property
    def splits(self) -> dict[str, list[str]]:
        """Split name -> scene ids (only complete, registered scenes)."""
        return {k: list(v) for k, v in self._meta.get("splits", {}).items()}

    def scenes(self, split: str | None = None) -> list[str]:
        """Return the complete scenes, all of them or those of ``split``, sorted by id.

        Raises:
            StoreError: ``split`` is not a split of this store.
        """
        if split is None:
            return sorted(self._meta.get("scenes", {}))
        splits = self._meta.get("splits", {})
        if split not in splits:
            raise StoreError(self.path, f"no split {split!r} (splits: {', '.join(sorted(splits)) or 'none'})")
        return sorted(splits[split])

    def _scene_meta(self, scene: str) -> dict[str, Any]:
        scenes = self._meta.get("scenes", {})
        if scene not in scenes:
            raise StoreError(self.path, f"no complete scene {scene!r} in the store")
        return scenes[scene]

    def shape(self, scene: str) -> tuple[int, int, int]:
        """Return the scene's image shape ``(bands, H, W)``."""
        c, h, w = self._scene_meta(scene)["shape"]
        return int(c), int(h), int(w)

    def dtype(self, scene: str) -> np.dtype:
        """Return the scene image's native dtype (e.g. uint8, uint16)."""
        return np.dtype(self._scene_meta(scene)["dtype"])

    def scene_attrs(self, scene: str) -> dict[str, Any]:
        """Return the scene group's ``lrss_ds`` attributes (georeference, sources, statistics)."""
        if scene not in self._scene_attrs:
            self._scene_meta(scene)
            self._scene_attrs[scene] = dict(self._group(scene).attrs)[ATTR_KEY]
        return self._scene_attrs[scene]

    def _group(self, scene: str) -> zarr.Group:
        try:
            return zarr.open_group(str(self.path / scene), mode="r")
        except Exception as error:
            raise StoreError(self.path / scene, f"scene group unreadable: {error}") from None

    def array(self, scene: str, name: str) -> zarr.Array:
        """Return the scene's ``image`` or ``label`` Zarr array (opened once per instance)."""
        key = (scene, name)
        if key not in self._arrays:
            self._scene_meta(scene)
            try:
                self._arrays[key] = zarr.open_array(str(self.path / scene / name), mode="r")
            except Exception as error:
                raise StoreError(self.path / scene / name, f"array unreadable: {error}") from None
        return self._arrays[key]

    # ---------------------------------------------------------------- reading
    def read(self, scene: str, window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read a whole scene or a window of it; only the chunks the window overlaps are read.

        Args:
            scene: scene id.
            window: ``(row_off, col_off, height, width)`` inside the scene, or None for all.

        Returns:
            ``(image (C, h, w) native dtype, label (h, w) uint8)``.

        Raises:
            StoreError: unknown scene or a window outside the scene.
        """
        slices = self._slices(scene, window)
        return self._read_array(scene, "image", (slice(None),) + slices), self._read_array(scene, "label", slices)

    def read_image(self, scene: str, window: Window | None = None) -> np.ndarray:
        """Read only the image ``(C, h, w)`` of a scene or window (see ``read``)."""
        return self._read_array(scene, "image", (slice(None),) + self._slices(scene, window))

    def read_label(self, scene: str, window: Window | None = None) -> np.ndarray:
        """Read only the label ``(h, w)`` uint8 of a scene or window (see ``read``)."""
        return self._read_array(scene, "label", self._slices(scene, window))

    def _read_array(self, scene: str, name: str, box: tuple[slice, ...]) -> np.ndarray:
        key = (scene, name)
        if key not in self._readers:
            self._scene_meta(scene)
            self._readers[key] = ChunkReader.for_array(self.path / scene / name)
        reader = self._readers[key]
        if reader is None:
            return np.asarray(self.array(scene, name)[box])
        full = tuple(slice(0 if b.start is None else b.start, n if b.stop is None else b.stop)
                     for b, n in zip(box, reader.shape))
        try:
            return reader.read(full)
        except (OSError, RuntimeError, ValueError) as error:
            raise StoreError(self.path / scene / name, f"chunk unreadable: {error}") from None

    def _slices(self, scene: str, window: Window | None) -> tuple[slice, slice]:
        _, height, width = self.shape(scene)
        if window is None:
            return slice(0, height), slice(0, width)
        row, col, h, w = (int(v) for v in window)
        if row < 0 or col < 0 or h <= 0 or w <= 0 or row + h > height or col + w > width:
            raise StoreError(
                f"{self.path}/{scene}", f"window {window} is outside the scene of {height}x{width}"
            )
        return slice(row, row + h), slice(col, col + w)

    def georef(self, scene: str) -> tuple[Any, Any]:
        """Return ``(crs, transform)`` as ``rasterio.crs.CRS`` and ``affine.Affine``, None where absent."""
        from affine import Affine
        from rasterio.crs import CRS

        attrs = self.scene_attrs(scene)
        crs = CRS.from_wkt(attrs["crs_wkt"]) if attrs.get("crs_wkt") else None
        transform = Affine(*attrs["transform"]) if attrs.get("transform") else None
        return crs, transform

    def nodata(self, scene: str) -> float | None:
        """Return the image nodata value recorded for the scene, or None."""
        return _from_json_number(self.scene_attrs(scene).get("nodata"))

    def band_stats(self) -> tuple[list[float], list[float]]:
        """Return per-band ``(mean, std)`` over the train split, computed at ingest.

        Falls back to all scenes when the store has no ``train`` split (recorded as
        ``band_stats.split == "all"``); nodata pixels are left out.

        Raises:
            StoreError: the store has no scenes.
        """
        stats = self._meta.get("band_stats")
        if not stats or not stats.get("scenes"):
            raise StoreError(self.path, "store has no scenes, so no band statistics")
        return list(stats["mean"]), list(stats["std"])

    def band_stats_info(self) -> dict[str, Any]:
        """Return the recorded band statistics with the split and scenes they cover."""
        return dict(self._meta.get("band_stats") or {})


# -------------------------------------------------------------------- writing (ingest only)
class StoreWriter:
    """Creates a store or adds scenes to one; each scene is written whole under ``_partial``.

    Used by ``lrss_ds.data.ingest``; readers use ``TileStore``. One writer per store at a time.

    Args:
        path: the store directory (created if absent).
        spec: the dataset spec; must equal the store's if the store exists.
        codec: chunk codec of new scenes (see ``default_compressor``).

    Raises:
        StoreError: the path holds something else, or a store of another dataset spec.
    """

    def __init__(self, path: str | Path, spec: DatasetSpec, codec: str = "lz4") -> None:
        self.path = Path(path)
        self.spec = spec
        self.codec = codec
        default_compressor(codec)  # validate early
        if (self.path / "zarr.json").is_file():
            store = TileStore.open(self.path)
            if store.spec.to_dict() != spec.to_dict():
                raise StoreError(
                    self.path,
                    f"store holds dataset {store.spec.name!r} with a different spec than the "
                    f"{spec.name!r} given; use another store or the same --dataset",
                )
            self.root = zarr.open_group(str(self.path), mode="r+")
        else:
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(self.path, "exists and is not a directory")
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreError(self.path, "exists, is not empty and is not a tile store")
            self.root = zarr.open_group(str(self.path), mode="w")
            self.root.attrs[ATTR_KEY] = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "dataset": spec.to_dict(),
                "scenes": {},
                "splits": {},
                "band_stats": {},
            }

    def is_complete(self, scene: str) -> bool:
        """Return True if ``scene`` is a complete scene group (its completion marker is set)."""
        marker = self.path / scene / "zarr.json"
        if not marker.is_file():
            return False
        try:
            attrs = dict(zarr.open_group(str(self.path / scene), mode="r").attrs).get(ATTR_KEY, {})
        except Exception:
            return False
        return bool(attrs.get("complete"))

    def discard_incomplete(self, scene: str) -> bool:
        """Delete any partial or unmarked copy of ``scene``; return True if something was deleted."""
        removed = False
        for candidate in (self.path / PARTIAL_DIR / scene, self.path / scene):
            if candidate.exists() and not (candidate == self.path / scene and self.is_complete(scene)):
                shutil.rmtree(candidate)
                removed = True
        self._cleanup_partial_dir()
        return removed

    def begin_scene(
        self, scene: str, bands: int, height: int, width: int, dtype: np.dtype, tile: int = DEFAULT_TILE
    ) -> tuple[zarr.Group, zarr.Array, zarr.Array]:
        """Create the scene's group and arrays under ``_partial``.

        Returns:
            ``(group, image array (C,H,W), label array (H,W) uint8)`` to fill.
        """
        partial = self.path / PARTIAL_DIR / scene
        if partial.exists():
            shutil.rmtree(partial)
        partial.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(partial), mode="w")
        image = group.create_array(
            "image",
            shape=(bands, height, width),
            chunks=(bands, tile, tile),
            dtype=dtype,
            compressors=default_compressor(self.codec),
            fill_value=0,
            dimension_names=("band", "y", "x"),
        )
        label = group.create_array(
            "label",
            shape=(height, width),
            chunks=(tile, tile),
            dtype=np.uint8,
            compressors=default_compressor("lz4" if self.codec == "none" else self.codec),
            fill_value=self.spec.ignore_index,
            dimension_names=("y", "x"),
        )
        return group, image, label

    def finish_scene(self, scene: str, group: zarr.Group, attrs: dict[str, Any]) -> None:
        """Mark the scene complete, move it into place and register it in the root attributes.

        The completion marker is written last inside ``_partial`` and the directory rename is
        atomic, so a scene directory at the top level is always whole.
        """
        attrs = dict(attrs, complete=True)
        group.attrs[ATTR_KEY] = attrs
        target = self.path / scene
        if target.exists():
            shutil.rmtree(target)
        os.replace(self.path / PARTIAL_DIR / scene, target)
        self._cleanup_partial_dir()
        self.refresh_root()

    def _cleanup_partial_dir(self) -> None:
        partial = self.path / PARTIAL_DIR
        try:
            partial.rmdir()  # only when empty: keeps zarr's listing of the root warning-free
        except OSError:
            pass

    def complete_scenes(self) -> list[str]:
        """Return the ids of complete scene groups found on disk."""
        out = []
        for entry in sorted(self.path.iterdir()):
            if entry.is_dir() and entry.name != PARTIAL_DIR and self.is_complete(entry.name):
                out.append(entry.name)
        return out

    def refresh_root(self) -> None:
        """Rebuild the root's scene list, splits and train-split band statistics from the scenes.

        Everything in the root attributes is derived from the complete scene groups, so a run
        killed between a scene's rename and this update is repaired by the next run.
        """
        scenes: dict[str, Any] = {}
        splits: dict[str, list[str]] = {}
        per_scene: dict[str, BandStats] = {}
        for scene in self.complete_scenes():
            group = zarr.open_group(str(self.path / scene), mode="r")
            attrs = dict(group.attrs)[ATTR_KEY]
            image = group["image"]
            scenes[scene] = {"shape": list(image.shape), "dtype": str(image.dtype), "split": attrs["split"]}
            splits.setdefault(attrs["split"], []).append(scene)
            per_scene[scene] = BandStats.from_dict(attrs["stats"])
        stats_split = "train" if "train" in splits else "all"
        covered = splits.get("train", []) if stats_split == "train" else sorted(scenes)
        band_stats: dict[str, Any] = {}
        if covered:
            total = BandStats.empty(len(per_scene[covered[0]].count))
            for scene in covered:
                total.merge(per_scene[scene])
            band_stats = {
                "split": stats_split,
                "scenes": covered,
                "mean": total.mean.tolist(),
                "std": total.std().tolist(),
                "count": total.count.tolist(),
            }
        meta = dict(dict(self.root.attrs)[ATTR_KEY])
        meta.update(scenes=scenes, splits={k: sorted(v) for k, v in sorted(splits.items())}, band_stats=band_stats)
        self.root.attrs[ATTR_KEY] = meta


def scene_attributes(
    *,
    split: str,
    crs_wkt: str | None,
    transform: tuple[float, ...] | None,
    band_names: list[str],
    nodata: float | None,
    source_image: str,
    source_image_sha256: str,
    source_label: str,
    source_label_sha256: str,
    stats: BandStats,
) -> dict[str, Any]:
    """Return the scene group's attribute values (the completion marker is added on finish)."""
    return {
        "split": split,
        "crs_wkt": crs_wkt,
        "transform": None if transform is None else [float(v) for v in transform],
        "band_names": list(band_names),
        "nodata": _json_number(nodata),
        "source_image": source_image,
        "source_image_sha256": source_image_sha256,
        "source_label": source_label,
        "source_label_sha256": source_label_sha256,
        "stats": stats.to_dict(),
        "complete": False,
    }
