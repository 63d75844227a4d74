"""BandSamples: each rank of a spatial group reads only its band of rows of a scene, never the whole scene."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lrss_ds.data import TileStore
from lrss_ds.data.band_samples import BandSamples
from lrss_ds.engine.config import DataConfig, SynthConfig
from lrss_ds.engine.synthetic_store import prepare_synthetic_store
from lrss_ds.parallel import band_bounds

HEIGHT, WIDTH = 150, 96


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bands") / "store"
    synth = SynthConfig(train_scenes=2, val_scenes=0, height=HEIGHT, width=WIDTH, bands=4, seed=1)
    prepare_synthetic_store(DataConfig(store=str(path), synthetic=synth), log=lambda line: None)
    return path


def _band(height: int, ranks: int, rank: int) -> tuple[int, int]:
    return band_bounds(height, ranks, 32)[rank]


@pytest.mark.parametrize("ranks", [2, 3])
def test_each_rank_reads_only_its_band_and_the_bands_make_the_scene(
    store_path: Path, ranks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[str, Any]] = []
    one_read = TileStore.read

    def counting_read(store: TileStore, scene: str, window: Any = None) -> Any:
        reads.append((scene, window))
        return one_read(store, scene, window)

    whole = {scene: one_read(TileStore.open(store_path), scene) for scene in TileStore.open(store_path).scenes("train")}
    monkeypatch.setattr(TileStore, "read", counting_read)
    for scene_no, (scene, (image, label)) in enumerate(whole.items()):
        parts = []
        for rank in range(ranks):
            reads.clear()
            item = BandSamples(store_path, "train", functools.partial(_band, ranks=ranks, rank=rank))[scene_no]
            start, stop = band_bounds(HEIGHT, ranks, 32)[rank]
            assert reads == [(scene, (start, 0, stop - start, WIDTH))]  # one windowed read of the band
            assert item["window"] == (start, 0, stop - start, WIDTH) and stop - start < HEIGHT
            parts.append((item["image"].numpy(), item["label"].numpy()))
        assert np.array_equal(np.concatenate([p[0] for p in parts], axis=1), image)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), label)


def test_bands_outside_the_scene_and_flips_are_refused(store_path: Path) -> None:
    with pytest.raises(ValueError, match="outside its 150 rows"):
        BandSamples(store_path, "train", lambda height: (100, 200))
    samples = BandSamples(store_path, "train", functools.partial(_band, ranks=2, rank=0))
    with pytest.raises(ValueError, match="cannot be flipped"):
        samples[(0, 3)]
