"""Does bf16 autocast train like fp32? The main job's experiment in both precisions, several seeds.

Issue 4 asks to show bf16 converging like fp32 on the synthetic task before bf16 becomes a
default. This trains ``ds_configs/ehsnet_synthetic.yaml`` (the main job: EHSNet-W18, ZeRO-2 with
the optimizer offloaded, stage checkpointing) with ``memory.bf16`` off and on, for each seed, each
run a fresh ``lrss-ds train`` process, and compares the loss curves and the evaluations (eval-mode
BatchNorm included: the issue saw running statistics go wrong under bf16 once; the memory mode
keeps weights and BN statistics fp32 and autocasts only the compute).

The verdict compares the bf16-minus-fp32 gap with the seed-to-seed spread of fp32 itself: with a
handful of short runs, "like fp32" can only mean "no further from fp32 than fp32 is from itself
under another seed" (plus a small floor, so two identical fp32 seeds do not make every gap fail).

Usage::

    python benchmarks/bf16_convergence.py --out benchmarks/results            # 2 seeds x 2 precisions
    python benchmarks/bf16_convergence.py --quick --out /tmp/bf16q            # tiny, one seed, for the suite
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:  # run as `python benchmarks/bf16_convergence.py`
    sys.path.insert(0, str(BENCH_DIR.parent))

from benchmarks._harness import (  # noqa: E402
    Column,
    Report,
    benchmark_parser,
    machine_header,
    parse_benchmark_args,
    write_report,
)

REPO_ROOT = BENCH_DIR.parent
EXPERIMENT = REPO_ROOT / "ds_configs" / "ehsnet_synthetic.yaml"
PRECISIONS = ("fp32", "bf16")
TAIL = 20  # iterations averaged for the final loss: single-scene losses jump from scene to scene
# "like fp32": the gap may not exceed the fp32 seed spread, nor these floors (mIoU fraction, loss).
MIOU_FLOOR, LOSS_FLOOR = 0.03, 0.05
QUICK_OVERRIDES = [
    "data.synthetic.height=128", "data.synthetic.width=128", "data.synthetic.train_scenes=2",
    "data.synthetic.val_scenes=1", "train.iterations=4", "train.eval_every=2", "train.checkpoint_every=4",
    "schedule.warmup_iters=1", "schedule.milestones=[3]", "model.options.lrd_k=16", "model.options.lrd_d=16",
]


def train_once(out: Path, precision: str, seed: int, overrides: list[str], threads: int,
               reuse: bool = False) -> dict[str, Any]:
    """Train the experiment once in a fresh process and return what the run recorded.

    With ``reuse``, a finished run already in ``out/runs`` (same precision, seed and overrides)
    is read instead of trained again (its wall time is then the recorded one).

    Returns:
        ``precision``, ``seed``, ``loss`` (per iteration), ``evals`` ([iteration, mIoU] pairs),
        the final evaluation's ``miou``/``oa``/``iou`` per class, ``wall_s`` and ``peak_rss_gib``.
    """
    run_dir = out / "runs" / f"{precision}_seed{seed}"
    # One store per data setting: the store is reused by name, so a --quick store must not
    # stand in for the full one in the same folder.
    data_key = hashlib.sha1(json.dumps(sorted(o for o in overrides if o.startswith("data."))).encode()).hexdigest()[:8]
    command = [
        sys.executable, "-m", "lrss_ds.cli", "train", "--config", str(EXPERIMENT), "--output", str(run_dir),
        f"data.store={out / f'store_{data_key}'}", f"train.seed={seed}",
        f"memory.bf16={'true' if precision == 'bf16' else 'false'}", *overrides,
    ]
    from lrss_ds.engine.demo import launcher_env

    # The node's accelerator: launcher_env sets the CPU one only where no GPU is present.
    env = dict(launcher_env(), OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore::FutureWarning")
    recorded = run_dir / "wall_s.txt"
    settings = run_dir / "overrides.json"
    same = settings.is_file() and json.loads(settings.read_text()) == overrides
    if reuse and same and recorded.is_file() and (run_dir / "metrics.json").is_file():
        wall = float(recorded.read_text())
    else:
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{run_dir}: training exited with status {done.returncode}:\n{done.stdout[-3000:]}")
        recorded.write_text(f"{wall:.3f}\n")
        settings.write_text(json.dumps(overrides) + "\n")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evals_csv = run_dir / "monitor" / "train" / "Val_mIoU.csv"
    with evals_csv.open() as handle:
        evals = [[int(float(row["step"])), float(row["mIoU"])] for row in csv.DictReader(handle)]
    final = metrics["final"]
    return {
        "precision": precision,
        "seed": seed,
        "loss": [h["loss"] for h in metrics["history"]],
        "evals": evals,
        "miou": final["miou"],
        "oa": final["oa"],
        "iou": dict(zip(final["classes"], final["iou"])),
        "wall_s": wall,
        "train_s": metrics.get("seconds"),
        "peak_rss_gib": (metrics.get("memory") or {}).get("peak_rss_gib"),
    }


def _tail_mean(values: list[float], count: int = TAIL) -> float:
    tail = [v for v in values[-count:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else math.nan


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def _curve_gap(a: list[float], b: list[float], window: int) -> float:
    """Mean absolute difference of two loss curves after a moving average over ``window`` steps."""
    def smooth(v: list[float]) -> list[float]:
        return [sum(v[max(0, i - window + 1) : i + 1]) / len(v[max(0, i - window + 1) : i + 1]) for i in range(len(v))]

    sa, sb = smooth(a), smooth(b)
    n = min(len(sa), len(sb))
    return sum(abs(x - y) for x, y in zip(sa[:n], sb[:n])) / max(1, n)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-precision means, the bf16 - fp32 gaps, the fp32 seed spread and the verdict."""
    by = {p: [r for r in runs if r["precision"] == p] for p in PRECISIONS}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731 - two uses
    miou = {p: mean([r["miou"] for r in by[p]]) for p in PRECISIONS}
    loss = {p: mean([_tail_mean(r["loss"]) for r in by[p]]) for p in PRECISIONS}
    window = max(1, min(TAIL, len(runs[0]["loss"]) // 4))
    fp32_by_seed = {r["seed"]: r for r in by["fp32"]}
    same_seed_gaps = [_curve_gap(fp32_by_seed[r["seed"]]["loss"], r["loss"], window) for r in by["bf16"]
                      if r["seed"] in fp32_by_seed]
    seeds = sorted(fp32_by_seed)
    fp32_seed_gaps = [_curve_gap(fp32_by_seed[a]["loss"], fp32_by_seed[b]["loss"], window)
                      for i, a in enumerate(seeds) for b in seeds[i + 1 :]]
    per_seed_gaps = [r["miou"] - fp32_by_seed[r["seed"]]["miou"] for r in by["bf16"] if r["seed"] in fp32_by_seed]
    miou_allowed = max(MIOU_FLOOR, _spread([r["miou"] for r in by["fp32"]]))
    loss_allowed = max(LOSS_FLOOR, _spread([_tail_mean(r["loss"]) for r in by["fp32"]]))
    return {
        "miou_fp32": miou["fp32"], "miou_bf16": miou["bf16"], "miou_gap": miou["bf16"] - miou["fp32"],
        "miou_allowed": miou_allowed,
        # the gap can sit inside the seed spread and still have one sign every time
        "miou_gap_per_seed": [round(g, 4) for g in per_seed_gaps],
        "seeds_bf16_below_fp32": f"{sum(g < 0 for g in per_seed_gaps)} of {len(per_seed_gaps)}",
        "final_loss_fp32": loss["fp32"], "final_loss_bf16": loss["bf16"], "final_loss_gap": loss["bf16"] - loss["fp32"],
        "final_loss_allowed": loss_allowed,
        "curve_gap_bf16_vs_fp32_same_seed": mean(same_seed_gaps) if same_seed_gaps else None,
        "curve_gap_fp32_between_seeds": mean(fp32_seed_gaps) if fp32_seed_gaps else None,
        "smoothing_window": window,
        "converges_like_fp32": abs(miou["bf16"] - miou["fp32"]) <= miou_allowed
        and abs(loss["bf16"] - loss["fp32"]) <= loss_allowed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.splitlines()[0], out=None, quick="tiny scenes and 4 iterations, for the test suite",
                              out_help="output folder (report + runs/ + store/)", threads=2)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; quick: 0)")
    parser.add_argument("--iterations", type=int, default=None, help="train.iterations (default: the experiment's)")
    parser.add_argument("--reuse", action="store_true", help="read finished runs in OUT/runs instead of retraining")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more experiment overrides")
    args = parse_benchmark_args(parser, argv)

    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",") if s.strip()]
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    if args.iterations is not None:
        overrides.append(f"train.iterations={args.iterations}")
    header = machine_header(
        f"{EXPERIMENT.name} with overrides {overrides or 'none'}; seeds {seeds}; each run a fresh "
        f"`lrss-ds train` process (one rank, ZeRO-2 + host optimizer offload) with {args.threads} intra-op "
        f"thread(s), runs one after another. {args.conditions}".strip()
    )
    runs = []
    for seed in seeds:
        for precision in PRECISIONS:
            print(f"[bf16_convergence] {precision} seed {seed} ...", flush=True)
            run = train_once(args.out, precision, seed, overrides, args.threads, args.reuse)
            print(f"[bf16_convergence]   mIoU {run['miou']:.3f}, last-{TAIL} loss {_tail_mean(run['loss']):.3f}, "
                  f"{run['wall_s']:.0f} s", flush=True)
            runs.append(run)
    summary = summarise(runs)
    rows = [{
        "precision": r["precision"], "seed": r["seed"], "iterations": len(r["loss"]), "loss_first": r["loss"][0],
        "final_loss": _tail_mean(r["loss"]), "miou": r["miou"], "oa": r["oa"],
        "river_iou": r["iou"].get("river"), "lake_iou": r["iou"].get("lake"),
        "evals": " ".join(f"{it}:{m:.3f}" for it, m in r["evals"]), "wall_s": r["wall_s"],
        "peak_rss_gib": r["peak_rss_gib"],
    } for r in runs]
    columns = [
        Column("precision", "Precision"), Column("seed", "Seed"), Column("iterations", "Iterations"),
        Column("loss_first", "First loss", 3), Column("final_loss", f"Mean loss, last {TAIL} its", 3),
        Column("miou", "Final val mIoU", 3), Column("oa", "Final val OA", 3), Column("river_iou", "River IoU", 3),
        Column("lake_iou", "Lake IoU", 3), Column("evals", "Val mIoU at iteration"),
        Column("wall_s", "Wall s", 0), Column("peak_rss_gib", "Peak RSS GiB", 2),
    ]
    verdict_row = [{"measure": key, "value": value} for key, value in summary.items()]
    report = Report(
        name="bf16_convergence",
        title=f"bf16 autocast vs fp32 on the main job's synthetic task (measured here, "
              f"{header['accelerator']['name']} accelerator)",
        header=header,
        tables=[("Runs", columns, rows),
                ("bf16 minus fp32, against fp32's own seed spread", [Column("measure", "Measure"),
                                                                     Column("value", "Value", 3)], verdict_row)],
        notes=[
            "Evaluations are eval-mode (BatchNorm running statistics, kept fp32 by memory.bf16) on the val scenes.",
            "The verdict judges the means only; `seeds_bf16_below_fp32` says whether the gap has one sign on every seed.",
            f"Verdict rule: |mIoU gap| <= max({MIOU_FLOOR}, fp32 seed spread) and |last-{TAIL} loss gap| <= "
            f"max({LOSS_FLOOR}, fp32 seed spread). Curve gaps are mean |difference| of moving-average loss curves.",
        ],
        data={"runs": runs, "summary": summary},
    )
    for path in write_report(report, args.out):
        print(f"[bf16_convergence] wrote {path}", flush=True)
    print(f"[bf16_convergence] converges like fp32: {summary['converges_like_fp32']} "
          f"(mIoU gap {summary['miou_gap']:+.3f}, allowed {summary['miou_allowed']:.3f}; loss gap "
          f"{summary['final_loss_gap']:+.3f}, allowed {summary['final_loss_allowed']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
