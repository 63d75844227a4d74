"""Predict the peak memory of a holistic training step per memory mode from small measured sizes.

``lrss-ds plan --model ehsnet --size 6800x7200 --device-mem 24G --host-mem 64G`` measures one
training step of the model at a few small square sizes in fresh processes (cached), fits
``bytes = a * pixels + b`` per memory mode for the device peak and the host peak, extrapolates to
the asked size and recommends the fastest mode whose prediction fits both budgets, with the
DeepSpeed JSON that mode trains with.

Three parts, top to bottom:

1. ``run_isolated``: run one ``module:function`` in a fresh Python process, watch its resident
   set, kill it when it passes a cap, and return its JSON result with the kernel's own peak RSS
   of that process (``wait4`` ``ru_maxrss``), so every measurement starts from a clean heap.
2. ``probe_training_step``: the measured workload - build the model, enter the memory mode,
   run forward + loss + backward + optimizer step on one whole sample, report the peaks.
3. The fit, the prediction and the CLI.

What "device memory" means: on an accelerator, the allocator's peak
(``torch.cuda.max_memory_allocated``). On a CPU there is no device, so the planner's "device"
column is the simulated device peak of :mod:`lrss_ds.memory.device_sim` (the live storages a GPU
run would keep on the card, measured in the probe's first step) and "host" is the process's peak
RSS, which is what actually has to fit in RAM there. A card fits a mode when the predicted device
peak plus the margin of :func:`lrss_ds.memory.device_sim.device_bytes_needed` (CUDA context,
allocator reserve, cuDNN workspaces) fits it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lrss_ds.engine.interrupt import terminate_as_exit
from lrss_ds.errors import ConfigError, LrssError

GIB = 1024**3
MIB = 1024**2

# Repository root (the folder holding ``lrss_ds/``), so that a fresh child process imports the
# same checkout as its parent even when the package is not installed into the interpreter.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# 1. Fresh-process measurement
# ----------------------------------------------------------------------------------------------


@dataclass
class IsolatedRun:
    """Outcome of one function run in a fresh process.

    Attributes:
        status: ``"ok"``; ``"over_cap"`` (RSS passed the cap: killed by the watchdog, or the
            kernel's peak exceeds it); ``"oom"`` (``MemoryError``/allocator out-of-memory in
            the child, or killed by SIGKILL that the watchdog did not send, i.e. the kernel's
            OOM killer); ``"timeout"``; ``"error"`` (any other exception; see ``error``).
        result: the JSON-able dict the function returned (empty unless ``status == "ok"``).
        peak_rss_bytes: the child's peak resident set from ``wait4`` (``ru_maxrss``); this
            is exact, unlike polling, which can miss a short spike.
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
    paths = [str(_PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if not _has_cuda_cheap():
        env.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's accelerator probe warning
    env.update(extra or {})
    return env


def _has_cuda_cheap(dev: Path = Path("/dev")) -> bool:
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
    it once it passes ``cap_bytes``; afterwards the kernel's exact peak (``ru_maxrss`` from
    ``wait4``) decides again, so a spike the poll missed still counts as not fitting.
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
        }
        spec_path.write_text(json.dumps(spec))
        code = "import sys; from lrss_ds.engine.plan import _child_main; sys.exit(_child_main(sys.argv[1]))"
        stderr_path = Path(tmp) / "stderr.txt"
        start = time.perf_counter()
        with open(stderr_path, "wb") as stderr_file:
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(spec_path)],
                env=_child_env(env),
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                cwd=str(_PACKAGE_ROOT),
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
        cpu_s = float(usage.ru_utime + usage.ru_stime)
        stderr_tail = _tail(stderr_path.read_text(errors="replace"))
        payload: dict[str, Any] = {}
        if out_path.exists():
            payload = json.loads(out_path.read_text())
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


def _child_main(spec_path: str) -> int:
    """Child side of ``run_isolated``: import the target, call it, write the JSON result."""
    spec = json.loads(Path(spec_path).read_text())
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
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, default=_json_default))
    tmp.rename(out)
    return 0 if payload["status"] == "ok" else 3


