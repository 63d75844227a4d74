"""benchmarks/spatial.py --quick trains one scene on 1 and 2 spatial ranks and reports every rank's peak and step time."""

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
def test_quick_spatial_benchmark_reports_each_rank(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "spatial.py"), "--quick", "--larger", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "spatial.json").read_text())
    rows = report["rows"]
    assert [(r["scene"], r["ranks"], r["rank"]) for r in rows] == [
        ("128x64", 1, 0), ("128x64", 2, 0), ("128x64", 2, 1), ("256x64", 2, 0), ("256x64", 2, 1)]
    assert [r["band_rows"] for r in rows] == [128, 64, 64, 128, 128]  # --larger: each rank holds the one-rank scene's rows
    for row in rows:
        assert 0.1 < row["peak_rss_gib"] < 4 and row["step_s"] >= 0 and row["job_cpu_s"] > 0
    assert rows[0]["peak_vs_one_rank"] == 1.0
    assert rows[0]["halo_mib_per_step"] == 0 and min(r["halo_mib_per_step"] for r in rows[1:]) > 0
    # the same scene and weights: the spatial run's first loss is the one-rank loss to float32
    # rounding; after a step the rounding has moved the weights (CI: last losses 1.4e-3 apart)
    assert rows[1]["loss_first"] == pytest.approx(rows[0]["loss_first"], rel=1e-4)
    assert rows[1]["loss_last"] == pytest.approx(rows[0]["loss_last"], rel=1e-2)
    assert rows[3]["loss_first"] != pytest.approx(rows[0]["loss_first"], rel=1e-4)  # another scene
    assert "| 2 | 1 | 64 |" in (tmp_path / "spatial.md").read_text()


def _launch_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> dict[str, str]:
    """The environment benchmarks/spatial.py launches its first training run with (the launch is stopped there)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import spatial

    class Launched(Exception):
        pass

    seen: dict[str, str] = {}
    original = subprocess.run

    def run(cmd: list[str], *args: object, **kwargs: object) -> object:
        if "deepspeed" not in " ".join(map(str, cmd)):  # the report header's git call
            return original(cmd, *args, **kwargs)
        seen.update(kwargs["env"])  # type: ignore[arg-type]
        raise Launched

    monkeypatch.setattr(spatial.subprocess, "run", run)
    monkeypatch.setattr(spatial, "prepare_synthetic_store", lambda *args, **kwargs: None)
    with pytest.raises(Launched):
        spatial.main(["--quick", "--out", str(tmp_path), *argv])
    return seen


def test_ranks_run_with_the_benchmarks_allocator_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # glibc's default heap kept 45-100 MiB per spatial rank above the fixed part + half the
    # one-rank activations (EHSNet, 512-1024 px), none with blocks >= 128 KiB from mmap
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert _launch_env(monkeypatch, tmp_path, [])["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert "MALLOC_MMAP_THRESHOLD_" not in _launch_env(monkeypatch, tmp_path, ["--default-allocator"])
