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

    Idempotent: existing GeoTIFFs are not rewritten and complete scenes are not re-ingested, so
    a second call (a rerun of the demo) costs a directory listing. Train scenes use
    ``synthetic.seed``, val scenes ``seed + 1``, so their ids (``synth_<seed>_<i>``) differ.

    Args:
        data: the data section; ``data.synthetic`` must be set.
        log: where progress lines go.

    Returns:
        The store path.

    Raises:
        ConfigError / StoreError: from the generator or the ingest.
    """
    from lrss_ds.data.ingest import ingest
    from lrss_ds.data.synth import synthesize

    assert data.synthetic is not None, "prepare_synthetic_store needs data.synthetic"
    synth = data.synthetic
    store = Path(data.store)
    raw = raw_dir(store)
    size = (synth.height, synth.width)
    for split, count, seed in (
        (data.train_split, synth.train_scenes, synth.seed),
        (data.val_split, synth.val_scenes, synth.seed + 1),
    ):
        if not split or count < 1:
            continue
        folder = raw / split
        ids = [f"synth_{seed:d}_{i:04d}" for i in range(count)]
        if not all((folder / "labels" / f"{scene}.tif").is_file() for scene in ids):
            synthesize(folder, count, size, bands=synth.bands, seed=seed, overwrite=True, log=log,
                       water_scale=synth.water_scale)
        ingest(store, str(folder / "images"), str(folder / "labels"), "synthetic", split=split, log=log)
    return store
