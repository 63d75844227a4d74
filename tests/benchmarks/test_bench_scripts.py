"""Each benchmark script runs end to end with --quick and writes a complete, measured table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from _workloads import METHODS  # noqa: E402
from memory_time import TWO_VIEW_MODELS  # noqa: E402

pytestmark = pytest.mark.slow


SCRIPTS = {"memory_time": "memory_time", "scaling": "scaling", "max_size": "max_size", "plan_accuracy": "plan",
           "bf16_convergence": "bf16_convergence", "inference": "inference"}


@pytest.fixture(scope="module")
def quick_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """Run every benchmark script with --quick, all at once (they are process-bound, the machine
    has several cores), and return each one's JSON report and output folder."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    running = {}
    for name in SCRIPTS:
        out = tmp_path_factory.mktemp(name)
        proc = subprocess.Popen(
            # one intra-op thread each: four scripts share the cores, and OpenMP threads that
            # wait on descheduled siblings would only burn CPU
            [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--threads", "1", "--out", str(out),
             # memory_time's ~20 methods are the suite's longest path: two probes at once
             *(["--jobs", "2"] if name == "memory_time" else [])],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        running[name] = (proc, out)
    reports = {}
    try:
        for name, (proc, out) in running.items():
            log, _ = proc.communicate(timeout=2700)  # memory_time --quick runs every method: ~20 min beside the suite
            reports[name] = (proc.returncode, log, out)
    finally:
        for proc, _ in running.values():  # a timeout must not leave scripts running
            if proc.poll() is None:
                proc.kill()
    return reports


def _report(quick_reports: dict, name: str) -> tuple[dict, Path]:
    """The JSON report of ``name`` after checking that it ran and wrote all three files."""
    code, log, out = quick_reports[name]
    assert code == 0, log[-4000:]
    stem = SCRIPTS[name]
    for suffix in ("md", "csv", "json"):
        assert (out / f"{stem}.{suffix}").stat().st_size > 0
    return json.loads((out / f"{stem}.json").read_text()), out


def _measured(row: dict, keys: list[str]) -> None:
    for key in keys:
        assert isinstance(row.get(key), (int, float)), f"{key} not measured in {row}"


def test_memory_time_quick(quick_reports: dict) -> None:
    report, tmp_path = _report(quick_reports, "memory_time")
    rows = report["rows"]
    methods = {r["method"] for r in rows}
    sys.path.insert(0, str(BENCH))
    from _workloads import METHODS

    generic = {"U-Net", "PSPNet", "DeepLabv3+", "UPerNet", "Swin-UPerNet", "FCN"}  # library models: run where they import
    assert methods == set(METHODS) - set(report["unavailable"])  # every compared method that imports here
    assert {"patch HRNet", "downsampled HRNet", "GLNet", "GLSNet", "EHSNet", "ISDNet", "STDC", "MagNet", "FCtL",
            "SegNet", "ICNet", "FCN-8s"} <= methods
    assert set(report["unavailable"]) <= generic
    assert [r["memory_mode"] for r in rows if r["method"] == "EHSNet"] == ["none", "ckpt_stage"]
    for row in rows:
        for key in ("method", "memory_mode", "size", "miou", "miou_source", "device_peak_mib",
                    "saved_activation_mib", "host_peak_gib", "train_s", "test_s"):
            assert key in row, key
        assert row["status"] == "ok", row
        assert row["device_peak_mib"] is None  # CPU: no device allocator
        assert row["device_peak"].endswith("simulated (CPU, lrss_ds.memory.device_sim)")  # labelled, never bare
        _measured(row, ["miou", "saved_activation_mib", "host_peak_gib", "train_s", "test_s"])
        assert row["miou_source"]
    ehs = {r["memory_mode"]: r for r in rows if r["method"] == "EHSNet"}
    assert ehs["ckpt_stage"]["saved_activation_mib"] < ehs["none"]["saved_activation_mib"]
    inference = report["tables"][next(t for t in report["tables"] if t.startswith("Local vs global"))]
    assert {r["method"] for r in inference} == methods
    for row in inference:
        _measured(row, ["global_miou", "global_peak_mib", "global_s"])
        if METHODS[row["method"]].model not in TWO_VIEW_MODELS:
            _measured(row, ["local_miou", "local_peak_mib", "local_s"])
    assert report["papers"]["ehsnet_table3"]["rows"][-1]["method"] == "EHSNet"
    assert "THEIR figures" in (tmp_path / "memory_time.md").read_text()


def test_scaling_quick(quick_reports: dict) -> None:
    report, tmp_path = _report(quick_reports, "scaling")
    rows = report["rows"]
    assert {r["memory_mode"] for r in rows} == {"none", "ckpt_stage"}
    for row in rows:
        assert row["status"] == "ok", row
        _measured(row, ["saved_activation_mib", "host_peak_gib", "step_s", "step_cpu_s"])
    for fit in report["fits"]:
        _measured(fit, ["saved_bytes_per_px", "host_bytes_per_px", "step_us_per_px"])
        assert fit["saved_bytes_per_px"] > 0
    assert len(list(tmp_path.glob("scaling_*.png"))) == 4  # RSS, saved activations, wall and CPU time


def test_max_size_quick(quick_reports: dict) -> None:
    report, _ = _report(quick_reports, "max_size")
    rows = report["rows"]
    assert [r["memory_mode"] for r in rows] == ["none", "ckpt_stage"]
    for row in rows:
        assert row["probes"] >= 2
        # either a largest fitting side was found (and measured there) or none fits the cap
        if row["max_side"] is not None:
            _measured(row, ["host_peak_gib_at_max", "saved_activation_mib_at_max"])
            assert row["host_peak_gib_at_max"] <= row["cap_gib"]


def test_plan_accuracy_quick(quick_reports: dict) -> None:
    report, _ = _report(quick_reports, "plan_accuracy")
    rows = report["rows"]
    assert len(rows) == 2 * 2  # two modes x two held-out sides
    for row in rows:
        _measured(row, ["measured_host_gib", "predicted_host_gib", "host_error_pct", "device_error_pct"])
    assert isinstance(report["worst_memory_error_pct"], float)
    assert report["plan"]["recommendation"] in (None, "none", "ckpt_stage")


def test_bf16_convergence_quick(quick_reports: dict) -> None:
    report, out = _report(quick_reports, "bf16_convergence")
    rows = report["rows"]
    assert sorted(r["precision"] for r in rows) == ["bf16", "fp32"]
    for row in rows:
        assert row["iterations"] == 4
        _measured(row, ["loss_first", "final_loss", "miou", "oa", "wall_s"])
        assert 0.0 <= row["miou"] <= 1.0
    for run in report["runs"]:
        assert len(run["loss"]) == 4 and all(math.isfinite(v) for v in run["loss"])
        assert [it for it, _ in run["evals"]] == [2, 4]
        assert (out / "runs" / f"{run['precision']}_seed{run['seed']}" / "metrics.json").is_file()
    summary = report["summary"]
    assert summary["miou_gap"] == pytest.approx(summary["miou_bf16"] - summary["miou_fp32"])
    assert isinstance(summary["converges_like_fp32"], bool)


def test_inference_quick(quick_reports: dict) -> None:
    report, _ = _report(quick_reports, "inference")
    rows = report["rows"]
    assert [(r["model"], r["precision"]) for r in rows] == [
        (model, precision) for model in ("ehsnet", "ehsnet", "hrnet_fcn", "hrnet_fcn") for precision in ("fp32", "bf16")
    ]
    assert rows[0]["classes"] == 24 and rows[0]["options"]["lrd_k"] == 256 and rows[2]["classes"] == 6
    assert rows[-1]["options"]["mode"] == "patch"
    for row in rows:
        assert row["status"] == "ok", row
        _measured(row, ["peak_rss_gib", "seconds", "gflops", "conv_gflops_per_s", "floor_s", "ratio"])
        assert row["ratio"] == pytest.approx(row["seconds"] / row["floor_s"])
        assert 0.0 < row["conv_spread"] <= 1.0  # the slower of the two throughput samples over the faster
    for row in rows[1::2]:  # every bf16 row against its fp32 row
        assert 0.0 <= row["agreement"] <= 1.0
    assert report["header"]["scene"] == [203, 229] and "conditions" in report["header"]
