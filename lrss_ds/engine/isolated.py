"""Run one function in a fresh Python process under an RSS cap; return its JSON result and exact peak RSS.

``run_isolated("package.module:function", params)`` starts a new interpreter, calls the function
there, watches the child's resident set (killing it past a cap) and reads the kernel's own peak
RSS of that program (its ``VmHWM``; ``wait4``'s ``ru_maxrss`` when it cannot say), so every
measurement starts from a clean heap.
The planner's probes (:mod:`lrss_ds.engine.plan`) and every benchmark configuration
(``benchmarks/_harness.run_config``) run this way.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lrss_ds.engine.resident_memory import program_peak_bytes
from lrss_ds.engine.temporaries import write_text_atomically

# Repository root (the folder holding ``lrss_ds/``), so that a fresh child process imports the
# same checkout as its parent even when the package is not installed into the interpreter; the
# probe's memory modes also name their DeepSpeed JSONs relative to it.
REPO_ROOT = Path(__file__).resolve().parents[2]

PROGRAM_PEAK_KEY = "program_peak_rss_bytes"
"""Payload key of the child's own peak resident set since its exec (``VmHWM`` at exit)."""

PROCESS_PEAK_KEY = "process_peak_rss_bytes"
"""Result key of a child that resets its high-water mark: its peak resident set before the resets
(``run_isolated`` reports the larger of it and the child's ``VmHWM`` at exit)."""


@dataclass
class IsolatedRun:
    """Outcome of one function run in a fresh process.

    Attributes:
        status: ``"ok"``; ``"over_cap"`` (RSS passed the cap: killed by the watchdog, or the
            kernel's peak exceeds it); ``"oom"`` (``MemoryError``/allocator out-of-memory in
            the child, or killed by SIGKILL that the watchdog did not send, i.e. the kernel's
            OOM killer); ``"timeout"``; ``"error"`` (any other exception; see ``error``).
        result: the JSON-able dict the function returned (empty unless ``status == "ok"``).
        peak_rss_bytes: the child's peak resident set: its own ``VmHWM`` at exit (``wait4``'s
            ``ru_maxrss`` when the child could not report it, which can include this parent's
            resident set), or the child's ``PROCESS_PEAK_KEY`` figure when larger; exact,
            unlike polling, which can miss a short spike.
        wall_s: wall-clock seconds from spawn to exit (includes interpreter and torch import).
        cpu_s: user + system CPU seconds of the child.
        returncode: the child's exit code (negative: killed by that signal).
        error: the last lines of the child's traceback or stderr when it did not succeed.
    """

    status: str
    result: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    returncode: int = 0
    error: str = ""

    @property
    def fits(self) -> bool:
        """True when the run finished under the cap."""
        return self.status == "ok"


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    """Environment for a child: ours, the checkout on ``PYTHONPATH``, plus ``extra``."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if not has_cuda_cheap():
        env.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's accelerator probe warning
    env.update(extra or {})
    return env


def has_cuda_cheap(dev: Path = Path("/dev")) -> bool:
    """Whether CUDA looks present, without importing torch (a probe must not pay for it).

    Any ``/dev/nvidiaN`` counts: a node whose scheduler exposes only its job's GPUs (cgroup
    device filtering) may show ``/dev/nvidia2`` and ``/dev/nvidia3`` but no ``/dev/nvidia0``.
    ``/dev/nvidiactl`` and ``/dev/nvidia-uvm`` exist wherever the driver is loaded, GPU or not.

    Args:
        dev: the device directory to look in.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
        return True
    try:
        names = os.listdir(dev)
    except OSError:
        return False
    return any(name.startswith("nvidia") and name[len("nvidia"):].isdigit() for name in names)


