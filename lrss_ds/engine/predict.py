"""`lrss-ds predict`: write georeferenced class maps (and class probabilities) for whole scenes."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from lrss_ds.data.rasters import RasterSource, open_geotiff, open_store_scene
from lrss_ds.engine.cli_inputs import expand_inputs, resolve_device
from lrss_ds.engine.inference import check_source, predictor_for
from lrss_ds.engine.interrupt import terminate_as_exit
from lrss_ds.engine.model_io import load_model
from lrss_ds.engine.prediction_writer import write_prediction
from lrss_ds.engine.scene_batch import PredictionLog, Ranks, pending, timed
from lrss_ds.engine.spatial_predict import check_spatial, start_spatial_prediction
from lrss_ds.engine.temporaries import remove_stale_temporaries
from lrss_ds.errors import LrssError, OutputError, OutputExistsError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lrss-ds predict`` options to ``parser``."""
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, DeepSpeed checkpoint tag directory or exported weights file"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="GeoTIFF, directory of GeoTIFFs, or glob pattern (quote it)")
    source.add_argument("--store", help="tile store to read scenes from (with --scene)")
    parser.add_argument("--scene", action="append", help="scene id in --store (repeatable)")
    parser.add_argument(
        "--output",
        required=True,
        help="output GeoTIFF for one file or scene; a directory for a directory, glob or several",
    )
    parser.add_argument(
        "--probabilities",
        help="also write per-class float16 probabilities here (a file or a directory, like --output)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding-window size (default: holistic, or the patch size of patch models; 0 forces holistic)",
    )
    parser.add_argument(
        "--overlap", type=int, default=None, help="sliding-window overlap in pixels (default: window/4)"
    )
    parser.add_argument("--no-overviews", dest="overviews", action="store_false", help="do not build overviews")
    parser.add_argument(
        "--compress", choices=("deflate", "zstd"), default="deflate", help="GeoTIFF compression (default deflate)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast, channels-last")
    parser.add_argument(
        "--spatial",
        type=int,
        default=1,
        help="ranks per scene: each group of N launcher ranks predicts one scene in N bands of rows, its first "
             "rank writing it (default 1: whole scenes per rank; EHSNet and HRNet-FCN)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip scenes whose outputs exist and are finished (a rerun of a batch)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``lrss-ds predict``; returns the exit code."""
    if args.store and not args.scene:
        raise LrssError("--scene", "give at least one --scene with --store")
    if args.scene and not args.store:
        raise LrssError("--scene", "needs --store")
    if args.window is not None and args.window < 0:
        raise LrssError("--window", f"must be >= 0, got {args.window}")
    sources: list[RasterSource] = (
        [open_store_scene(args.store, scene) for scene in args.scene]
        if args.store
        else [open_geotiff(p) for p in expand_inputs(args.input)]
    )
    several = bool(args.input) and not Path(args.input).is_file()  # a directory or a glob
    probabilities = Path(args.probabilities) if args.probabilities else None
    ranks = Ranks.join()
    check_spatial(args.spatial, ranks.world_size, args.window, args.bf16)
    outputs = plan_outputs(
        sources, Path(args.output), probabilities, args.overwrite or args.resume, directories=several
    )
    device = ranks.device(resolve_device(args.device))
    model, meta = load_model(args.checkpoint, device=device)
    for source in sources:  # check every input before spending time on any
        check_source(source, meta)
    spatial = start_spatial_prediction(args.spatial, model, meta, sources, device) if args.spatial > 1 else None
    predictor = spatial or predictor_for(model, meta, window=args.window, overlap=args.overlap, device=device,
                                         bf16=args.bf16)
    writes = spatial is None or spatial.writes  # in a spatial group only the first rank writes and logs
    share = spatial.share if spatial else ranks.share
    common = {"model": meta["model"], "checkpoint": str(Path(args.checkpoint).resolve()), "rank": ranks.rank,
              "threads": torch.get_num_threads(), "spatial": args.spatial}
    log = PredictionLog(outputs[0][0].parent, common, say=tqdm.write)
    jobs = pending(share(list(zip(sources, outputs))), predictor.num_classes, args.resume, args.overwrite,
                   on_skip=log.skip if writes else lambda *_: None)
    # only files whose writer process is gone: another rank's live temporaries stay
    for directory in dict.fromkeys(path.parent for pair in outputs for path in pair if path is not None):
        for leftover in remove_stale_temporaries(directory):
            print(f"removed {leftover}, left by a predict that was killed", file=sys.stderr)
    ranks.barrier()  # every rank has checked the outputs before any rank writes one
    with terminate_as_exit("lrss-ds predict"):  # SIGTERM unwinds through write_prediction's clean-up
        progress = tqdm(jobs, desc=f"predict (rank {ranks.rank})" if ranks.world_size > 1 else "predict",
                        unit="scene", disable=None)
        for source, (output, probabilities) in progress:
            if spatial is not None and not writes:  # its band's rows, to the group's first rank
                _, peak = timed(functools.partial(spatial.send, source, probabilities is not None))
                spatial.peaks_per_rank(peak.gib())
                continue
            progress.set_postfix_str(source.name)
            with tqdm(total=source.height, desc=source.name, unit="row", leave=False, disable=None) as rows:
                predictor.row_progress = rows.update
                seconds, peak = timed(functools.partial(
                    write_prediction, source, predictor, meta, output, probabilities,
                    overviews=args.overviews, compress=args.compress,
                ))
            extra = {"peak_rss_gib_per_rank": spatial.peaks_per_rank(peak.gib())} if spatial else {}
            log.add(source, output, probabilities, seconds, peak, **extra)
            tqdm.write(f"wrote {output}" + (f" and {probabilities}" if probabilities else "") + f" in {seconds:.1f} s")
    ranks.barrier()
    if ranks.rank == 0:
        tqdm.write(f"summary in {log.merge()}")
    if spatial is not None:
        spatial.close()
    return 0


def plan_outputs(
    sources: Sequence[RasterSource],
    output: Path,
    probabilities: Path | None,
    overwrite: bool,
    directories: bool = False,
) -> list[tuple[Path, Path | None]]:
    """Decide every output path up front and refuse existing ones unless ``overwrite``.

    ``output`` (and ``probabilities``) are directories receiving ``<name>.tif`` when there are
    several sources, when ``directories`` is set (the input was a directory or a glob, so the
    number of matches should not change what ``--output`` means), or when they already are
    directories; otherwise they are the files to write.

    Args:
        sources: the scenes, in order.
        output: ``--output``.
        probabilities: ``--probabilities`` or None.
        overwrite: allow replacing existing files.
        directories: treat ``output``/``probabilities`` as directories even for one source.

    Returns:
        ``(class map path, probabilities path or None)`` per source.

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is false.
        OutputError: an output is one of the input files (same path, hard link or symlink).
        LrssError: two inputs would write the same output.
    """

    def target(base: Path, source: RasterSource) -> Path:
        as_directory = directories or len(sources) > 1 or base.is_dir()
        return base / f"{source.name}.tif" if as_directory else base

    planned = [(target(output, s), target(probabilities, s) if probabilities else None) for s in sources]
    inputs = {_file_id(s.path): s.path for s in sources if s.path is not None and _file_id(s.path)}
    seen: dict[Path, str] = {}
    for source, paths in zip(sources, planned):
        for path in (p for p in paths if p is not None):
            if path in seen:
                raise LrssError(
                    path, f"both {seen[path]} and {source.where} would be written here; give inputs distinct names"
                )
            seen[path] = source.where
            same_input = inputs.get(_file_id(path))
            if same_input is not None:
                raise OutputError(
                    path,
                    f"is the input {same_input} ({_how_same(path, same_input)}); writing there would destroy it, "
                    "so it is refused even with --overwrite: choose another --output",
                )
            if path.exists() and not overwrite:
                raise OutputExistsError(path, "already exists; pass --overwrite to replace it")
    return planned


def _file_id(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file ``path`` resolves to (following symlinks), or None if none."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _how_same(output: Path, source: Path) -> str:
    """Why ``output`` is ``source``: the same path, a symlink, or a hard link."""
    if output.absolute() == source.absolute():
        return "the same path"
    if output.resolve() == source.resolve():
        return "the same file through a symlink"
    return "a hard link to the same file"
