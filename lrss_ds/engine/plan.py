"""The planner: predict the peak memory of a training step per memory mode from small measured sizes.

``make_plan`` measures one training step of the model at a few small square sizes, each in a
fresh process (:mod:`lrss_ds.engine.isolated` running :mod:`lrss_ds.engine.probe`; cached),
fits ``value = a * pixels + b`` per memory mode for the device peak, the host peak and the step
times, extrapolates to the asked size and recommends the fastest mode whose prediction fits both
budgets, with the DeepSpeed JSON that mode trains with. ``lrss-ds plan`` is its command line
(:mod:`lrss_ds.engine.plan_cli`).

On a CPU the "device" peak is the probe's simulated one (see :mod:`lrss_ds.engine.probe`) and
"host" is the process's peak RSS, which is what actually has to fit in RAM there. A card fits a
mode when the predicted device peak plus the margin of
:func:`lrss_ds.memory.device_sim.device_bytes_needed` (CUDA context, allocator reserve, cuDNN
workspaces) fits it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lrss_ds.engine.isolated import json_default, run_isolated
from lrss_ds.engine.probe import PLAN_SETUPS, REPO_ROOT
from lrss_ds.engine.temporaries import write_text_atomically
from lrss_ds.errors import ConfigError

from lrss_ds.units import GIB

# The quantities the planner fits, each against the number of pixels.
METRICS: tuple[str, ...] = ("device_bytes", "host_bytes", "step_s", "step_cpu_s")


@dataclass
class Measurement:
    """One measured training step (one mode, one size), as the planner uses it.

    Attributes:
        mode: ``PLAN_SETUPS`` name.
        side: square side in pixels.
        status: ``IsolatedRun.status`` (only ``"ok"`` rows are fitted).
        device_bytes: accelerator allocator peak; on CPU the simulated device peak.
        host_bytes: the process's peak RSS (kernel ``ru_maxrss``).
        step_s: fastest step after the first, wall-clock seconds.
        step_cpu_s: CPU seconds (all threads) of the cheapest step after the first.
        phase_device_bytes: ``device_bytes`` per phase of the step (``{phase: bytes}``; empty in
            measurements cached before phases were recorded).
        phase_host_bytes: peak RSS per phase of the step (empty where it cannot be measured).
        probe: the probe's full result.
    """

    mode: str
    side: int
    status: str
    device_bytes: float = math.nan
    host_bytes: float = math.nan
    step_s: float = math.nan
    step_cpu_s: float = math.nan
    phase_device_bytes: dict[str, float] = field(default_factory=dict)
    phase_host_bytes: dict[str, float] = field(default_factory=dict)
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


PROBE_TARGET = "lrss_ds.engine.probe:probe_training_step"
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
        mode: ``PLAN_SETUPS`` name.
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
        phases = run.result.get("phase_device_peak_bytes") or run.result.get("phase_simulated_device_peak_bytes")
        found.phase_device_bytes = {phase: float(value) for phase, value in (phases or {}).items()}
        found.phase_host_bytes = {phase: float(value) for phase, value in
                                  (run.result.get("phase_rss_peak_bytes") or {}).items()}
    else:
        found.probe = {"error": run.error, "peak_rss_bytes": run.peak_rss_bytes}
    found.probe["probe_wall_s"] = run.wall_s  # what later estimates of a plan's duration start from
    if cache_file is not None and run.status in ("ok", "over_cap", "oom"):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(cache_file, json.dumps(dataclasses.asdict(found), default=json_default))
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


WHOLE_STEP = "whole step"
"""The :class:`PhasedFit` part fitted on a measurement's headline peak (set-up and every phase)."""


@dataclass
class PhasedFit:
    """A step's peak memory as the largest of its phases' peaks, each ``a * pixels + b``.

    A step's peak is the largest of the peaks of its phases (forward and loss, backward,
    optimizer step; :mod:`lrss_ds.engine.step_phases`), and each grows with the pixels at its
    own rate: a phase that holds the gradients and optimizer buffers (a larger fixed part) can
    set the peak at the sizes a planner can afford to measure, while a phase with more bytes per
    pixel overtakes it beyond them. One line through the step's peaks then bends under the truth
    when extrapolated; the largest of the per-phase lines does not. A line through the headline
    peak (``WHOLE_STEP``: set-up and anything outside the phases) is one of the parts.

    Attributes:
        phases: ``{phase: LinearFit}``.
    """

    phases: dict[str, LinearFit]

    def __call__(self, pixels: float) -> float:
        """The largest phase's fitted value at ``pixels``."""
        return max(fit(pixels) for fit in self.phases.values())

    def pixels_for(self, budget: float) -> float:
        """The largest pixel count at which every phase stays within ``budget``."""
        return min(fit.pixels_for(budget) for fit in self.phases.values())

    def phase_at(self, pixels: float) -> str:
        """The phase that sets the peak at ``pixels``."""
        return max(self.phases, key=lambda phase: self.phases[phase](pixels))

    @property
    def steepest(self) -> LinearFit:
        """The phase line with the most bytes per pixel: the one that sets the peak at large sizes."""
        return max(self.phases.values(), key=lambda fit: fit.per_pixel)

    @property
    def per_pixel(self) -> float:
        """Bytes per pixel of the :attr:`steepest` phase."""
        return self.steepest.per_pixel

    @property
    def base(self) -> float:
        """Fixed part of the :attr:`steepest` phase."""
        return self.steepest.base

    @property
    def points(self) -> int:
        """Measurements fitted."""
        return self.steepest.points


