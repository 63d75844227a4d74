"""Tests of the tile store: exact round trips, windowed reads, plain-zarr access, band statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from lrss_ds.cli import main
from lrss_ds.data import TileStore
from lrss_ds.data.ingest import ingest
from lrss_ds.errors import StoreError
from tests.data.data_helpers import realdata, user_dataset_yaml, write_raster


def _quiet(_: str) -> None:
    pass


@pytest.fixture()
def landsat_store(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """Ingest the real Landsat GeoTIFF (3x718x791, EPSG:32618, nodata 0) with a made-up label."""
    source = realdata("rasterio_rgb_byte/RGB.byte.tif")
    with rasterio.open(source) as src:
        label = ((src.read(1).astype(np.int32) // 64) % 3).astype(np.uint8)
        label[:5] = 255
        crs, transform = src.crs.to_wkt(), tuple(src.transform)[:6]
    images = tmp_path / "images"
    images.mkdir()
    (images / "RGB.byte.tif").symlink_to(source)
    write_raster(tmp_path / "labels" / "RGB.byte.tif", label, crs=crs, transform=transform)
    dataset = user_dataset_yaml(tmp_path / "landsat.yaml", ["R", "G", "B"], ["dark", "mid", "bright"])
    store = tmp_path / "store.zarr"
    ingest(store, str(images), str(tmp_path / "labels"), str(dataset), tile=256, log=_quiet)
    return store, source, label


def test_round_trip_is_exact_in_pixels_and_georeference(landsat_store) -> None:
    store_path, source, label = landsat_store
    store = TileStore.open(store_path)
    assert store.scenes() == ["RGB.byte"] and store.scenes("train") == ["RGB.byte"]
    image, stored_label = store.read("RGB.byte")
    crs, transform = store.georef("RGB.byte")
    with rasterio.open(source) as src:
        assert image.dtype == np.uint8 and store.dtype("RGB.byte") == np.uint8
        assert store.shape("RGB.byte") == (3, 718, 791)
        assert np.array_equal(image, src.read())
        assert crs == src.crs and crs.to_epsg() == 32618
        assert transform == src.transform
        assert store.nodata("RGB.byte") == 0
        # Band statistics skip nodata pixels and match a direct computation.
        mean, std = store.band_stats()
        for band in range(3):
            values = src.read(band + 1).astype(np.float64)
            values = values[values != 0]
            assert mean[band] == pytest.approx(values.mean(), rel=1e-12)
            assert std[band] == pytest.approx(values.std(), rel=1e-10)
    assert np.array_equal(stored_label, label)
    attrs = store.scene_attrs("RGB.byte")
    assert attrs["source_image"] == "RGB.byte.tif" and len(attrs["source_image_sha256"]) == 64
    assert attrs["complete"] is True and attrs["band_names"] == ["R", "G", "B"]


def test_windowed_reads_touch_only_overlapping_chunks(landsat_store) -> None:
    store_path, _, _ = landsat_store
    store = TileStore.open(store_path)
    whole_image, whole_label = store.read("RGB.byte")
    for window in [(0, 0, 1, 1), (100, 200, 300, 311), (700, 780, 18, 11), (0, 0, 718, 791)]:
        r, c, h, w = window
        image, label = store.read("RGB.byte", window)
        assert np.array_equal(image, whole_image[:, r:r + h, c:c + w])
        assert np.array_equal(label, whole_label[r:r + h, c:c + w])
    # Corrupt every chunk the window (10, 10, 200, 200) does not overlap (chunks are 256):
    # the window still reads, so those chunks are never touched; a whole read then fails.
    for kind in ("image", "label"):
        for chunk in (store_path / "RGB.byte" / kind / "c").rglob("*"):
            if chunk.is_file() and chunk.relative_to(store_path / "RGB.byte" / kind / "c").parts[-2:] != ("0", "0"):
                chunk.write_bytes(b"garbage")
    fresh = TileStore.open(store_path)
    image, label = fresh.read("RGB.byte", (10, 10, 200, 200))
    assert np.array_equal(image, whole_image[:, 10:210, 10:210])
    with pytest.raises(Exception):
        fresh.read("RGB.byte")
    with pytest.raises(StoreError, match="outside"):
        fresh.read("RGB.byte", (700, 700, 100, 100))


def test_store_opens_with_plain_zarr(landsat_store) -> None:
    store_path, source, label = landsat_store
    root = zarr.open_group(str(store_path), mode="r")
    meta = root.attrs["lrss_ds"]
    assert meta["dataset"]["name"] == "custom" and meta["splits"] == {"train": ["RGB.byte"]}
    image = root["RGB.byte/image"]
    assert image.shape == (3, 718, 791) and image.chunks == (3, 256, 256)
    with rasterio.open(source) as src:
        assert np.array_equal(image[:, 50:60, 70:90], src.read()[:, 50:60, 70:90])
    assert np.array_equal(root["RGB.byte/label"][:], label)
    assert root["RGB.byte"].attrs["lrss_ds"]["crs_wkt"].startswith(("PROJCS", "PROJCRS"))


def test_open_refuses_what_is_not_a_store(tmp_path) -> None:
    with pytest.raises(StoreError, match="no tile store"):
        TileStore.open(tmp_path / "nothing")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an lrss_ds tile store"):
        TileStore.open(tmp_path / "other.zarr")


def test_splits_stats_and_info(tmp_path, capsys) -> None:
    assert main(["synth", "--out", str(tmp_path / "syn"), "--scenes", "3", "--size", "200x260"]) == 0
    store_path = tmp_path / "s.zarr"
    images, labels = tmp_path / "syn" / "images", tmp_path / "syn" / "labels"
    ingest(store_path, str(images / "synth_0_000[01].tif"), str(labels), "synthetic", log=_quiet)
    ingest(store_path, str(images / "synth_0_0002.tif"), str(labels), "synthetic", split="val", log=_quiet)
    store = TileStore.open(store_path)
    assert store.scenes("train") == ["synth_0_0000", "synth_0_0001"] and store.scenes("val") == ["synth_0_0002"]
    with pytest.raises(StoreError, match="no split"):
        store.scenes("test")
    train = np.concatenate([store.read(s)[0].reshape(4, -1) for s in store.scenes("train")], axis=1)
    mean, std = store.band_stats()
    np.testing.assert_allclose(mean, train.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(std, train.std(axis=1), rtol=1e-10)
    assert main(["info", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "train 2" in out and "val 1" in out and "river" in out and "EPSG:32633" in out and "mean" in out
    assert "codec blosc-lz4" in out


def test_codecs_read_back_identically(tmp_path) -> None:
    assert main(["synth", "--out", str(tmp_path / "syn"), "--scenes", "1", "--size", "300x530"]) == 0
    images, labels = str(tmp_path / "syn" / "images"), str(tmp_path / "syn" / "labels")
    reads = {}
    for codec in ("lz4", "zstd", "none"):
        assert main(["ingest", "--store", str(tmp_path / codec), "--images", images, "--labels", labels,
                     "--dataset", "synthetic", "--codec", codec, "--tile", "128"]) == 0
        store = TileStore.open(tmp_path / codec)
        codecs = [c["name"] for c in zarr.open_array(str(tmp_path / codec / "synth_0_0000" / "image")).metadata.to_dict()["codecs"]]
        assert codecs == (["bytes"] if codec == "none" else ["bytes", "blosc"])
        reads[codec] = store.read("synth_0_0000") + store.read("synth_0_0000", (100, 120, 130, 300))
        # The fast reader and zarr-python agree.
        plain = zarr.open_array(str(tmp_path / codec / "synth_0_0000" / "image"), mode="r")
        assert np.array_equal(reads[codec][2], plain[:, 100:230, 120:420])
    for codec in ("zstd", "none"):
        for got, want in zip(reads[codec], reads["lz4"]):
            assert np.array_equal(got, want)
