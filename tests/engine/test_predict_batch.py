"""Batches of scenes: split over 2 ranks under the deepspeed launcher, and a killed batch resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lrss_ds.engine.demo import launcher_env
from lrss_ds.engine.model_io import WEIGHTS_FORMAT
from lrss_ds.engine.rendezvous import free_port
from lrss_ds.models import build_model
from tests.engine.test_predict_helpers import DATASET, REPO, write_geotiff

MEAN, STD = [90.0, 100.0, 110.0], [40.0, 45.0, 50.0]
TIMEOUT = 300


def _weights(path: Path) -> Path:
    """An exported weights file of a fresh HRNet-FCN (3 classes, 3 bands): what `lrss-ds export` writes."""
    torch.manual_seed(0)
    model = build_model("hrnet_fcn", 3, 3, band_mean=MEAN, band_std=STD)
    torch.save({"format": WEIGHTS_FORMAT, "model": model.config(), "dataset": DATASET, "input_dtype": "uint8",
                "band_mean": MEAN, "band_std": STD, "iteration": 0, "metrics": {},
                "state_dict": model.state_dict()}, path)
    return path


def _scenes(directory: Path, count: int, height: int, width: int) -> list[Path]:
    directory.mkdir()
    rng = np.random.default_rng(0)
    return [write_geotiff(directory / f"scene{i}.tif", rng.integers(0, 255, (3, height, width)).astype("uint8"))
            for i in range(count)]


def _predict(*args: str) -> list[str]:
    return [sys.executable, "-m", "lrss_ds.cli", "predict", *args]


def _summary(out: Path) -> list[dict]:
    return json.loads((out / "predictions.json").read_text())["scenes"]


@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_launcher_write_every_map_once(tmp_path: Path) -> None:
    weights = _weights(tmp_path / "w.pt")
    scenes = _scenes(tmp_path / "in", 5, 64, 72)
    out = tmp_path / "out"
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--log_level", "warning",
               "--module", "lrss_ds.cli", "predict", "--checkpoint", str(weights), "--input", str(tmp_path / "in"),
               "--output", str(out)]
    env = {k: v for k, v in launcher_env().items() if k != "OMP_NUM_THREADS"}  # ranks split the cores themselves
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([s.name for s in scenes] + ["predictions.json"])
    records = _summary(out)
    assert [r["scene"] for r in records] == [s.stem for s in scenes]
    # rank r took scenes r, r + 2, ...: each map was written by exactly one rank
    assert {r["scene"]: r["rank"] for r in records} == {s.stem: i % 2 for i, s in enumerate(scenes)}
    wrote = [line for line in done.stdout.splitlines() if "wrote " in line]
    assert len(wrote) == len(scenes), done.stdout
    for record in records:
        assert record["size"] == [64, 72] and record["seconds"] > 0 and record["peak_rss_gib"] > 0
        assert record["model"]["name"] == "hrnet_fcn" and record["checkpoint"] == str(weights)
        assert record["threads"] == max(1, (os.cpu_count() or 1) // 2)


@pytest.mark.slow
def test_a_killed_batch_resumes_without_rewriting_finished_maps(tmp_path: Path) -> None:
    weights = _weights(tmp_path / "w.pt")
    scenes = _scenes(tmp_path / "in", 6, 128, 160)
    out = tmp_path / "out"
    args = ["--checkpoint", str(weights), "--input", str(tmp_path / "in"), "--output", str(out), "--resume"]
    env = {**launcher_env(), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_predict(*args), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "scene0.tif").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("scene*.tif")}
    assert 1 <= len(finished) < len(scenes), "the kill came too late to leave scenes unfinished"

    done = subprocess.run(_predict(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("scene*.tif")) == [s.name for s in scenes]
    for name, identity in finished.items():
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == identity, f"{name} was rewritten"
        assert f"skip {tmp_path / 'in' / name}" in done.stdout + done.stderr
    assert [r["scene"] for r in _summary(out)] == [s.stem for s in scenes]
