"""Writing the tile store (``lrss-ds ingest`` only): one scene at a time under ``_partial``, under the writer lock."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr

from lrss_ds.data.catalog import DatasetSpec
from lrss_ds.data.store_format import (
    ATTR_KEY,
    DEFAULT_TILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PARTIAL_DIR,
    REPLACED_PREFIX,
    BandStats,
    default_compressor,
    json_number,
    missing_chunks,
    pixel_dtype_of,
)
from lrss_ds.data.store import TileStore
from lrss_ds.data.store_lock import LOCK_NAME, WriterLock
from lrss_ds.errors import StoreError


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
        "nodata": json_number(nodata),
        "source_image": source_image,
        "source_image_sha256": source_image_sha256,
        "source_label": source_label,
        "source_label_sha256": source_label_sha256,
        "stats": stats.to_dict(),
        "complete": False,
    }