def run_isolated(
    target: str,
    params: dict[str, Any],
    *,
    cap_bytes: int | None = None,
    timeout_s: float = 1800.0,
    env: dict[str, str] | None = None,
    sys_path: Sequence[str | Path] = (),
    poll_s: float = 0.02,
) -> IsolatedRun:
    """Run ``target(**params)`` in a fresh Python process and measure its peak RSS.

    The child imports ``target`` (``"package.module:function"``; modules found on ``sys_path``
    too), calls it and writes the returned dict as JSON to a temporary file (not stdout, which
    libraries print to). The parent polls the child's RSS every ``poll_s`` seconds and SIGKILLs
    it once it passes ``cap_bytes``; afterwards the kernel's exact peak (the child's ``VmHWM``,
    else ``ru_maxrss`` from ``wait4``) decides again, so a spike the poll missed still counts as
    not fitting.
    ``resource.setrlimit(RLIMIT_AS)`` is not used: torch reserves far more address space than it
    touches, so an address-space cap fails runs that would fit.

    Args:
        target: ``"module:function"``; the function takes JSON-able keyword arguments and
            returns a JSON-able dict.
        params: keyword arguments for ``target``.
        cap_bytes: kill the child when its RSS exceeds this many bytes; ``None`` = no cap.
        timeout_s: kill the child after this many seconds (status ``"timeout"``).
        env: extra environment variables for the child.
        sys_path: folders prepended to the child's ``sys.path`` before importing ``target``.
        poll_s: RSS polling interval in seconds.

    Returns:
        An ``IsolatedRun``.
    """
    import psutil  # local: the CLI's --help must not pay for it

    with tempfile.TemporaryDirectory(prefix="lrss_probe_") as tmp:
        spec_path = Path(tmp) / "spec.json"
        out_path = Path(tmp) / "result.json"
        spec = {
            "target": target,
            "params": params,
            "out": str(out_path),
            "sys_path": [str(p) for p in sys_path],
            "parent_pid": os.getpid(),
        }
        spec_path.write_text(json.dumps(spec))
        code = "import sys; from lrss_ds.engine.isolated import _child_main; sys.exit(_child_main(sys.argv[1]))"
        stderr_path = Path(tmp) / "stderr.txt"
        start = time.perf_counter()
        with open(stderr_path, "wb") as stderr_file:
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(spec_path)],
                env=_child_env(env),
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                cwd=str(REPO_ROOT),
            )
            killed_for: str | None = None
            watched = psutil.Process(proc.pid)
            exit_info: list[tuple[int, int, Any]] = []

            # wait4 in a thread: it returns the exact rusage of this one child, which
            # Popen.wait cannot give, while the main thread keeps polling the RSS.
            def reap() -> None:
                exit_info.append(os.wait4(proc.pid, 0))

            reaper = threading.Thread(target=reap, daemon=True)
            reaper.start()
            try:
                while reaper.is_alive():
                    reaper.join(poll_s)
                    if not reaper.is_alive():
                        break
                    if time.perf_counter() - start > timeout_s:
                        killed_for = "timeout"
                    elif cap_bytes is not None:
                        with contextlib.suppress(psutil.Error):
                            if watched.memory_info().rss > cap_bytes:
                                killed_for = "over_cap"
                    if killed_for:
                        break
            finally:
                # Also on Ctrl-C or SIGTERM (as SystemExit) in this loop: the child must not
                # outlive us, and must be reaped before its temporary folder is removed. Whether
                # it was reaped is read from ``exit_info``: a join interrupted by an exception
                # can leave ``reaper.is_alive()`` False while wait4 still waits.
                if not exit_info:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    reaper.join()
            wall_s = time.perf_counter() - start
        _, status_word, usage = exit_info[0]
        proc.returncode = os.waitstatus_to_exitcode(status_word)  # Popen must not reap again
        peak = int(usage.ru_maxrss) * 1024  # KiB on Linux
        payload: dict[str, Any] = {}
        if out_path.exists():
            payload = json.loads(out_path.read_text())
        if payload.get(PROGRAM_PEAK_KEY) is not None and not killed_for:
            # wait4's figure includes the resident set of this (parent) process, which Linux
            # carries into a child's ru_maxrss across exec; the child's own VmHWM does not.
            peak = int(payload[PROGRAM_PEAK_KEY])
        cpu_s = float(usage.ru_utime + usage.ru_stime)
        stderr_tail = _tail(stderr_path.read_text(errors="replace"))
        run = IsolatedRun(
            status="ok",
            peak_rss_bytes=peak,
            wall_s=wall_s,
            cpu_s=cpu_s,
            returncode=proc.returncode,
        )
        if killed_for:
            run.status = killed_for
        elif payload.get("status") == "ok" and proc.returncode == 0:
            run.result = payload.get("result", {})
            # A child that resets its high-water mark (per-phase peaks) lowers what wait4
            # reports; it returns the peak it saw before each reset instead.
            reported = run.result.get(PROCESS_PEAK_KEY) if isinstance(run.result, dict) else None
            if reported is not None:
                run.peak_rss_bytes = peak = max(peak, int(reported))
        elif payload.get("status") in ("oom", "error"):
            run.status = payload["status"]
            run.error = payload.get("error", "")
        elif proc.returncode == -signal.SIGKILL:
            run.status = "oom"  # SIGKILL we did not send: the kernel's OOM killer
            run.error = "killed by SIGKILL (out of memory?)\n" + stderr_tail
        else:
            run.status = "error"
            run.error = f"exit code {proc.returncode}\n{stderr_tail}"
        if run.status == "ok" and cap_bytes is not None and peak > cap_bytes:
            run.status = "over_cap"  # a spike between two polls still does not fit
        return run


def _tail(text: str, lines: int = 12) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.strip().splitlines()[-lines:])


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A parent killed by SIGTERM (a batch scheduler's time limit, ``kill``) runs no ``finally``,
    so without this its probe child would keep running, and holding memory, on its own.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _child_main(spec_path: str) -> int:
    """Child side of ``run_isolated``: import the target, call it, write the JSON result."""
    spec = json.loads(Path(spec_path).read_text())
    _die_with_parent(spec["parent_pid"])
    for path in reversed(spec["sys_path"]):
        sys.path.insert(0, path)
    out = Path(spec["out"])
    try:
        module_name, func_name = spec["target"].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(**spec["params"])
        payload: dict[str, Any] = {"status": "ok", "result": result}
    except MemoryError:
        payload = {"status": "oom", "error": _tail(traceback.format_exc())}
    except Exception as error:  # noqa: BLE001 - every failure is reported to the parent
        # torch.OutOfMemoryError (accelerator) and "DefaultCPUAllocator: can't allocate" are
        # RuntimeErrors: they mean "does not fit", not "broken".
        text = str(error)
        is_oom = type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in text
        payload = {"status": "oom" if is_oom else "error", "error": _tail(traceback.format_exc())}
    payload[PROGRAM_PEAK_KEY] = program_peak_bytes()
    write_text_atomically(out, json.dumps(payload, default=json_default))
    return 0 if payload["status"] == "ok" else 3


def json_default(value: Any) -> Any:
    """JSON encoder fallback for numpy scalars and paths."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)

