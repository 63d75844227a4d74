"""Failed GDAL writes in `lrss-ds predict` and the `lrss-ds train` command line: one named line each."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import numpy as np
import pytest

import lrss_ds.engine.train_cli
import lrss_ds.models
from lrss_ds.cli import main
from tests.engine.test_predict_faults import _refuse_writes_in, make_weights
from tests.engine.test_predict_helpers import build_stand_in, one_line_error, write_geotiff


@pytest.fixture(autouse=True)
def stand_in_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI builds models with lrss_ds.models.build_model; point it at the stand-ins."""
    monkeypatch.setattr(lrss_ds.models, "build_model", build_stand_in, raising=False)


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    """A 3-band 64x80 uint8 GeoTIFF."""
    image = np.random.default_rng(0).integers(0, 255, size=(3, 64, 80)).astype("uint8")
    return write_geotiff(tmp_path / "scene.tif", image)


@pytest.mark.parametrize("full", ["map", "probs"])
def test_predict_onto_a_full_disk_says_so_and_leaves_nothing(
    scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], full: str
) -> None:
    weights = make_weights(tmp_path / "weights.pt")
    out = tmp_path / "out"
    out.mkdir()
    # A real ENOSPC: GDAL's first temporary (this process's PID) for one output leads to /dev/full.
    (out / f".{full}.part-{os.getpid()}.tif").symlink_to("/dev/full")
    argv = ["predict", "--checkpoint", str(weights), "--input", str(scene), "--output", str(out / "map.tif"),
            "--probabilities", str(out / "probs.tif")]
    err = one_line_error(capsys, argv, str(out / f"{full}.tif"), "the disk is full")
    assert "See previous exception" not in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("code, cause", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_predict_into_a_read_only_directory_names_the_real_cause(
    scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    code: int, cause: str,
) -> None:
    weights = make_weights(tmp_path / "weights.pt")
    locked = tmp_path / "locked"
    locked.mkdir()
    _refuse_writes_in(monkeypatch, locked, code)
    output = locked / "map.tif"
    argv = ["predict", "--checkpoint", str(weights), "--input", str(scene), "--output", str(output)]
    err = one_line_error(capsys, argv, str(output), cause)
    assert "See previous exception" not in err
    assert list(locked.iterdir()) == []


def test_train_takes_overrides_before_and_after_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(lrss_ds.engine.train_cli, "run", lambda args: seen.append(args) or 0)
    assert main(["train", "--config", "x.yaml", "train.iterations=1", "--resume", "model.options.lrd_k=32"]) == 0
    assert seen[0].overrides == ["train.iterations=1", "model.options.lrd_k=32"]
    assert seen[0].resume and seen[0].config == "x.yaml"
