"""benchmarks/spatial_predict.py --quick predicts one scene on 1 and 2 spatial ranks and reports every rank's peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.launcher
def test_quick_spatial_prediction_benchmark_reports_each_rank(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "spatial_predict.py"), "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "spatial_predict.json").read_text())["rows"]
    assert [(r["ranks"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    assert [r["band_rows"] for r in rows] == [160, 96, 64]
    for row in rows:
        assert 0.1 < row["peak_rss_gib"] < 4 and row["scene_s"] > 0 and row["job_cpu_s"] > 0
    assert rows[0]["peak_vs_one_rank"] == 1.0
    assert all(row["classes_equal"] >= 0.9999 for row in rows)  # the spatial map is the one-rank map
