"""The benchmark harness: report files, the machine header and max_size's bisection."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402
import max_size  # noqa: E402


def test_report_writes_markdown_csv_and_json(tmp_path: Path) -> None:
    columns = [_harness.Column("name", "Name"), _harness.Column("mib", "MiB", 1),
               _harness.Column("device", "Device", 0, "n/a (CPU)")]
    rows = [{"name": "a|b", "mib": 1.234, "device": None}, {"name": "c", "mib": 2.0, "device": 3.0}]
    report = _harness.Report("demo", "Demo", {"cpu": "x"}, [("Rows", columns, rows)], notes=["n"])
    md, csv_path, json_path = _harness.write_report(report, tmp_path)
    text = md.read_text()
    assert "| Name | MiB | Device |" in text and "| a\\|b | 1.2 | n/a (CPU) |" in text
    with open(csv_path) as f:
        read = list(csv.DictReader(f))
    assert read[0]["device"] == "" and read[1]["mib"] == "2.0"
    payload = json.loads(json_path.read_text())
    assert payload["rows"][0]["device"] is None and payload["header"] == {"cpu": "x"}
    assert not list(tmp_path.glob("*.tmp"))


def test_report_markdown_names_each_earlier_run_once(tmp_path: Path) -> None:
    """Reused runs' headers nest their own reused runs: the Markdown gives each folder one line
    (date, commit, load, conditions), the JSON keeps every header whole."""
    inner = {"date": "d0", "git_commit": "c0", "conditions": "old"}
    earlier = {"date": "d1", "git_commit": "c1", "load_at_start": {"loadavg_1_5_15": [0.1, 0.2, 0.3]},
               "conditions": "budget 480", "torch": "2.13", "training_from": {"/runs/old": inner}}
    header = {"cpu": "x", "accelerator": {"name": "cpu", "device": "cpu"}, "training_from": {"/runs/a": earlier}}
    md, _, json_path = _harness.write_report(_harness.Report("demo", "Demo", header, []), tmp_path)
    text = md.read_text()
    assert "- **accelerator**: name=cpu, device=cpu" in text
    assert "- **training_from**:\n  - /runs/a: date d1; git_commit c1; load_at_start loadavg_1_5_15=[0.1, 0.2, 0.3]; " \
           "conditions budget 480\n" in text
    assert "/runs/old" not in text and "2.13" not in text
    assert json.loads(json_path.read_text())["header"]["training_from"]["/runs/a"]["training_from"]["/runs/old"] == inner


def test_machine_header_names_versions_and_conditions() -> None:
    header = _harness.machine_header("shared machine")
    for key in ("date", "cpu", "logical_cores", "ram_gib", "torch", "deepspeed", "git_commit", "conditions"):
        assert header[key] not in (None, "")
    assert header["conditions"] == "shared machine"


class _Fake:
    def __init__(self, fits: bool) -> None:
        self.fits = fits


@pytest.mark.parametrize("limit", [20, 700, 1000, 1024, 5000, 100000])
def test_bisection_finds_the_largest_fitting_side(limit: int) -> None:
    best, failing, runs = max_size.search(lambda side: _Fake(side <= limit), 1024, 16384, 64)
    expected = None if limit < 64 else min(limit // 64 * 64, 16384)
    assert best == expected
    if best is not None and failing is not None:
        assert 0 < failing - best <= 64
    assert len(runs) <= 12


def test_benchmark_options_check_modes_and_set_child_threads(monkeypatch, capsys) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)

    def parse(*argv: str):
        parser = _harness.benchmark_parser("demo", quick="tiny", cap=(3.0, "cap GiB"), model=True, modes=True)
        return _harness.parse_benchmark_args(parser, ["--out", "x", *argv], (["none"], ["none", "ckpt_stage"]))

    args = parse("--quick", "--threads", "1")
    assert args.modes == ["none"] and args.cap == 3.0 and args.model == "ehsnet" and args.out == Path("x")
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert parse().modes == ["none", "ckpt_stage"]
    assert parse("--modes", "fullres_bf16,ckpt_stage").modes == ["fullres_bf16", "ckpt_stage"]
    with pytest.raises(SystemExit):
        parse("--modes", "none,turbo")
    assert "--modes: unknown memory mode 'turbo'" in capsys.readouterr().err


def test_benchmark_mode_lists_come_from_the_planner_setups() -> None:
    from lrss_ds.memory.modes import PLANNED_PRESETS

    assert _harness.ALL_MODES == list(_harness.PLAN_SETUPS)
    assert _harness.PRESET_MODES == list(PLANNED_PRESETS)
    assert set(_harness.QUICK_MODES) <= set(_harness.PRESET_MODES)
