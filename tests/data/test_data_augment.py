"""Tests of the training augmentation: the 8 flips/turns, drawn per stream position, off at evaluation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import pytest

from lrss_ds.cli import main
from lrss_ds.data import TileStore
from lrss_ds.data.augment import DIHEDRAL, dihedral, transform_number
from lrss_ds.data.ingest import ingest
from lrss_ds.data.samples import SceneSamples
from lrss_ds.engine.loaders import AugmentedOrder, ResumableSampler, make_eval_loader, train_order


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two square 48x48 scenes in train, one 40x64 scene in val."""
    root = tmp_path_factory.mktemp("augment")
    assert main(["synth", "--out", str(root / "sq"), "--scenes", "2", "--size", "48x48"]) == 0
    assert main(["synth", "--out", str(root / "wide"), "--scenes", "1", "--size", "40x64", "--seed", "1"]) == 0
    ingest(root / "s.zarr", str(root / "sq" / "images"), str(root / "sq" / "labels"), "synthetic", log=lambda _: None)
    ingest(root / "s.zarr", str(root / "wide" / "images"), str(root / "wide" / "labels"), "synthetic", split="val",
           log=lambda _: None)
    return root / "s.zarr"


def test_the_eight_transforms_are_distinct_and_move_image_and_label_alike() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, (5, 5), dtype=np.uint8)
    image = np.stack([label * 10, label + 100]).astype(np.uint8)  # band 0 is 10 x label
    results = [dihedral(image, label, n) for n in range(DIHEDRAL)]
    assert len({(i.tobytes(), l.tobytes()) for i, l in results}) == 8
    for out_image, out_label in results:
        assert np.array_equal(out_image[0], out_label * 10) and np.array_equal(out_image[1], out_label + 100)
    # transform 1 is a quarter turn, 4 a left-right mirror
    assert np.array_equal(results[1][1], np.rot90(label)) and np.array_equal(results[4][1], label[:, ::-1])


def test_every_block_of_eight_positions_draws_each_transform_once() -> None:
    for rank in (0, 1):
        numbers = [transform_number(7, rank, p) for p in range(8 * 40)]
        for block in range(40):
            assert sorted(numbers[8 * block : 8 * block + 8]) == list(range(8))
    assert [transform_number(7, 0, p) for p in range(64)] != [transform_number(7, 1, p) for p in range(64)]
    assert [transform_number(7, 0, p) for p in range(64)] != [transform_number(8, 0, p) for p in range(64)]


def test_augmented_order_resumes_with_the_same_transforms() -> None:
    whole = AugmentedOrder(ResumableSampler(5, 1, 2, seed=3))
    resumed = AugmentedOrder(ResumableSampler(5, 1, 2, seed=3, start=7))
    head = [item for _, item in zip(range(20), whole)]
    assert [item for _, item in zip(range(13), resumed)] == head[7:]
    assert Counter(t for _, t in head[:16]) == {n: 2 for n in range(8)}


def test_training_items_are_transformed_and_evaluation_items_are_not(store_path: Path) -> None:
    samples = SceneSamples(store_path, "train")
    store = TileStore.open(store_path)
    order = train_order(len(samples), 0, 1, seed=0, start=0, augment="d4")
    keys = [key for _, key in zip(range(16), order)]
    assert Counter(t for _, t in keys) == {n: 2 for n in range(8)}
    for index, number in keys:
        item = samples[(index, number)]
        image, label = dihedral(*store.read(samples.scenes[index]), number)
        assert item["transform"] == number
        assert np.array_equal(item["image"].numpy(), image) and np.array_equal(item["label"].numpy(), label)
    # augment: none is the plain order of indices, and indices read untransformed scenes
    plain = train_order(len(samples), 0, 1, seed=0, start=0, augment="none")
    assert [i for _, i in zip(range(4), plain)] == [i for i, _ in keys[:4]]
    val = SceneSamples(store_path, "val")
    loader, count = make_eval_loader(val, 0, 1, workers=0, device=torch.device("cpu"))
    (batch,) = list(loader)
    image, label = store.read(val.scenes[0])
    assert count == 1 and np.array_equal(batch["image"][0].numpy(), image)
    assert np.array_equal(batch["label"][0].numpy(), label)


def test_a_non_square_sample_keeps_its_shape_and_gets_the_four_shape_keeping_transforms(store_path: Path) -> None:
    val = SceneSamples(store_path, "val")  # one 40x64 scene
    seen = Counter()
    for number in range(DIHEDRAL):
        item = val[(0, number)]
        assert item["image"].shape == (4, 40, 64) and item["label"].shape == (40, 64)
        seen[item["transform"]] += 1
    assert seen == {0: 2, 2: 2, 4: 2, 6: 2}
    image, label = TileStore.open(store_path).read(val.scenes[0])
    assert np.array_equal(val[(0, 5)]["label"].numpy(), label[:, ::-1])  # 5 -> 4: left-right mirror
