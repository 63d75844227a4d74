"""`lrss-ds ingest`: stream GeoTIFF (or any GDAL raster) image/label pairs into a tile store.

Each scene is read in row blocks of one tile height, so memory holds one block (bands x 512 x W)
whatever the scene size; it is written under ``STORE/_partial/<id>`` and renamed into place
when complete. A rerun skips complete scenes and redoes incomplete ones, so an interrupted
ingest (Ctrl-C, kill, full disk) leaves a valid store. One ingest writes to a store at a time
(``store_lock``); a second is refused at once, naming the first, or waits with ``--wait``.

A scene already in the store is skipped only when its image and label files hash to the sha256
recorded at its ingest and it goes to the same split; otherwise the ingest refuses before
writing anything, saying what differs, unless ``--replace`` is given (which re-ingests the scene,
also to move it to another split). Every file of a complete scene is hashed on each rerun
(about 0.9 GB/s on one core).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lrss_ds.data.catalog import DatasetSpec, get_dataset
from lrss_ds.data.store_format import CODECS, DEFAULT_TILE, PARTIAL_DIR, REPLACED_PREFIX, BandStats, check_scene_id
from lrss_ds.data.store_writer import StoreWriter, disk_errors, scene_attributes
from lrss_ds.errors import ConfigError, InputFileError, StoreError, underlying_cause

RASTER_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".img", ".vrt", ".bmp", ".gif"}
MAX_LISTED_VALUES = 12
GDAL_CACHE_MB = 64


@dataclass
class ScenePair:
    """One scene to ingest.

    Args:
        scene_id: the image file's stem.
        image: image raster path.
        label: label raster path.
    """

    scene_id: str
    image: Path
    label: Path


def expand_paths(pattern: str, option: str) -> list[Path]:
    """Expand a file, a directory (its raster files) or a glob into sorted raster paths.

    Raises:
        InputFileError: nothing matches.
    """
    path = Path(pattern)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES]
    elif any(ch in pattern for ch in "*?["):
        found = [Path(p) for p in glob.glob(pattern) if Path(p).is_file()]
    elif path.is_file():
        found = [path]
    else:
        raise InputFileError(pattern, f"{option}: no such file or directory")
    if not found:
        raise InputFileError(pattern, f"{option}: no raster files match")
    return sorted(found)


def pair_scenes(images: list[Path], labels: list[Path], spec: DatasetSpec) -> list[ScenePair]:
    """Match each image to its label by stem (``spec.label_stem``) and check the scene ids.

    Raises:
        InputFileError: a missing label or two files with one stem.
        StoreError: a scene id that would escape the store.
    """
    by_stem: dict[str, Path] = {}
    for label in labels:
        if label.stem in by_stem:
            raise InputFileError(label, f"two label files share the stem {label.stem!r} ({by_stem[label.stem]})")
        by_stem[label.stem] = label
    pairs: list[ScenePair] = []
    seen: dict[str, Path] = {}
    for image in images:
        scene_id = image.stem
        check_scene_id(scene_id, image)
        if scene_id in seen:
            raise InputFileError(image, f"two image files share the scene id {scene_id!r} ({seen[scene_id]})")
        seen[scene_id] = image
        wanted = spec.label_stem(scene_id)
        if wanted not in by_stem:
            raise InputFileError(image, f"no label file with stem {wanted!r} among --labels")
        pairs.append(ScenePair(scene_id, image, by_stem[wanted]))
    return pairs


def sha256_of(path: Path) -> str:
    """Return the file's sha256 hex digest, read in 8 MiB pieces.

    Raises:
        InputFileError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for piece in iter(lambda: handle.read(8 << 20), b""):
                digest.update(piece)
    except OSError as error:
        raise InputFileError(path, f"cannot read: {error.strerror or error}") from None
    return digest.hexdigest()


