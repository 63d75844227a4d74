"""Scenes to read window by window: GeoTIFF files, tile-store scenes and in-memory arrays."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from lrss_ds.data.store import TileStore
from lrss_ds.errors import InputFileError, StoreError, underlying_cause

RASTER_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")


@dataclass
class RasterSource:
    """One scene to predict: where it is, its geometry, and how to read a window of it.

    Attributes:
        name: output stem (file stem or scene id).
        where: what to name in error messages (the file, or ``store:scene``).
        count, height, width: bands C and size.
        dtype: numpy dtype name of the bands (e.g. ``"uint8"``).
        crs, transform: rasterio georeference (``crs`` None when the input has none).
        nodata: the input's nodata value (pixels where every band equals it are written as
            the ignore value), or None.
        path: the raster file it is read from (None for a store scene); no output may be it.
        reader: ``reader(row, col, height, width) -> (C, height, width)`` array, what
            :meth:`read` calls.
    """

    name: str
    where: str
    count: int
    height: int
    width: int
    dtype: str
    crs: Any
    transform: Any
    nodata: float | None
    reader: Callable[[int, int, int, int], np.ndarray]
    path: Path | None = None

    def read(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Read a window in the native dtype.

        Args:
            row, col: top-left pixel of the window.
            height, width: window size.

        Returns:
            ``(C, height, width)`` array.
        """
        return self.reader(row, col, height, width)

    @classmethod
    def from_array(
        cls, image: np.ndarray, name: str, nodata: float | None = None, where: str | None = None
    ) -> RasterSource:
        """Wrap an in-memory ``(C, H, W)`` array as a source without georeference.

        Args:
            image: the bands.
            name: output stem.
            nodata: the nodata value of ``image``, or None.
            where: what errors name (default ``name``).

        Returns:
            the source; its windows are views of ``image``.
        """

        def read(row: int, col: int, height: int, width: int) -> np.ndarray:
            return image[:, row : row + height, col : col + width]

        count, height, width = image.shape
        return cls(name=name, where=where or name, count=int(count), height=int(height), width=int(width),
                   dtype=np.dtype(image.dtype).name, crs=None, transform=None, nodata=nodata, reader=read)



def open_geotiff(path: str | Path) -> RasterSource:
    """Describe a GeoTIFF (or any GDAL raster) as a :class:`RasterSource`.

    Args:
        path: the raster file.

    Returns:
        the source; reads open the file each time, so no handle is held between scenes.

    Raises:
        InputFileError: the file is missing or not a readable raster, or its bands differ in dtype.
    """
    path = Path(path)
    try:
        with quiet_georef(), rasterio.open(path) as ds:
            if len(set(ds.dtypes)) != 1:
                raise InputFileError(path, f"bands have different dtypes {sorted(set(ds.dtypes))}")
            crs, transform = ds.crs, ds.transform
            info = dict(count=ds.count, height=ds.height, width=ds.width, dtype=ds.dtypes[0], nodata=ds.nodata)
    except RasterioIOError as error:
        raise InputFileError(path, f"not a readable raster: {underlying_cause(error)}") from error

    def read(row: int, col: int, height: int, width: int) -> np.ndarray:
        try:
            with quiet_georef(), rasterio.open(path) as ds:
                return ds.read(window=Window(col, row, width, height))
        except RasterioIOError as error:
            raise InputFileError(path, f"read failed: {underlying_cause(error)}") from error

    return RasterSource(
        name=path.stem, where=str(path), crs=crs, transform=transform, reader=read, path=path, **info
    )



def open_store_scene(store_path: str | Path, scene: str) -> RasterSource:
    """Describe one scene of a tile store as a :class:`RasterSource`.

    Args:
        store_path: the Zarr tile store.
        scene: the scene id.

    Returns:
        the source; its windows are read from the store.

    Raises:
        StoreError: the store cannot be opened or has no such scene.
    """
    store = TileStore.open(store_path)
    if scene not in store.scenes():
        raise StoreError(store_path, f"no scene {scene!r} (scenes: {', '.join(store.scenes()[:10])}...)")
    count, height, width = store.shape(scene)
    crs, transform = store.georef(scene)

    def read(row: int, col: int, h: int, w: int) -> np.ndarray:
        return store.read_image(scene, window=(row, col, h, w))

    return RasterSource(
        name=scene,
        where=f"{store_path}:{scene}",
        count=int(count),
        height=int(height),
        width=int(width),
        dtype=np.dtype(store.dtype(scene)).name,
        crs=crs,
        transform=transform if transform is not None else rasterio.Affine.identity(),
        nodata=store.nodata(scene),
        reader=read,
    )


@contextlib.contextmanager
def quiet_georef() -> Iterator[None]:
    """Silence rasterio's NotGeoreferencedWarning: a missing CRS gets our own one-line warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield
