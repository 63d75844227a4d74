"""Step time and peak memory of one holistic training step against image side, per memory mode.

For each memory mode, square sides from ``--sides`` are measured in turn, each in a fresh
process under the RSS cap, until one does not fit; then ``a * pixels + b`` is fitted to the
device figure (CPU: saved-activation bytes), the peak RSS and the step time, and everything is
drawn to PNG plots (matplotlib, Agg backend).

    python benchmarks/scaling.py --out benchmarks/results [--quick] [--cap 3] [--model ehsnet]
"""

from __future__ import annotations

import math
import sys
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
    Report,
    benchmark_parser,
    parse_benchmark_args,
    write_report,
)

from lrss_ds.engine.plan import fit_linear, measure  # noqa: E402

FULL_SIDES = [256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192]
QUICK_SIDES = [128, 192]

COLUMNS = [
    Column("memory_mode", "Memory mode"),
    Column("side", "Side px", 0),
    Column("status", "Status"),
    Column("device_peak_mib", "Device peak MiB", 0, "n/a (CPU)"),
    Column("saved_activation_mib", "Saved act. on device MiB", 1),
    Column("saved_total_mib", "Saved act. total MiB", 1),
    Column("host_peak_gib", "Host peak RSS GiB", 3),
    Column("step_s", "Step s (wall)", 2),
    Column("step_cpu_s", "Step CPU-s", 2),
]
FIT_COLUMNS = [
    Column("memory_mode", "Memory mode"),
    Column("points", "Points", 0),
    Column("largest_fitting_side", "Largest measured side that fit", 0),
    Column("saved_bytes_per_px", "Saved act. bytes/px", 1),
    Column("host_bytes_per_px", "Host RSS bytes/px", 1),
    Column("host_base_gib", "Host RSS base GiB", 3),
    Column("step_us_per_px", "Step wall µs/px", 3),
    Column("step_cpu_us_per_px", "Step CPU-µs/px", 3),
]


def measure_mode(
    model: str, mode: str, sides: list[int], cap_gib: float, bands: int, steps: int, cache: Path | None,
    keep_going: bool = False,
) -> list[dict[str, Any]]:
    """Measure ``mode`` at increasing ``sides`` until one does not fit; one row per probe.

    Measurements go through the planner's cache (``lrss_ds.engine.plan.measure``), so
    ``plan_accuracy.py --cache`` with the same folder reuses them instead of measuring again.
    """
    rows = []
    for side in sides:
        found = measure(model, side, mode, bands=bands, cap_bytes=int(cap_gib * GIB), cache_dir=cache, steps=steps)
        res = found.probe
        row: dict[str, Any] = {"memory_mode": mode, "side": side, "pixels": side * side, "status": found.status,
                               "device_peak_mib": None}
        if found.status == "ok":
            row.update(
                host_peak_gib=found.host_bytes / GIB,
                saved_activation_mib=res["saved_activation_peak_bytes"] / MIB,
                saved_total_mib=res["saved_total_peak_bytes"] / MIB,
                device_peak_mib=None if res["device_peak_bytes"] is None else res["device_peak_bytes"] / MIB,
                step_s=found.step_s,
                step_cpu_s=found.step_cpu_s,
            )
        else:
            row["host_peak_gib"] = res.get("peak_rss_bytes", 0) / GIB
            row["error"] = res.get("error", "")[-500:]
        rows.append(row)
        print(f"[scaling] {mode:>14} {side:>5}px {found.status:>8} rss {row['host_peak_gib']:.2f} GiB "
              f"step {row.get('step_s', math.nan):.2f} s", flush=True)
        if found.status != "ok" and not keep_going:
            break
    return rows


