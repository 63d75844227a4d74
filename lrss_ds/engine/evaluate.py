"""`lrss-ds evaluate`: score a model on a store split, or prediction/label GeoTIFF pairs, into a report."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from tqdm import tqdm

from lrss_ds.data.rasters import open_store_scene
from lrss_ds.engine.temporaries import write_atomically
from lrss_ds.engine.metrics import ConfusionMatrix, jsonable
from lrss_ds.engine.cli_inputs import expand_inputs, resolve_device
from lrss_ds.engine.inference import check_source, predictor_for
from lrss_ds.errors import InputFileError, LrssError, OutputError, OutputExistsError, StoreError

REPORT_FILES = ("metrics.json", "metrics.md", "confusion.png")


# ----------------------------------------------------------------------------- counting


def count_pixels(
    matrix: ConfusionMatrix, pred: np.ndarray, label: np.ndarray, where: str, unpredicted: int | None = None
) -> int:
    """Add one block of prediction/label pixels to ``matrix``, turning bad classes into user errors.

    Pixels whose prediction is ``unpredicted`` (the ignore value a prediction map writes where
    the input was nodata) are left out and counted separately.

    Args:
        matrix: the confusion matrix (its ``ignore_index`` skips unlabeled pixels).
        pred: ``(h, w)`` predicted classes.
        label: ``(h, w)`` label classes ``0..K-1`` or the ignore value.
        where: file or scene to name in errors.
        unpredicted: prediction value meaning "no prediction" (None: none).

    Returns:
        the number of labeled pixels left out because they had no prediction.

    Raises:
        InputFileError: a label or prediction holds a class outside ``0..K-1`` (and not ignore).
    """
    skipped = 0
    if unpredicted is not None:
        missing = pred == unpredicted
        if missing.any():
            labeled = missing if matrix.ignore_index is None else missing & (label != matrix.ignore_index)
            skipped = int(labeled.sum())
            pred, label = pred[~missing], label[~missing]
    try:
        matrix.update(pred, label)
    except ValueError as error:
        problem = str(error)
        if problem.startswith("target"):
            problem = "label" + problem[len("target") :]
        elif problem.startswith("pred"):
            problem = "prediction" + problem[len("pred") :]
        names = f"classes 0..{matrix.num_classes - 1}"
        ignore = f" or ignore {matrix.ignore_index}" if matrix.ignore_index is not None else ""
        raise InputFileError(where, f"unknown class: {problem} (the dataset has {names}{ignore})") from error
    return skipped


def encode_label(raw: np.ndarray, dataset: dict[str, Any], where: str) -> np.ndarray:
    """Turn a label raster as stored on disk into class indices, the way the dataset defines it.

    Args:
        raw: ``(bands, h, w)`` label raster: one band of class values (``label_encoding ==
            "index"``, remapped by ``label_map`` when given) or three bands of palette colours
            (``"rgb"``; ``ignore_colours`` map to the ignore value).
        dataset: ``DatasetSpec.to_dict()``.
        where: the label file, for errors.

    Returns:
        ``(h, w)`` uint8 classes ``0..K-1`` or the ignore value.

    Raises:
        InputFileError: a value or colour that is not a class of the dataset.
    """
    ignore = int(dataset.get("ignore_index", 255))
    k = len(dataset["classes"])
    if dataset.get("label_encoding", "index") == "rgb":
        if raw.shape[0] < 3:
            raise InputFileError(
                where, f"has {raw.shape[0]} band(s); dataset {dataset['name']!r} labels are RGB colours"
            )
        packed = (raw[0].astype(np.int64) << 16) | (raw[1].astype(np.int64) << 8) | raw[2].astype(np.int64)
        out = np.full(packed.shape, 254, dtype=np.int64)  # 254 never survives: checked below
        known = np.zeros(packed.shape, bool)
        colours = [(tuple(c), index) for index, c in enumerate(dataset["palette"])]
        colours += [(tuple(c), ignore) for c in dataset.get("ignore_colours") or []]
        for (r, g, b), index in colours:
            hit = packed == ((int(r) << 16) | (int(g) << 8) | int(b))
            out[hit] = index
            known |= hit
        if not known.all():
            value = int(packed[~known][0])
            colour = ((value >> 16) & 255, (value >> 8) & 255, value & 255)
            raise InputFileError(where, f"unknown class: colour {colour} is not in the {dataset['name']!r} palette")
        return out.astype(np.uint8)
    values = raw[0].astype(np.int64)
    mapping = dataset.get("label_map")
    if mapping:
        pairs = mapping.items() if isinstance(mapping, dict) else mapping
        lookup = {int(a): int(b) for a, b in pairs}
        out = np.full(values.shape, -1, dtype=np.int64)
        for source_value, class_value in lookup.items():
            out[values == source_value] = class_value
        if (out < 0).any():
            bad = int(values[out < 0][0])
            raise InputFileError(where, f"unknown class: label value {bad} is not in the {dataset['name']!r} label map")
        values = out
    bad = (values != ignore) & ((values < 0) | (values >= k))
    if bad.any():
        raise InputFileError(
            where,
            f"unknown class: label value {int(values[bad][0])} (dataset {dataset['name']!r} has classes 0..{k - 1} and ignore {ignore})",
        )
    return values.astype(np.uint8)


def evaluate_store(
    checkpoint: str | Path,
    store_path: str | Path,
    split: str,
    window: int | None = None,
    overlap: int | None = None,
    device: str = "auto",
    bf16: bool = False,
) -> dict[str, Any]:
    """Predict every scene of a store split and score it against the store's labels.

    Args:
        checkpoint: run directory, checkpoint tag directory or exported weights file.
        store_path: the tile store.
        split: split name (e.g. ``"val"``).
        window, overlap, device, bf16: as for :func:`lrss_ds.engine.inference.predictor_for`.

    Returns:
        the report dict: :meth:`ConfusionMatrix.compute` over all scenes plus ``scenes``
        (per-scene ``miou``/``oa``/``pixels``) and where it came from.

    Raises:
        StoreError: unknown or empty split, or a store whose classes differ from the model's.
        InputFileError: a corrupt checkpoint, an unsuitable scene or an unknown label class.
    """
    from lrss_ds.data.store import TileStore
    from lrss_ds.engine.model_io import load_model

    torch_device = resolve_device(device)  # a bad --device fails before any work
    store = TileStore.open(store_path)
    scenes = store.scenes(split)
    if not scenes:
        raise StoreError(
            store_path, f"split {split!r} has no scenes (splits: {', '.join(sorted(store.splits)) or 'none'})"
        )
    model, meta = load_model(checkpoint, device=torch_device)
    spec = store.spec.to_dict()
    k = int(meta["model"]["num_classes"])
    if len(spec["classes"]) != k:
        raise StoreError(store_path, f"has {len(spec['classes'])} classes, the model predicts {k}")
    trained_classes = (meta.get("dataset") or {}).get("classes")
    if trained_classes and list(trained_classes) != list(spec["classes"]):
        warnings.warn(
            f"{store_path}: class names {spec['classes']} differ from the model's {trained_classes}; "
            "scoring by class index",
            stacklevel=2,
        )
    predictor = predictor_for(model, meta, window=window, overlap=overlap, device=torch_device, bf16=bf16)
    total = ConfusionMatrix(k, spec.get("ignore_index", 255), spec["classes"])
    per_scene, skipped = [], 0
    sources = [open_store_scene(store_path, scene) for scene in scenes]
    for source in sources:
        check_source(source, meta)
    for source in tqdm(sources, desc=f"evaluate {split}", unit="scene", disable=None):
        scene_matrix = ConfusionMatrix(k, total.ignore_index, spec["classes"])
        for row, classes, _ in predictor.strips(source):
            label = store.read_label(source.name, window=(row, 0, classes.shape[0], source.width))
            skipped += count_pixels(scene_matrix, classes, label, source.where, unpredicted=predictor.ignore_index)
        total.matrix += scene_matrix.matrix
        per_scene.append(_scene_summary(source.name, scene_matrix))
    report = total.compute()
    report.update(
        mode="store",
        checkpoint=meta["source"],
        store=str(store_path),
        split=split,
        dataset=spec["name"],
        iteration=meta.get("iteration"),
        scenes=per_scene,
        unpredicted_pixels=skipped,
    )
    return report


def evaluate_pairs(predictions: str, labels: str, dataset: dict[str, Any]) -> dict[str, Any]:
    """Score prediction GeoTIFFs (e.g. from ``lrss-ds predict``) against label GeoTIFFs.

    A prediction ``<stem>.tif`` pairs with the label whose stem is ``<stem>``, or
    ``dataset.label_stem(<stem>)`` (the dataset's label suffix rule).

    Args:
        predictions: file, directory or glob of single-band class maps.
        labels: file, directory or glob of label rasters in the dataset's encoding.
        dataset: ``DatasetSpec.to_dict()``.

    Returns:
        the report dict (as :func:`evaluate_store`).

    Raises:
        InputFileError: a prediction without a label, size mismatch, or an unknown class.
    """
    pred_files = expand_inputs(predictions)
    label_files = {p.stem: p for p in expand_inputs(labels)}
    k = len(dataset["classes"])
    ignore = int(dataset.get("ignore_index", 255))
    pairs = []
    for pred in pred_files:
        label = label_files.get(pred.stem) or label_files.get(_label_stem(pred.stem, dataset))
        if label is None:
            raise InputFileError(
                pred,
                f"no label file for it among {labels} (looked for stems {pred.stem!r} and {_label_stem(pred.stem, dataset)!r})",
            )
        pairs.append((pred, label))
    total = ConfusionMatrix(k, ignore, dataset["classes"])
    per_scene, skipped = [], 0
    for pred_path, label_path in tqdm(pairs, desc="evaluate", unit="scene", disable=None):
        scene_matrix = ConfusionMatrix(k, ignore, dataset["classes"])
        with _open(pred_path) as pred_ds, _open(label_path) as label_ds:
            if pred_ds.shape != label_ds.shape:
                raise InputFileError(
                    label_path,
                    f"is {label_ds.shape[0]}x{label_ds.shape[1]}, its prediction {pred_path} is {pred_ds.shape[0]}x{pred_ds.shape[1]}",
                )
            for _, window in pred_ds.block_windows(1):  # block by block: memory bounded by one tile row
                pred = pred_ds.read(1, window=window)
                label = encode_label(label_ds.read(window=window), dataset, str(label_path))
                skipped += count_pixels(scene_matrix, pred, label, str(pred_path), unpredicted=ignore)
        total.matrix += scene_matrix.matrix
        per_scene.append(_scene_summary(pred_path.stem, scene_matrix))
    report = total.compute()
    report.update(
        mode="pairs",
        predictions=predictions,
        labels=labels,
        dataset=dataset["name"],
        scenes=per_scene,
        unpredicted_pixels=skipped,
    )
    return report


def _label_stem(stem: str, dataset: dict[str, Any]) -> str:
    """The dataset's label stem for an image stem (``DatasetSpec.label_stem``)."""
    image_suffix, label_suffix = dataset.get("image_suffix") or "", dataset.get("label_suffix") or ""
    base = stem[: -len(image_suffix)] if image_suffix and stem.endswith(image_suffix) else stem
    return base + label_suffix


def _open(path: Path) -> Any:
    """Open a raster for reading, as an InputFileError naming it when that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as error:
        raise InputFileError(path, f"not a readable raster: {str(error).splitlines()[0]}") from error


def _scene_summary(name: str, matrix: ConfusionMatrix) -> dict[str, Any]:
    """Per-scene line of the report."""
    metrics = matrix.compute()
    return {"scene": name, "miou": metrics["miou"], "oa": metrics["oa"], "pixels": metrics["pixels"]}


# ----------------------------------------------------------------------------- report


def write_report(report: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``metrics.json``, ``metrics.md`` and ``confusion.png`` into ``out_dir``.

    Each file is written under a temporary name and renamed; existing report files are refused
    before anything is written unless ``overwrite``.

    Args:
        report: a dict from :func:`evaluate_store` / :func:`evaluate_pairs` (or
            :meth:`ConfusionMatrix.compute` plus any header keys).
        out_dir: the report directory (created).
        overwrite: replace existing report files.

    Returns:
        the paths written.

    Raises:
        OutputExistsError: a report file exists and ``overwrite`` is false.
        OutputError: ``out_dir`` or a file in it cannot be written (full disk, read-only).
    """
    out_dir = Path(out_dir)
    targets = [out_dir / name for name in REPORT_FILES]
    for target in targets:
        if target.exists() and not overwrite:
            raise OutputExistsError(target, "already exists; pass --overwrite to replace the report")
    writers = {
        "metrics.json": lambda p: p.write_text(json.dumps(jsonable(report), indent=2) + "\n"),
        "metrics.md": lambda p: p.write_text(markdown_report(report)),
        "confusion.png": lambda p: draw_confusion(report["matrix"], report["classes"], p),
    }
    for target in targets:
        with write_atomically(target) as temporary:
            writers[target.name](temporary)
    return targets


def _pct(value: float | None) -> str:
    """A metric as a percentage with two decimals, or an en dash when undefined."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The per-class table and summary metrics as Markdown (percentages, as the papers report).

    Args:
        report: an evaluation report dict.

    Returns:
        the Markdown text.
    """
    lines = ["# Evaluation", ""]
    for key in ("checkpoint", "iteration", "store", "split", "predictions", "labels", "dataset"):
        if report.get(key) is not None:
            lines.append(f"- {key}: `{report[key]}`")
    lines.append(f"- scenes: {len(report.get('scenes', []))}, labeled pixels counted: {report['pixels']:,}")
    if report.get("unpredicted_pixels"):
        lines.append(
            f"- labeled pixels without a prediction (input nodata), left out: {report['unpredicted_pixels']:,}"
        )
    lines += ["", "| class | IoU | precision | recall | F1 | label pixels |", "|---|---:|---:|---:|---:|---:|"]
    for index, name in enumerate(report["classes"]):
        cells = [_pct(report[key][index]) for key in ("iou", "precision", "recall", "f1")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {report['support'][index]:,} |")
    lines += [
        "",
        f"**mIoU {_pct(report['miou'])}** · mean F1 {_pct(report['mean_f1'])} · OA {_pct(report['oa'])} (percent)",
        "",
        "IoU = TP/(TP+FP+FN), F1 = 2·P·R/(P+R) per class; mIoU and mean F1 average the classes present in the",
        "labels or the predictions; OA = correct pixels / labeled pixels. – = undefined (precision of a class never",
        "predicted; every metric of a class in neither labels nor predictions, which the means leave out).",
        "Confusion matrix (rows = label, columns = prediction, row-normalised): `confusion.png`.",
        "",
    ]
    return "\n".join(lines)


def draw_confusion(matrix: Iterable[Iterable[int]], classes: list[str], path: Path) -> None:
    """Draw the row-normalised confusion matrix (rows = label, columns = prediction) to a PNG.

    Args:
        matrix: K x K counts.
        classes: K class names.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node; set before pyplot is imported
    import matplotlib.pyplot as plt

    counts = np.asarray(list(matrix), dtype=np.float64)
    k = counts.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = counts / counts.sum(axis=1, keepdims=True)
    size = max(4.0, 0.45 * k + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1.2, size))
    image = axes.imshow(np.ma.masked_invalid(rates), cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(k), labels=classes, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(k), labels=classes, fontsize=8)
    axes.set_xlabel("prediction")
    axes.set_ylabel("label")
    axes.set_title("confusion matrix (row-normalised)")
    if k <= 16:  # numbers stay legible up to about this many classes
        for i in range(k):
            for j in range(k):
                if not math.isnan(rates[i, j]):
                    axes.text(
                        j,
                        i,
                        f"{rates[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lrss-ds evaluate`` options to ``parser``."""
    parser.add_argument(
        "--checkpoint", help="run directory, checkpoint tag directory or exported weights file (with --store)"
    )
    parser.add_argument("--store", help="tile store whose split to predict and score")
    parser.add_argument("--split", help="split of --store to score (e.g. val, test)")
    parser.add_argument(
        "--predictions", help="class-map GeoTIFFs (file, directory or quoted glob) to score against --labels"
    )
    parser.add_argument(
        "--labels", help="label GeoTIFFs (file, directory or quoted glob) matching --predictions by name"
    )
    parser.add_argument("--dataset", help="dataset name or YAML for --labels (default: the --checkpoint's dataset)")
    parser.add_argument("--output", required=True, help="report directory (metrics.json, metrics.md, confusion.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding-window size for prediction (default: as the model was trained)",
    )
    parser.add_argument("--overlap", type=int, default=None, help="sliding-window overlap in pixels")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast")


def run(args: argparse.Namespace) -> int:
    """Run ``lrss-ds evaluate``; returns the exit code."""
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise OutputError(
            args.output, "is a file; --output is the report directory (metrics.json, metrics.md, confusion.png)"
        )
    for target in (Path(args.output) / name for name in REPORT_FILES):
        if target.exists() and not args.overwrite:  # refuse before spending time predicting
            raise OutputExistsError(target, "already exists; pass --overwrite to replace the report")
    if args.predictions or args.labels:
        if not (args.predictions and args.labels):
            raise LrssError("--predictions/--labels", "give both")
        if args.store:
            raise LrssError("--store", "score either a store split or --predictions/--labels, not both")
        report = evaluate_pairs(args.predictions, args.labels, _dataset_dict(args))
    else:
        if not (args.checkpoint and args.store and args.split):
            raise LrssError(
                "evaluate", "give --checkpoint, --store and --split (or --predictions, --labels and --dataset)"
            )
        report = evaluate_store(
            args.checkpoint,
            args.store,
            args.split,
            window=args.window,
            overlap=args.overlap,
            device=args.device,
            bf16=args.bf16,
        )
    write_report(report, args.output, overwrite=args.overwrite)
    print(f"mIoU {_pct(report['miou'])}  mean F1 {_pct(report['mean_f1'])}  OA {_pct(report['oa'])}  -> {args.output}")
    return 0


def _dataset_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset that defines the label classes: ``--dataset``, else the checkpoint's."""
    if args.dataset:
        from lrss_ds.data.catalog import get_dataset

        return get_dataset(args.dataset).to_dict()
    if args.checkpoint:
        from lrss_ds.engine.model_io import load_meta

        return load_meta(args.checkpoint)["dataset"]
    raise LrssError("--dataset", "needed with --predictions/--labels (or give --checkpoint to use its dataset)")
