"""Shared benchmark plumbing: the common options, fresh capped processes, the machine header, the report writers.

Every benchmark configuration runs in its own fresh Python process (``run_config``), so one
configuration's heap, allocator caches and imported kernels never colour the next one's peak.
Reports are written three ways from the same rows: Markdown for people, CSV for spreadsheets and
JSON for programs, each under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from lrss_ds.engine.isolated import IsolatedRun, run_isolated  # noqa: E402
from lrss_ds.engine.plan_cli import parse_bytes, parse_size  # noqa: E402
from lrss_ds.engine.probe import PLAN_SETUPS  # noqa: E402
from lrss_ds.engine.temporaries import write_text_atomically  # noqa: E402

from lrss_ds.units import GIB, MIB  # noqa: E402

# glibc's default allocator keeps freed blocks below its dynamic mmap threshold (which grows to
# 32 MiB) in the heap: a training step's peak RSS then holds 1.5-1.7x the live tensor peak
# (fullscene_train.json), and a spatial rank, whose band-sized tensors are more of them, 45-100
# MiB more than the one-rank run's fixed part and half its activations at 512-1024 px (EHSNet,
# ds_configs/cpu.json; with this setting, none). Serving every block >= 128 KiB by mmap returns
# each block when it is freed, so peaks measure the tensors, as a run with this setting trains.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

# The --modes defaults, derived from the planner's setups (themselves from
# lrss_ds.memory.modes.PLANNED_PRESETS), so a new preset reaches every benchmark: all setups;
# the presets alone, without DeepSpeed's own ZeRO offload on top; the two a --quick run takes.
ALL_MODES: list[str] = list(PLAN_SETUPS)
PRESET_MODES: list[str] = [name for name, setup in PLAN_SETUPS.items() if name == setup.memory_preset]
QUICK_MODES: list[str] = ["none", "ckpt_stage"]

__all__ = [
    "GIB",
    "MIB",
    "ALL_MODES",
    "PRESET_MODES",
    "QUICK_MODES",
    "IsolatedRun",
    "benchmark_parser",
    "parse_benchmark_args",
    "Column",
    "Report",
    "run_config",
    "machine_header",
    "machine_load",
    "cpu_model",
    "parse_size",
    "parse_bytes",
    "write_report",
    "write_json_and_markdown",
    "write_text_atomically",
    "fmt",
]


def run_config(
    target: str,
    params: dict[str, Any],
    *,
    cap_gib: float | None = None,
    timeout_s: float = 1800.0,
    env: dict[str, str] | None = None,
    threads: int | None = None,
) -> IsolatedRun:
    """Run one benchmark configuration in a fresh process, optionally under a memory cap.

    Args:
        target: ``"module:function"``; modules in ``benchmarks/`` are importable by bare name
            (e.g. ``"_workloads:train_step"``).
        params: JSON-able keyword arguments.
        cap_gib: resident-set cap in GiB; a child passing it is killed and reported
            ``over_cap``. ``None``: no cap.
        timeout_s: wall-clock limit for the child.
        env: extra environment variables (e.g. ``MALLOC_MMAP_THRESHOLD_``).
        threads: intra-op threads of the child (``OMP_NUM_THREADS``); ``None`` = torch's
            default. One thread keeps timings meaningful on an oversubscribed machine, where
            OpenMP barriers wait for descheduled threads.

    Returns:
        The child's ``IsolatedRun`` (status, result dict, exact peak RSS, wall and CPU seconds).
    """
    cap = None if cap_gib is None else int(cap_gib * GIB)
    child_env = dict(env or {})
    if threads is not None:
        child_env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return run_isolated(
        target, params, cap_bytes=cap, timeout_s=timeout_s, env=child_env, sys_path=[BENCH_DIR]
    )


def benchmark_parser(
    description: str,
    *,
    out: Path | None = None,
    quick: str | None = None,
    cap: tuple[float | None, str] | None = None,
    model: bool = False,
    modes: bool = False,
    conditions: bool = True,
    out_help: str = "output folder",
    threads: int | None = None,
) -> argparse.ArgumentParser:
    """A parser with the options benchmarks share, each added where the benchmark uses it.

    ``--out`` and ``--threads`` (intra-op threads of every child process) are always there; read
    the arguments with :func:`parse_benchmark_args`, which validates ``--modes`` and applies
    ``--threads``.

    Args:
        description: the parser's description (the script's first docstring line).
        out: the default output folder; ``None`` makes ``--out`` required.
        quick: help of ``--quick`` (tiny sizes for the test suite); ``None``: no ``--quick``.
        cap: ``(default GiB, help)`` of ``--cap``, the RSS cap per configuration; ``None``: no ``--cap``.
        model: add ``--model`` (default ``ehsnet``).
        modes: add ``--modes``, comma-separated ``PLAN_SETUPS`` names.
        conditions: add ``--conditions``, text added to the report's conditions line.
        out_help: the help of ``--out`` (a benchmark writing named files says what it names).
        threads: the default of ``--threads`` (``None``: torch's own).

    Returns:
        The parser; the script adds its own options.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=out is None, default=out, help=out_help)
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    if model:
        parser.add_argument("--model", default="ehsnet")
    if modes:
        parser.add_argument("--modes", default=None, help=f"comma-separated memory modes of {', '.join(PLAN_SETUPS)}")
    if cap is not None:
        parser.add_argument("--cap", type=float, default=cap[0], help=cap[1])
    if conditions:
        parser.add_argument("--conditions", default="", help="text added to the conditions line")
    default_threads = "torch's" if threads is None else str(threads)
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"intra-op threads per configuration (default: {default_threads}); 1 on a shared machine")
    return parser


