"""Data layer: GeoTIFF -> Zarr tile store -> samples (``TileStore``; torch lives in ``samples``)."""

from __future__ import annotations

from lrss_ds.data.catalog import DatasetSpec, get_dataset
from lrss_ds.data.store import TileStore

__all__ = ["DatasetSpec", "TileStore", "get_dataset"]
