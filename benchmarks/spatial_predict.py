"""Per-rank peak RSS and scene time of `lrss-ds predict` on one rank and with `--spatial N` on N ranks.

Each configuration is a real prediction of the same scene by the same weights: ``lrss-ds
predict`` in a fresh process (one rank: the banded holistic predictor), then ``lrss-ds predict
--spatial N`` under the ``deepspeed`` launcher. Peaks and seconds come from the run's
``predictions.json`` (``peak_rss_gib``; ``peak_rss_gib_per_rank`` for spatial groups: the
writer's over writing the maps, the others' over predicting and sending their bands); each
spatial map is compared with the one-rank map pixel by pixel.

    python benchmarks/spatial_predict.py --out benchmarks/results [--quick] [--size 2048x2048] [--ranks 1,2]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    Column,
    Report,
    benchmark_parser,
    machine_header,
    parse_benchmark_args,
    parse_size,
    write_report,
)
from spatial import MODELS  # noqa: E402  # the spatial training benchmark's models, the same here

from lrss_ds.engine.demo import launcher_env  # noqa: E402
from lrss_ds.engine.model_io import WEIGHTS_FORMAT  # noqa: E402
from lrss_ds.engine.rendezvous import free_port  # noqa: E402
from lrss_ds.models import build_model  # noqa: E402
from lrss_ds.parallel import band_bounds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = 24
BANDS = 3
MEAN, STD = [90.0, 100.0, 110.0], [40.0, 45.0, 50.0]

COLUMNS = [
    Column("ranks", "Ranks (spatial)", 0),
    Column("rank", "Rank", 0),
    Column("band_rows", "Band rows", 0),
    Column("peak_rss_gib", "Peak RSS GiB", 3),
    Column("peak_vs_one_rank", "Peak / one rank", 2),
    Column("scene_s", "Scene s (wall)", 1),
    Column("job_cpu_s", "Job CPU-s (all ranks)", 1),
    Column("classes_equal", "Classes = one rank", 6),
]


def prepare(work: Path, model_name: str, height: int, width: int) -> tuple[Path, Path]:
    """An exported weights file of a fresh model (seed 0) and a random uint8 GeoTIFF scene."""
    torch.manual_seed(0)
    model = build_model(model_name, CLASSES, BANDS, band_mean=MEAN, band_std=STD, **MODELS[model_name])
    weights = work / f"{model_name}.pt"
    dataset = {"name": "bench", "classes": None, "palette": None, "ignore_index": 255}
    torch.save({"format": WEIGHTS_FORMAT, "model": model.config(), "dataset": dataset, "input_dtype": "uint8",
                "band_mean": MEAN, "band_std": STD, "iteration": 0, "metrics": {},
                "state_dict": model.state_dict()}, weights)
    scene = work / f"scene_{height}x{width}.tif"
    image = np.random.default_rng(0).integers(0, 255, (BANDS, height, width)).astype("uint8")
    profile = dict(driver="GTiff", width=width, height=height, count=BANDS, dtype="uint8", crs="EPSG:32633",
                   transform=rasterio.Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0), tiled=True)
    with rasterio.open(scene, "w", **profile) as ds:
        ds.write(image)
    return weights, scene


def predict_once(
    work: Path, weights: Path, scene: Path, spatial: int, timeout: float
) -> tuple[dict[str, Any], float, Path]:
    """One prediction on ``spatial`` ranks; returns ``(its predictions.json record, job CPU seconds, map)``."""
    out = work / f"ranks{spatial}"
    arguments = ["predict", "--checkpoint", str(weights), "--input", str(scene), "--output", str(out / "map.tif"),
                 "--overwrite"]
    if spatial == 1:
        command = [sys.executable, "-m", "lrss_ds.cli", *arguments]
    else:
        command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(spatial), "--master_port",
                   str(free_port()), "--log_level", "warning", "--module", "lrss_ds.cli", *arguments,
                   "--spatial", str(spatial)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(work / f"ranks{spatial}.log", "w") as log:
        done = subprocess.run(command, env=launcher_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"prediction on {spatial} rank(s) failed (status {done.returncode}); see {log.name}")
    (record,) = json.loads((out / "predictions.json").read_text())["scenes"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return record, cpu, out / "map.tif"


def main(argv: list[str] | None = None) -> int:
    """Run the spatial prediction benchmark and write ``spatial_predict.{md,csv,json}``."""
    parser = benchmark_parser(__doc__.splitlines()[0], out=REPO / "benchmarks" / "results",
                              quick="a tiny HRNet-FCN on a 160x96 scene (the test suite)")
    parser.add_argument("--size", default="2048x2048", help="scene HEIGHTxWIDTH")
    parser.add_argument("--ranks", default="1,2", help="comma-separated spatial group sizes (1 first)")
    parser.add_argument("--model", default="ehsnet", choices=sorted(MODELS))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per prediction")
    args = parse_benchmark_args(parser, argv)
    if args.quick:
        args.size, args.model = "160x96", "hrnet_fcn"
    height, width = parse_size(args.size)
    ranks = [int(r) for r in args.ranks.split(",")]
    work = args.out / "spatial_predict_work"
    work.mkdir(parents=True, exist_ok=True)
    weights, scene = prepare(work, args.model, height, width)
    conditions = (f"{args.model} ({CLASSES} classes, random weights) on one random {height}x{width} {BANDS}-band "
                  f"uint8 GeoTIFF, fp32, class map only, spatial groups {ranks}; " + args.conditions)
    header = machine_header(conditions, {"model": args.model, "height": height, "width": width})
    multiple = build_model(args.model, CLASSES, BANDS, **MODELS[args.model]).pad_multiple
    rows: list[dict[str, Any]] = []
    one_rank: tuple[float, np.ndarray] | None = None
    started = time.perf_counter()
    for spatial in ranks:
        record, cpu, output = predict_once(work, weights, scene, spatial, args.timeout)
        with rasterio.open(output) as ds:
            classes = ds.read(1)
        peaks = record.get("peak_rss_gib_per_rank") or [record["peak_rss_gib"]]
        if one_rank is None:
            one_rank = (peaks[0], classes)
        bands = band_bounds(height, spatial, multiple)
        for rank, peak in enumerate(peaks):
            rows.append({
                "ranks": spatial, "rank": rank, "band_rows": bands[rank][1] - bands[rank][0], "peak_rss_gib": peak,
                "peak_vs_one_rank": peak / one_rank[0], "scene_s": record["seconds"], "job_cpu_s": cpu,
                "classes_equal": float((classes == one_rank[1]).mean()),
            })
    report = Report(
        name="spatial_predict",
        title=f"Spatial prediction: one {height}x{width} scene on 1 vs {ranks[-1]} ranks ({args.model})",
        header=header,
        tables=[("Per rank", COLUMNS, rows)],
        notes=[
            "Peak RSS is each rank's peak resident set over the scene (VmHWM reset before it; the process's "
            "interpreter, DeepSpeed and model included): the writer's over predicting its band and writing the "
            "maps, the others' over predicting and sending their bands. One rank runs the banded holistic "
            "predictor; spatial ranks run each HRNet's front in row bands of their band (with its halo) and the "
            "rest of the network on the whole band.",
            "Scene s is the writer's wall time for the scene; ranks on one host share its cores, so on a shared "
            "CPU compare CPU-s. Job CPU-s includes start-up (DeepSpeed import, launcher) of every rank.",
            "Classes = one rank: the fraction of pixels whose class equals the one-rank map's (one rank folds "
            "BatchNorm into the convolutions, spatial ranks do not: logits differ by float rounding).",
            f"Band rows: multiples of {multiple} (the network's total stride), the last band uneven.",
            f"Total benchmark wall time {time.perf_counter() - started:.0f} s.",
        ],
    )
    for path in write_report(report, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
