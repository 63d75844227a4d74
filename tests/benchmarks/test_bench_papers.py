"""Every method of the papers' comparison tables is measured by memory_time or explained in one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _papers  # noqa: E402
import memory_time  # noqa: E402
from _workloads import METHODS  # noqa: E402

# The methods each table names, as printed in /work/shared/papers (ehsnet.txt Tables 1-3, glsnet.txt
# Table 3): written out here so that dropping a row from _papers' tables fails too.
PAPERS_TABLES = {
    "EHSNet T1": {"GoogLeNet", "ResNet", "UNet", "PSPNet", "DeepLabv3+", "UperNet", "HRNet", "STDC", "Swin", "GLNet",
                  "FCtL", "MagNet", "ISDNet", "EHSNet"},
    "EHSNet T2": {"ICNet", "FCN", "DeepLabv3+", "STDC", "GLNet", "CascadePSP", "FCtL", "ISDNet", "EHSNet"},
    "EHSNet T3": {"GLNet", "FCtL", "MagNet", "ISDNet", "EHSNet"},
    "GLSNet T3": {"U-Net", "ICNet", "PSPNet", "SegNet", "DeepLabv3+", "FCN-8s", "Mask2Former", "TransUNet", "GLNet",
                  "GLSNet"},
}
# The required (bold) rows: they must run, not be explained away.
REQUIRED = {"FCtL", "MagNet", "ISDNet", "U-Net", "PSPNet", "DeepLabv3+", "UperNet", "HRNet", "STDC", "SegNet", "ICNet",
            "FCN-8s"}


def test_every_table_method_is_measured_or_explained() -> None:
    for table, names in PAPERS_TABLES.items():
        assert {_papers.paper_method_name(r) for r in _papers.COMPARISON_TABLES[table]} == names, table
    every = set().union(*PAPERS_TABLES.values())
    assert set(_papers.PAPER_METHODS) == every
    for name, entry in _papers.PAPER_METHODS.items():
        assert bool(entry.runs_as) != bool(entry.not_built), f"{name}: measured rows or a reason, not both or neither"
        assert set(entry.runs_as) <= set(METHODS), name
        assert "\n" not in entry.not_built, name
    assert all(_papers.PAPER_METHODS[name].runs_as for name in REQUIRED)
    # every measured method stands for some paper row (no orphan row without a paper to compare)
    assert set(METHODS) <= {label for e in _papers.PAPER_METHODS.values() for label in e.runs_as}


def test_report_says_per_method_whether_it_ran_and_why_not() -> None:
    """The memory_time report's accounting table: run, not run here (library), not selected, not built."""
    measured = [label for label in METHODS if label not in ("U-Net", "FCN", "GLNet")]
    not_run = {"U-Net": "needs segmentation-models-pytorch", "FCN": "needs torchvision"}
    args = argparse.Namespace(size_text="64x64", target_from=None, methods=measured, not_run=not_run)
    header = {"accelerator": {"name": "cpu", "device": "cpu", "backend": "gloo"}}
    report = memory_time.build_report(args, header, [], [], {})
    table = next(rows for title, _, rows in report.tables if title.startswith("Every method of the papers'"))
    status = {row["method"]: row["status"] for row in table}
    assert len(table) == len(_papers.PAPER_METHODS)
    assert status["EHSNet"] == status["SegNet"] == status["HRNet"] == "run"
    assert status["UNet"] == status["U-Net"] == "not run here: needs segmentation-models-pytorch"
    assert status["FCN"] == "FCN-8s: run; FCN: not run here: needs torchvision"
    assert status["GLNet"] == "not selected (--methods)"
    assert status["Mask2Former"].startswith("not built: ")
    assert report.data["paper_methods"] == table
    assert "Not run here: U-Net: needs segmentation-models-pytorch" in report.notes
