"""``lrss-ds doctor``: the preflight passes end to end on this CPU node and names what fails."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lrss_ds.engine import doctor

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
@pytest.mark.launcher
def test_doctor_passes_on_the_cpu_accelerator_and_says_so(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "lrss_ds.cli", "doctor", "--workdir", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert lines[-1].startswith("doctor: PASS: versions, accelerator, ops, collective, training on the cpu accelerator")
    assert "CPU only, no GPU was checked" in lines[-1]
    assert any("2 rank(s), backend gloo, devices cpu, cpu: all-reduce sum 3 (expected 3)" in line for line in lines)
    assert any("3 iterations on 1 rank(s)" in line for line in lines)
    # the training run's own log names the accelerator and the backend of its process group
    run_log = (tmp_path / "run" / "log.txt").read_text()
    assert "accelerator cpu on cpu, backend gloo" in run_log


def test_a_gpu_node_falling_back_to_the_cpu_fails_with_the_check_named(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(doctor, "gpu_hardware_present", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LRSS_DS_AUTO_ACCELERATOR", "cpu")  # chosen by env.sh on a login node, not the user
    status = doctor.run(_args("--skip", "ops", "collective", "training"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert status == 1
    assert last.startswith("doctor: FAIL: accelerator: this node has GPUs but DeepSpeed picks the CPU")
    assert "launch/env.sh" in last

    monkeypatch.delenv("LRSS_DS_AUTO_ACCELERATOR")  # the user's own DS_ACCELERATOR=cpu is respected
    assert doctor.run(_args("--skip", "ops", "collective", "training")) == 0
    assert "running on the CPU because DS_ACCELERATOR=cpu was set" in capsys.readouterr().out


def test_a_check_that_breaks_fails_the_verdict_and_the_rest_still_run(capsys: pytest.CaptureFixture) -> None:
    def broken(args: argparse.Namespace) -> doctor.CheckResult:
        raise OSError("no such device")

    ran = []

    def fine(args: argparse.Namespace) -> doctor.CheckResult:
        ran.append(True)
        return doctor.CheckResult("fine", True, ["all good"])

    status = doctor.run_checks([("broken", broken), ("fine", fine)], _args())
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 1 and ran == [True]
    assert out[-1] == "doctor: FAIL: broken: OSError: no such device"
    assert "[doctor] fine: ok" in "\n".join(out)


def test_a_collective_that_does_not_finish_fails(capsys: pytest.CaptureFixture) -> None:
    result = doctor.check_collective(_args("--timeout", "0.5"))
    assert not result.ok and "did not finish in 0.5 s" in result.reason
