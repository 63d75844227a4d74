"""benchmarks/fullscene_train.py runs a (small) whole-scene step per precision and merges results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fullscene_train.py"), "--size", "128x160",
                           "--need-gib", "0", "--max-wait", "60", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_fullscene_step_per_precision_merged(tmp_path: Path) -> None:
    out = tmp_path / "fullscene.json"
    _run("--precision", "bf16", "--out", str(out))
    _run("--precision", "fp32", "--merge", str(out), "--out", str(out))
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["dtype"] for r in runs] == ["bf16", "fp32"]
    assert [r["memory_mode"] for r in runs] == ["fullres_bf16", "fullres_fp32"]
    for run in runs:
        assert (run["height"], run["width"], run["bands"]) == (128, 160, 4)
        assert run["loss_finite"] and run["peak_rss_gib"] > 0.1 and run["step_seconds"] > 0
        assert run["batchnorm_stats_dtype"] == "torch.float32"
        assert run["meets_target"] is None  # targets are for the whole scene only
        assert run["accelerator"]["backend_source"] == "process group"
        assert run["device"] == run["accelerator"]["device"] == "cpu"  # this machine has no GPU
        assert run["device_peak_allocated_gib"] is None
        # ZeRO-Offload keeps the fp32 partition, its gradient and Adam's two states on the host
        assert run["simulated_host_peak_gib"] == pytest.approx(16 * run["parameters"] / 2**30, abs=1e-3)
        assert 0 < run["simulated_device_peak_gib"] < run["peak_rss_gib"]
    assert result["header"]["accelerator"]["name"] == "cpu"
    for key in ("model", "height", "width", "bands", "memory_mode", "peak_rss_gib", "step_seconds", "device",
                "torch", "deepspeed", "date"):
        assert key in result, key
    note = out.with_suffix(".md").read_text()
    assert "| bf16 | `fullres_bf16` |" in note and "| fp32 | `fullres_fp32` |" in note
    assert "on the cpu accelerator (cpu, backend gloo)" in note and "no GPU" in note
