"""Tests of ingest: resume after interruption, every bad input, RGB labels, rasters without georeference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from lrss_ds.cli import main
from lrss_ds.data import TileStore
from lrss_ds.data.catalog import get_dataset
from lrss_ds.data.ingest import ingest
from lrss_ds.data.store_format import PARTIAL_DIR
from lrss_ds.errors import InputFileError, StoreError
from tests.data.data_helpers import quiet, realdata, snapshot, synth_scenes, user_dataset_yaml, write_raster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def synth_dir(tmp_path: Path) -> Path:
    return synth_scenes(tmp_path, 3, "160x200")


# ------------------------------------------------------------------ resume after interruption
KILL_SCRIPT = """
import os, signal, sys
from lrss_ds.data import store_writer as store_mod
from lrss_ds.data.ingest import ingest
target, when = sys.argv[4], sys.argv[5]
original_finish, original_refresh = store_mod.StoreWriter.finish_scene, store_mod.StoreWriter.refresh_root
def finish(self, scene, group, attrs):
    if scene == target and when == "before_rename":
        os.kill(os.getpid(), signal.SIGKILL)
    original_finish(self, scene, group, attrs)
def refresh(self):
    if when == "after_rename" and (self.path / target / "zarr.json").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    original_refresh(self)
store_mod.StoreWriter.finish_scene, store_mod.StoreWriter.refresh_root = finish, refresh
ingest(sys.argv[1], sys.argv[2], sys.argv[3], "synthetic", log=lambda s: None)
"""


@pytest.mark.parametrize("when", ["before_rename", "after_rename"])
def test_killed_ingest_resumes_to_the_same_store(tmp_path, synth_dir, when) -> None:
    images, labels = str(synth_dir / "images"), str(synth_dir / "labels")
    clean = tmp_path / "clean.zarr"
    ingest(clean, images, labels, "synthetic", log=quiet)

    store_path = tmp_path / "killed.zarr"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(store_path), images, labels,
                           "synth_0_0001", when], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-500:]
    # The store is valid after the kill and holds only complete scenes.
    partial = TileStore.open(store_path)
    assert partial.scenes() == ["synth_0_0000"]
    if when == "before_rename":
        assert (store_path / PARTIAL_DIR / "synth_0_0001").is_dir()

    result = ingest(store_path, images, labels, "synthetic", log=quiet)
    assert result["skipped"] == ["synth_0_0000"] + (["synth_0_0001"] if when == "after_rename" else [])
    assert "synth_0_0002" in result["ingested"]
    assert not (store_path / PARTIAL_DIR).exists()
    assert snapshot(store_path) == snapshot(clean)


def test_leftover_partial_and_unmarked_scenes_are_redone(tmp_path, synth_dir) -> None:
    images, labels = str(synth_dir / "images"), str(synth_dir / "labels")
    store_path = tmp_path / "s.zarr"
    ingest(store_path, images, labels, "synthetic", log=quiet)
    reference = snapshot(store_path)
    # A half-written temporary group, and a scene whose completion marker is missing.
    shutil.move(store_path / "synth_0_0002", store_path / PARTIAL_DIR / "synth_0_0002")
    for chunk in (store_path / PARTIAL_DIR / "synth_0_0002" / "image" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"half")
    meta = (store_path / "synth_0_0001" / "zarr.json")
    meta.write_text(meta.read_text().replace('"complete": true', '"complete": false'))
    result = ingest(store_path, images, labels, "synthetic", log=quiet)
    assert sorted(result["ingested"]) == ["synth_0_0001", "synth_0_0002"]
    assert result["skipped"] == ["synth_0_0000"] and "synth_0_0002" in result["redone"]
    assert snapshot(store_path) == reference


# ------------------------------------------------------------------ bad inputs, one line each
def _one_line(error: Exception, name: str) -> None:
    text = str(error)
    assert "\n" not in text and name in text, text


def _pair(tmp_path: Path, image: np.ndarray, label: np.ndarray, **label_geo) -> tuple[str, str]:
    write_raster(tmp_path / "img" / "scene.tif", image)
    write_raster(tmp_path / "lbl" / "scene.tif", label, **label_geo)
    return str(tmp_path / "img"), str(tmp_path / "lbl")


def test_corrupt_tiff_is_named(tmp_path, synth_dir) -> None:
    images = tmp_path / "img"
    images.mkdir()
    good = (synth_dir / "images" / "synth_0_0000.tif").read_bytes()
    (images / "synth_0_0000.tif").write_bytes(good[: len(good) // 3])  # truncated
    (images / "synth_0_0001.tif").write_bytes(b"II*\x00 this is not a tiff")
    for name in ("synth_0_0001", "synth_0_0000"):
        with pytest.raises(InputFileError) as info:
            ingest(tmp_path / f"s_{name}.zarr", str(images / f"{name}.tif"), str(synth_dir / "labels"),
                   "synthetic", log=quiet)
        _one_line(info.value, f"{name}.tif")
        assert "corrupt" in str(info.value)
        assert not (tmp_path / f"s_{name}.zarr" / name).exists()


def test_size_and_georeference_mismatch(tmp_path) -> None:
    image = np.zeros((4, 64, 80), np.uint8)
    images, labels = _pair(tmp_path / "a", image, np.zeros((64, 81), np.uint8))
    with pytest.raises(InputFileError, match="size 64x81 differs") as info:
        ingest(tmp_path / "a.zarr", images, labels, "synthetic", log=quiet)
    _one_line(info.value, "scene.tif")
    images, labels = _pair(tmp_path / "b", image, np.zeros((64, 80), np.uint8), crs="EPSG:32632")
    with pytest.raises(InputFileError, match="georeference differs"):
        ingest(tmp_path / "b.zarr", images, labels, "synthetic", log=quiet)
    images, labels = _pair(tmp_path / "c", image, np.zeros((64, 80), np.uint8),
                           transform=(4.0, 0.0, 400004.0, 0.0, -4.0, 5300000.0))
    with pytest.raises(InputFileError, match="georeference differs"):
        ingest(tmp_path / "c.zarr", images, labels, "synthetic", log=quiet)


def test_label_values_outside_the_class_table_are_listed(tmp_path) -> None:
    label = np.zeros((64, 80), np.uint8)
    label[0, 0], label[5, 5], label[63, 79] = 6, 9, 200
    images, labels = _pair(tmp_path, np.zeros((4, 64, 80), np.uint8), label)
    with pytest.raises(InputFileError, match=r"outside the class table.*6, 9, 200") as info:
        ingest(tmp_path / "s.zarr", images, labels, "synthetic", log=quiet)
    _one_line(info.value, str(Path(labels) / "scene.tif"))
    assert not (tmp_path / "s.zarr" / "scene").exists()
    assert not (tmp_path / "s.zarr" / PARTIAL_DIR).exists()
    assert TileStore.open(tmp_path / "s.zarr").scenes() == []


def test_band_count_mismatch_with_the_store(tmp_path, synth_dir) -> None:
    store_path = tmp_path / "s.zarr"
    ingest(store_path, str(synth_dir / "images"), str(synth_dir / "labels"), "synthetic", log=quiet)
    images, labels = _pair(tmp_path, np.zeros((3, 64, 80), np.uint8), np.zeros((64, 80), np.uint8))
    with pytest.raises(InputFileError, match="has 3 bands but the store's dataset 'synthetic' has 4") as info:
        ingest(store_path, images, labels, "synthetic", log=quiet)
    _one_line(info.value, "scene.tif")
    # Another dataset spec for the same store is refused too.
    with pytest.raises(StoreError, match="different spec"):
        ingest(store_path, images, labels, "inria", log=quiet)


def test_scene_id_escaping_the_store_and_missing_label(tmp_path) -> None:
    image = np.zeros((4, 32, 32), np.uint8)
    write_raster(tmp_path / "img" / "...tif", image)  # stem ".."
    write_raster(tmp_path / "lbl" / "...tif", np.zeros((32, 32), np.uint8))
    with pytest.raises(StoreError, match="escape the store") as info:
        ingest(tmp_path / "s.zarr", str(tmp_path / "img"), str(tmp_path / "lbl"), "synthetic", log=quiet)
    _one_line(info.value, "...tif")
    assert not (tmp_path / "s.zarr").exists()
    write_raster(tmp_path / "img3" / "zarr.json.tif", image)  # would overwrite the root metadata
    write_raster(tmp_path / "lbl" / "zarr.json.tif", np.zeros((32, 32), np.uint8))
    with pytest.raises(StoreError, match="escape the store"):
        ingest(tmp_path / "s.zarr", str(tmp_path / "img3"), str(tmp_path / "lbl"), "synthetic", log=quiet)
    write_raster(tmp_path / "img2" / "alone.tif", image)
    with pytest.raises(InputFileError, match="no label file with stem 'alone'"):
        ingest(tmp_path / "s.zarr", str(tmp_path / "img2"), str(tmp_path / "lbl"), "synthetic", log=quiet)
    assert main(["ingest", "--store", str(tmp_path / "t.zarr"), "--images", str(tmp_path / "nope"),
                 "--labels", str(tmp_path / "lbl"), "--dataset", "synthetic"]) == 1


# ------------------------------------------------------------------ RGB labels, no georeference
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_rgb_labels_real_vaihingen_png_without_georeference(tmp_path) -> None:
    image_png = realdata("mmseg_vaihingen/img_dir/area1_0_0_512_512.png")
    label_png = realdata("mmseg_vaihingen/ann_dir/area1_0_0_512_512.png")
    spec = get_dataset("vaihingen")
    with rasterio.open(label_png) as src:
        index = src.read(1)  # mmseg encoding: 0 ignore (eroded boundary), 1..6 classes
    # Re-encode as the ISPRS colour code (black = eroded boundary), the form users have.
    colours = np.array([[0, 0, 0]] + [list(c) for c in spec.palette], np.uint8)
    rgb = colours[index].transpose(2, 0, 1)
    (tmp_path / "img").mkdir()
    shutil.copy(image_png, tmp_path / "img" / "area1_0_0_512_512.png")
    write_raster(tmp_path / "lbl" / "area1_0_0_512_512.png", rgb, crs=None, transform=None, driver="PNG")
    lines: list[str] = []
    ingest(tmp_path / "s.zarr", str(tmp_path / "img"), str(tmp_path / "lbl"), "vaihingen", log=lines.append)
    assert any("no georeference" in line and "area1_0_0_512_512.png" in line for line in lines)
    store = TileStore.open(tmp_path / "s.zarr")
    image, label = store.read("area1_0_0_512_512")
    expected = np.where(index == 0, 255, index.astype(np.int64) - 1).astype(np.uint8)
    assert np.array_equal(label, expected)
    with rasterio.open(image_png) as src:
        assert np.array_equal(image, src.read())
    assert store.georef("area1_0_0_512_512") == (None, None)
    assert store.scenes("test") == ["area1_0_0_512_512"]  # not an ISPRS training tile

    # A colour outside the palette is listed.
    rgb[:, 0, 0] = (12, 34, 56)
    write_raster(tmp_path / "lbl2" / "area1_0_0_512_512.png", rgb, crs=None, transform=None, driver="PNG")
    with pytest.raises(InputFileError, match=r"\(12, 34, 56\)"):
        ingest(tmp_path / "s2.zarr", str(tmp_path / "img"), str(tmp_path / "lbl2"), "vaihingen", log=quiet)


def test_label_map_and_label_suffix_from_a_user_yaml(tmp_path) -> None:
    label = np.array([[0, 255], [255, 0]], np.uint8).repeat(16, 0).repeat(16, 1)
    write_raster(tmp_path / "img" / "tile7.tif", np.ones((3, 32, 32), np.uint16) * 1000)
    write_raster(tmp_path / "lbl" / "tile7_gt.tif", label)
    dataset = user_dataset_yaml(tmp_path / "d.yaml", ["R", "G", "B"], ["bg", "house"],
                                label_suffix="_gt", label_map={0: 0, 255: 1})
    ingest(tmp_path / "s.zarr", str(tmp_path / "img"), str(tmp_path / "lbl" / "*.tif"), str(dataset), log=quiet)
    store = TileStore.open(tmp_path / "s.zarr")
    image, stored = store.read("tile7")
    assert image.dtype == np.uint16 and np.array_equal(stored, (label == 255).astype(np.uint8))
    assert store.band_stats() == ([1000.0] * 3, [0.0] * 3)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_rgb_threshold_cleans_lossy_colour_labels(tmp_path) -> None:
    spec = get_dataset("deepglobe")
    index = (np.arange(64 * 64).reshape(64, 64) // 600 % 7).astype(np.uint8)
    rgb = np.array(spec.palette, np.int16)[index].transpose(2, 0, 1)
    noisy = np.clip(rgb + np.where(rgb > 127, -20, 20), 0, 255).astype(np.uint8)  # as after JPEG
    write_raster(tmp_path / "img" / "42_sat.tif", np.zeros((3, 64, 64), np.uint8), crs=None, transform=None)
    write_raster(tmp_path / "lbl" / "42_mask.tif", noisy, crs=None, transform=None)
    ingest(tmp_path / "s.zarr", str(tmp_path / "img"), str(tmp_path / "lbl"), "deepglobe", log=quiet)
    store = TileStore.open(tmp_path / "s.zarr")
    assert np.array_equal(store.read("42_sat")[1], index) and store.scenes("val") == ["42_sat"]
