"""Data layer: GeoTIFF -> Zarr tile store -> samples (``TileStore``; torch lives in ``samples``).

Adding a dataset: write its description (classes, palette, bands, label encoding, splits; the
fields of :class:`DatasetSpec`) as a YAML file and pass its path wherever a dataset name goes, or
make it built in with one entry of ``BUILTIN_DATASETS`` in ``catalog.py``.
"""

from __future__ import annotations

from lrss_ds.data.catalog import DatasetSpec, get_dataset
from lrss_ds.data.store import TileStore

__all__ = ["DatasetSpec", "TileStore", "get_dataset"]
