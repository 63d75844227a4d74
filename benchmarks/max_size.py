"""The largest square holistic training sample that fits a memory cap, per memory mode.

For each mode: grow the side geometrically from ``--start`` until a probe does not fit, then
bisect between the last fitting and the first failing side down to ``--resolution`` pixels.
Every probe is one training step in a fresh process under the RSS cap (killed when it passes
it; the kernel's exact peak decides afterwards).

    python benchmarks/max_size.py --out benchmarks/results --cap 3 [--quick] [--model ehsnet]
"""

from __future__ import annotations

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
    run_config,
    benchmark_parser,
    parse_benchmark_args,
    write_report,
)



COLUMNS = [
    Column("memory_mode", "Memory mode"),
    Column("cap_gib", "Cap GiB", 2),
    Column("max_side", "Largest side that fits px", 0, "none fits"),
    Column("max_megapixels", "Mpx", 2),
    Column("first_failing_side", "Smallest failing side px", 0, "not reached"),
    Column("host_peak_gib_at_max", "Peak RSS at max GiB", 3),
    Column("saved_activation_mib_at_max", "Saved act. at max MiB", 1),
    Column("step_s_at_max", "Step s at max", 2),
    Column("probes", "Probes", 0),
]


def _round(side: float, resolution: int) -> int:
    """``side`` rounded down to a multiple of ``resolution`` (at least ``resolution``)."""
    return max(resolution, int(side) // resolution * resolution)


def search(
    probe: Any, start: int, limit: int, resolution: int, growth: float = 2.0
) -> tuple[int | None, int | None, dict[int, Any]]:
    """Find the largest side ``s <= limit`` (multiple of ``resolution``) with ``probe(s).fits``.

    Assumes fitting is monotone in the side. Grows ``start`` by ``growth`` until a failure or
    ``limit``, then bisects.

    Args:
        probe: ``probe(side) -> IsolatedRun``-like object with ``.fits``.
        start: first side tried.
        limit: largest side tried.
        resolution: sides are multiples of this; the answer is exact to it.
        growth: geometric growth factor of the first phase.

    Returns:
        ``(largest fitting side or None, smallest failing side or None, {side: probe result})``.
    """
    runs: dict[int, Any] = {}

    def fits(side: int) -> bool:
        if side not in runs:
            runs[side] = probe(side)
        return bool(runs[side].fits)

    side = _round(start, resolution)
    if not fits(side):
        # shrink until something fits (or nothing does)
        high = side
        while side > resolution:
            side = _round(side / growth, resolution)
            if fits(side):
                break
            high = side
        else:
            return None, high, runs
        low = side
    else:
        low, high = side, None
        while high is None and low < limit:
            nxt = min(_round(low * growth, resolution), _round(limit, resolution))
            if nxt <= low:
                break
            if fits(nxt):
                low = nxt
            else:
                high = nxt
    if high is None:
        return low, None, runs
    while high - low > resolution:
        mid = _round((low + high) / 2, resolution)
        if mid <= low:
            break
        if fits(mid):
            low = mid
        else:
            high = mid
    return low, high, runs


def main(argv: list[str] | None = None) -> int:
    """Run the search for each mode and write ``max_size.{md,csv,json}``."""
    parser = benchmark_parser(__doc__.splitlines()[0], quick="tiny cap and sizes for the test suite",
                              cap=(None, "RSS cap in GiB (default 3; quick 1.0)"), model=True, modes=True)
    parser.add_argument("--start", type=int, default=None, help="first side tried (default 1024; quick 128)")
    parser.add_argument("--limit", type=int, default=16384, help="largest side tried")
    parser.add_argument("--resolution", type=int, default=None, help="answer granularity px (default 64)")
    parser.add_argument("--steps", type=int, default=2,
                        help="training steps per probe (default 2: the optimizer state exists from the first "
                             "step on, so the second step's peak is the sustained one)")
    parser.add_argument("--growth", type=float, default=2.0, help="growth factor before bisection (default 2)")
    parser.add_argument("--starts", default="", help="per-mode first sides, e.g. none=768,fullres_bf16=2048")
    parser.add_argument("--bands", type=int, default=4)
    args = parse_benchmark_args(parser, argv, (QUICK_MODES, PRESET_MODES))
    cap = args.cap if args.cap is not None else (1.0 if args.quick else 3.0)
    start = args.start or (128 if args.quick else 1024)
    resolution = args.resolution or 64
    limit = min(args.limit, 256) if args.quick else args.limit
    modes = args.modes
    conditions = (f"{args.model}, batch 1, {args.bands} bands uint8; {args.steps} training steps (forward, loss, "
                  f"backward, optimizer) per probe in a fresh process; RSS cap {cap} GiB (watchdog kill + kernel ru_maxrss); "
                  f"sides multiples of {resolution}. " + args.conditions)
    header = machine_header(conditions, {"cap_gib": cap, "model": args.model})
    rows: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []

    def make_report() -> Report:
        return Report(
            name="max_size",
            title=f"Largest square holistic training sample under {cap} GiB RSS ({args.model})",
            header=header,
            tables=[("Largest size per memory mode", COLUMNS, rows),
                    ("Every probe", [Column("memory_mode", "Mode"), Column("side", "Side", 0),
                                     Column("status", "Status"), Column("host_peak_gib", "Peak RSS GiB", 3)], probes)],
            notes=["Step time is the fastest step after the first. With one step only, the peak misses the "
                   "optimizer state (created in the first step): measured here, +0.25 GiB at 768 px for EHSNet.",
                   "A failing probe is one killed at the cap, or whose kernel peak RSS exceeded it, or that "
                   "raised out-of-memory."],
        )

    for mode in modes:
        def probe(side: int, mode: str = mode) -> Any:
            run = run_config(
                "lrss_ds.engine.probe:probe_training_step",
                {"model": args.model, "height": side, "width": side, "mode": mode, "steps": args.steps,
                 "bands": args.bands},
                cap_gib=cap,
            )
            print(f"[max_size] {mode:>14} {side:>5}px {run.status:>8} rss {run.peak_rss_bytes / GIB:.2f} GiB",
                  flush=True)
            return run

        starts = dict(item.split("=") for item in args.starts.split(",") if item)
        best, failing, runs = search(probe, int(starts.get(mode, start)), limit, resolution, args.growth)
        for side, run in sorted(runs.items()):
            probes.append({"memory_mode": mode, "side": side, "status": run.status,
                           "host_peak_gib": run.peak_rss_bytes / GIB, "error": run.error[-300:]})
        at_max = runs[best] if best is not None else None
        rows.append({
            "memory_mode": mode,
            "cap_gib": cap,
            "max_side": best,
            "max_megapixels": None if best is None else best * best / 1e6,
            "first_failing_side": failing,
            "host_peak_gib_at_max": None if at_max is None else at_max.peak_rss_bytes / GIB,
            "saved_activation_mib_at_max": None if at_max is None
            else at_max.result["saved_activation_peak_bytes"] / MIB,
            "step_s_at_max": None if at_max is None else at_max.result["step_min_s"],
            "probes": len(runs),
        })
        write_report(make_report(), args.out)  # after every mode: a long search keeps what it found
    for path in write_report(make_report(), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
