"""Small raster-writing helpers shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"


def realdata(relative: str) -> Path:
    """Return a file under ../shared/realdata, or skip the test when it is absent."""
    path = REALDATA / relative
    if not path.exists():
        pytest.skip(f"real test raster {relative} not found under {REALDATA} (only present beside the checkout)")
    return path


def write_raster(path: Path, array: np.ndarray, crs: str | None = "EPSG:32633",
                 transform: tuple[float, ...] | None = (4.0, 0.0, 400000.0, 0.0, -4.0, 5300000.0),
                 driver: str = "GTiff", nodata: float | None = None) -> Path:
    """Write ``array`` (C, H, W) or (H, W) to ``path`` with the given georeference."""
    import rasterio
    from affine import Affine

    data = array[None] if array.ndim == 2 else array
    profile = dict(driver=driver, height=data.shape[1], width=data.shape[2], count=data.shape[0],
                   dtype=data.dtype.name)
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = Affine(*transform)
    if nodata is not None:
        profile["nodata"] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def user_dataset_yaml(path: Path, bands: list[str], classes: list[str], **extra) -> Path:
    """Write a user dataset YAML and return its path."""
    import yaml

    values = {"name": "custom", "classes": classes, "ignore_index": 255, "label_encoding": "index",
              "bands": bands, **extra}
    path.write_text(yaml.safe_dump(values))
    return path


def quiet(_: str) -> None:
    """A ``log`` that drops every line."""


def synth_scenes(tmp_path: Path, scenes: int, size: str) -> Path:
    """Write ``scenes`` synthetic scenes of ``size`` (``HxW``) under ``tmp_path/syn`` and return it."""
    from lrss_ds.cli import main

    assert main(["synth", "--out", str(tmp_path / "syn"), "--scenes", str(scenes), "--size", size]) == 0
    return tmp_path / "syn"


def snapshot(store_path: Path) -> dict:
    """Return every scene's pixels and labels, the splits and the band statistics of a store."""
    from lrss_ds.data import TileStore

    store = TileStore.open(store_path)
    return {s: tuple(a.tobytes() for a in store.read(s)) for s in store.scenes()} | {
        "_splits": store.splits, "_stats": store.band_stats()}
