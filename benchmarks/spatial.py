"""Per-rank peak RSS and step time of training one scene on one rank and split over spatial ranks.

Each configuration is a real training run: ``lrss-ds train`` under the ``deepspeed`` launcher
(ZeRO-2 with the optimizer on the host, ``ds_configs/cpu.json``) on the same synthetic scene,
first on one rank, then with ``parallel.spatial: N`` on N ranks. Each rank's peak RSS comes
from the run's ``metrics.json`` (``memory.peak_rss_gib_per_rank``); the step time is the
training loop's wall time per iteration after the first (from the log's iteration stamps when
there are at least two, else the loop's mean). The ranks run with the benchmarks' allocator
setting (``ALLOCATOR_ENV``: blocks >= 128 KiB from mmap), so a peak is the tensors', not what
glibc's heap keeps of freed blocks; ``--default-allocator`` measures glibc's default instead.

    python benchmarks/spatial.py --out benchmarks/results [--quick] [--size 2048x2048] [--ranks 1,2] [--larger]

``--larger`` adds one more run: the largest group on a scene as many times taller as it has
ranks, so each rank holds a band as tall as the one-rank scene. Its per-rank peak against the
one-rank peak says whether N ranks hold N times the pixels one rank holds under the same cap
(each rank's fixed part, interpreter, DeepSpeed and model, and its halos are what can stop it).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    ALLOCATOR_ENV,
    Column,
    Report,
    benchmark_parser,
    machine_header,
    parse_benchmark_args,
    parse_size,
    write_report,
)

from lrss_ds.engine.config import DataConfig, SynthConfig  # noqa: E402
from lrss_ds.engine.demo import deepspeed_command, launcher_env  # noqa: E402
from lrss_ds.engine.synthetic_store import prepare_synthetic_store  # noqa: E402
from lrss_ds.models import build_model  # noqa: E402
from lrss_ds.parallel import band_bounds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The main job's EHSNet-W18 (ds_configs/ehsnet_synthetic.yaml) for the full run; a tiny HRNet-FCN
# for --quick, which only checks that the script measures and reports.
MODELS: dict[str, dict[str, Any]] = {
    "ehsnet": {"backbone": "hrnet_w18", "output_stride": 8, "lrd_k": 64, "lrd_d": 64},
    "hrnet_fcn": {"backbone": "hrnet_w18", "output_stride": 4},
}
LOSSES = {"ehsnet": "ehsnet", "hrnet_fcn": "ce"}

EXPERIMENT = """
model: {{name: {model}, options: {options}}}
data: {{store: {store}, val_split: '', workers: 0}}
optim: {{type: sgd, lr: 0.01, momentum: 0.9}}
schedule: {{policy: constant}}
memory: {{preset: {preset}}}
deepspeed: {{config: {ds_json}}}
loss: {{name: {loss}}}
train: {{seed: 0, iterations: {iterations}, checkpoint_every: 0, eval_every: 0}}
parallel: {{spatial: {spatial}}}
"""

COLUMNS = [
    Column("scene", "Scene"),
    Column("ranks", "Ranks (spatial)", 0),
    Column("rank", "Rank", 0),
    Column("band_rows", "Band rows", 0),
    Column("peak_rss_gib", "Peak RSS GiB", 3),
    Column("peak_vs_one_rank", "Peak / one rank", 2),
    Column("step_s", "Step s (wall)", 2),
    Column("halo_mib_per_step", "Halo MiB sent / step", 1),
    Column("loss_first", "First loss", 6),
    Column("loss_last", "Last loss", 5),
    Column("job_cpu_s", "Job CPU-s (all ranks)", 1),
]


def step_seconds(log: Path, metrics: dict[str, Any]) -> float:
    """Wall seconds per iteration after the first (log stamps, 1 s resolution), else the loop's mean."""
    stamps = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == "it":
            h, m, s = (int(v) for v in parts[0].split(":"))
            stamps.append(h * 3600 + m * 60 + s)
    if len(stamps) >= 3:
        return (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    return metrics["seconds"] / max(1, metrics["iteration"])


def rank_env(args: Any) -> dict[str, str]:
    """The environment of the launched ranks: :func:`launcher_env`, with ``ALLOCATOR_ENV`` unless ``--default-allocator``."""
    env = launcher_env()
    if not args.default_allocator:
        env.update(ALLOCATOR_ENV)
    return env


def train_once(root: Path, store: Path, spatial: int, args: Any) -> tuple[dict[str, Any], float, float]:
    """One training run on ``spatial`` ranks; returns ``(metrics.json, step seconds, job CPU seconds)``."""
    name = f"{store.name}_spatial{spatial}"
    config = root / f"{name}.yaml"
    config.write_text(EXPERIMENT.format(
        model=args.model, options=json.dumps(MODELS[args.model]), store=store, preset=args.preset, ds_json=REPO / "ds_configs" / "cpu.json",
        loss=LOSSES[args.model], iterations=args.iterations, spatial=spatial,
    ))
    out = root / f"run_{name}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(f"{out}.log", "w") as log:
        done = subprocess.run(deepspeed_command(config, spatial, ["--output", str(out)]), env=rank_env(args),
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"training on {spatial} rank(s) failed (status {done.returncode}); see {out}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return metrics, step_seconds(out / "log.txt", metrics), cpu


def main(argv: list[str] | None = None) -> int:
    """Run the spatial benchmark and write ``spatial.{md,csv,json}``."""
    parser = benchmark_parser(__doc__.splitlines()[0], out=REPO / "benchmarks" / "results",
                              quick="a tiny HRNet-FCN on a 128x64 scene, 2 iterations (the test suite)")
    parser.add_argument("--size", default="2048x2048", help="scene HEIGHTxWIDTH")
    parser.add_argument("--ranks", default="1,2", help="comma-separated spatial group sizes (1 first)")
    parser.add_argument("--model", default="ehsnet", choices=sorted(MODELS))
    parser.add_argument("--preset", default="ckpt_stage", help="memory preset of every run")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--larger", action="store_true",
                        help="also train the largest group on a scene that many times taller (the same band per rank)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per training run")
    parser.add_argument("--default-allocator", action="store_true",
                        help=f"run the ranks with glibc's default allocator (not {ALLOCATOR_ENV})")
    args = parse_benchmark_args(parser, argv)
    if args.quick:
        args.size, args.model, args.preset, args.iterations = "128x64", "hrnet_fcn", "none", 2
    height, width = parse_size(args.size)
    ranks = [int(r) for r in args.ranks.split(",")]
    work = args.out / "spatial_work"
    work.mkdir(parents=True, exist_ok=True)
    runs = [((height, width), spatial) for spatial in ranks]
    if args.larger:
        runs.append(((height * ranks[-1], width), ranks[-1]))
    conditions = (f"{args.model} on one synthetic {height}x{width} 4-band scene, memory preset {args.preset}, "
                  f"ZeRO-2 + CPU optimizer offload, SGD, {args.iterations} iterations, spatial groups {ranks}"
                  + (f", and {ranks[-1]} ranks on a {height * ranks[-1]}x{width} scene" if args.larger else "")
                  + "; " + args.conditions)
    allocator = rank_env(args).get("MALLOC_MMAP_THRESHOLD_", "default")
    header = machine_header(conditions, {"model": args.model, "height": height, "width": width,
                                         "malloc_mmap_threshold": allocator})
    table: list[dict[str, Any]] = []
    one_rank_peak = None
    multiple = build_model(args.model, num_classes=5, in_channels=4, **MODELS[args.model]).pad_multiple
    started = time.perf_counter()
    for (rows, cols), spatial in runs:
        store = work / f"store_{rows}x{cols}"
        synth = SynthConfig(train_scenes=1, val_scenes=0, height=rows, width=cols, bands=4, seed=0)
        prepare_synthetic_store(DataConfig(store=str(store), synthetic=synth), log=lambda line: None)
        metrics, step, cpu = train_once(work, store, spatial, args)
        bands = band_bounds(rows, spatial, multiple)
        halo = metrics.get("spatial", {}).get("halo_mib_sent_per_iteration_per_rank")
        for rank, peak in enumerate(metrics["memory"]["peak_rss_gib_per_rank"]):
            one_rank_peak = peak if spatial == 1 else one_rank_peak
            table.append({
                "scene": f"{rows}x{cols}", "ranks": spatial, "rank": rank, "band_rows": bands[rank][1] - bands[rank][0], "peak_rss_gib": peak,
                "peak_vs_one_rank": peak / one_rank_peak if one_rank_peak else None, "step_s": step,
                "halo_mib_per_step": halo[rank] if halo else 0.0,
                "loss_first": metrics["loss_first"], "loss_last": metrics["loss_last"], "job_cpu_s": cpu,
            })
    report = Report(
        name="spatial",
        title=f"Spatial parallelism: one {height}x{width} scene on 1 vs {ranks[-1]} ranks ({args.model})",
        header=header,
        tables=[("Per rank", COLUMNS, table)],
        notes=[
            "Peak RSS is each rank process's own peak (ru_maxrss), DeepSpeed and the model included, "
            f"with the ranks' MALLOC_MMAP_THRESHOLD_ {allocator} (under glibc's default, freed blocks kept "
            "in the heap put a spatial rank 45-100 MiB above the fixed part + half the one-rank activations at "
            "512-1024 px; see ALLOCATOR_ENV in _harness.py).",
            "Halo MiB sent / step: the rows this rank sent to its neighbours in one training iteration "
            "(forward halos, the gradients of the halos it received, and the recomputation under checkpointing).",
            "First loss: the same weights and scene, equal to float32 rounding. Last loss: after float32 steps the "
            "runs drift apart as one rank does with another thread count (measured at 512x512: third losses 0.0081 "
            "apart between 1 and 2 threads on one rank, 0.0063 between 1 and 2 ranks); exactness is pinned in "
            "float64 by tests/parallel/test_parallel_deepspeed.py.",
            "Step s is wall time per iteration after the first; on a shared CPU it depends on the load, "
            "compare CPU-s. Ranks on one host share its cores.",
            f"Band rows: multiples of {multiple} (the network's total stride), the last band uneven.",
            *([f"The {height * ranks[-1]}x{width} rows: {ranks[-1]} ranks on {ranks[-1]} times the pixels, each rank's "
               "band as tall as the one-rank scene; Peak / one rank <= 1 means they hold that many times the pixels "
               "one rank holds under a cap of the one-rank peak."] if args.larger else []),
            f"Total benchmark wall time {time.perf_counter() - started:.0f} s.",
        ],
    )
    for path in write_report(report, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
