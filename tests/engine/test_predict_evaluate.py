"""Tests for `lrss-ds evaluate`: store splits, prediction/label pairs, the report files and bad labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import lrss_ds.models
from lrss_ds.cli import main
from lrss_ds.engine.evaluate import encode_label
from lrss_ds.engine.model_io import load_model
from lrss_ds.errors import InputFileError
from tests.engine.test_predict_helpers import DATASET, build_stand_in, write_geotiff

TRANSFORM = rasterio.Affine(2.0, 0.0, 300000.0, 0.0, -2.0, 5000000.0)


@pytest.fixture
def run(stand_in_checkpoints: dict[str, Path]) -> Path:
    """A real ZeRO-1 DeepSpeed checkpoint of the pointwise stand-in."""
    return stand_in_checkpoints["point"]


@pytest.fixture(autouse=True)
def stand_in_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lrss_ds.models, "build_model", build_stand_in, raising=False)


def _hand_matrix(pred: np.ndarray, label: np.ndarray, k: int = 3, ignore: int = 255) -> np.ndarray:
    keep = (label != ignore) & (pred != ignore)
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (label[keep].astype(int), pred[keep].astype(int)), 1)
    return matrix


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_pairs_report_matches_hand_computed_matrix(run: Path, tmp_path: Path) -> None:
    # 2 x 4 pixels: rows = label, columns = prediction. By hand:
    #   label 0: pred 0, 0, 1 -> [2, 1, 0];  label 1: pred 1, 2 -> [0, 1, 1];  label 2: pred 2, 0 -> [1, 0, 1]
    # one label pixel is ignore (255) and one has no prediction (255, input nodata): both left out.
    label = np.array([[0, 0, 0, 1], [1, 2, 255, 2]], np.uint8)[None]
    pred = np.array([[0, 0, 1, 1], [2, 2, 0, 0]], np.uint8)[None]
    pred_with_gap = pred.copy()
    label_with_gap = label.copy()
    label_with_gap = np.concatenate([label_with_gap, np.array([[[1, 1, 1, 1]]], np.uint8)], axis=1)
    pred_with_gap = np.concatenate([pred_with_gap, np.array([[[255, 255, 255, 255]]], np.uint8)], axis=1)
    (tmp_path / "pred").mkdir()
    (tmp_path / "labels").mkdir()
    write_geotiff(tmp_path / "pred" / "tile.tif", pred_with_gap, transform=TRANSFORM)
    write_geotiff(tmp_path / "labels" / "tile.tif", label_with_gap, transform=TRANSFORM)
    report_dir = tmp_path / "report"
    # The dataset comes from the checkpoint here (no --dataset needed).
    assert (
        main(
            [
                "evaluate",
                "--predictions",
                str(tmp_path / "pred" / "*.tif"),
                "--labels",
                str(tmp_path / "labels"),
                "--checkpoint",
                str(run),
                "--output",
                str(report_dir),
            ]
        )
        == 0
    )
    report = _read_json(report_dir / "metrics.json")
    assert report["matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert report["classes"] == DATASET["classes"]
    assert report["iou"] == pytest.approx([0.5, 1 / 3, 1 / 3])
    assert report["f1"] == pytest.approx([2 / 3, 0.5, 0.5])
    assert report["precision"] == pytest.approx([2 / 3, 0.5, 0.5]) and report["recall"] == pytest.approx(
        [2 / 3, 0.5, 0.5]
    )
    assert report["miou"] == pytest.approx(7 / 18) and report["mean_f1"] == pytest.approx(5 / 9)
    assert report["oa"] == pytest.approx(4 / 7)
    assert report["unpredicted_pixels"] == 4 and report["pixels"] == 7
    markdown = (report_dir / "metrics.md").read_text()
    assert "| water | 50.00 | 66.67 | 66.67 | 66.67 | 3 |" in markdown
    assert "**mIoU 38.89**" in markdown and "OA 57.14" in markdown
    png = (report_dir / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # The report is refused the second time, and replaced with --overwrite.
    argv = [
        "evaluate",
        "--predictions",
        str(tmp_path / "pred"),
        "--labels",
        str(tmp_path / "labels"),
        "--checkpoint",
        str(run),
        "--output",
        str(report_dir),
    ]
    assert main(argv) == 1
    assert main(argv + ["--overwrite"]) == 0


def test_unknown_label_class_is_a_one_line_error(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_geotiff(tmp_path / "p.tif", np.zeros((1, 4, 4), np.uint8), transform=TRANSFORM)
    bad = write_geotiff(tmp_path / "labels_p.tif", np.full((1, 4, 4), 7, np.uint8), transform=TRANSFORM)
    (tmp_path / "l").mkdir()
    bad = bad.rename(tmp_path / "l" / "p.tif")
    assert (
        main(
            [
                "evaluate",
                "--predictions",
                str(tmp_path / "p.tif"),
                "--labels",
                str(tmp_path / "l"),
                "--checkpoint",
                str(run),
                "--output",
                str(tmp_path / "r"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and "unknown class" in err and "7" in err, err
    assert not (tmp_path / "r").exists()


def test_encode_label_rgb_and_label_map() -> None:
    rgb = dict(DATASET, label_encoding="rgb", ignore_colours=[[255, 255, 255]])
    raw = np.zeros((3, 1, 4), np.uint8)
    for i, colour in enumerate([[0, 0, 255], [0, 128, 0], [200, 0, 0], [255, 255, 255]]):
        raw[:, 0, i] = colour
    assert encode_label(raw, rgb, "lab.tif").tolist() == [[0, 1, 2, 255]]
    raw[:, 0, 3] = [1, 2, 3]
    with pytest.raises(InputFileError, match=r"lab.tif: unknown class: colour \(1, 2, 3\)"):
        encode_label(raw, rgb, "lab.tif")
    mapped = dict(DATASET, label_map=[[0, 255], [1, 0], [2, 1], [3, 2]])
    assert encode_label(np.array([[[0, 1, 2, 3]]], np.uint8), mapped, "m.tif").tolist() == [[255, 0, 1, 2]]
    with pytest.raises(InputFileError, match="label value 9 is not in"):
        encode_label(np.array([[[9, 1]]], np.uint8), mapped, "m.tif")


def _make_store(path: Path, scenes: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    catalog = pytest.importorskip("lrss_ds.data.catalog")
    store = pytest.importorskip("lrss_ds.data.store_writer")
    from rasterio.crs import CRS

    writer = store.StoreWriter(path, catalog.DatasetSpec.from_dict(DATASET))
    for scene, (image, label) in scenes.items():
        group, image_array, label_array = writer.begin_scene(
            scene, image.shape[0], image.shape[1], image.shape[2], image.dtype
        )
        image_array[:] = image
        label_array[:] = label
        stats = store.BandStats.empty(image.shape[0])
        stats.add_block(image)
        attrs = store.scene_attributes(
            split="val",
            crs_wkt=CRS.from_epsg(32633).to_wkt(),
            transform=tuple(TRANSFORM)[:6],
            band_names=["R", "G", "B"],
            nodata=None,
            source_image=f"{scene}.tif",
            source_image_sha256="0",
            source_label=f"{scene}_l.tif",
            source_label_sha256="0",
            stats=stats,
        )
        writer.finish_scene(scene, group, attrs)


def test_store_split_evaluation_equals_predict_then_pairs(run: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    model, _ = load_model(run, builder=build_stand_in)
    scenes, expected = {}, np.zeros((3, 3), np.int64)
    for index, (height, width) in enumerate([(70, 90), (600, 40)]):
        image = rng.integers(0, 255, size=(3, height, width)).astype(np.uint8)
        with torch.inference_mode():
            pred = model(torch.from_numpy(image)[None])[0].argmax(0).numpy().astype(np.uint8)
        label = pred.copy()
        label[: height // 3] = (label[: height // 3] + 1) % 3  # a third of the rows wrong
        label[-5:] = 255
        scenes[f"scene{index}"] = (image, label)
        expected += _hand_matrix(pred, label)
    store = tmp_path / "store"
    _make_store(store, scenes)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run),
                "--store",
                str(store),
                "--split",
                "val",
                "--output",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    report = _read_json(tmp_path / "rep" / "metrics.json")
    assert report["matrix"] == expected.tolist()
    diag = np.diag(expected)
    assert report["iou"] == pytest.approx((diag / (expected.sum(0) + expected.sum(1) - diag)).tolist())
    assert report["oa"] == pytest.approx(diag.sum() / expected.sum())
    assert [s["scene"] for s in report["scenes"]] == ["scene0", "scene1"] and report["split"] == "val"
    # The same through predict (from the store) -> evaluate on the GeoTIFF pairs.
    (tmp_path / "labels").mkdir()
    for scene, (_, label) in scenes.items():
        write_geotiff(tmp_path / "labels" / f"{scene}.tif", label[None], transform=TRANSFORM)
    argv = ["predict", "--checkpoint", str(run), "--store", str(store), "--output", str(tmp_path / "pred")]
    assert main(argv + ["--scene", "scene0", "--scene", "scene1"]) == 0
    with rasterio.open(tmp_path / "pred" / "scene1.tif") as out:
        assert out.crs.to_epsg() == 32633 and out.transform == TRANSFORM and out.shape == (600, 40)
    assert (
        main(
            [
                "evaluate",
                "--predictions",
                str(tmp_path / "pred"),
                "--labels",
                str(tmp_path / "labels"),
                "--checkpoint",
                str(run),
                "--output",
                str(tmp_path / "rep2"),
            ]
        )
        == 0
    )
    assert _read_json(tmp_path / "rep2" / "metrics.json")["matrix"] == expected.tolist()


def test_unknown_class_in_store_label_names_the_scene(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = np.full((3, 20, 20), 100, np.uint8)
    label = np.zeros((20, 20), np.uint8)
    label[3, 4] = 9
    _make_store(tmp_path / "store", {"bad": (image, label)})
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run),
                "--store",
                str(tmp_path / "store"),
                "--split",
                "val",
                "--output",
                str(tmp_path / "rep"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "store:bad" in err and "unknown class" in err and "9" in err, err


def test_pixels_without_prediction_are_left_out_and_counted() -> None:
    from lrss_ds.engine.evaluate import count_pixels
    from lrss_ds.engine.metrics import ConfusionMatrix

    pred = np.array([[0, 255, 1], [255, 2, 2]], np.uint8)
    label = np.array([[0, 1, 1], [255, 2, 0]], np.uint8)
    with_ignore = ConfusionMatrix(3, ignore_index=255)
    assert count_pixels(with_ignore, pred, label, "x.tif", unpredicted=255) == 1  # (0,1); (1,0) is unlabeled
    assert with_ignore.compute()["matrix"] == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    no_ignore = ConfusionMatrix(3, ignore_index=None)
    label[1, 0] = 0
    assert count_pixels(no_ignore, pred, label, "x.tif", unpredicted=255) == 2
    assert no_ignore.compute()["matrix"] == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
