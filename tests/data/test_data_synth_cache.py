"""Tests of the synthetic store an experiment asks for: changed data.synthetic values are named or
the stale GeoTIFFs made again, never silently reused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lrss_ds.data import TileStore
from lrss_ds.data.synth import synthesize
from lrss_ds.engine.config import DataConfig, SynthConfig
from lrss_ds.engine.synthetic_store import prepare_synthetic_store, raw_dir
from lrss_ds.errors import ConfigError


def _prepare(store: Path, lines: list[str] | None = None, **values) -> None:
    synth = SynthConfig(**{"train_scenes": 2, "val_scenes": 1, "height": 64, "width": 80, "bands": 4,
                           "seed": 0, **values})
    prepare_synthetic_store(DataConfig(store=str(store), synthetic=synth),
                            log=(lines.append if lines is not None else lambda line: None))


def _shapes(store: Path) -> dict[str, tuple[int, int, int]]:
    opened = TileStore.open(store)
    return {scene: opened.shape(scene) for scene in opened.scenes()}


def test_changed_synthetic_values_on_an_existing_store_are_named(tmp_path) -> None:
    store = tmp_path / "store"
    _prepare(store)
    before = _shapes(store)
    assert before == {"synth_0_0000": (4, 64, 80), "synth_0_0001": (4, 64, 80), "synth_1_0000": (4, 64, 80)}
    for values, key in (({"height": 96}, "height"), ({"width": 96, "height": 32}, "height"),
                        ({"train_scenes": 1}, "train_scenes"), ({"seed": 7}, "seed")):
        with pytest.raises(ConfigError) as info:
            _prepare(store, **values)
        text = str(info.value)
        assert "\n" not in text and text.startswith(f"data.synthetic.{key}: the store {store} holds")
        assert str(raw_dir(store)) in text
    with pytest.raises(ConfigError, match=r"data.synthetic.height: .* scene synth_0_0000 of 4x64x80, the config "
                                          r"asks for 4x96x80"):
        _prepare(store, height=96)
    assert _shapes(store) == before
    # More scenes than before: the store grows, the scenes it has are kept.
    lines: list[str] = []
    _prepare(store, lines, train_scenes=3)
    assert TileStore.open(store).scenes("train") == ["synth_0_0000", "synth_0_0001", "synth_0_0002"]
    assert any("made with other parameters (scenes 2 -> 3)" in line for line in lines)


def test_stale_synthetic_files_are_made_again(tmp_path) -> None:
    store = tmp_path / "store"
    raw = raw_dir(store)
    # Files an earlier run left with other bands (its ingest then failed, so there is no store).
    synthesize(raw / "train", 2, (64, 80), bands=3, seed=0, log=lambda line: None)
    lines: list[str] = []
    _prepare(store, lines)
    assert set(_shapes(store).values()) == {(4, 64, 80)}
    assert any("bands 3 -> 4" in line and "regenerating" in line for line in lines)

    # Another height after the store was deleted: the files are made again at the new size.
    shutil.rmtree(store)
    _prepare(store, height=48)
    assert set(_shapes(store).values()) == {(4, 48, 80)}

    with pytest.raises(ConfigError, match=r"data.synthetic.bands: is 3, but the synthetic dataset has 4 bands"):
        _prepare(tmp_path / "other", bands=3)


def test_changed_water_scale_on_an_existing_store_is_named(tmp_path) -> None:
    """The widened water changes every pixel but no shape: the store's scenes are refused by name,
    and without a store the raw files are made again at the new scale."""
    store = tmp_path / "store"
    _prepare(store)
    with pytest.raises(ConfigError) as info:
        _prepare(store, water_scale=2.5)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"data.synthetic.water_scale: the store {store} holds train scenes "
                                                "made with water_scale 1, the config asks for 2.5")
    # Raw files recorded before water_scale was part of the record count as 1.0.
    record = raw_dir(store) / "train" / "synth.json"
    record.write_text(record.read_text().replace(', "water_scale": 1.0', ""))
    with pytest.raises(ConfigError, match="made with water_scale 1, the config asks for 2.5"):
        _prepare(store, water_scale=2.5)
    shutil.rmtree(store)
    lines: list[str] = []
    _prepare(store, lines, water_scale=2.5)
    assert any("water_scale 1.0 -> 2.5" in line and "regenerating" in line for line in lines)
    _prepare(store, water_scale=2.5)  # the same parameters again: accepted, nothing regenerated


def _prepare_after(barrier, store: str, results) -> None:
    barrier.wait()
    try:
        _prepare(Path(store), train_scenes=4, height=160, width=160)
        results.put("ok")
    except Exception as error:  # the parent asserts on the text
        results.put(f"{type(error).__name__}: {error}")


def test_two_runs_preparing_one_store_at_once_both_get_it(tmp_path) -> None:
    """Trainings side by side on one synthetic store: the second waits for the first's
    preparation instead of being refused by its ingest, and each scene is ingested once."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    store = tmp_path / "store"
    runs = [context.Process(target=_prepare_after, args=(barrier, str(store), results)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
    assert sorted(results.get(timeout=5) for _ in runs) == ["ok", "ok"]
    assert set(_shapes(store)) == {f"synth_0_000{i}" for i in range(4)} | {"synth_1_0000"}
    assert not (raw_dir(store) / ".writer.lock").exists()
