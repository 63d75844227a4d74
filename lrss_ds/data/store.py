"""TileStore: a Zarr v3 store of whole scenes (image + label), readable whole or by window.

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

import errno
import json
import math
import mmap
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from lrss_ds.data.catalog import DatasetSpec
from lrss_ds.data.store_lock import LOCK_NAME, WriterLock
from lrss_ds.errors import ConfigError, StoreError

FORMAT_NAME = "lrss_ds.tilestore"
FORMAT_VERSION = 1
PARTIAL_DIR = "_partial"
REPLACED_PREFIX = ".replaced-"  # _partial/.replaced-<scene>: the old copy while a scene is swapped
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

    @property
    def pixel_dtype(self) -> np.dtype:
        """The store's one pixel type (every scene's image dtype), recorded at ingest.

        Raises:
            StoreError: the store has no scenes, or (written before the type was enforced)
                mixes pixel types.
        """
        dtype = pixel_dtype_of(self._meta, self.path)
        if dtype is None:
            raise StoreError(self.path, "store has no scenes, so no pixel type")
        return dtype

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
def spec_differences(recorded: dict[str, Any], given: dict[str, Any]) -> tuple[list[str], str]:
    """Compare two dataset specs (``DatasetSpec.to_dict()``).

    Returns:
        ``(keys that differ, "key: store X, given Y" for the first of them)``; ``description``
        and ``name`` come last, as the other keys say more.
    """
    keys = sorted((k for k in set(recorded) | set(given) if recorded.get(k) != given.get(k)),
                  key=lambda k: (k in ("description", "name"), k))
    if not keys:
        return [], ""
    shown = [json.dumps(v) for v in (recorded.get(keys[0]), given.get(keys[0]))]
    shown = [s if len(s) <= 60 else s[:57] + "..." for s in shown]
    return keys, f"{keys[0]}: store {shown[0]}, given {shown[1]}"


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


@contextmanager
def disk_errors(where: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing the store into a one-line ``StoreError``.

    A full disk (``ENOSPC``, or ``EDQUOT`` for a quota) is named as such; the file named is the
    one the error carries, else ``where``.
    """
    try:
        yield
    except OSError as error:
        path = error.filename or where
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            cause = "the disk is full" if error.errno == errno.ENOSPC else "the disk quota is exhausted"
            raise StoreError(path, f"cannot write the store: {cause} (disk full); the scene being written was "
                             "discarded and the store keeps the scenes completed before; free space and rerun") from None
        raise StoreError(path, f"cannot write the store: {error.strerror or error}") from None


