"""Make the synthetic tile store an experiment asks for (``data.synthetic``), once, reusably."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lrss_ds.engine.config import DataConfig


def raw_dir(store: Path) -> Path:
    """Where the synthetic GeoTIFFs of ``store`` are written: ``<store>_raw`` beside it."""
    return store.with_name(store.name + "_raw")


def prepare_synthetic_store(data: DataConfig, log: Callable[[str], None] = print) -> Path:
    """Synthesize the train and val scenes of ``data.synthetic`` and ingest them into ``data.store``.

    Idempotent: GeoTIFFs made with the same parameters are not rewritten and complete scenes are
    not re-ingested, so a second call (a rerun of the demo) costs a listing and hashing the
    files. Train scenes use ``synthetic.seed``, val scenes ``seed + 1``, so their ids
    (``synth_<seed>_<i>``) differ. GeoTIFFs made with other parameters are made again; a store
    made with other parameters is refused (it may hold what a model was trained on). Runs that
    share the store wait for each other: the whole preparation holds the writer lock
    (``lrss_ds.data.store_lock``) of the GeoTIFF folder.

    Args:
        data: the data section; ``data.synthetic`` must be set.
        log: where progress lines go.

    Returns:
        The store path.

    Raises:
        ConfigError: the store holds scenes of other ``data.synthetic`` values (naming the key),
            or ``bands`` is not the synthetic dataset's.
        StoreError: from the ingest.
    """
    from lrss_ds.data.ingest import ingest
    from lrss_ds.data.store_lock import WriterLock
    from lrss_ds.data.synth_cache import check_store_scenes, check_synthetic_bands, ensure_scene_files

    assert data.synthetic is not None, "prepare_synthetic_store needs data.synthetic"
    synth = data.synthetic
    store = Path(data.store)
    raw = raw_dir(store)
    size = (synth.height, synth.width)
    check_synthetic_bands(synth.bands, "data.synthetic.bands")
    jobs = [(split, count, seed, key) for split, count, seed, key in (
        (data.train_split, synth.train_scenes, synth.seed, "train_scenes"),
        (data.val_split, synth.val_scenes, synth.seed + 1, "val_scenes"),
    ) if split and count >= 1]
    # Runs sharing one synthetic store (a sweep, trainings side by side) take turns, so the
    # second finds the store complete instead of being refused by the first one's ingest.
    made_raw = not raw.exists()
    raw.mkdir(parents=True, exist_ok=True)
    try:
        with WriterLock(raw, wait=True, log=log):
            # A store made from other data.synthetic values is refused before anything is
            # written, naming the value; stale GeoTIFFs under raw/ are made again.
            for split, count, seed, key in jobs:
                check_store_scenes(store, raw, split, count, size, synth.bands, seed, "data.synthetic", key,
                                   water_scale=synth.water_scale)
            for split, count, seed, _ in jobs:
                folder = raw / split
                ensure_scene_files(folder, count, size, synth.bands, seed, log=log, water_scale=synth.water_scale)
                ingest(store, str(folder / "images"), str(folder / "labels"), "synthetic", split=split, log=log)
    except BaseException:
        if made_raw and raw.is_dir() and not any(raw.iterdir()):
            raw.rmdir()  # a refused config leaves no empty folder behind
        raise
    return store