def parse_benchmark_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    default_modes: tuple[Sequence[str], Sequence[str]] | None = None,
) -> argparse.Namespace:
    """Parse ``argv``; turn ``--modes`` into a checked list; make every child use ``--threads`` threads.

    Args:
        parser: from :func:`benchmark_parser`.
        argv: the arguments (``None``: ``sys.argv[1:]``).
        default_modes: ``(quick, full)`` mode lists used when ``--modes`` is not given
            (default: ``ALL_MODES`` for both).

    Returns:
        The arguments; ``modes`` (when the parser has it) is a list of ``PLAN_SETUPS`` names.
        An unknown mode ends the program with the parser's one-line error.
    """
    args = parser.parse_args(argv)
    if hasattr(args, "modes"):
        quick_modes, full_modes = default_modes or (ALL_MODES, ALL_MODES)
        default = quick_modes if getattr(args, "quick", False) else full_modes
        args.modes = [m for m in args.modes.split(",") if m] if args.modes else list(default)
        for mode in args.modes:
            if mode not in PLAN_SETUPS:
                parser.error(f"--modes: unknown memory mode {mode!r}; use some of {list(PLAN_SETUPS)}")
    set_child_threads(args.threads)
    return args


def set_child_threads(threads: int | None) -> None:
    """Make every child started from now on use ``threads`` intra-op threads (None: default)."""
    if threads is not None:
        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _git_commit() -> str:
    """The checkout's commit (with ``+dirty`` when tracked files differ), or ``"unknown"``.

    ``LRSS_BENCH_COMMIT`` overrides it, for runs from an exported snapshot (``git archive``).
    """
    if os.environ.get("LRSS_BENCH_COMMIT"):
        return os.environ["LRSS_BENCH_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_load() -> dict[str, Any]:
    """What else is running: load averages and the busiest other processes' CPU and RSS."""
    import psutil

    me = os.getpid()
    procs = []
    for proc in psutil.process_iter(["pid", "name", "memory_info", "cpu_percent"]):
        if proc.info["pid"] == me or proc.info["memory_info"] is None:
            continue
        procs.append(proc)
    load1, load5, load15 = os.getloadavg()
    rss_others = sum(p.info["memory_info"].rss for p in procs)
    return {
        "loadavg_1_5_15": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "other_processes_rss_gib": round(rss_others / GIB, 2),
        "available_gib": round(psutil.virtual_memory().available / GIB, 2),
    }


def machine_header(conditions: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe the machine, the versions and the conditions a report was measured under.

    Args:
        conditions: free text said next to every table (what was running alongside, caps,
            sizes, thread counts...).
        extra: more key/value pairs (e.g. the cap used).

    Returns:
        A JSON-able dict: date, host CPU, cores, RAM, the accelerator (name, device, backend,
        as ``lrss_ds.engine.setup.accelerator_summary`` reports it in this process, which
        starts the children with the same environment), OS, Python/torch/DeepSpeed/numpy
        versions, git commit, torch threads, allocator settings, load, conditions.
    """
    import numpy
    import psutil
    import torch

    from lrss_ds.engine.setup import accelerator_summary

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception:  # noqa: BLE001 - the header still says which one is missing
        ds_version = "not importable"
    header = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "accelerator": accelerator_summary(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "numpy": numpy.__version__,
        "git_commit": _git_commit(),
        "torch_threads": torch.get_num_threads(),
        "child_threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"),
        "load_at_start": machine_load(),
        "conditions": conditions,
    }
    header.update(extra or {})
    return header


@dataclass
class Column:
    """One column of a report table.

    Attributes:
        key: the row key (also the CSV/JSON key).
        title: the Markdown heading.
        digits: decimals shown in Markdown (JSON and CSV keep the full value).
        none_text: what Markdown shows for ``None`` (e.g. ``"n/a (CPU)"``).
    """

    key: str
    title: str
    digits: int = 2
    none_text: str = "—"


@dataclass
class Report:
    """A benchmark report: a header, named tables of rows, and notes.

    Attributes:
        name: file stem (``memory_time`` -> ``memory_time.md/.csv/.json``).
        title: Markdown title.
        header: ``machine_header()`` output.
        tables: list of ``(table title, columns, rows)``; the first table is the CSV one.
        notes: paragraphs printed after the tables (conditions, what each column means).
        data: more JSON-only content (fits, paper figures...).
    """

    name: str
    title: str
    header: dict[str, Any]
    tables: list[tuple[str, list[Column], list[dict[str, Any]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def fmt(value: Any, digits: int = 2, none_text: str = "—") -> str:
    """Format one cell for Markdown: numbers rounded, ``None`` as ``none_text``."""
    if value is None:
        return none_text
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> str:
    """Render rows as a GitHub Markdown table."""
    lines = [
        "| " + " | ".join(c.title for c in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        cells = [fmt(row.get(c.key), c.digits, c.none_text) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What the Markdown says of each earlier run a report reuses; the JSON keeps their whole headers.
_EARLIER_RUN_KEYS = ("date", "git_commit", "load_at_start", "conditions")


def _header_markdown(header: dict[str, Any]) -> str:
    """The header as a bullet list; earlier runs' headers (``{folder: header}``) one sub-bullet each."""
    lines = []
    for key, value in header.items():
        if isinstance(value, dict) and value and all(isinstance(run, dict) and "date" in run for run in value.values()):
            lines.append(f"- **{key}**:")
            for folder, run in value.items():
                summary = "; ".join(f"{name} {_flat(run[name])}" for name in _EARLIER_RUN_KEYS if name in run)
                lines.append(f"  - {folder}: {summary}")
            continue
        lines.append(f"- **{key}**: {_flat(value)}")
    return "\n".join(lines)


def _flat(value: Any) -> str:
    """A header value on one line (a dict as ``k=v, ...``)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """Write ``report`` as ``<name>.md``, ``<name>.csv`` (first table) and ``<name>.json``.

    Args:
        report: the report.
        out_dir: destination folder (created).

    Returns:
        The three paths written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {report.title}", "", "## Machine and conditions", "", _header_markdown(report.header)]
    for title, columns, rows in report.tables:
        parts += ["", f"## {title}", "", markdown_table(columns, rows)]
    if report.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]

    csv_path = out_dir / f"{report.name}.csv"
    buffer = io.StringIO()
    if report.tables:
        _, columns, rows = report.tables[0]
        keys = [c.key for c in columns]
        keys += sorted({k for r in rows for k in r} - set(keys))
        writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in keys})
    write_text_atomically(csv_path, buffer.getvalue())

    payload = {
        "title": report.title,
        "header": report.header,
        "rows": report.tables[0][2] if report.tables else [],
        "tables": {title: rows for title, _, rows in report.tables},
        "notes": report.notes,
        **report.data,
    }
    json_path, md_path = write_json_and_markdown(out_dir / f"{report.name}.json", payload, "\n".join(parts) + "\n")
    return [md_path, csv_path, json_path]


def write_json_and_markdown(json_path: Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``payload`` as ``json_path`` and ``markdown`` beside it (``.md``), each atomically.

    For reports whose Markdown is prose around their own tables; :func:`write_report` writes
    row tables through it.

    Args:
        json_path: the JSON file (its folder is created).
        payload: JSON-able result (values JSON cannot hold are written as ``str``).
        markdown: the Markdown text.

    Returns:
        ``(json path, markdown path)``.
    """
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path = json_path.with_suffix(".md")
    write_text_atomically(md_path, markdown)
    write_text_atomically(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    return json_path, md_path


def _csv_cell(value: Any) -> Any:
    """CSV cell: ``None`` as empty, containers as JSON."""
    if value is None:
        return ""
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value)
    return value