def _open_raster(path: Path):
    """Open a raster with rasterio, turning any failure into a one-line ``InputFileError``."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # we say it ourselves, once
            return rasterio.open(path)
    except (RasterioError, OSError) as error:
        raise InputFileError(path, f"unreadable or corrupt raster: {underlying_cause(error)}") from None


def _is_georeferenced(src) -> bool:
    from affine import Affine

    return src.crs is not None or src.transform != Affine.identity() or bool(src.gcps[0])


def _same_transform(a, b) -> bool:
    pixel = max(min(abs(a.a), abs(a.e)), 1e-12)
    linear_ok = all(abs(x - y) <= 1e-6 * max(abs(x), abs(y), pixel) for x, y in ((a.a, b.a), (a.b, b.b), (a.d, b.d), (a.e, b.e)))
    offset_ok = abs(a.c - b.c) <= 1e-3 * pixel and abs(a.f - b.f) <= 1e-3 * pixel
    return linear_ok and offset_ok


class LabelDecoder:
    """Turns raw label blocks into uint8 class indices and collects values outside the class table.

    Args:
        spec: the dataset spec (encoding, palette, label_map, ignore_index).
    """

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.bad: set = set()
        if spec.label_encoding == "rgb":
            assert spec.palette is not None  # validated by DatasetSpec
            colours = [(tuple(c), k) for k, c in enumerate(spec.palette)]
            colours += [(tuple(c), spec.ignore_index) for c in spec.ignore_colours]
            keys = np.array([(r << 16) | (g << 8) | b for (r, g, b), _ in colours], np.int64)
            order = np.argsort(keys)
            self._keys = keys[order]
            self._values = np.array([v for _, v in colours], np.uint8)[order]
        else:
            valid = dict(spec.label_map) if spec.label_map is not None else {
                **{k: k for k in range(spec.num_classes)}, spec.ignore_index: spec.ignore_index}
            self._lut_valid = valid

    def bands_needed(self) -> int:
        """Label bands to read: 3 for colour-coded labels, else 1."""
        return 3 if self.spec.label_encoding == "rgb" else 1

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Decode ``raw`` (bands, h, w) into ``(h, w)`` uint8; unknown values become ignore_index."""
        if self.spec.label_encoding == "rgb":
            rgb = raw[:3].astype(np.int64)
            if self.spec.rgb_threshold is not None:
                rgb = np.where(rgb >= self.spec.rgb_threshold, 255, 0)
            keys = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
            idx = np.clip(np.searchsorted(self._keys, keys), 0, len(self._keys) - 1)
            known = self._keys[idx] == keys
            if not known.all():
                for key in np.unique(keys[~known])[: MAX_LISTED_VALUES + 1]:
                    self.bad.add((int(key) >> 16, (int(key) >> 8) & 255, int(key) & 255))
            return np.where(known, self._values[idx], np.uint8(self.spec.ignore_index)).astype(np.uint8)
        band = raw[0]
        if not np.issubdtype(band.dtype, np.integer):
            if not np.all(np.isfinite(band)) or not np.all(band == np.round(band)):
                self.bad.add("non-integer values")
                return np.full(band.shape, self.spec.ignore_index, np.uint8)
            band = band.astype(np.int64)
        if band.dtype in (np.uint8, np.uint16):
            present = np.flatnonzero(np.bincount(band.ravel(), minlength=1))
        else:
            present = np.unique(band)
        lut_size = int(present.max()) + 1 if present.size else 1
        lut = np.full(max(lut_size, 1), self.spec.ignore_index, np.uint8)
        for value in present.tolist():
            if value in self._lut_valid:
                lut[value] = self._lut_valid[value]
            else:
                self.bad.add(int(value))
        if present.size and present.min() < 0:
            return np.where(band < 0, np.uint8(self.spec.ignore_index), lut[np.clip(band, 0, None)]).astype(np.uint8)
        return lut[band]

    def describe_bad(self) -> str:
        """Return the collected invalid values as a short list."""
        values = sorted(self.bad, key=lambda v: (isinstance(v, str), v))
        shown = ", ".join(str(v) for v in values[:MAX_LISTED_VALUES])
        more = f" and {len(values) - MAX_LISTED_VALUES} more" if len(values) > MAX_LISTED_VALUES else ""
        return shown + more


def _read(src, path: Path, window, indexes) -> np.ndarray:
    from rasterio.errors import RasterioError

    try:
        return src.read(indexes, window=window)
    except (RasterioError, OSError) as error:
        raise InputFileError(path, f"unreadable or corrupt raster data: {underlying_cause(error)}") from None


