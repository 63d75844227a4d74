"""`lrss-ds info STORE`: print a tile store's scenes, sizes, splits, classes and band statistics.

``--check`` also reads every chunk of every scene and names each damaged scene (``store_check``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrss_ds.data.store import TileStore
from lrss_ds.data.store_format import PARTIAL_DIR
from lrss_ds.data.store_check import check_store
from lrss_ds.data.store_lock import describe_holder, live_holder
from lrss_ds.errors import StoreError


def describe(path: str | Path) -> str:
    """Return the human-readable summary of the store at ``path``.

    Raises:
        StoreError: not a tile store.
    """
    store = TileStore.open(path)
    spec = store.spec
    lines = [f"store     {store.path}", f"dataset   {spec.name}: {spec.description}".rstrip(": ")]
    try:
        pixel_type = f"; pixel type {store.pixel_dtype}" if store.scenes() else ""
    except StoreError as error:  # a store written before one type was enforced
        pixel_type = f"; {error.problem}"
    lines.append(f"bands     {len(spec.bands)}: {', '.join(spec.bands)}{pixel_type}")
    lines.append(f"labels    {spec.label_encoding}-coded, ignore_index {spec.ignore_index}")
    lines.append(f"classes   {spec.num_classes}:")
    for k, name in enumerate(spec.classes):
        colour = f"  rgb{tuple(spec.palette[k])}" if spec.palette else ""
        lines.append(f"  {k:3d}  {name}{colour}")
    splits = store.splits
    lines.append("splits    " + (", ".join(f"{name} {len(ids)}" for name, ids in splits.items()) or "none"))
    scenes = store.scenes()
    lines.append(f"scenes    {len(scenes)}")
    total = 0
    for scene in scenes:
        bands, height, width = store.shape(scene)
        try:
            crs, _ = store.georef(scene)
            attrs = store.scene_attrs(scene)
        except StoreError as error:
            lines.append(f"  {scene}  damaged: {error.problem} (see `lrss-ds info --check`)")
            continue
        split = next((name for name, ids in splits.items() if scene in ids), "?")
        crs_text = crs.to_string() if crs is not None else "no georeference"
        total += bands * height * width * store.dtype(scene).itemsize
        lines.append(
            f"  {scene}  {bands}x{height}x{width} {store.dtype(scene)}  {split}  {crs_text}  "
            f"from {attrs.get('source_image')}"
        )
    info = store.band_stats_info()
    if info.get("scenes"):
        lines.append(f"band statistics over {info['split']} ({len(info['scenes'])} scenes):")
        for name, mean, std in zip(spec.bands, info["mean"], info["std"]):
            lines.append(f"  {name:>6}  mean {mean:10.4f}  std {std:10.4f}")
    else:
        lines.append("band statistics: none (no scenes)")
    lines.append(f"pixels    {total / 2**20:.1f} MiB uncompressed")
    if scenes:
        try:
            meta = store.array(scenes[0], "image").metadata.to_dict()
        except StoreError:
            meta = None  # a damaged first scene: --check names it
        if meta is not None:
            codecs = [c["name"] + (f"-{c['configuration']['cname']}" if c["name"] == "blosc" else "")
                      for c in meta["codecs"] if c["name"] != "bytes"]
            chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            lines.append(f"storage   image chunks {chunks}, codec {', '.join(codecs) or 'none'} (first scene)")
    holder = live_holder(store.path)
    if holder is not None:
        lines.append(f"writer    an ingest is writing to the store: {describe_holder(holder)}")
    partial = Path(path) / PARTIAL_DIR
    if partial.is_dir() and any(partial.iterdir()):
        names = ", ".join(sorted(p.name for p in partial.iterdir()))
        why = "being written" if holder is not None else "interrupted ingest; rerun ingest to redo"
        lines.append(f"incomplete scenes ({why}): {names}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``lrss-ds info`` arguments."""
    parser.add_argument("store", type=Path, help="tile store directory")
    parser.add_argument("--check", action="store_true",
                        help="read every chunk of every scene, name each damaged scene; exit 1 if any")


def run(args: argparse.Namespace) -> int:
    """Run ``lrss-ds info``; with ``--check``, return 1 if a scene is damaged."""
    print(describe(args.store))
    if not args.check:
        return 0
    intact, damaged = check_store(args.store)
    print(f"check     {len(intact)} scenes intact, {len(damaged)} damaged")
    for line in damaged:
        print(f"damaged   {line}", file=sys.stderr)
    if damaged:
        print("          rerun `lrss-ds ingest` with a damaged scene's files to write it again", file=sys.stderr)
    return 1 if damaged else 0
