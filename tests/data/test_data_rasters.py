"""Scenes read window by window: an in-memory array wrapped as a source reads like a GeoTIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from lrss_ds.data.rasters import RasterSource, open_geotiff


def write_geotiff(path: Path, image: np.ndarray) -> Path:
    """``image (C, H, W)`` as a GeoTIFF with a CRS."""
    count, height, width = image.shape
    transform = rasterio.Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=image.dtype.name,
                       crs="EPSG:32633", transform=transform) as dataset:
        dataset.write(image)
    return path


def test_an_array_source_reads_the_windows_a_geotiff_of_it_reads(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (3, 37, 53), dtype=np.uint8)
    from_file = open_geotiff(write_geotiff(tmp_path / "scene.tif", image))
    from_array = RasterSource.from_array(image, "scene", where="synthetic scene 0")
    for field in ("name", "count", "height", "width", "dtype", "nodata"):
        assert getattr(from_array, field) == getattr(from_file, field), field
    assert (from_array.where, from_array.crs, from_array.path) == ("synthetic scene 0", None, None)
    for window in ((0, 0, 37, 53), (5, 7, 16, 20), (30, 40, 7, 13)):
        np.testing.assert_array_equal(from_array.read(*window), from_file.read(*window))