def ingest_scene(
    writer: StoreWriter, pair: ScenePair, split: str, tile: int = DEFAULT_TILE,
    log: Callable[[str], None] = print,
) -> None:
    """Ingest one image/label pair into the store under ``_partial`` and move it into place.

    Args:
        writer: the store being written.
        pair: scene id, image and label paths.
        split: the split to record.
        tile: chunk size (rows and columns) and the height of the row blocks read.
        log: where warnings go.

    Raises:
        InputFileError: unreadable raster, size or georeference mismatch, band count different
            from the store's, label values outside the class table.
        StoreError: pixel type different from the store's; the disk is full or the store is
            not writable (nothing of the scene is kept).
    """
    with disk_errors(writer.path / PARTIAL_DIR / pair.scene_id):
        _ingest_scene(writer, pair, split, tile, log)


def _ingest_scene(writer: StoreWriter, pair: ScenePair, split: str, tile: int, log: Callable[[str], None]) -> None:
    from rasterio.windows import Window

    spec = writer.spec
    decoder = LabelDecoder(spec)
    image_src = _open_raster(pair.image)
    label_src = _open_raster(pair.label)
    try:
        if image_src.count != spec.num_bands:
            raise InputFileError(
                pair.image,
                f"has {image_src.count} bands but the store's dataset {spec.name!r} has "
                f"{spec.num_bands} ({', '.join(spec.bands)})",
            )
        if label_src.count < decoder.bands_needed() or (spec.label_encoding == "index" and label_src.count != 1):
            raise InputFileError(
                pair.label,
                f"has {label_src.count} bands; {spec.label_encoding!r} labels of {spec.name!r} need "
                f"{decoder.bands_needed()}",
            )
        if (label_src.height, label_src.width) != (image_src.height, image_src.width):
            raise InputFileError(
                pair.label,
                f"size {label_src.height}x{label_src.width} differs from image {pair.image.name} "
                f"({image_src.height}x{image_src.width})",
            )
        if len(set(image_src.dtypes)) != 1:
            raise InputFileError(pair.image, f"bands have mixed data types {image_src.dtypes}")
        image_geo = _is_georeferenced(image_src)
        label_geo = _is_georeferenced(label_src)
        if image_geo and label_geo and (
            image_src.crs != label_src.crs or not _same_transform(image_src.transform, label_src.transform)
        ):
            raise InputFileError(
                pair.label,
                f"georeference differs from image {pair.image.name} (crs {label_src.crs} vs "
                f"{image_src.crs}; transform {tuple(label_src.transform)[:6]} vs {tuple(image_src.transform)[:6]})",
            )
        if not image_geo:
            log(f"warning: {pair.image}: no georeference (no CRS or transform); scene stored without one")
        dtype = np.dtype(image_src.dtypes[0])
        writer.check_pixel_dtype(dtype, pair.image)
        nodata = image_src.nodata
        bands, height, width = image_src.count, image_src.height, image_src.width

        group, image_arr, label_arr = writer.begin_scene(pair.scene_id, bands, height, width, dtype, tile)
        stats = BandStats.empty(bands)
        label_indexes = list(range(1, decoder.bands_needed() + 1))
        for row in range(0, height, tile):
            rows = min(tile, height - row)
            window = Window(0, row, width, rows)
            image_block = _read(image_src, pair.image, window, None)
            label_block = _read(label_src, pair.label, window, label_indexes)
            label = decoder.decode(label_block)
            # Whole chunk rows are written at once, so no chunk is ever read back and rewritten.
            image_arr[:, row : row + rows, :] = image_block
            label_arr[row : row + rows, :] = label
            stats.add_block(image_block, nodata)
        if decoder.bad:
            raise InputFileError(
                pair.label,
                f"label values outside the class table of {spec.name!r}: {decoder.describe_bad()}",
            )
        attrs = scene_attributes(
            split=split,
            crs_wkt=image_src.crs.to_wkt() if image_src.crs is not None else None,
            transform=tuple(image_src.transform)[:6] if image_geo else None,
            band_names=_band_names(image_src, spec),
            nodata=None if nodata is None else float(nodata),
            source_image=pair.image.name,
            source_image_sha256=sha256_of(pair.image),
            source_label=pair.label.name,
            source_label_sha256=sha256_of(pair.label),
            stats=stats,
        )
        writer.finish_scene(pair.scene_id, group, attrs)
    except BaseException:
        writer.discard_incomplete(pair.scene_id)  # leaves a scene already moved into place
        raise
    finally:
        image_src.close()
        label_src.close()


