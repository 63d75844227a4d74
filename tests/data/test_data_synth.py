"""Tests of the synthetic scene generator: determinism, georeference, river-vs-lake design."""

from __future__ import annotations

import hashlib

import numpy as np
import rasterio

from lrss_ds.cli import main
from lrss_ds.data.catalog import get_dataset
from lrss_ds.data.synth import LAKE, RIVER, make_layout, render, render_scene


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Pixels whose whole (2k+1)^2 neighbourhood is in ``mask``."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            shifted = np.zeros_like(mask)
            shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            out &= shifted
    return out


def test_cli_is_deterministic_and_georeferenced(tmp_path) -> None:
    args = ["synth", "--scenes", "2", "--size", "300x420", "--bands", "3", "--seed", "7"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert main(["synth", "--scenes", "1", "--size", "300x420", "--bands", "3", "--seed", "8",
                 "--out", str(tmp_path / "c")]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tif"))
    assert len(files) == 4
    for rel in files:
        assert _digest(tmp_path / "a" / rel) == _digest(tmp_path / "b" / rel)
    with rasterio.open(tmp_path / "a" / "images" / "synth_7_0000.tif") as a, \
            rasterio.open(tmp_path / "c" / "images" / "synth_8_0000.tif") as c:
        assert (a.count, a.height, a.width) == (3, 300, 420) and a.dtypes[0] == "uint8"
        assert a.crs.to_epsg() == 32633 and a.transform.a == 4.0 and a.transform.e == -4.0
        assert not np.array_equal(a.read(), c.read())  # another seed, another scene
    with rasterio.open(tmp_path / "a" / "labels" / "synth_7_0000.tif") as label:
        values = np.unique(label.read(1))
        assert set(values.tolist()) <= set(range(len(get_dataset("synthetic").classes)))
    # Refuses to overwrite without --overwrite.
    assert main([*args, "--out", str(tmp_path / "a")]) == 1


def test_windows_render_the_same_pixels_as_the_whole_scene() -> None:
    layout = make_layout(3, 1, 700, 900)
    image, label = render_scene(layout, bands=5)
    part_image, part_label = render(layout, (123, 456, 300, 333), bands=5)
    assert np.array_equal(part_image, image[:, 123:423, 456:789])
    assert np.array_equal(part_label, label[123:423, 456:789])


def test_river_crosses_and_lakes_are_compact_with_the_same_water() -> None:
    for index in range(3):
        layout = make_layout(0, index, 512, 512)
        image, label = render_scene(layout)
        river, lake = label == RIVER, label == LAKE
        assert river.any() and lake.any()
        # The river reaches two opposite edges; lakes touch none and stay small.
        assert (river[0].any() and river[-1].any()) or (river[:, 0].any() and river[:, -1].any())
        assert not (lake[0].any() or lake[-1].any() or lake[:, 0].any() or lake[:, -1].any())
        assert lake.sum() < 0.1 * lake.size
        # Inside both, the pixels come from one distribution: a river crop looks like a lake crop.
        river_in, lake_in = _erode(river, 3), _erode(lake, 3)
        for band in range(image.shape[0]):
            r, q = image[band][river_in].astype(float), image[band][lake_in].astype(float)
            assert abs(r.mean() - q.mean()) < 6, (index, band)
            assert 0.6 < r.std() / q.std() < 1.6, (index, band)