def _json_default(value: Any) -> Any:
    """JSON encoder fallback for numpy scalars and paths."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------------------------
# 2. The measured workload: one holistic training step
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanMode:
    """A memory mode as the planner and the benchmarks run it.

    Attributes:
        name: the planner's name for it (a column in every table).
        memory_preset: the ``lrss_ds.memory`` preset entered around forward + backward.
        ds_config: the DeepSpeed JSON (relative to the repository root) the step trains with.
        summary: one line for tables.
        ds_override: keys merged into that JSON (``deepspeed.override`` of an experiment).
    """

    name: str
    memory_preset: str
    ds_config: str
    summary: str
    ds_override: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.name)


# Ordered from the least to the most memory machinery. "Cheapest" in a recommendation is decided
# by the predicted step time (measured), not by this order.
PLAN_MODES: dict[str, PlanMode] = {
    mode.name: mode
    for mode in (
        # ds_configs/cpu.json is the project's CPU default: ZeRO-2 with the optimizer on the host.
        PlanMode("none", "none", "ds_configs/cpu.json", "plain training (no checkpointing, no offload)"),
        PlanMode("ckpt_stage", "ckpt_stage", "ds_configs/cpu.json", "activation checkpointing per stage"),
        PlanMode("ckpt_offload", "ckpt_offload", "ds_configs/cpu.json",
                 "stage checkpointing + checkpoint inputs and saved tensors offloaded to the host"),
        # These JSONs say cpu_checkpointing false; the memory mode and the JSON must agree.
        PlanMode("zero2_offload", "ckpt_offload", "ds_configs/zero2_offload.json",
                 "ckpt_offload + ZeRO-2, optimizer offloaded (DeepSpeedCPUAdam), pinned, overlapped",
                 {"activation_checkpointing": {"cpu_checkpointing": True}}),
        PlanMode("zero3_offload", "ckpt_offload", "ds_configs/zero3_offload.json",
                 "ckpt_offload + ZeRO-3, parameters and optimizer offloaded",
                 {"activation_checkpointing": {"cpu_checkpointing": True}}),
        PlanMode("fullres_fp32", "fullres_fp32", "ds_configs/cpu.json",
                 "fine checkpoints (layer1 in halves) + stem and loss in row bands + channels-last, fp32"),
        PlanMode("fullres_bf16", "fullres_bf16", "ds_configs/cpu.json",
                 "fullres_fp32 levers under bf16 autocast (weights and BN statistics fp32)"),
    )
}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_bytes() -> int:
    """This process's peak resident set so far (``ru_maxrss``), in bytes."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def probe_training_step(
    model: str = "ehsnet",
    height: int = 512,
    width: int = 512,
    mode: str = "none",
    steps: int = 2,
    bands: int = 4,
    num_classes: int = 6,
    model_options: dict[str, Any] | None = None,
    loss: str | None = None,
    seed: int = 0,
    patch_size: int | None = None,
) -> dict[str, Any]:
    """Run ``steps`` whole-sample training steps of ``model`` under ``mode`` and report the peaks.

    Meant to run in a fresh process (``run_isolated("lrss_ds.engine.plan:probe_training_step",
    ...)``); the parent reads the exact peak RSS from the kernel. The sample is a random uint8
    image ``(1, bands, height, width)`` and random labels ``(1, height, width)``: memory and time
    do not depend on the content.

    Args:
        model: a ``MODEL_BUILDERS`` name.
        height: sample height H.
        width: sample width W.
        mode: a ``PLAN_MODES`` name.
        steps: training steps; the step time reported is the fastest after the first (the
            first pays for kernel selection and first-touch page faults).
        bands: input bands C.
        num_classes: classes K.
        model_options: extra ``build_model`` options (e.g. ``{"mode": "holistic"}``).
        loss: a ``build_loss`` name; default ``ehsnet`` for EHSNet, ``focal`` for GLSNet and
            ``ce`` otherwise.
        seed: torch seed.
        patch_size: train on non-overlapping ``patch_size`` tiles covering the sample instead
            (patch baselines): one "step" is then one pass over all the tiles of the image, one
            optimizer step per tile, so ``step_s`` is the training time per image.

    Returns:
        JSON-able dict: ``saved_activation_peak_bytes`` (ledger, on device),
        ``offloaded_peak_bytes`` (ledger), ``device_peak_bytes`` (accelerator allocator, None on
        CPU), ``simulated_device_peak_bytes`` / ``simulated_host_peak_bytes`` (the
        ``DeviceMemorySimulator`` over the first step, which the step times leave out: it slows
        the step), ``model_state_bytes`` (parameters + gradients + optimizer state), ``step_s``
        (list), ``step_min_s``, ``loss`` (last), ``rss_after_setup_bytes``, ``pixels``.

    Raises:
        ConfigError: for an unknown mode.
    """
    import torch

    from lrss_ds.engine.config import DeepSpeedConfigRef, ExperimentConfig, MemoryConfig, ModelConfig, TrainConfig
    from lrss_ds.engine.setup import init_distributed, initialize_engine, load_deepspeed_json, resolve_memory_mode
    from lrss_ds.memory import SavedTensorLedger, apply_memory_mode
    from lrss_ds.memory.device_sim import DeviceMemorySimulator
    from lrss_ds.models import build_model
    from lrss_ds.models.losses import build_loss

    if mode not in PLAN_MODES:
        raise ConfigError("mode", f"unknown memory mode {mode!r}; use one of {list(PLAN_MODES)}")
    plan_mode = PLAN_MODES[mode]
    torch.manual_seed(seed)
    init_distributed()
    # The step is the trainer's (lrss_ds.engine.trainer.train_step): the experiment's default
    # optimizer handed to DeepSpeed with the mode's JSON, the memory mode prepared by the same
    # setup. The DeepSpeed monitor is off: a probe writes no files.
    config = ExperimentConfig(
        model=ModelConfig(name=model, options=dict(model_options or {})),
        memory=MemoryConfig(preset=plan_mode.memory_preset),
        deepspeed=DeepSpeedConfigRef(config=str(_PACKAGE_ROOT / plan_mode.ds_config),
                                     override={**plan_mode.ds_override, "csv_monitor": {"enabled": False},
                                               "tensorboard": {"enabled": False}}),
        train=TrainConfig(output=tempfile.gettempdir()),
    )
    net = build_model(model, num_classes, bands, **(model_options or {}))
    memory_mode = resolve_memory_mode(config)
    loss_name = loss or {"ehsnet": "ehsnet", "glsnet": "focal", "isdnet": "isdnet", "stdc": "stdc"}.get(model, "ce")
    loss_options = {} if memory_mode.loss_band_rows is None else {"band_rows": memory_mode.loss_band_rows}
    loss_fn = build_loss(loss_name, num_classes, 255, **loss_options)
    engine = initialize_engine(net, config, load_deepspeed_json(config))
    device = engine.device
    image = torch.randint(0, 256, (1, bands, height, width), dtype=torch.uint8, device=device)
    target = torch.randint(0, num_classes, (1, height, width), dtype=torch.uint8, device=device)
    ledger = SavedTensorLedger()
    rss_after_setup = _rss_bytes()
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    last_loss = float("nan")
    saved_device_peak = saved_offloaded_peak = saved_total_peak = 0
    engine.train()
    windows = [(0, 0, height, width)]
    if patch_size:
        windows = [
            (r, c, min(patch_size, height - r), min(patch_size, width - c))
            for r in range(0, height, patch_size)
            for c in range(0, width, patch_size)
        ]
    cpu_times: list[float] = []
    simulator = DeviceMemorySimulator(engine)
    for index in range(steps):
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        for r, c, h, w in windows:
            simulating = simulator if index == 0 else contextlib.nullcontext()
            with simulating:
                with apply_memory_mode(engine.module, memory_mode, ledger) as memory:
                    with memory.autocast():
                        outputs = engine(image[:, :, r : r + h, c : c + w])
                        loss_value = loss_fn(outputs, target[:, r : r + h, c : c + w])
                    engine.backward(loss_value)
                engine.step()
            # apply_memory_mode restarts the ledger's peaks every step: keep the maximum.
            saved_device_peak = max(saved_device_peak, ledger.peak_device_bytes)
            saved_offloaded_peak = max(saved_offloaded_peak, ledger.peak_offloaded_bytes)
            saved_total_peak = max(saved_total_peak, ledger.peak_total_bytes)
        if on_cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - start_cpu)
        last_loss = float(loss_value.detach())
    return {
        "model": model,
        "mode": mode,
        "height": height,
        "width": width,
        "pixels": height * width,
        "saved_activation_peak_bytes": int(saved_device_peak),
        "offloaded_peak_bytes": int(saved_offloaded_peak),
        "saved_total_peak_bytes": int(saved_total_peak),
        "device_peak_bytes": int(torch.cuda.max_memory_allocated(device)) if on_cuda else None,
        "simulated_device_peak_bytes": simulator.peak_device_bytes,
        "simulated_host_peak_bytes": simulator.peak_host_bytes,
        "model_state_bytes": _model_state_bytes(engine),
        "parameters": sum(p.numel() for p in net.parameters()),
        "step_s": times,
        "step_min_s": min(times[1:] or times),
        # CPU seconds of all this process's threads: on a machine shared with other jobs this
        # is the work a step costs, which wall-clock time is not.
        "step_cpu_s": cpu_times,
        "step_cpu_min_s": min(cpu_times[1:] or cpu_times),
        "loss": last_loss,
        "rss_after_setup_bytes": rss_after_setup,
        "optimizer_steps_per_image": len(windows),
        "torch_threads": torch.get_num_threads(),
    }