def _band_names(src, spec: DatasetSpec) -> list[str]:
    # The dataset's band names, unless the file names its bands itself.
    described = [d for d in (src.descriptions or ()) if d]
    return described if len(described) == src.count else list(spec.bands)


def scene_differences(writer: StoreWriter, pair: ScenePair, split: str) -> list[str]:
    """Return what differs between a complete scene in the store and the files and split given now.

    Args:
        writer: the store.
        pair: the scene's files now (hashed here).
        split: the split the scene would go to now.

    Returns:
        One phrase per difference (image or label sha256, split); empty if the scene is the same.
    """
    recorded = writer.scene_attrs(pair.scene_id)
    out = []
    for kind, path in (("image", pair.image), ("label", pair.label)):
        before, now = recorded.get(f"source_{kind}_sha256"), sha256_of(path)
        if before != now:
            out.append(f"{kind} {path.name} has sha256 {now[:12]}..., the store's copy of "
                       f"{recorded.get(f'source_{kind}')} had {str(before)[:12]}...")
    if recorded.get("split") != split:
        out.append(f"split is {recorded.get('split')!r} in the store, {split!r} now")
    return out


def plan_ingest(
    writer: StoreWriter, pairs: list[ScenePair], split: str | None, replace: bool
) -> list[tuple[ScenePair, str, str]]:
    """Decide per scene: ``skip`` (same files, same split), ``new``, ``replace`` or ``repair``.

    ``repair`` is a complete scene whose chunk files are not all on disk: it is ingested again.

    Runs before anything is written, so a refusal leaves the store as it was.

    Args:
        writer: the store.
        pairs: the scenes given.
        split: the split asked for, or None for the dataset's rule.
        replace: re-ingest scenes whose files or split differ instead of refusing.

    Returns:
        ``(pair, split, action)`` per scene.

    Raises:
        StoreError: a scene in the store differs and ``replace`` is False (naming the scene, what
            differs, and how many other scenes differ); image files of several pixel types, or
            of another type than the store's.
    """
    plan: list[tuple[ScenePair, str, str]] = []
    conflicts: list[tuple[ScenePair, list[str]]] = []
    for pair in pairs:
        scene_split = split or writer.spec.split_of(pair.scene_id)
        if not writer.is_complete(pair.scene_id):
            plan.append((pair, scene_split, "new"))
            continue
        differences = scene_differences(writer, pair, scene_split)
        if differences and not replace:
            conflicts.append((pair, differences))
        damaged = not differences and writer.missing_chunk_files(pair.scene_id)
        plan.append((pair, scene_split, "replace" if differences else "repair" if damaged else "skip"))
    if conflicts:
        pair, differences = conflicts[0]
        more = f" ({len(conflicts) - 1} more scenes differ too)" if len(conflicts) > 1 else ""
        raise StoreError(pair.image, f"scene {pair.scene_id!r} is already in {writer.path} and differs: "
                         f"{'; '.join(differences)}{more}; pass --replace to re-ingest it")
    _check_pixel_dtypes(writer, [pair for pair, _, action in plan if action != "skip"])
    return plan


def _check_pixel_dtypes(writer: StoreWriter, pairs: list[ScenePair]) -> None:
    # Headers only: refuse a mix of pixel types before the first scene is written.
    first: tuple[Path, np.dtype] | None = None
    for pair in pairs:
        src = _open_raster(pair.image)
        dtype = np.dtype(src.dtypes[0])
        src.close()
        writer.check_pixel_dtype(dtype, pair.image)
        if first is None:
            first = (pair.image, dtype)
        elif dtype != first[1]:
            raise StoreError(pair.image, f"pixel type {dtype} differs from {first[1]} of {first[0].name} in "
                             "the same ingest; a store holds one pixel type: ingest them into separate stores")


