"""run_isolated: a function in a fresh process, its result, its exact peak RSS, the cap, errors and timeouts."""

from __future__ import annotations

from pathlib import Path

from lrss_ds.engine.isolated import IsolatedRun, run_isolated

TESTS_DIR = str(Path(__file__).resolve().parent)
MIB = 1024**2


def _run(target: str, params: dict, **kw) -> IsolatedRun:
    return run_isolated(f"isolated_targets:{target}", params, sys_path=[TESTS_DIR], **kw)


def test_run_isolated_returns_result_and_exact_peak_rss() -> None:
    small = _run("hold", {"mib": 528})
    big = _run("hold", {"mib": 1040})
    assert small.status == "ok" and small.result == {"sum": 4.0, "mib": 528}
    assert big.status == "ok"
    # the kernel's peak grows by what the child touched (1040 - 528 MiB), within 25%. Both
    # children hold more than the child's start-up peak (imports can briefly take a few hundred
    # MiB), so that transient cannot hide in either figure.
    grown = (big.peak_rss_bytes - small.peak_rss_bytes) / MIB
    assert 0.75 * 512 < grown < 1.25 * 512
    assert big.cpu_s > 0 and big.wall_s >= 0.2


def test_run_isolated_kills_over_cap_and_reports_it() -> None:
    run = _run("hold", {"mib": 400, "seconds": 60.0}, cap_bytes=200 * MIB)
    assert run.status == "over_cap" and not run.fits
    assert run.result == {}
    assert run.wall_s < 45.0  # killed as it passed the cap, not waited for


def test_run_isolated_classifies_errors_oom_and_timeouts() -> None:
    failed = _run("fail", {})
    assert failed.status == "error" and "broken on purpose" in failed.error
    oom = _run("out_of_memory", {})
    assert oom.status == "oom" and "MemoryError" in oom.error
    slow = _run("sleep", {"seconds": 30}, timeout_s=1.0)
    assert slow.status == "timeout"


def test_run_isolated_keeps_the_peak_a_child_saw_before_resetting_its_high_water_mark() -> None:
    run = _run("hold_then_reset", {"mib": 600})
    assert run.status == "ok"
    if run.result["source"] != "VmHWM":
        return  # no resettable high-water mark: wait4's peak is the lifetime peak already
    # wait4 sees only the peak since the reset; the run reports the one before it
    assert run.peak_rss_bytes == run.result["process_peak_rss_bytes"] > 600 * MIB


def test_a_small_child_of_a_large_parent_reports_its_own_peak_not_the_parents() -> None:
    # Linux carries the pre-exec high-water mark (the parent's, after vfork/fork) into the
    # child's ru_maxrss; a planner probe started from a large benchmark parent must not
    # report the parent's resident set as its own.
    import numpy as np

    held = np.ones(1200 * MIB // 8)  # touched: resident in this (parent) process
    small = _run("hold", {"mib": 64})
    assert small.status == "ok"
    assert small.peak_rss_bytes < 1000 * MIB, small.peak_rss_bytes / MIB
    assert held[-1] == 1.0


def test_a_child_dies_with_a_parent_killed_by_sigterm(tmp_path: Path) -> None:
    # SIGTERM kills a Python parent without running its clean-up: the kernel must end the child.
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([
        sys.executable, "-c",
        "from lrss_ds.engine.isolated import run_isolated; "
        f"run_isolated('isolated_targets:sleep_after_writing_pid', {{'path': {str(pid_file)!r}, 'seconds': 120}}, "
        f"sys_path=[{TESTS_DIR!r}])",
    ])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and _state(child) != "Z":
        assert time.monotonic() < deadline, f"child {child} outlived its parent"
        time.sleep(0.05)


def _state(pid: int) -> str:
    """The process state letter of ``pid`` from /proc ("Z": a zombie, i.e. dead), or "" if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""