class StoreWriter:
    """Creates a store or adds scenes to one; each scene is written whole under ``_partial``.

    Used by ``lrss_ds.data.ingest``; readers use ``TileStore``. The writer holds the store's
    exclusive ``WriterLock`` from construction until ``close()`` (or the end of a ``with``
    block, or the process), so everything under ``_partial`` that it finds is a dead writer's.

    A store has one pixel type: the first scene's, recorded in the root (``dtype``); a scene of
    another type is refused. A store without a complete scene takes the spec it is given
    (a failed first ingest does not bind it); one with scenes refuses another spec, naming the
    keys that differ.

    Args:
        path: the store directory (created if absent).
        spec: the dataset spec; must equal the store's if the store holds complete scenes.
        codec: chunk codec of new scenes (see ``default_compressor``).
        wait: wait for another writer to finish instead of refusing at once.
        log: where notices go (waiting for the lock, an empty store taking a new spec).

    Raises:
        StoreError: the path holds something else, a store of another dataset spec, or is
            being written by another process.
    """

    def __init__(self, path: str | Path, spec: DatasetSpec, codec: str = "lz4", wait: bool = False,
                 log: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.spec = spec
        self.codec = codec
        default_compressor(codec)  # validate early
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(self.path, "exists and is not a directory")
        if not (self.path / "zarr.json").is_file() and self.path.exists() and \
                any(p.name != LOCK_NAME for p in self.path.iterdir()):
            raise StoreError(self.path, "exists, is not empty and is not a tile store")
        with disk_errors(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self.lock = WriterLock(self.path, wait=wait, log=log)
        try:
            self._open_root(log)
        except BaseException:
            self.lock.release()
            raise

    def _open_root(self, log: Callable[[str], None]) -> None:
        # Under the lock: another writer may have created the root since the checks above.
        if (self.path / "zarr.json").is_file():
            store = TileStore.open(self.path)
            self.root = zarr.open_group(str(self.path), mode="r+")
            keys, first = spec_differences(store.spec.to_dict(), self.spec.to_dict())
            if not keys:
                return
            if self.complete_scenes():
                raise StoreError(
                    self.path,
                    f"store holds dataset {store.spec.name!r} with a different spec than the {self.spec.name!r} "
                    f"given: {', '.join(keys)} differ ({first}); use another store or the store's dataset",
                )
            log(f"ingest: {self.path} holds no complete scene, so it takes the dataset spec given "
                f"({self.spec.name!r}; {', '.join(keys)} differed)")
            with disk_errors(self.path / "zarr.json"):
                self.root.attrs[ATTR_KEY] = dict(dict(self.root.attrs)[ATTR_KEY], dataset=self.spec.to_dict(),
                                                 dtype=None)
            return
        with disk_errors(self.path):
            # "a", not "w": "w" would clear the directory, the lock file with it.
            self.root = zarr.open_group(str(self.path), mode="a")
            self.root.attrs[ATTR_KEY] = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "dataset": self.spec.to_dict(),
                "dtype": None,
                "scenes": {},
                "splits": {},
                "band_stats": {},
            }

    def close(self) -> None:
        """Release the writer lock (idempotent)."""
        self.lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pixel_dtype(self) -> np.dtype | None:
        """The store's pixel type, or None while it holds no complete scene (see ``pixel_dtype_of``)."""
        return pixel_dtype_of(dict(self.root.attrs)[ATTR_KEY], self.path)

    def check_pixel_dtype(self, dtype: np.dtype, where: str | Path) -> None:
        """Refuse a scene whose pixel type is not the store's.

        Raises:
            StoreError: naming ``where`` (the image file) and both types.
        """
        store_dtype = self.pixel_dtype
        if store_dtype is not None and np.dtype(dtype) != store_dtype:
            raise StoreError(
                where,
                f"pixel type {np.dtype(dtype)} differs from the store's {store_dtype} ({self.path}); a store "
                "holds one pixel type: ingest these scenes into another store",
            )

    def is_complete(self, scene: str) -> bool:
        """Return True if ``scene`` is a complete scene group: marker set, both arrays' metadata present."""
        directory = self.path / scene
        if not all((directory / name / "zarr.json").is_file() for name in ("", "image", "label")):
            return False
        try:
            attrs = dict(zarr.open_group(str(directory), mode="r").attrs).get(ATTR_KEY, {})
        except Exception:
            return False
        return bool(attrs.get("complete"))

    def missing_chunk_files(self, scene: str) -> list[str]:
        """Return the chunk files a complete scene lacks (only scenes with ``all_chunks_written``)."""
        if not self.scene_attrs(scene).get("all_chunks_written"):
            return []
        return [f"{name}/{key}" for name in ("image", "label") for key in missing_chunks(self.path / scene / name)]

    def scene_attrs(self, scene: str) -> dict[str, Any]:
        """Return a complete scene's ``lrss_ds`` attributes (split, sources and their sha256)."""
        return dict(dict(zarr.open_group(str(self.path / scene), mode="r").attrs)[ATTR_KEY])

    def discard_incomplete(self, scene: str) -> bool:
        """Delete any partial or unmarked copy of ``scene``; return True if something was deleted."""
        removed = False
        for candidate in (self.path / PARTIAL_DIR / scene, self.path / scene):
            if candidate.exists() and not (candidate == self.path / scene and self.is_complete(scene)):
                shutil.rmtree(candidate)
                removed = True
        self._cleanup_partial_dir()
        return removed

    def discard_leftovers(self) -> tuple[list[str], list[str]]:
        """Clear ``_partial`` of what a dead writer left (this writer holds the lock, so it is dead).

        The old copy of a scene whose replacement had not yet been moved into place is put back;
        everything else is deleted.

        Returns:
            ``(names deleted, scenes restored)``.
        """
        partial = self.path / PARTIAL_DIR
        names = sorted(p.name for p in partial.iterdir()) if partial.is_dir() else []
        deleted, restored = [], []
        for name in names:
            leftover = partial / name
            scene = name[len(REPLACED_PREFIX):]
            if name.startswith(REPLACED_PREFIX) and not (self.path / scene).exists():
                os.replace(leftover, self.path / scene)
                restored.append(scene)
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            deleted.append(name)
        self._cleanup_partial_dir()
        return deleted, restored

    def begin_scene(
        self, scene: str, bands: int, height: int, width: int, dtype: np.dtype, tile: int = DEFAULT_TILE
    ) -> tuple[zarr.Group, zarr.Array, zarr.Array]:
        """Create the scene's group and arrays under ``_partial``.

        Every chunk is written, even one that holds only the fill value, so that a complete
        scene has all its chunk files and a missing one is damage (``lrss-ds info --check``).

        Returns:
            ``(group, image array (C,H,W), label array (H,W) uint8)`` to fill.

        Raises:
            StoreError: ``dtype`` is not the store's pixel type.
        """
        self.check_pixel_dtype(dtype, scene)
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
            config={"write_empty_chunks": True},
        )
        label = group.create_array(
            "label",
            shape=(height, width),
            chunks=(tile, tile),
            dtype=np.uint8,
            compressors=default_compressor("lz4" if self.codec == "none" else self.codec),
            fill_value=self.spec.ignore_index,
            dimension_names=("y", "x"),
            config={"write_empty_chunks": True},
        )
        return group, image, label

    def finish_scene(self, scene: str, group: zarr.Group, attrs: dict[str, Any]) -> None:
        """Check the scene is whole, mark it complete, move it into place and register it.

        The completion marker is written only after both arrays' metadata and every chunk file
        were found on disk, and the directory rename is atomic, so a scene directory at the top
        level is always whole. A scene that replaces another is swapped in by two renames; after
        a crash between them the next writer puts the old copy back (``discard_leftovers``).

        Raises:
            StoreError: an array's metadata or chunk files are missing (the scene is not marked).
        """
        partial = self.path / PARTIAL_DIR / scene
        for name in ("image", "label"):
            missing = missing_chunks(partial / name)
            if missing:
                raise StoreError(partial / name, f"{len(missing)} chunk files missing after writing "
                                 f"(first {missing[0]}); the scene was not marked complete")
        attrs = dict(attrs, complete=True, all_chunks_written=True)
        group.attrs[ATTR_KEY] = attrs
        target = self.path / scene
        if target.exists():
            aside = self.path / PARTIAL_DIR / f"{REPLACED_PREFIX}{scene}"
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(target, aside)
            os.replace(partial, target)
            shutil.rmtree(aside)
        else:
            os.replace(partial, target)
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
        """Rebuild the root's scene list, splits, pixel type and train-split band statistics.

        Everything in the root attributes is derived from the complete scene groups, so a run
        killed between a scene's rename and this update is repaired by the next run. Zarr writes
        the root's ``zarr.json`` to a temporary name and renames it, so it is never half-written.
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
        dtypes = sorted({s["dtype"] for s in scenes.values()})
        meta = dict(dict(self.root.attrs)[ATTR_KEY])
        # A store written before one pixel type was enforced may mix types: record none then,
        # and pixel_dtype_of names the mix.
        meta.update(scenes=scenes, splits={k: sorted(v) for k, v in sorted(splits.items())}, band_stats=band_stats,
                    dtype=dtypes[0] if len(dtypes) == 1 else None)
        with disk_errors(self.path / "zarr.json"):
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