def ingest(
    store: str | Path, images: str, labels: str, dataset: str | Path, split: str | None = None,
    tile: int = DEFAULT_TILE, log: Callable[[str], None] = print, codec: str = "lz4",
    replace: bool = False, wait: bool = False,
) -> dict[str, list[str]]:
    """Ingest all image/label pairs into ``store``, skipping complete scenes of the same files.

    Args:
        store: store directory (created if absent).
        images: image file, directory or glob.
        labels: label file, directory or glob.
        dataset: built-in dataset name or dataset YAML path.
        split: split for every scene; default: the dataset's split rule.
        tile: chunk size.
        log: where progress lines go.
        codec: chunk codec of new scenes: ``lz4`` (default), ``zstd`` or ``none``.
        replace: re-ingest scenes whose files (sha256) or split differ from the store's copy.
        wait: wait for another ingest into the store to finish instead of refusing at once.

    Returns:
        ``{"ingested": [...], "skipped": [...], "redone": [...], "replaced": [...]}`` scene ids.

    Raises:
        LrssError subclasses: bad input, naming the file.
    """
    if tile < 16:
        raise ConfigError("--tile", "must be at least 16")
    spec = get_dataset(dataset)
    pairs = pair_scenes(expand_paths(images, "--images"), expand_paths(labels, "--labels"), spec)
    with StoreWriter(store, spec, codec, wait=wait, log=log) as writer:
        return _ingest_locked(writer, pairs, split, tile, log, replace)


def _ingest_locked(writer: StoreWriter, pairs: list[ScenePair], split: str | None, tile: int,
                   log: Callable[[str], None], replace: bool) -> dict[str, list[str]]:
    import rasterio

    result: dict[str, list[str]] = {"ingested": [], "skipped": [], "redone": [], "replaced": []}
    deleted, restored = writer.discard_leftovers()
    for name in deleted:
        if name.startswith(REPLACED_PREFIX):  # the old copy of a scene whose replacement is in place
            continue
        log(f"ingest: removed incomplete scene {name!r} left by an interrupted run")
        result["redone"].append(name)
    for scene in restored:
        log(f"ingest: put back scene {scene!r}, which an interrupted run was replacing")
    writer.refresh_root()
    plan = plan_ingest(writer, pairs, split, replace)
    # GDAL's block cache defaults to 5 % of RAM; rows are read once, so a small cache suffices
    # and keeps the peak memory of a 4x6800x7200 ingest well under 1 GiB.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        for pair, scene_split, action in plan:
            if action == "skip":
                result["skipped"].append(pair.scene_id)
                log(f"ingest: {pair.scene_id}: complete, same files, skipped")
                continue
            if action == "repair":
                missing = writer.missing_chunk_files(pair.scene_id)
                log(f"ingest: {pair.scene_id}: damaged in the store ({len(missing)} chunk files missing, first "
                    f"{missing[0]}), ingesting it again")
            if (writer.discard_incomplete(pair.scene_id) or action == "repair") and pair.scene_id not in result["redone"]:
                result["redone"].append(pair.scene_id)
            start = time.perf_counter()
            ingest_scene(writer, pair, scene_split, tile, log)
            result["replaced" if action == "replace" else "ingested"].append(pair.scene_id)
            verb = "replaced" if action == "replace" else "->"
            log(f"ingest: {pair.scene_id} {verb} {scene_split} in {time.perf_counter() - start:.2f} s")
    writer.refresh_root()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``lrss-ds ingest`` options."""
    parser.add_argument("--store", required=True, type=Path, help="tile store directory (created if absent)")
    parser.add_argument("--images", required=True, help="image file, directory or glob")
    parser.add_argument("--labels", required=True, help="label file, directory or glob")
    parser.add_argument("--dataset", required=True, help="built-in dataset name or dataset YAML")
    parser.add_argument("--split", default=None, help="split for all these scenes (default: the dataset's rule)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="chunk size in pixels (default 512)")
    parser.add_argument("--codec", choices=CODECS, default="lz4",
                        help="chunk compression: lz4 (default, fast), zstd (smaller, slower) or none")
    parser.add_argument("--replace", action="store_true",
                        help="re-ingest scenes already in the store whose files changed (sha256) or that go "
                        "to another split (the way to move a scene between splits); without it they are refused")
    parser.add_argument("--wait", action="store_true",
                        help="if another ingest is writing to the store, wait for it (default: refuse at once)")


def run(args: argparse.Namespace) -> int:
    """Run ``lrss-ds ingest``."""
    def log(line: str) -> None:
        print(line, file=sys.stderr)

    result = ingest(args.store, args.images, args.labels, args.dataset, args.split, args.tile, log, args.codec,
                    replace=args.replace, wait=args.wait)
    replaced = f", {len(result['replaced'])} replaced" if result["replaced"] else ""
    print(f"ingest: {len(result['ingested'])} scenes ingested{replaced}, {len(result['skipped'])} already "
          f"complete -> {args.store}")
    return 0