def _model_state_bytes(engine: Any) -> int:
    """Bytes of parameters, gradients and optimizer state the engine keeps (any device)."""
    import torch

    total = 0
    seen: set[int] = set()

    def add(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen and tensor.numel():
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    for param in engine.module.parameters():
        add(param.data)
        add(param.grad)
    optimizer = getattr(engine, "optimizer", None)
    state = getattr(optimizer, "state", None)
    if isinstance(state, dict):
        for per_param in state.values():
            if isinstance(per_param, dict):
                for value in per_param.values():
                    add(value)
    return total


# ----------------------------------------------------------------------------------------------
# 3. Measure (cached), fit, predict, recommend
# ----------------------------------------------------------------------------------------------

# The quantities the planner fits, each against the number of pixels.
METRICS: tuple[str, ...] = ("device_bytes", "host_bytes", "step_s", "step_cpu_s")


@dataclass
class Measurement:
    """One measured training step (one mode, one size), as the planner uses it.

    Attributes:
        mode: ``PLAN_MODES`` name.
        side: square side in pixels.
        status: ``IsolatedRun.status`` (only ``"ok"`` rows are fitted).
        device_bytes: accelerator allocator peak; on CPU the simulated device peak.
        host_bytes: the process's peak RSS (kernel ``ru_maxrss``).
        step_s: fastest step after the first, wall-clock seconds.
        step_cpu_s: CPU seconds (all threads) of the cheapest step after the first.
        probe: the probe's full result.
    """

    mode: str
    side: int
    status: str
    device_bytes: float = math.nan
    host_bytes: float = math.nan
    step_s: float = math.nan
    step_cpu_s: float = math.nan
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def pixels(self) -> int:
        """Pixels of the square sample."""
        return self.side * self.side


def default_cache_dir() -> Path:
    """``$LRSS_DS_CACHE/plan`` or ``~/.cache/lrss_ds/plan``."""
    base = os.environ.get("LRSS_DS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lrss_ds"
    )
    return Path(base) / "plan"


def _installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of the ``lrss_ds`` sources: a measurement is only valid for the code that made it
    (splitting the LRD's fusion moved EHSNet's peak by a quarter without a version change)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_key(params: dict[str, Any]) -> str:
    """A file name for one measurement: the probe's parameters, the software versions, the code
    and the allocator setting (glibc's mmap threshold changes the peak RSS by a third)."""
    import torch

    ident = dict(params, torch=torch.__version__, python=platform.python_version(),
                 machine=platform.machine(), threads=os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()),
                 lrss_ds=_source_digest(), malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                 deepspeed=_installed_version("deepspeed"))
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{params['model']}_{params['mode']}_{params['height']}x{params['width']}_{digest}.json"