def fit_rows(mode: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit bytes/pixel and seconds/pixel of ``mode`` from its fitting rows."""
    good = [r for r in rows if r["memory_mode"] == mode and r["status"] == "ok"]
    out: dict[str, Any] = {"memory_mode": mode, "points": len(good),
                           "largest_fitting_side": max((r["side"] for r in good), default=None)}
    if len(good) >= 2:
        px = [float(r["pixels"]) for r in good]
        saved = fit_linear(px, [r["saved_activation_mib"] * MIB for r in good])
        host = fit_linear(px, [r["host_peak_gib"] * GIB for r in good])
        step = fit_linear(px, [r["step_s"] for r in good])
        step_cpu = fit_linear(px, [r["step_cpu_s"] for r in good])
        out.update(saved_bytes_per_px=saved.per_pixel, host_bytes_per_px=host.per_pixel,
                   host_base_gib=host.base / GIB, step_us_per_px=step.per_pixel * 1e6,
                   step_cpu_us_per_px=step_cpu.per_pixel * 1e6)
    return out


def plot(rows: list[dict[str, Any]], modes: list[str], out_dir: Path, stem: str) -> list[Path]:
    """Draw host RSS, saved activations and step time against megapixels; one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, scale in (
        ("host_peak_gib", "peak RSS (GiB)", 1.0),
        ("saved_activation_mib", "saved activations on device (GiB)", 1 / 1024),
        ("step_s", "training step, wall-clock (s)", 1.0),
        ("step_cpu_s", "training step, CPU seconds (all threads)", 1.0),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for mode in modes:
            good = [r for r in rows if r["memory_mode"] == mode and r["status"] == "ok"]
            if good:
                ax.plot([r["pixels"] / 1e6 for r in good], [r[key] * scale for r in good], marker="o", label=mode)
        ax.set_xlabel("image pixels (Mpx, square)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}_{key}.png"
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the scaling benchmark and write ``scaling.{md,csv,json}`` and PNG plots."""
    parser = benchmark_parser(__doc__.splitlines()[0], quick="tiny sizes for the test suite",
                              cap=(3.0, "RSS cap per probe, GiB (default 3)"), model=True, modes=True)
    parser.add_argument("--sides", default=None, help="comma-separated square sides")
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="training steps per probe (time: fastest after the first)")
    parser.add_argument("--keep-going", action="store_true",
                        help="measure the larger sides of a mode after one does not fit (a size-specific spike)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="planner measurement cache to fill and reuse (plan_accuracy.py --cache reads it)")
    args = parse_benchmark_args(parser, argv, (QUICK_MODES, PRESET_MODES))
    modes = args.modes
    sides = [int(s) for s in args.sides.split(",")] if args.sides else (QUICK_SIDES if args.quick else FULL_SIDES)
    conditions = (f"{args.model}, batch 1, {args.bands} bands uint8, random labels; each point a fresh process "
                  f"under a {args.cap} GiB RSS cap; {args.steps} steps, time = fastest after the first. "
                  + args.conditions)
    header = machine_header(conditions, {"cap_gib": args.cap, "model": args.model})
    rows: list[dict[str, Any]] = []
    for mode in modes:
        rows += measure_mode(args.model, mode, sides, args.cap, args.bands, args.steps, args.cache, args.keep_going)
    fits = [fit_rows(mode, rows) for mode in modes]
    args.out.mkdir(parents=True, exist_ok=True)
    pngs = plot(rows, modes, args.out, "scaling")
    report = Report(
        name="scaling",
        title=f"Holistic training step vs image side ({args.model})",
        header=header,
        tables=[("Measurements", COLUMNS, rows), ("Fitted growth per pixel", FIT_COLUMNS, fits)],
        notes=[
            "Device peak is the accelerator allocator's; on CPU there is none (n/a). 'Saved act. on device' "
            "is the ledger's peak of saved activations not offloaded; 'total' adds the offloaded ones "
            "(on CPU offloaded bytes are still in RAM, so RSS is the honest figure there).",
            "A point stops a mode's series when it does not fit the cap (status over_cap/oom).",
            "Plots: " + ", ".join(p.name for p in pngs),
        ],
        data={"fits": fits},
    )
    for path in write_report(report, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
