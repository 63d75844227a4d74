"""`lrss-ds plan` says what it measures and how long it will take, refuses unknown models at once,
and leaves no probe process or probe folder behind when stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import lrss_ds.engine.plan as plan
from lrss_ds.engine.isolated import IsolatedRun
from lrss_ds.cli import main
from lrss_ds.models import MODEL_BUILDERS

REPO = Path(__file__).resolve().parents[2]


def _fake_runner(calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], said: list[str]) -> Any:
    """A ``run_isolated`` stand-in: a probe whose peaks grow with the pixels, timed at 10 s."""

    def run(target: str, params: dict[str, Any], **_: Any) -> IsolatedRun:
        said.append(capsys.readouterr().err)  # what was printed before this probe started
        calls.append(params)
        pixels = params["height"] * params["width"]
        # what a probe on a CPU returns: no device allocator, the simulated device peak instead
        result = {"device_peak_bytes": None, "saved_activation_peak_bytes": 100 * pixels,
                  "simulated_device_peak_bytes": 150 * pixels, "simulated_host_peak_bytes": 10**7,
                  "step_min_s": pixels / 1e4, "step_cpu_min_s": pixels / 1e4}
        return IsolatedRun(status="ok", result=result, peak_rss_bytes=10**8 + 300 * pixels, wall_s=10.0)

    return run


def test_plan_prints_an_estimate_first_then_progress_per_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    said: list[str] = []
    monkeypatch.setattr(plan, "run_isolated", _fake_runner(calls, capsys, said))
    argv = ["plan", "--model", "ehsnet", "--size", "1024", "--modes", "none,ckpt_stage", "--fit-sides", "64,128",
            "--cache", str(tmp_path)]
    assert main(argv) == 0
    said.append(capsys.readouterr().err)
    assert len(calls) == 4
    first = said[0]  # printed before the first probe ran
    assert "measuring 4 probe(s), 0 cached" in first and "ehsnet training step" in first
    assert f"estimate about {4 * plan.PROBE_SECONDS_PRIOR / 60:.0f} min" in first
    assert "probe 1/4: none" in first and "64x64 px" in first
    assert "probe 2/4: none" in said[1] and "128x128 px" in said[1]
    assert "probe 1/4: ok in 0 s; about 0 s left" in said[1]
    assert "probe 4/4: ok in 0 s" in said[4] and "left" not in said[4].splitlines()[-1]
    # Cached probes are not run again; the next estimate starts from the cached probes' 10 s.
    calls.clear(), said.clear()
    assert main(argv[:-3] + ["64,128,256", "--cache", str(tmp_path)]) == 0
    assert [(c["mode"], c["height"]) for c in calls] == [("none", 256), ("ckpt_stage", 256)]
    assert "measuring 2 probe(s), 4 cached" in said[0] and "estimate about 20 s" in said[0]


def test_unknown_model_is_refused_before_any_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan, "run_isolated", lambda *a, **k: pytest.fail("a probe ran for an unknown model"))
    assert main(["plan", "--model", "ehsnett", "--size", "512", "--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrss-ds plan: error: --model: unknown model 'ehsnett'") and "\n" not in err, err
    assert ", ".join(sorted(MODEL_BUILDERS)) in err, err
    assert list(tmp_path.iterdir()) == []


def sleeping_probe(**params: Any) -> dict[str, Any]:
    """Probe stand-in for the SIGTERM test: announce this process, then sleep."""
    Path(os.environ["LRSS_TEST_PROBE_PID"]).write_text(str(os.getpid()))
    time.sleep(120)
    return {}


def test_sigterm_leaves_no_probe_process_or_folder(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    pid_file = tmp_path / "probe.pid"
    argv = ["plan", "--model", "ehsnet", "--size", "512", "--modes", "none", "--cache", str(tmp_path / "cache")]
    code = ("import json, sys; import lrss_ds.engine.plan as plan; from lrss_ds.cli import main; "
            "plan.PROBE_TARGET = 'tests.engine.test_plan_progress:sleeping_probe'; "
            "sys.exit(main(json.loads(sys.argv[1])))")
    env = dict(os.environ, TMPDIR=str(scratch), LRSS_TEST_PROBE_PID=str(pid_file),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the probe never started"
            time.sleep(0.1)
        probe_pid = int(pid_file.read_text())
        assert [p.name.startswith("lrss_probe_") for p in scratch.iterdir()] == [True]  # the probe's folder
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert list(scratch.iterdir()) == []
    assert not _running(probe_pid)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper holds nothing and counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")
