"""Tests of ingesting into a store that already holds scenes: changed files, another split, another spec."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio

from lrss_ds.cli import main
from lrss_ds.data import store_writer as store_module
from lrss_ds.data import TileStore
from lrss_ds.data.ingest import ingest, sha256_of
from lrss_ds.data.store_format import PARTIAL_DIR
from lrss_ds.errors import InputFileError, StoreError
from tests.data.data_helpers import quiet, snapshot, synth_scenes, user_dataset_yaml


@pytest.fixture()
def synth_dir(tmp_path: Path) -> Path:
    return synth_scenes(tmp_path, 2, "64x96")


def test_changed_file_under_the_same_stem_is_refused_unless_replace(tmp_path, synth_dir, capsys) -> None:
    images, labels = synth_dir / "images", synth_dir / "labels"
    store = tmp_path / "s.zarr"
    ingest(store, str(images), str(labels), "synthetic", log=quiet)
    before = snapshot(store)
    old_sha = sha256_of(images / "synth_0_0001.tif")
    with rasterio.open(images / "synth_0_0001.tif", "r+") as dst:  # the file is edited in place
        changed = dst.read()
        changed[:, :10, :10] = 7
        dst.write(changed)
    new_sha = sha256_of(images / "synth_0_0001.tif")
    with pytest.raises(StoreError) as info:
        ingest(store, str(images), str(labels), "synthetic", log=quiet)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(images / "synth_0_0001.tif"))
    assert f"image synth_0_0001.tif has sha256 {new_sha[:12]}..., the store's copy of synth_0_0001.tif had " \
           f"{old_sha[:12]}..." in text and "--replace" in text
    assert snapshot(store) == before  # refused before anything was written

    command = ["ingest", "--store", str(store), "--images", str(images), "--labels", str(labels),
               "--dataset", "synthetic", "--replace"]
    assert main(command) == 0
    assert "0 scenes ingested, 1 replaced, 1 already complete" in capsys.readouterr().out
    opened = TileStore.open(store)
    assert np.array_equal(opened.read("synth_0_0001")[0], changed)
    assert opened.scene_attrs("synth_0_0001")["source_image_sha256"] == new_sha
    assert main(["info", "--check", str(store)]) == 0
    # The same files again: skipped, nothing to replace.
    assert ingest(store, str(images), str(labels), "synthetic", log=quiet)["skipped"] == ["synth_0_0000",
                                                                                          "synth_0_0001"]


def test_moving_a_scene_to_another_split_needs_replace(tmp_path, synth_dir) -> None:
    images, labels = synth_dir / "images", synth_dir / "labels"
    store = tmp_path / "s.zarr"
    ingest(store, str(images), str(labels), "synthetic", log=quiet)
    one = str(images / "synth_0_0001.tif")
    with pytest.raises(StoreError, match=r"synth_0_0001.tif: scene 'synth_0_0001' .* split is 'train' in the "
                                         r"store, 'val' now; pass --replace"):
        ingest(store, one, str(labels), "synthetic", split="val", log=quiet)
    assert TileStore.open(store).splits == {"train": ["synth_0_0000", "synth_0_0001"]}
    result = ingest(store, one, str(labels), "synthetic", split="val", replace=True, log=quiet)
    assert result["replaced"] == ["synth_0_0001"]
    moved = TileStore.open(store)
    assert moved.splits == {"train": ["synth_0_0000"], "val": ["synth_0_0001"]}
    assert moved.band_stats_info()["scenes"] == ["synth_0_0000"]  # statistics follow the train split


def test_an_empty_store_takes_the_corrected_spec_and_a_refusal_names_the_key(tmp_path, synth_dir) -> None:
    images, labels = str(synth_dir / "images"), str(synth_dir / "labels")
    classes = ["background", "field", "road", "building", "river", "lake"]
    wrong = user_dataset_yaml(tmp_path / "wrong.yaml", ["R", "G", "B"], classes)
    right = user_dataset_yaml(tmp_path / "right.yaml", ["NIR", "R", "G", "B"], classes)
    store = tmp_path / "s.zarr"
    with pytest.raises(InputFileError, match="has 4 bands"):
        ingest(store, images, labels, str(wrong), log=quiet)
    assert TileStore.open(store).scenes() == [] and TileStore.open(store).spec.bands == ["R", "G", "B"]
    lines: list[str] = []
    result = ingest(store, images, labels, str(right), log=lines.append)
    assert result["ingested"] == ["synth_0_0000", "synth_0_0001"]
    assert any("holds no complete scene, so it takes the dataset spec given" in line and "bands" in line
               for line in lines)
    assert TileStore.open(store).spec.bands == ["NIR", "R", "G", "B"]

    other = user_dataset_yaml(tmp_path / "other.yaml", ["NIR", "R", "G", "B"], classes[:-1] + ["pond"])
    with pytest.raises(StoreError) as info:
        ingest(store, images, labels, str(other), log=quiet)
    text = str(info.value)
    assert "\n" not in text and "classes differ (classes: store [" in text and '"pond"]' in text


def test_a_replacement_interrupted_between_its_renames_puts_the_old_scene_back(tmp_path, synth_dir,
                                                                               monkeypatch) -> None:
    images, labels = synth_dir / "images", synth_dir / "labels"
    store = tmp_path / "s.zarr"
    ingest(store, str(images), str(labels), "synthetic", log=quiet)
    before = snapshot(store)
    with rasterio.open(images / "synth_0_0001.tif", "r+") as dst:
        changed = dst.read()
        changed[:, :10, :10] = 7
        dst.write(changed)
    real_replace = os.replace

    def killed_between_renames(src, dst) -> None:
        if Path(src).parent.name == PARTIAL_DIR and not Path(src).name.startswith("."):
            raise KeyboardInterrupt  # the old copy is aside, the new one not yet in place
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", killed_between_renames)
    with pytest.raises(KeyboardInterrupt):
        ingest(store, str(images), str(labels), "synthetic", replace=True, log=quiet)
    monkeypatch.setattr(store_module.os, "replace", real_replace)
    assert not (store / "synth_0_0001").exists()

    lines: list[str] = []
    ingest(store, str(images / "synth_0_0000.tif"), str(labels), "synthetic", log=lines.append)
    assert any("put back scene 'synth_0_0001'" in line for line in lines)
    assert snapshot(store) == before
    assert main(["info", "--check", str(store)]) == 0
