"""Whole-scene prediction: peak RSS, seconds and the compute floor, fp32 and bf16, per model.

Each case runs ``lrss_ds.engine.prediction_writer.write_prediction`` (what ``lrss-ds predict`` runs per
scene) on one synthetic 4-band uint8 scene in a fresh process, and reports:

- peak RSS of that process (kernel ``ru_maxrss``) and the seconds ``write_prediction`` took;
- FLOPs of the model's eval forward at that size, from ``lrss_ds.models.listing.model_cost``
  (the counter ``lrss-ds models`` prints; for the patch model, per patch times patches);
- the floor = FLOPs / the throughput of a plain 64 -> 64 3x3 convolution of the same precision
  and layout (fp32 NCHW; bf16 autocast, channels-last) measured in the same process just
  before and just after (the faster of the two), and the ratio seconds / floor;
- for bf16, the fraction of pixels whose class equals the fp32 map's.

Models: EHSNet-W18 in the paper's configuration (LRD k = d = 256, 24 classes), the demo
model (``ds_configs/ehsnet_synthetic.yaml``, 6 classes), HRNet-FCN-W18 (24 classes) holistic,
and HRNet-FCN-W18 in patch mode on sliding windows. Weights are freshly initialised: time
and memory do not depend on them, and the agreement compares two precisions of the same
weights.

    python benchmarks/inference.py [--quick] [--threads N] [--out benchmarks/results]

Without ``--quick`` the scene is 6908 x 7300 (FBP's size) and the run takes hours on a small
CPU machine; measure it on an idle one. ``--quick`` uses a tiny scene and checks the plumbing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from _harness import (  # noqa: E402
    GIB,
    REPO_ROOT,
    Column,
    Report,
    machine_load,
    benchmark_parser,
    machine_header,
    parse_benchmark_args,
    run_config,
    write_report,
)

BANDS = 4
FULL_SIZE = (6908, 7300)
QUICK_SIZE = (203, 229)
FULL_PATCH = (512, 64)  # patch side, overlap
QUICK_PATCH = (96, 16)
CONV_SIDE = {"full": 384, "quick": 96}
DEMO_CLASSES = 6  # the synthetic dataset's classes (lrss_ds.data.synth)


def cases(quick: bool) -> list[dict[str, Any]]:
    """Every (model, precision) case: name, model name, classes, options (``quick`` runs them all too)."""
    demo = yaml.safe_load((REPO_ROOT / "ds_configs" / "ehsnet_synthetic.yaml").read_text())["model"]
    patch, overlap = QUICK_PATCH if quick else FULL_PATCH
    models = [
        ("EHSNet-W18 (paper: k=d=256)", "ehsnet", 24, {"backbone": "hrnet_w18", "lrd_k": 256, "lrd_d": 256}),
        ("demo EHSNet", demo["name"], DEMO_CLASSES, dict(demo.get("options") or {})),
        ("HRNet-FCN-W18", "hrnet_fcn", 24, {"backbone": "hrnet_w18"}),
        ("patch HRNet-W18 (sliding)", "hrnet_fcn", 24,
         {"backbone": "hrnet_w18", "mode": "patch", "patch_size": patch, "overlap": overlap}),
    ]
    return [dict(case=label, model=name, classes=k, options=opts, bf16=bf16)
            for label, name, k, opts in models for bf16 in (False, True)]


# ----------------------------------------------------------------------------- child side


def conv_throughput(bf16: bool, side: int) -> tuple[float, float]:
    """FLOP/s of a plain 64 -> 64 3x3 convolution on ``(1, 64, side, side)`` (best of 5 after a warm-up).

    fp32 runs NCHW; bf16 runs under bf16 autocast with channels-last tensors, as ``--bf16``.

    Returns:
        ``(per wall second, per CPU second of this process)``: on a shared machine the CPU
        clock does not count the time the process waits for a core.
    """
    import torch

    x = torch.randn(1, 64, side, side)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    if bf16:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    best_wall = best_cpu = float("inf")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for rep in range(6):
            start, start_cpu = time.perf_counter(), time.process_time()
            conv(x)
            if rep:
                best_wall = min(best_wall, time.perf_counter() - start)
                best_cpu = min(best_cpu, time.process_time() - start_cpu)
    flops = 2 * 64 * 64 * 9 * side * side
    return flops / best_wall, flops / max(best_cpu, 1e-9)


def predict_case(scene: str, output: str, model: str, classes: int, options: dict[str, Any], bf16: bool,
                 conv_side: int) -> dict[str, Any]:
    """Child: the conv throughput, one ``write_prediction`` of ``scene`` into ``output``, the conv throughput again.

    The floor takes the faster of the two throughput measurements: on a machine whose speed
    drifts (another tenant's memory traffic measured the same convolution here at 32 and at
    90 GFLOP/s within minutes), one slow sample would lower the bar the prediction is held to.
    ``conv_spread`` (slower / faster) says how far the two were apart.
    """
    import torch

    from lrss_ds.data.rasters import open_geotiff
    from lrss_ds.engine.inference import predictor_for
    from lrss_ds.engine.prediction_writer import write_prediction
    from lrss_ds.models import build_model

    before = conv_throughput(bf16, conv_side)
    torch.manual_seed(0)
    net = build_model(model, classes, BANDS, band_mean=[100.0] * BANDS, band_std=[50.0] * BANDS, **options).eval()
    meta = {"model": net.config(), "dataset": {"classes": [f"class{k}" for k in range(classes)]}}
    predictor = predictor_for(net, meta, bf16=bf16)
    start, start_cpu = time.perf_counter(), time.process_time()
    write_prediction(open_geotiff(scene), predictor, meta, Path(output), overviews=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    after = conv_throughput(bf16, conv_side)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds,
            "conv_flops_per_s": max(before[0], after[0]), "conv_flops_per_cpu_s": max(before[1], after[1]),
            "conv_spread": min(before[0], after[0]) / max(before[0], after[0])}


# ----------------------------------------------------------------------------- parent side


def write_scene(path: Path, height: int, width: int) -> None:
    """A 4-band uint8 GeoTIFF of smooth random fields plus noise, written in strips."""
    import rasterio

    rng = np.random.default_rng(0)
    coarse = rng.uniform(30, 220, size=(BANDS, height // 64 + 2, width // 64 + 2))
    profile = dict(driver="GTiff", height=height, width=width, count=BANDS, dtype="uint8", tiled=True,
                   blockxsize=512, blockysize=512, crs="EPSG:32633",
                   transform=rasterio.Affine(4.0, 0, 500000.0, 0, -4.0, 4100000.0))
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, height, 512):
            rows = min(512, height - row)
            r = (np.arange(row, row + rows) // 64)[:, None]
            c = (np.arange(width) // 64)[None, :]
            block = coarse[:, r, c] + rng.normal(0, 12, size=(BANDS, rows, width))
            ds.write(np.clip(block, 0, 255).astype("uint8"), window=rasterio.windows.Window(0, row, width, rows))


def agreement(a: Path, b: Path) -> float:
    """Fraction of pixels with the same class in two class maps (read in strips)."""
    import rasterio

    same = total = 0
    with rasterio.open(a) as da, rasterio.open(b) as db:
        for row in range(0, da.height, 1024):
            window = rasterio.windows.Window(0, row, da.width, min(1024, da.height - row))
            x, y = da.read(1, window=window), db.read(1, window=window)
            same += int((x == y).sum())
            total += x.size
    return same / total


COLUMNS = [
    Column("case", "Model"),
    Column("precision", "Precision"),
    Column("status", "Status"),
    Column("peak_rss_gib", "Peak RSS GiB", 2),
    Column("seconds", "Seconds", 1),
    Column("gflops", "GFLOPs", 0),
    Column("conv_gflops_per_s", "3x3 conv GFLOP/s", 1),
    Column("conv_spread", "Conv before/after", 2),
    Column("floor_s", "Floor s", 1),
    Column("ratio", "Seconds / floor", 2),
    Column("cpu_seconds", "CPU s", 1),
    Column("cpu_ratio", "CPU s / CPU floor", 2),
    Column("agreement", "Classes = fp32", 5),
]


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.splitlines()[0], out=Path(__file__).resolve().parent / "results",
                              quick=f"a {QUICK_SIZE[0]} x {QUICK_SIZE[1]} scene", conditions=False)
    parser.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds per case")
    parser.add_argument("--case", action="append", default=None,
                        help="run only the cases whose label contains this text (repeatable; default: all)")
    parser.add_argument("--note", default="", help="conditions to state in the header (e.g. what else ran)")
    args = parse_benchmark_args(parser, argv)
    from lrss_ds.models.listing import model_cost

    size = QUICK_SIZE if args.quick else FULL_SIZE
    conv_side = CONV_SIDE["quick" if args.quick else "full"]
    header = machine_header(
        f"{'--quick: tiny' if args.quick else 'whole'} {size[0]} x {size[1]} 4-band uint8 scene; each case in a fresh "
        f"process; threads per case: {args.threads or 'torch default'}; no overviews; class map only"
        + (f"; {args.note}" if args.note else ""),
        {"scene": list(size)},
    )
    rows: list[dict[str, Any]] = []
    paths: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="lrss_inference_") as tmp:
        scene = Path(tmp) / "scene.tif"
        write_scene(scene, *size)
        maps: dict[tuple[str, bool], Path] = {}
        selected = [c for c in cases(args.quick) if not args.case or any(text in c["case"] for text in args.case)]
        for case in selected:
            output = Path(tmp) / f"map{len(rows)}.tif"
            params = dict(scene=str(scene), output=str(output), model=case["model"], classes=case["classes"],
                          options=case["options"], bf16=case["bf16"], conv_side=conv_side)
            run = run_config("inference:predict_case", params, threads=args.threads, timeout_s=args.timeout)
            flops = model_cost(case["model"], case["classes"], BANDS, size, **case["options"]).flops
            row: dict[str, Any] = {"case": case["case"], "model": case["model"], "classes": case["classes"],
                                   "options": case["options"], "precision": "bf16" if case["bf16"] else "fp32",
                                   "size": list(size), "status": run.status,
                                   "peak_rss_gib": run.peak_rss_bytes / GIB, "gflops": flops / 1e9 if flops else None}
            if run.status == "ok":
                throughput = run.result["conv_flops_per_s"]
                row.update(seconds=run.result["seconds"], conv_gflops_per_s=throughput / 1e9,
                           conv_spread=run.result["conv_spread"], cpu_seconds=run.result["cpu_seconds"])
                if flops:
                    row.update(floor_s=flops / throughput, ratio=run.result["seconds"] / (flops / throughput),
                               cpu_ratio=run.result["cpu_seconds"] / (flops / run.result["conv_flops_per_cpu_s"]))
                maps[(case["case"], case["bf16"])] = output
                fp32_map = maps.get((case["case"], False))
                if case["bf16"] and fp32_map is not None:
                    row["agreement"] = agreement(fp32_map, output)
            else:
                row["error"] = run.error[-500:]
            rows.append(row)
            print(f"{row['case']} {row['precision']}: {row['status']} {row.get('seconds', float('nan')):.1f} s "
                  f"{row['peak_rss_gib']:.2f} GiB ratio {row.get('ratio', float('nan')):.2f}", flush=True)
            paths = write_report(_report(header, rows), args.out)  # after every case: a stopped run keeps them
    for path in paths:
        print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _report(header: dict[str, Any], rows: list[dict[str, Any]]) -> Report:
    """The report of the cases run so far (the header gains the machine's load now)."""
    return Report(
        name="inference",
        title="Whole-scene prediction: memory, time and the compute floor",
        header={**header, "load_at_end": machine_load()},
        tables=[("Holistic and sliding-window prediction", COLUMNS, rows)],
        notes=[
            "Seconds: one `write_prediction` (prediction and the tiled GeoTIFF), as `lrss-ds predict` runs per scene.",
            "Floor: the forward's FLOPs (lrss_ds.models.listing.model_cost, as `lrss-ds models`) divided by the "
            "FLOP/s of a plain 64 -> 64 3x3 convolution of the same precision and layout measured in the same process, "
            "before and after the prediction; the faster of the two sets the floor (Conv before/after: the slower "
            "one's share of it, 1.00 when the machine held its speed).",
            "CPU s / CPU floor: the same with the process's CPU seconds and the convolution's FLOP per CPU second, "
            "which do not count the time a process waits for a core on a shared machine.",
            "Classes = fp32: fraction of pixels of the bf16 map equal to the fp32 map of the same weights.",
            "Peak RSS: the case's whole process (kernel ru_maxrss), interpreter and torch included.",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
