"""Synthetic scene files kept for a store: regenerated when their parameters change; the check
that an existing store holds the scenes those parameters describe.

The generator writes ``synth.json`` (its parameters) beside ``images/`` and ``labels/``; files
whose record differs from the parameters asked for (or that have none) are stale and are
replaced. A store is never changed here: one built from other parameters is an error naming the
parameter, as its scenes may already have trained a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lrss_ds.data.catalog import get_dataset
from lrss_ds.data.synth import made_water_scale, manifest, read_manifest, scene_ids, synthesize
from lrss_ds.errors import ConfigError, StoreError


def check_synthetic_bands(bands: int, where: str) -> None:
    """Refuse a band count the ``synthetic`` dataset cannot ingest.

    Raises:
        ConfigError: naming ``where`` (e.g. ``data.synthetic.bands``).
    """
    spec = get_dataset("synthetic")
    if bands != spec.num_bands:
        raise ConfigError(where, f"is {bands}, but the synthetic dataset has {spec.num_bands} bands "
                          f"({', '.join(spec.bands)}); use {spec.num_bands}")


def ensure_scene_files(folder: Path, count: int, size: tuple[int, int], bands: int, seed: int,
                       log: Callable[[str], None] = print, water_scale: float = 1.0) -> None:
    """Make ``folder`` hold exactly the ``count`` synthetic scenes of these parameters.

    Nothing is written when ``folder/synth.json`` records the same parameters and every file is
    there; otherwise the scene files in it are deleted and generated again, saying why.

    Args:
        folder: gets ``images/``, ``labels/`` and ``synth.json``.
        count, size, bands, seed, water_scale: as for ``synthesize``.
        log: where the "regenerating" line and the generator's lines go.
    """
    wanted = manifest(count, size, bands, seed, water_scale=water_scale)
    recorded = read_manifest(folder)
    if recorded is not None:
        recorded = {**recorded, "water_scale": made_water_scale(recorded)}
    ids = scene_ids(seed, count)
    present = all((folder / kind / f"{scene}.tif").is_file() for scene in ids for kind in ("images", "labels"))
    if recorded == wanted and present:
        return
    if recorded is not None and recorded != wanted:
        changed = ", ".join(f"{k} {recorded.get(k)} -> {v}" for k, v in wanted.items() if recorded.get(k) != v)
        log(f"synthetic scenes in {folder} were made with other parameters ({changed}): regenerating")
    for kind in ("images", "labels"):
        for stale in (folder / kind).glob("synth_*.tif") if (folder / kind).is_dir() else ():
            stale.unlink()
    synthesize(folder, count, size, bands=bands, seed=seed, overwrite=True, log=log, water_scale=water_scale)


def check_store_scenes(store_path: Path, raw: Path, split: str, count: int, size: tuple[int, int], bands: int,
                       seed: int, where: str, count_key: str, water_scale: float = 1.0) -> None:
    """Refuse an existing store whose ``split`` holds other synthetic scenes than these parameters make.

    Missing scenes are fine (the ingest adds them); other ids or other sizes are not.

    Args:
        store_path: the store (may not exist yet).
        raw: the folder of its synthetic files (named in the advice).
        split: the split the scenes go to.
        count, size, bands, seed: the parameters asked for.
        where: the config section named in errors (``data.synthetic``).
        count_key: the key of ``count`` in that section (``train_scenes`` or ``val_scenes``).
        water_scale: the water widening asked for. What the store's scenes were made with is
            read from ``raw/split/synth.json`` (a folder of files without a record was made
            with 1.0); with no raw folder left it cannot be known and is not checked.

    Raises:
        ConfigError: naming the parameter that differs, the store and what to do.
    """
    from lrss_ds.data.store import TileStore

    try:
        store = TileStore.open(store_path)
        scenes = store.scenes(split)
    except StoreError:
        return  # no store or no such split yet: the ingest creates it
    advice = f"delete {store_path} and {raw}, or set data.store to a new path"
    wanted = (bands, size[0], size[1])
    for scene in scenes:
        shape = store.shape(scene)
        if shape != wanted:
            keys = [k for k, a, b in zip(("bands", "height", "width"), shape, wanted) if a != b]
            raise ConfigError(f"{where}.{keys[0]}", f"the store {store_path} holds {split} scene {scene} of "
                              f"{'x'.join(map(str, shape))}, the config asks for {'x'.join(map(str, wanted))} "
                              f"({', '.join(keys)} changed); {advice}")
    recorded = read_manifest(raw / split)
    made = made_water_scale(recorded) if recorded is not None else (1.0 if (raw / split).is_dir() else None)
    if scenes and made is not None and made != float(water_scale):
        raise ConfigError(f"{where}.water_scale", f"the store {store_path} holds {split} scenes made with water_scale "
                          f"{made:g}, the config asks for {float(water_scale):g} (recorded in {raw / split}); {advice}")
    extra = sorted(set(scenes) - set(scene_ids(seed, count)))
    if extra:
        key = "seed" if any(not scene.startswith(f"synth_{seed:d}_") for scene in extra) else count_key
        raise ConfigError(f"{where}.{key}", f"the store {store_path} holds {split} scenes the config does not make "
                          f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}; the config asks for "
                          f"{count} with seed {seed}); {advice}")
