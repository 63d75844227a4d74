"""Tests of SceneSamples: whole and patch items, seed/epoch-determined windows, DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lrss_ds.cli import main
from lrss_ds.data import TileStore
from lrss_ds.data.ingest import ingest
from lrss_ds.data.samples import SceneSamples
from lrss_ds.errors import ConfigError, StoreError


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("samples")
    assert main(["synth", "--out", str(root / "syn"), "--scenes", "3", "--size", "150x190"]) == 0
    ingest(root / "s.zarr", str(root / "syn" / "images" / "synth_0_000[01].tif"), str(root / "syn" / "labels"),
           "synthetic", log=lambda _: None)
    ingest(root / "s.zarr", str(root / "syn" / "images" / "synth_0_0002.tif"), str(root / "syn" / "labels"),
           "synthetic", split="val", log=lambda _: None)
    return root / "s.zarr"


def test_whole_mode_returns_native_dtype_scenes(store_path) -> None:
    samples = SceneSamples(store_path, "train")
    assert len(samples) == 2
    item = samples[1]
    image, label = TileStore.open(store_path).read("synth_0_0001")
    assert item["scene"] == "synth_0_0001" and item["window"] == (0, 0, 150, 190)
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (4, 150, 190)
    assert item["label"].dtype == torch.uint8 and item["label"].shape == (150, 190)
    assert np.array_equal(item["image"].numpy(), image) and np.array_equal(item["label"].numpy(), label)
    assert len(SceneSamples(store_path, None)) == 3 and len(SceneSamples(store_path, "val")) == 1


def test_patch_windows_follow_seed_and_epoch(store_path) -> None:
    a = SceneSamples(store_path, "train", mode="patch", patch_size=64, patches_per_scene=5, seed=3)
    b = SceneSamples(store_path, "train", mode="patch", patch_size=64, patches_per_scene=5, seed=3)
    c = SceneSamples(store_path, "train", mode="patch", patch_size=64, patches_per_scene=5, seed=4)
    assert len(a) == 10
    windows = [a.window(i) for i in range(len(a))]
    assert windows == [b.window(i) for i in range(len(b))]
    assert windows != [c.window(i) for i in range(len(c))]
    a.set_epoch(1)
    assert windows != [a.window(i) for i in range(len(a))]
    a.set_epoch(0)
    for i, (scene_no, (r, col, h, w)) in enumerate(windows):
        assert (h, w) == (64, 64) and 0 <= r <= 150 - 64 and 0 <= col <= 190 - 64
        item = a[i]
        full, label = TileStore.open(store_path).read(a.scenes[scene_no])
        assert np.array_equal(item["image"].numpy(), full[:, r:r + 64, col:col + 64])
        assert np.array_equal(item["label"].numpy(), label[r:r + 64, col:col + 64])
    # Patches larger than the scene are clipped to it.
    big = SceneSamples(store_path, "val", mode="patch", patch_size=1000, patches_per_scene=1)
    assert big[0]["window"] == (0, 0, 150, 190)


def test_dataloader_workers_open_the_store_themselves(store_path) -> None:
    samples = SceneSamples(store_path, "train", mode="patch", patch_size=32, patches_per_scene=4, seed=1)
    samples[0]  # opened in the parent first: workers must not reuse it
    loader = torch.utils.data.DataLoader(samples, batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["image"].shape == (4, 4, 32, 32)
    for batch, first in zip(batches, (0, 4)):
        assert torch.equal(batch["image"][0], samples[first]["image"])


def test_bad_arguments(store_path) -> None:
    with pytest.raises(ConfigError, match="mode"):
        SceneSamples(store_path, "train", mode="tiles")
    with pytest.raises(StoreError, match="no split"):
        SceneSamples(store_path, "test")
