"""Tests of a store's one pixel type: other types refused at ingest; uint16 and float32 stores
ingest, train (through the real trainer) and predict end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from lrss_ds.cli import main
from lrss_ds.data import TileStore
from lrss_ds.data.ingest import ingest
from lrss_ds.data.store_writer import StoreWriter
from lrss_ds.errors import StoreError
from tests.data.data_helpers import user_dataset_yaml, write_raster

ROOT = Path(__file__).resolve().parents[2]


def _quiet(_: str) -> None:
    pass


def _scene(folder: Path, name: str, dtype: str, size: int = 64, seed: int = 0) -> None:
    """Write a 3-band image whose right half is bright (class 1) and its label."""
    rng = np.random.default_rng(seed)
    label = np.zeros((size, size), np.uint8)
    label[:, size // 2:] = 1
    scale = {"uint8": 1.0, "int8": 0.5, "uint16": 40.0, "float32": 0.01}[dtype]
    base = (60.0 + 120.0 * label) * scale
    image = np.stack([base] * 3) + rng.normal(0, 5 * scale, (3, size, size))
    write_raster(folder / "img" / f"{name}.tif", image.astype(dtype))
    write_raster(folder / "lbl" / f"{name}.tif", label)


def test_a_scene_of_another_pixel_type_is_refused_naming_file_and_types(tmp_path) -> None:
    dataset = user_dataset_yaml(tmp_path / "d.yaml", ["R", "G", "B"], ["dark", "bright"])
    _scene(tmp_path / "u8", "a", "uint8")
    store = tmp_path / "s.zarr"
    ingest(store, str(tmp_path / "u8" / "img"), str(tmp_path / "u8" / "lbl"), str(dataset), log=_quiet)
    for dtype in ("uint16", "float32", "int8"):
        _scene(tmp_path / dtype, f"b_{dtype}", dtype)
        with pytest.raises(StoreError) as info:
            ingest(store, str(tmp_path / dtype / "img"), str(tmp_path / dtype / "lbl"), str(dataset), log=_quiet)
        text = str(info.value)
        assert "\n" not in text and f"b_{dtype}.tif" in text
        assert f"pixel type {dtype} differs from the store's uint8" in text
    opened = TileStore.open(store)
    assert opened.scenes() == ["a"] and opened.pixel_dtype == np.uint8

    # One ingest of mixed files into a new store is refused before any scene is written.
    mixed = tmp_path / "mixed"
    for sub in ("u8", "uint16"):
        for kind in ("img", "lbl"):
            (mixed / kind).mkdir(parents=True, exist_ok=True)
            for path in (tmp_path / sub / kind).iterdir():
                shutil.copy(path, mixed / kind / path.name)
    with pytest.raises(StoreError, match=r"b_uint16.tif: pixel type uint16 differs from uint8 of a.tif"):
        ingest(tmp_path / "new.zarr", str(mixed / "img"), str(mixed / "lbl"), str(dataset), log=_quiet)
    assert TileStore.open(tmp_path / "new.zarr").scenes() == []


def test_a_store_that_mixes_pixel_types_is_named_when_read(tmp_path, capsys) -> None:
    """A store written before one type was enforced: its pixel type is an error naming the mix."""
    dataset = user_dataset_yaml(tmp_path / "d.yaml", ["R", "G", "B"], ["dark", "bright"])
    for dtype, name in (("uint8", "a"), ("uint16", "b")):
        _scene(tmp_path / dtype, name, dtype)
        ingest(tmp_path / f"{dtype}.zarr", str(tmp_path / dtype / "img"), str(tmp_path / dtype / "lbl"),
               str(dataset), log=_quiet)
    shutil.copytree(tmp_path / "uint16.zarr" / "b", tmp_path / "uint8.zarr" / "b")
    with StoreWriter(tmp_path / "uint8.zarr", TileStore.open(tmp_path / "uint8.zarr").spec) as writer:
        writer.refresh_root()
    with pytest.raises(StoreError, match=r"mixes pixel types uint16 \(b, \.\.\.\), uint8 \(a, \.\.\.\)"):
        TileStore.open(tmp_path / "uint8.zarr").pixel_dtype
    assert main(["info", str(tmp_path / "uint8.zarr")]) == 0
    assert "store mixes pixel types" in capsys.readouterr().out


# Trains each store for 2 iterations through `lrss-ds train` and predicts a file and a store
# scene with `lrss-ds predict`, all in one child process (one DeepSpeed start-up).
END_TO_END = """
import json, sys
from lrss_ds.cli import main
for store, run, image, out in json.loads(sys.argv[1]):
    assert main(["train", "--config", sys.argv[2], "--output", run, f"data.store={store}"]) == 0
    assert main(["predict", "--checkpoint", run, "--input", image, "--output", out + "_file.tif"]) == 0
    assert main(["predict", "--checkpoint", run, "--store", store, "--scene", "t1",
                 "--output", out + "_scene.tif"]) == 0
"""


@pytest.mark.slow
def test_uint16_and_float32_stores_train_and_predict_end_to_end(tmp_path) -> None:
    dataset = user_dataset_yaml(tmp_path / "d.yaml", ["R", "G", "B"], ["dark", "bright"])
    jobs = []
    for dtype in ("uint16", "float32"):
        folder = tmp_path / dtype
        for seed in range(2):
            _scene(folder, f"t{seed}", dtype, seed=seed)
        assert main(["ingest", "--store", str(folder / "s.zarr"), "--images", str(folder / "img"),
                     "--labels", str(folder / "lbl"), "--dataset", str(dataset)]) == 0
        store = TileStore.open(folder / "s.zarr")
        assert store.pixel_dtype == np.dtype(dtype) and store.read("t0")[0].dtype == np.dtype(dtype)
        jobs.append([str(folder / "s.zarr"), str(folder / "run"), str(folder / "img" / "t0.tif"), str(folder / "pred")])
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "hrnet_fcn", "options": {"backbone": "hrnet_w18"}},
        "data": {"store": "", "train_split": "train", "val_split": "", "mode": "whole", "workers": 0},
        "optim": {"type": "adamw", "lr": 1.0e-3},
        "deepspeed": {"config": str(ROOT / "ds_configs" / "cpu.json")},
        "loss": {"name": "ce"},
        "train": {"iterations": 2, "log_every": 1},
    }))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", END_TO_END, json.dumps(jobs), str(config)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for dtype in ("uint16", "float32"):
        folder = tmp_path / dtype
        tag = (folder / "run" / "checkpoints" / "latest").read_text().strip()
        meta = json.loads((folder / "run" / "checkpoints" / tag / "lrss_meta.json").read_text())
        assert meta["input_dtype"] == dtype
        mean = meta["band_mean"][0]
        assert mean == pytest.approx(TileStore.open(folder / "s.zarr").band_stats()[0][0])
        for suffix in ("file", "scene"):
            with rasterio.open(folder / f"pred_{suffix}.tif") as src:
                classes = src.read(1)
                assert classes.shape == (64, 64) and set(np.unique(classes)) <= {0, 1}