PROBE_TARGET = "lrss_ds.engine.plan:probe_training_step"
"""The ``module:function`` each probe process runs (tests point it at a stand-in)."""

PROBE_STEPS = 2
"""Training steps per probe: the first pays for kernel selection and first-touch page faults."""

PROBE_SECONDS_PRIOR = 45.0
"""Wall seconds per probe assumed before this cache has timed any: ehsnet probes in mode
``none`` at 256 and 512 px took 44 s and 51 s (12 s and 16 s of CPU) on a 2-core machine
shared with other jobs; most of a probe is starting Python, torch and DeepSpeed."""


def _probe_params(
    model: str,
    side: int,
    mode: str,
    bands: int,
    num_classes: int,
    model_options: dict[str, Any] | None,
    steps: int,
) -> dict[str, Any]:
    """The keyword arguments of one probe (and the identity of its cache entry)."""
    return {
        "model": model, "height": side, "width": side, "mode": mode, "steps": steps,
        "bands": bands, "num_classes": num_classes, "model_options": model_options or {},
    }


def cached_measurement(params: dict[str, Any], cache_dir: Path | None, refresh: bool = False) -> Measurement | None:
    """The cached measurement of a probe with ``params``, or None (no cache, not cached, refresh)."""
    if cache_dir is None or refresh:
        return None
    cache_file = cache_dir / _cache_key(params)
    return Measurement(**json.loads(cache_file.read_text())) if cache_file.exists() else None


def probe_seconds_estimate(cache_dir: Path | None, model: str) -> float:
    """Mean wall seconds of the cached probes of ``model`` (any size or mode), else the prior."""
    times = []
    for path in sorted(cache_dir.glob(f"{model}_*.json")) if cache_dir is not None and cache_dir.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            wall = json.loads(path.read_text())["probe"].get("probe_wall_s")
            if wall:
                times.append(float(wall))
    return sum(times) / len(times) if times else PROBE_SECONDS_PRIOR


def _duration(seconds: float) -> str:
    """``"about 40 s"`` / ``"about 12 min"``."""
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


