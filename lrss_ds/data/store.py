"""TileStore: a Zarr v3 store of whole scenes (image + label), readable whole or by window.

The layout is described in :mod:`lrss_ds.data.store_format`; scenes are written by
:mod:`lrss_ds.data.store_writer` (``lrss-ds ingest``), and windows are decoded by
:mod:`lrss_ds.data.chunk_reader`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lrss_ds.data.catalog import DatasetSpec
from lrss_ds.data.chunk_reader import ChunkReader
from lrss_ds.data.store_format import ATTR_KEY, FORMAT_NAME, FORMAT_VERSION, number_from_json, pixel_dtype_of
from lrss_ds.errors import StoreError

Window = tuple[int, int, int, int]


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
        return number_from_json(self.scene_attrs(scene).get("nodata"))

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