MemoryFit = LinearFit | PhasedFit

# The fitted metric and, for the two memory peaks, the Measurement field holding its phases.
PHASED_METRICS: dict[str, str] = {"device_bytes": "phase_device_bytes", "host_bytes": "phase_host_bytes"}


def fit_metric(good: Sequence[Measurement], metric: str) -> MemoryFit:
    """Fit ``metric`` over ``good`` measurements: per phase (:class:`PhasedFit`) for the memory
    peaks when every measurement recorded the same phases, else one line."""
    pixels = [float(m.pixels) for m in good]
    whole = fit_linear(pixels, [float(getattr(m, metric)) for m in good])
    phase_field = PHASED_METRICS.get(metric)
    if phase_field is None:
        return whole
    per_measurement = [getattr(m, phase_field) for m in good]
    shared = set(per_measurement[0]).intersection(*per_measurement[1:]) if per_measurement else set()
    if not shared:
        return whole
    phases = {phase: fit_linear(pixels, [float(found[phase]) for found in per_measurement])
              for phase in sorted(shared)}
    return PhasedFit({**phases, WHOLE_STEP: whole})


def fit_modes(measurements: Sequence[Measurement]) -> dict[str, dict[str, MemoryFit]]:
    """Fit every metric of every mode from its successful measurements.

    Returns:
        ``{mode: {metric: fit}}`` for modes with at least one ``ok`` measurement: a
        :class:`PhasedFit` for the memory peaks where phases were measured, a
        :class:`LinearFit` otherwise.
    """
    fits: dict[str, dict[str, MemoryFit]] = {}
    for mode in dict.fromkeys(m.mode for m in measurements):
        good = [m for m in measurements if m.mode == mode and m.status == "ok"]
        if good:
            fits[mode] = {metric: fit_metric(good, metric) for metric in METRICS}
    return fits


@dataclass
class Prediction:
    """The planner's prediction for one mode at the asked size.

    Attributes:
        mode: ``PLAN_SETUPS`` name.
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


def predict_modes(
    fits: dict[str, dict[str, MemoryFit]],
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
        One ``Prediction`` per mode, in ``PLAN_SETUPS`` order.
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
        plan_mode = PLAN_SETUPS[mode]
        out.append(Prediction(
            mode=mode, device_bytes=device, host_bytes=host, step_s=per_metric["step_s"](pixels),
            step_cpu_s=per_metric["step_cpu_s"](pixels),
            fits=fits_both, max_side=-1 if math.isinf(max_pixels) else int(math.isqrt(int(max_pixels))),
            ds_config=plan_mode.ds_config, memory_preset=plan_mode.memory_preset,
        ))
    order = list(PLAN_SETUPS)
    return sorted(out, key=lambda p: order.index(p.mode))


# Card sizes the plan reports (GiB: a "24 GB" card holds 24 GiB, e.g. 24564 MiB usable on an RTX 4090).
CARDS_GIB: tuple[int, ...] = (24, 40, 80)


def card_fits(predictions: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    """For each mode, the card memory its predicted device peak needs and which cards hold it.

    Args:
        predictions: ``predict_modes`` output.

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
        modes: ``PLAN_SETUPS`` names to consider.
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
        if mode not in PLAN_SETUPS:
            raise ConfigError("--modes", f"unknown memory mode {mode!r}; use some of {list(PLAN_SETUPS)}")
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
        say(f"probe {index}/{len(todo)}: {mode} ({PLAN_SETUPS[mode].summary}) at {side}x{side} px ...")
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
    predictions = predict_modes(fits, height, width, allocator_mem, host_mem)
    best = recommend(predictions)
    on_accelerator = any(m.probe.get("device_peak_bytes") is not None for m in measurements)
    ds_config = None
    if best is not None:
        from lrss_ds.engine.config import merge

        ds_config = merge(json.loads((REPO_ROOT / best.ds_config).read_text()),
                          PLAN_SETUPS[best.mode].ds_override)
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
        "peak_phase": {mode: per["host_bytes"].phase_at(float(height) * width)
                       for mode, per in fits.items() if isinstance(per["host_bytes"], PhasedFit)},
        "predictions": [dataclasses.asdict(p) for p in predictions],
        "recommendation": None if best is None else best.mode,
        "memory_preset": None if best is None else best.memory_preset,
        "ds_config_path": None if best is None else best.ds_config,
        "ds_override": None if best is None else PLAN_SETUPS[best.mode].ds_override,
        "ds_config": ds_config,
    }