def measure(
    model: str,
    side: int,
    mode: str,
    *,
    bands: int = 4,
    num_classes: int = 6,
    model_options: dict[str, Any] | None = None,
    cap_bytes: int | None = None,
    cache_dir: Path | None = None,
    steps: int = PROBE_STEPS,
    refresh: bool = False,
) -> Measurement:
    """Measure one training step in a fresh process, or read it from the cache.

    Args:
        model: model name.
        side: square side in pixels.
        mode: ``PLAN_MODES`` name.
        bands: input bands.
        num_classes: classes.
        model_options: extra ``build_model`` options.
        cap_bytes: RSS cap for the probe (a probe over it is recorded as ``over_cap``).
        cache_dir: where measurements are cached; ``None`` = no cache.
        steps: training steps per probe.
        refresh: measure again even when cached.

    Returns:
        The ``Measurement``.
    """
    params = _probe_params(model, side, mode, bands, num_classes, model_options, steps)
    cached = cached_measurement(params, cache_dir, refresh)
    if cached is not None:
        return cached
    cache_file = cache_dir / _cache_key(params) if cache_dir is not None else None
    run = run_isolated(PROBE_TARGET, params, cap_bytes=cap_bytes)
    found = Measurement(mode=mode, side=side, status=run.status, probe=dict(run.result))
    if run.fits:
        device = run.result.get("device_peak_bytes")
        found.device_bytes = float(device if device is not None else run.result["simulated_device_peak_bytes"])
        found.host_bytes = float(run.peak_rss_bytes)
        found.step_s = float(run.result["step_min_s"])
        found.step_cpu_s = float(run.result["step_cpu_min_s"])
    else:
        found.probe = {"error": run.error, "peak_rss_bytes": run.peak_rss_bytes}
    found.probe["probe_wall_s"] = run.wall_s  # what later estimates of a plan's duration start from
    if cache_file is not None and run.status in ("ok", "over_cap", "oom"):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(found), default=_json_default))
        tmp.replace(cache_file)
    return found


@dataclass
class LinearFit:
    """``value = per_pixel * pixels + base``, least squares.

    Attributes:
        per_pixel: slope (units per pixel).
        base: intercept (units).
        points: how many measurements it was fitted on.
    """

    per_pixel: float
    base: float
    points: int

    def __call__(self, pixels: float) -> float:
        """The fitted value at ``pixels``."""
        return self.per_pixel * pixels + self.base

    def pixels_for(self, budget: float) -> float:
        """The largest pixel count whose fitted value stays within ``budget`` (inf if flat)."""
        if self.per_pixel <= 0:
            return math.inf if self.base <= budget else 0.0
        return max(0.0, (budget - self.base) / self.per_pixel)


def fit_linear(pixels: Sequence[float], values: Sequence[float]) -> LinearFit:
    """Least-squares line through ``(pixels, values)``.

    Args:
        pixels: x values (at least one).
        values: y values, same length.

    Returns:
        The ``LinearFit``; with a single point the line goes through it and the origin.

    Raises:
        ValueError: with no points or mismatched lengths.
    """
    if len(pixels) != len(values) or not pixels:
        raise ValueError("fit_linear needs equally many (>= 1) pixels and values")
    n = len(pixels)
    if n == 1:
        return LinearFit(values[0] / pixels[0], 0.0, 1)
    mean_x = sum(pixels) / n
    mean_y = sum(values) / n
    sxx = sum((x - mean_x) ** 2 for x in pixels)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(pixels, values))
    slope = sxy / sxx if sxx > 0 else 0.0
    return LinearFit(slope, mean_y - slope * mean_x, n)


def fit_modes(measurements: Sequence[Measurement]) -> dict[str, dict[str, LinearFit]]:
    """Fit every metric of every mode from its successful measurements.

    Returns:
        ``{mode: {metric: LinearFit}}`` for modes with at least one ``ok`` measurement.
    """
    fits: dict[str, dict[str, LinearFit]] = {}
    for mode in dict.fromkeys(m.mode for m in measurements):
        good = [m for m in measurements if m.mode == mode and m.status == "ok"]
        if good:
            pixels = [float(m.pixels) for m in good]
            fits[mode] = {k: fit_linear(pixels, [float(getattr(m, k)) for m in good]) for k in METRICS}
    return fits


@dataclass
class Prediction:
    """The planner's prediction for one mode at the asked size.

    Attributes:
        mode: ``PLAN_MODES`` name.
        device_bytes: predicted device peak (on CPU: the simulated device peak).
        host_bytes: predicted peak RSS.
        step_s: predicted step wall-clock time (on the measuring machine, as loaded as it was).
        step_cpu_s: predicted CPU seconds of a step (all threads): the cost used to rank modes,
            because it does not depend on what else ran on the machine.
        fits: whether both budgets hold.
        max_side: the largest square side whose prediction fits both budgets.
        ds_config: the DeepSpeed JSON this mode trains with.
        memory_preset: the ``lrss_ds.memory`` preset.
    """

    mode: str
    device_bytes: float
    host_bytes: float
    step_s: float
    step_cpu_s: float
    fits: bool
    max_side: int
    ds_config: str
    memory_preset: str


