"""Faults around `lrss-ds predict`, `evaluate` and `export`: outputs that are inputs, leftovers of
killed runs, bad devices, full disks and read-only directories each end in one named line."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import lrss_ds.models
from lrss_ds.cli import main
from lrss_ds.engine.model_io import WEIGHTS_FORMAT
from tests.engine.test_predict_helpers import DATASET, REPO, build_stand_in, write_geotiff

MEAN, STD = [90.0, 100.0, 110.0], [40.0, 45.0, 50.0]


@pytest.fixture(autouse=True)
def stand_in_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI builds models with lrss_ds.models.build_model; point it at the stand-ins."""
    monkeypatch.setattr(lrss_ds.models, "build_model", build_stand_in, raising=False)


def make_weights(path: Path, name: str = "pointnet") -> Path:
    """An exported weights file of a freshly initialised stand-in model (no training needed)."""
    config = {"name": name, "num_classes": 3, "in_channels": 3}
    model = build_stand_in(**config, band_mean=MEAN, band_std=STD)
    payload = {
        "format": WEIGHTS_FORMAT,
        "model": config,
        "dataset": DATASET,
        "input_dtype": "uint8",
        "band_mean": MEAN,
        "band_std": STD,
        "iteration": 1,
        "metrics": {},
        "state_dict": model.state_dict(),
    }
    torch.save(payload, path)
    return path


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    return make_weights(tmp_path / "weights.pt")


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(3, height, width)).astype("uint8")


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lrss-ds {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ------------------------------------------------------------------------------ output is an input


def test_output_that_is_the_input_is_refused_even_with_overwrite(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_geotiff(tmp_path / "x.tif", _image(20, 30))
    original = source.read_bytes()
    hard = tmp_path / "hard.tif"
    os.link(source, hard)
    soft = tmp_path / "soft.tif"
    soft.symlink_to(source)
    base = ["predict", "--checkpoint", str(weights), "--input", str(source), "--overwrite"]
    for output, how in ((source, "same path"), (hard, "hard link"), (soft, "symlink")):
        _one_line_error(capsys, base + ["--output", str(output)], str(output), "is the input", how)
        assert source.read_bytes() == original
    # The probabilities may not land on the input either, and nothing else is written meanwhile.
    _one_line_error(
        capsys, base + ["--output", str(tmp_path / "map.tif"), "--probabilities", str(hard)], "is the input"
    )
    assert source.read_bytes() == original and not (tmp_path / "map.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.tif", "soft.tif", "weights.pt", "x.tif"]


def test_batch_writing_into_its_own_input_directory_is_refused(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    sources = [write_geotiff(scenes / f"{name}.tif", _image(16, 16, seed=i)) for i, name in enumerate("ab")]
    before = {p: p.read_bytes() for p in sources}
    linked = tmp_path / "linked"
    linked.symlink_to(scenes, target_is_directory=True)
    for pattern, output in ((scenes, scenes), (f"{scenes}/*.tif", scenes), (scenes, linked)):
        argv = ["predict", "--checkpoint", str(weights), "--input", str(pattern), "--output", str(output)]
        _one_line_error(capsys, argv + ["--overwrite"], "a.tif", "is the input")
        assert {p: p.read_bytes() for p in sources} == before
    assert sorted(p.name for p in scenes.iterdir()) == ["a.tif", "b.tif"]
    # A different output directory is fine.
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(weights), "--input", str(scenes), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]
