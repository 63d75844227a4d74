"""How well ``lrss-ds plan`` predicts: its per-mode fit against measurements at two held-out sizes.

The planner fits ``a * pixels + b`` per memory mode to training steps measured at the fit sides;
this script measures two larger sides not used for the fit (each in a fresh process) and reports
the relative error of the predicted device figure (CPU: the simulated device peak), peak RSS and
step time, plus the recommendation ``lrss-ds plan`` gives for a whole FBP scene.

    python benchmarks/plan_accuracy.py --out benchmarks/results [--quick]
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    PRESET_MODES,
    QUICK_MODES,
    GIB,
    MIB,
    Column,
    machine_header,
    parse_bytes,
    parse_size,
    Report,
    benchmark_parser,
    parse_benchmark_args,
    write_report,
)

from lrss_ds.engine.plan import fit_modes, make_plan, measure, relative_error  # noqa: E402


COLUMNS = [
    Column("memory_mode", "Memory mode"),
    Column("side", "Held-out side px", 0),
    Column("measured_device_mib", "Measured device* MiB", 1),
    Column("predicted_device_mib", "Predicted device* MiB", 1),
    Column("device_error_pct", "Device* error %", 1),
    Column("measured_host_gib", "Measured RSS GiB", 3),
    Column("predicted_host_gib", "Predicted RSS GiB", 3),
    Column("host_error_pct", "RSS error %", 1),
    Column("measured_step_s", "Measured step s", 2),
    Column("predicted_step_s", "Predicted step s", 2),
    Column("step_error_pct", "Step error %", 1),
]
FIT_COLUMNS = [
    Column("memory_mode", "Memory mode"),
    Column("device_bytes_per_px", "Device* bytes/px", 1),
    Column("host_bytes_per_px", "RSS bytes/px", 1),
    Column("host_base_gib", "RSS base GiB", 3),
    Column("step_us_per_px", "Step µs/px", 3),
]
PREDICTION_COLUMNS = [
    Column("mode", "Memory mode"),
    Column("device_gib", "Predicted device* GiB", 2),
    Column("host_gib", "Predicted RSS GiB", 2),
    Column("step_s", "Predicted step s", 1),
    Column("fits", "Fits budgets"),
    Column("max_side", "Largest fitting side", 0),
]


def _pct(value: float) -> float | None:
    return None if value != value else 100.0 * value  # NaN -> None


def main(argv: list[str] | None = None) -> int:
    """Fit, validate at the held-out sides and write ``plan.{md,csv,json}``."""
    parser = benchmark_parser(__doc__.splitlines()[0], quick="tiny sizes for the test suite",
                              cap=(6.0, "RSS cap per probe, GiB"), model=True, modes=True)
    parser.add_argument("--fit-sides", default=None, help="sides for the fit (default 256,384,512; quick 128,160)")
    parser.add_argument("--check-sides", default=None, help="two held-out sides (default 768,1024; quick 192,224)")
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument("--target", default="6800x7200", help="size the recommendation is made for")
    parser.add_argument("--device-mem", default="24G", help="device budget of the recommendation")
    parser.add_argument("--host-mem", default="20G", help="host budget of the recommendation")
    parser.add_argument("--cache", type=Path, default=None, help="measurement cache (default: none, measure afresh)")
    args = parse_benchmark_args(parser, argv, (QUICK_MODES, PRESET_MODES))
    fit_sides = [int(s) for s in (args.fit_sides or ("128,160" if args.quick else "256,384,512")).split(",")]
    check_sides = [int(s) for s in (args.check_sides or ("192,224" if args.quick else "768,1024")).split(",")]
    modes = args.modes
    cap = int(args.cap * GIB)
    conditions = (f"{args.model}, {args.bands} bands; fit on sides {fit_sides}, checked at {check_sides} "
                  f"(not in the fit); every measurement a fresh process (2 training steps, time = the second). "
                  "Device* on CPU = the simulated device peak (lrss_ds.memory.device_sim). " + args.conditions)
    header = machine_header(conditions, {"cap_gib": args.cap, "model": args.model})
    # A cache shared by the fit, the check and the final `make_plan`, so nothing is measured twice.
    cache = args.cache or Path(tempfile.mkdtemp(prefix="lrss_plan_"))

    def run(side: int, mode: str) -> Any:
        found = measure(args.model, side, mode, bands=args.bands, cap_bytes=cap, cache_dir=cache)
        print(f"[plan] {mode:>14} {side:>5}px {found.status:>8} rss {found.host_bytes / GIB:.3f} GiB "
              f"dev* {found.device_bytes / MIB:.1f} MiB step {found.step_s:.2f} s", flush=True)
        return found

    fit_points = [run(side, mode) for mode in modes for side in fit_sides]
    fits = fit_modes(fit_points)
    rows: list[dict[str, Any]] = []
    for mode in modes:
        for side in check_sides:
            found = run(side, mode)
            row: dict[str, Any] = {"memory_mode": mode, "side": side, "status": found.status}
            if found.status == "ok" and mode in fits:
                px = float(side * side)
                f = fits[mode]
                pred_dev, pred_host, pred_step = f["device_bytes"](px), f["host_bytes"](px), f["step_s"](px)
                row.update(
                    measured_device_mib=found.device_bytes / MIB, predicted_device_mib=pred_dev / MIB,
                    device_error_pct=_pct(relative_error(pred_dev, found.device_bytes)),
                    measured_host_gib=found.host_bytes / GIB, predicted_host_gib=pred_host / GIB,
                    host_error_pct=_pct(relative_error(pred_host, found.host_bytes)),
                    measured_step_s=found.step_s, predicted_step_s=pred_step,
                    step_error_pct=_pct(relative_error(pred_step, found.step_s)),
                )
            rows.append(row)
    fit_rows = [
        {"memory_mode": mode, "device_bytes_per_px": f["device_bytes"].per_pixel,
         "host_bytes_per_px": f["host_bytes"].per_pixel, "host_base_gib": f["host_bytes"].base / GIB,
         "step_us_per_px": f["step_s"].per_pixel * 1e6}
        for mode, f in fits.items()
    ]
    errors = [abs(r[k]) for r in rows for k in ("device_error_pct", "host_error_pct") if r.get(k) is not None]
    worst = max(errors) if errors else None
    height, width = parse_size(args.target)
    plan = make_plan(args.model, height, width, device_mem=parse_bytes(args.device_mem),
                     host_mem=parse_bytes(args.host_mem), modes=modes, fit_sides=fit_sides, bands=args.bands,
                     probe_cap=cap, cache_dir=cache)
    prediction_rows = [{"mode": p["mode"], "device_gib": p["device_bytes"] / GIB, "host_gib": p["host_bytes"] / GIB,
                        "step_s": p["step_s"], "fits": p["fits"], "max_side": p["max_side"]}
                       for p in plan["predictions"]]
    tables = [("Planner error at held-out sizes", COLUMNS, rows), ("Fits", FIT_COLUMNS, fit_rows)]
    tables.append((f"lrss-ds plan --size {args.target} --device-mem {args.device_mem} --host-mem {args.host_mem}"
                       f" (recommendation: {plan['recommendation']})", PREDICTION_COLUMNS, prediction_rows))
    report = Report(
        name="plan",
        title=f"Memory planner accuracy ({args.model})",
        header=header,
        tables=tables,
        notes=[f"Worst absolute memory error (device* and RSS) over held-out points: "
               f"{'n/a' if worst is None else f'{worst:.1f}%'}; target <= 10%.",
               "Step-time errors are reported but not part of the target (timings are contended here).",
               "Device* on CPU is the simulated device peak (lrss_ds.memory.device_sim), not a measured "
               "allocator peak."],
        data={"worst_memory_error_pct": worst, "fit_points": [dataclasses.asdict(m) for m in fit_points],
              "plan": plan},
    )
    for path in write_report(report, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