def predict(
    fits: dict[str, dict[str, LinearFit]],
    height: int,
    width: int,
    device_mem: float | None,
    host_mem: float | None,
) -> list[Prediction]:
    """Predict every fitted mode at ``height x width`` against the budgets.

    Args:
        fits: ``fit_modes`` output.
        height: asked height.
        width: asked width.
        device_mem: device budget in bytes (``None``: unlimited).
        host_mem: host budget in bytes (``None``: unlimited).

    Returns:
        One ``Prediction`` per mode, in ``PLAN_MODES`` order.
    """
    pixels = float(height) * float(width)
    out = []
    for mode, per_metric in fits.items():
        device = per_metric["device_bytes"](pixels)
        host = per_metric["host_bytes"](pixels)
        limits = [math.inf]
        if device_mem is not None:
            limits.append(per_metric["device_bytes"].pixels_for(device_mem))
        if host_mem is not None:
            limits.append(per_metric["host_bytes"].pixels_for(host_mem))
        max_pixels = min(limits)
        fits_both = (device_mem is None or device <= device_mem) and (host_mem is None or host <= host_mem)
        plan_mode = PLAN_MODES[mode]
        out.append(Prediction(
            mode=mode, device_bytes=device, host_bytes=host, step_s=per_metric["step_s"](pixels),
            step_cpu_s=per_metric["step_cpu_s"](pixels),
            fits=fits_both, max_side=-1 if math.isinf(max_pixels) else int(math.isqrt(int(max_pixels))),
            ds_config=plan_mode.ds_config, memory_preset=plan_mode.memory_preset,
        ))
    order = list(PLAN_MODES)
    return sorted(out, key=lambda p: order.index(p.mode))


# Card sizes the plan reports (GiB: a "24 GB" card holds 24 GiB, e.g. 24564 MiB usable on an RTX 4090).
CARDS_GIB: tuple[int, ...] = (24, 40, 80)


def card_fits(predictions: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    """For each mode, the card memory its predicted device peak needs and which cards hold it.

    Args:
        predictions: ``predict`` output.

    Returns:
        ``{mode: {"needed_bytes": float, "24": bool, "40": bool, "80": bool}}``; the margin is
        :func:`lrss_ds.memory.device_sim.device_bytes_needed`'s.
    """
    from lrss_ds.memory.device_sim import device_bytes_needed

    out: dict[str, dict[str, Any]] = {}
    for p in predictions:
        needed = device_bytes_needed(p.device_bytes)
        out[p.mode] = {"needed_bytes": needed, **{str(card): needed <= card * GIB for card in CARDS_GIB}}
    return out


def recommend(predictions: Sequence[Prediction]) -> Prediction | None:
    """The fitting mode with the smallest predicted step CPU time, or ``None`` when none fits."""
    fitting = [p for p in predictions if p.fits]
    return min(fitting, key=lambda p: p.step_cpu_s) if fitting else None


def relative_error(predicted: float, measured: float) -> float:
    """``(predicted - measured) / measured`` (signed; NaN when not measured)."""
    if not measured or math.isnan(measured):
        return math.nan
    return (predicted - measured) / measured


# ----------------------------------------------------------------------------------------------
# CLI: lrss-ds plan
# ----------------------------------------------------------------------------------------------


# Largest side a plan is made for: ten times a Sentinel-2 tile (10980 px). Beyond it the linear
# fit is extrapolated by orders of magnitude and its numbers overflow the table's columns.
MAX_SIDE = 100_000


def parse_size(text: str, where: str = "--size") -> tuple[int, int]:
    """Parse ``"HxW"`` (or one number for a square) into ``(height, width)``.

    Raises:
        ConfigError: when the text is not of that form or a side is not in 1..``MAX_SIDE``.
    """
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(where, f"{text!r} is not a size; expected HxW, e.g. 6800x7200")
    height, width = (int(p) for p in parts)
    if height <= 0 or width <= 0:
        raise ConfigError(where, f"{text!r}: sides must be positive")
    if max(height, width) > MAX_SIDE:
        raise ConfigError(where, f"{text!r}: a side above {MAX_SIDE} px is not one training sample; cut the scene")
    return height, width


def parse_bytes(text: str, where: str = "--device-mem") -> int:
    """Parse ``"24G"``, ``"512M"``, ``"2.5GiB"`` or a plain byte count into bytes.

    Raises:
        ConfigError: when the text is not a positive size.
    """
    units = {"": 1, "k": 1024, "m": MIB, "g": GIB, "t": 1024 * GIB}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in "kmgt":
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(where, f"{text!r} is not a memory size; expected e.g. 24G, 512M or 2.5GiB") from None
    if value <= 0 or not math.isfinite(value):
        raise ConfigError(where, f"{text!r}: must be positive")
    return int(value * units[unit])


def _parse_sides(text: str, where: str) -> list[int]:
    """``"256,384,512"`` -> ``[256, 384, 512]``."""
    try:
        sides = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(where, f"{text!r}: expected comma-separated integers") from None
    if not sides or min(sides) < 32:
        raise ConfigError(where, f"{text!r}: give at least one side >= 32")
    return sides


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["mode=holistic", "width=18"]`` -> ``{"mode": "holistic", "width": 18}`` (YAML values)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--option", f"{item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lrss-ds plan`` arguments to ``parser``."""
    parser.add_argument("--model", required=True, help="model name (see `lrss-ds models`)")
    parser.add_argument("--size", required=True, help="training sample size HxW, e.g. 6800x7200")
    parser.add_argument("--device-mem", default=None,
                        help="device memory of the card, e.g. 24G: the predicted device peak (on a CPU-only "
                             "machine the simulated one) plus the margin for the CUDA context, allocator "
                             "reserve and workspaces must fit it")
    parser.add_argument("--host-mem", default=None, help="host memory budget (peak RSS), e.g. 64G")
    parser.add_argument("--bands", type=int, default=4, help="input bands (default 4, as FBP: NIR, R, G, B)")
    parser.add_argument("--classes", type=int, default=6, help="classes (default 6)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra model option, repeatable (e.g. mode=holistic)")
    parser.add_argument("--modes", default=",".join(PLAN_MODES),
                        help=f"comma-separated memory modes (default all: {','.join(PLAN_MODES)})")
    parser.add_argument("--fit-sides", default="256,384,512",
                        help="square sides measured for the fit (default 256,384,512)")
    parser.add_argument("--probe-cap", default="6G", help="RSS cap per measuring probe (default 6G)")
    parser.add_argument("--cache", default=None,
                        help=f"measurement cache folder (default {default_cache_dir()})")
    parser.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")


def make_plan(
    model: str,
    height: int,
    width: int,
    *,
    device_mem: int | None,
    host_mem: int | None,
    modes: Sequence[str],
    fit_sides: Sequence[int],
    bands: int = 4,
    num_classes: int = 6,
    model_options: dict[str, Any] | None = None,
    probe_cap: int | None = None,
    cache_dir: Path | None = None,
    refresh: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure (or read cached) small sizes, fit per mode, predict ``height x width``, recommend.

    Args:
        model: model name.
        height: asked height.
        width: asked width.
        device_mem: the card's memory in bytes (the margin of ``device_sim`` is taken off
            before the fitted peaks are compared), ``None`` = unlimited.
        host_mem: host budget in bytes, ``None`` = unlimited.
        modes: ``PLAN_MODES`` names to consider.
        fit_sides: square sides measured for the fit.
        bands: input bands.
        num_classes: classes.
        model_options: extra ``build_model`` options.
        probe_cap: RSS cap per probe in bytes.
        cache_dir: measurement cache (``None``: no cache).
        refresh: ignore cached measurements.
        progress: called with one line before measuring (the number of probes, what they
            measure, an estimate of the time) and before and after each probe.

    Returns:
        JSON-able dict: ``measurements``, ``fits``, ``predictions``, ``recommendation`` (mode
        name or ``None``), ``ds_config`` (the recommended JSON's content), ``device_meaning``,
        ``device_margin`` and ``cards`` (which of 24, 40 and 80 GiB cards hold each mode).

    Raises:
        ConfigError: for an unknown model or mode (before anything is measured).
    """
    from lrss_ds.models import MODEL_BUILDERS  # models sit below engine; imported late for --help speed

    if model not in MODEL_BUILDERS:
        raise ConfigError("--model", f"unknown model {model!r}; known models: {', '.join(sorted(MODEL_BUILDERS))}")
    for mode in modes:
        if mode not in PLAN_MODES:
            raise ConfigError("--modes", f"unknown memory mode {mode!r}; use some of {list(PLAN_MODES)}")
    say = progress or (lambda line: None)
    params = {
        (mode, side): _probe_params(model, side, mode, bands, num_classes, model_options, PROBE_STEPS)
        for mode in modes
        for side in fit_sides
    }
    cached = {job: cached_measurement(p, cache_dir, refresh) for job, p in params.items()}
    todo = [job for job, found in cached.items() if found is None]
    if todo:
        per_probe = probe_seconds_estimate(cache_dir, model)
        say(f"measuring {len(todo)} probe(s), {len(params) - len(todo)} cached: one {model} training step per "
            f"memory mode at {','.join(map(str, fit_sides))} px, each in a fresh process, for its peak memory and "
            f"step time; estimate {_duration(per_probe * len(todo))}")
    measurements, seconds = [], []
    for job in params:
        if cached[job] is not None:
            measurements.append(cached[job])
            continue
        (mode, side), index = job, len(seconds) + 1
        say(f"probe {index}/{len(todo)}: {mode} ({PLAN_MODES[mode].summary}) at {side}x{side} px ...")
        start = time.perf_counter()
        found = measure(model, side, mode, bands=bands, num_classes=num_classes, model_options=model_options,
                        cap_bytes=probe_cap, cache_dir=cache_dir, refresh=refresh)
        seconds.append(time.perf_counter() - start)
        left = len(todo) - index
        say(f"probe {index}/{len(todo)}: {found.status} in {seconds[-1]:.0f} s"
            + (f"; {_duration(sum(seconds) / len(seconds) * left)} left" if left else ""))
        measurements.append(found)
    from lrss_ds.memory.device_sim import allocator_budget, margin_text

    fits = fit_modes(measurements)
    # --device-mem is a card's memory: the fitted peak must fit it with the CUDA context,
    # allocator reserve and workspaces on top (device_sim's margin)
    allocator_mem = None if device_mem is None else int(allocator_budget(device_mem))
    predictions = predict(fits, height, width, allocator_mem, host_mem)
    best = recommend(predictions)
    on_accelerator = any(m.probe.get("device_peak_bytes") is not None for m in measurements)
    ds_config = None
    if best is not None:
        from lrss_ds.engine.config import merge

        ds_config = merge(json.loads((_PACKAGE_ROOT / best.ds_config).read_text()),
                          PLAN_MODES[best.mode].ds_override)
    return {
        "model": model,
        "size": [height, width],
        "device_mem_bytes": device_mem,
        "host_mem_bytes": host_mem,
        "device_meaning": "accelerator allocator peak (max_memory_allocated)" if on_accelerator
        else "SIMULATED device peak (lrss_ds.memory.device_sim; CPU: there is no device)",
        "device_margin": margin_text(),
        "device_allocator_budget_bytes": allocator_mem,
        "cards": card_fits(predictions),
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "fits": {mode: {k: dataclasses.asdict(f) for k, f in per.items()} for mode, per in fits.items()},
        "predictions": [dataclasses.asdict(p) for p in predictions],
        "recommendation": None if best is None else best.mode,
        "memory_preset": None if best is None else best.memory_preset,
        "ds_config_path": None if best is None else best.ds_config,
        "ds_override": None if best is None else PLAN_MODES[best.mode].ds_override,
        "ds_config": ds_config,
    }


def _gib(value: float | None) -> str:
    """Bytes as GiB text."""
    return "-" if value is None or math.isnan(value) else f"{value / GIB:.2f}"


def run(args: argparse.Namespace) -> int:
    """``lrss-ds plan``: print the prediction per mode and the recommended mode (exit 0 if one fits)."""
    height, width = parse_size(args.size)
    device_mem = parse_bytes(args.device_mem, "--device-mem") if args.device_mem else None
    host_mem = parse_bytes(args.host_mem, "--host-mem") if args.host_mem else None
    cache = Path(args.cache) if args.cache else default_cache_dir()
    with terminate_as_exit("lrss-ds plan"):  # SIGTERM kills the running probe and removes its folder
        plan = make_plan(
            args.model, height, width, device_mem=device_mem, host_mem=host_mem,
            modes=[m for m in args.modes.split(",") if m], fit_sides=_parse_sides(args.fit_sides, "--fit-sides"),
            bands=args.bands, num_classes=args.classes, model_options=_parse_options(args.option),
            probe_cap=parse_bytes(args.probe_cap, "--probe-cap"), cache_dir=cache, refresh=args.refresh,
            progress=lambda line: print(f"lrss-ds plan: {line}", file=sys.stderr, flush=True),
        )
    if args.json:
        print(json.dumps(plan, indent=2, default=_json_default))
        return 0 if plan["recommendation"] else 1
    print(f"{args.model} at {height}x{width}; device = {plan['device_meaning']}")
    print(f"{'mode':<16}{'device GiB':>12}{'host GiB':>10}{'step s':>9}{'step CPU-s':>11}{'fits':>6}{'max side':>10}")
    for p in plan["predictions"]:
        max_side = "any" if p["max_side"] < 0 else str(p["max_side"])
        print(f"{p['mode']:<16}{_gib(p['device_bytes']):>12}{_gib(p['host_bytes']):>10}"
              f"{p['step_s']:>9.1f}{p['step_cpu_s']:>11.1f}{'yes' if p['fits'] else 'no':>6}{max_side:>10}")
    print(f"cards (device only; {plan['device_margin']}):")
    print(f"{'mode':<16}{'needs GiB':>10}" + "".join(f"{f'{card} GB':>8}" for card in CARDS_GIB))
    for mode, card in plan["cards"].items():
        print(f"{mode:<16}{_gib(card['needed_bytes']):>10}"
              + "".join(f"{'fits' if card[str(c)] else 'no':>8}" for c in CARDS_GIB))
    failed = [m for m in plan["measurements"] if m["status"] != "ok"]
    for m in failed:
        print(f"note: {m['mode']} at {m['side']}px did not measure ({m['status']}); not fitted")
    if plan["recommendation"] is None:
        print("recommendation: no mode fits these budgets; see 'max side' above")
        return 1
    override = f" with deepspeed.override {json.dumps(plan['ds_override'])}" if plan["ds_override"] else ""
    print(f"recommendation: {plan['recommendation']} (memory preset {plan['memory_preset']!r}, "
          f"DeepSpeed JSON {plan['ds_config_path']}{override})")
    return 0
