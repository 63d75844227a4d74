"""The planner: the linear fit, predictions and recommendation, the cache key, and `lrss-ds plan` on cached measurements."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from lrss_ds.engine import plan, plan_cli
from lrss_ds.errors import ConfigError


def test_linear_fit_prediction_and_recommendation() -> None:
    pixels = [1e4, 4e4, 9e4]
    fit = plan.fit_linear(pixels, [2 * p + 100 for p in pixels])
    assert fit.per_pixel == pytest.approx(2) and fit.base == pytest.approx(100)
    assert fit.pixels_for(2 * 1e6 + 100) == pytest.approx(1e6)
    lines = {"device_bytes": fit, "host_bytes": plan.LinearFit(1.0, 0.0, 3),
             "step_s": plan.LinearFit(1e-6, 0.0, 3), "step_cpu_s": plan.LinearFit(1e-6, 0.0, 3)}
    cheap = dict(lines, step_cpu_s=plan.LinearFit(1e-7, 0.0, 3))
    small = dict(lines, device_bytes=plan.LinearFit(0.5, 0.0, 3))
    preds = plan.predict_modes({"none": cheap, "ckpt_stage": small}, 1000, 1000, device_mem=1e6, host_mem=None)
    by_mode = {p.mode: p for p in preds}
    assert not by_mode["none"].fits and by_mode["ckpt_stage"].fits
    assert by_mode["ckpt_stage"].max_side == 1414  # 0.5 * px <= 1e6
    assert plan.recommend(preds).mode == "ckpt_stage"
    assert plan.recommend(plan.predict_modes({"none": cheap}, 10, 10, device_mem=1e6, host_mem=None)).mode == "none"
    assert plan.recommend(plan.predict_modes({"none": cheap}, 1000, 1000, device_mem=1.0, host_mem=None)) is None
    assert math.isnan(plan.relative_error(1.0, math.nan))


def _measured(side: int, phases: dict[str, tuple[float, float]]) -> plan.Measurement:
    """A measurement whose device and host peaks per phase are ``per_pixel * pixels + base``."""
    pixels = side * side
    values = {phase: per_pixel * pixels + base for phase, (per_pixel, base) in phases.items()}
    peak = max(values.values())
    return plan.Measurement(mode="fullres_fp32", side=side, status="ok", device_bytes=peak, host_bytes=peak,
                            step_s=1.0, step_cpu_s=1.0, phase_device_bytes=dict(values), phase_host_bytes=dict(values))


def test_phased_fit_follows_the_phase_that_overtakes_beyond_the_fitted_sizes() -> None:
    # the optimizer step holds more fixed memory, the backward more per pixel: at the fit
    # sides the step sets the peak, at a whole scene the backward does
    phases = {"forward": (100.0, 0.5e9), "backward": (234.0, 0.68e9), "step": (185.0, 0.84e9)}
    measurements = [_measured(side, phases) for side in (512, 768, 1024)]
    fits = plan.fit_modes(measurements)["fullres_fp32"]
    host = fits["host_bytes"]
    assert isinstance(host, plan.PhasedFit)
    whole_scene = 6908 * 7300
    truth = max(per_pixel * whole_scene + base for per_pixel, base in phases.values())
    assert host(whole_scene) == pytest.approx(truth)
    assert host.phase_at(whole_scene) == "backward" and host.phase_at(512 * 512) == "step"
    one_line = plan.fit_linear([m.pixels for m in measurements], [m.host_bytes for m in measurements])
    assert one_line(whole_scene) < 0.85 * truth  # what one line through the step's peaks predicts
    assert host.pixels_for(truth) == pytest.approx(whole_scene)
    assert host.per_pixel == pytest.approx(234.0)
    (prediction,) = plan.predict_modes({"fullres_fp32": fits}, 6908, 7300, device_mem=None, host_mem=None)
    assert prediction.host_bytes == pytest.approx(truth) and prediction.device_bytes == pytest.approx(truth)


def test_measurements_without_shared_phases_fit_one_line() -> None:
    with_phases = _measured(512, {"forward": (1.0, 10.0)})
    cached_before_phases = dataclasses.replace(_measured(1024, {"forward": (1.0, 10.0)}),
                                               phase_device_bytes={}, phase_host_bytes={})
    fits = plan.fit_modes([with_phases, cached_before_phases])["fullres_fp32"]
    assert isinstance(fits["host_bytes"], plan.LinearFit) and isinstance(fits["device_bytes"], plan.LinearFit)


def test_plan_cli_parses_sizes_and_refuses_bad_input() -> None:
    assert plan_cli.parse_size("6800x7200") == (6800, 7200)
    assert plan_cli.parse_bytes("1.5G") == int(1.5 * plan.GIB)
    with pytest.raises(ConfigError, match="--size"):
        plan_cli.parse_size("big")
    with pytest.raises(ConfigError, match="--host-mem"):
        plan_cli.parse_bytes("-3G", "--host-mem")
    with pytest.raises(ConfigError, match="--modes"):
        plan.make_plan("ehsnet", 64, 64, device_mem=None, host_mem=None, modes=["turbo"], fit_sides=[64])


def _fake_cache(cache: Path, sides: list[int], modes: dict[str, tuple[float, float]]) -> None:
    """Cached measurements: per mode (device bytes/px, host bytes/px) on a 0.5 GiB base."""
    for mode, (dev, host) in modes.items():
        for side in sides:
            params = {"model": "ehsnet", "height": side, "width": side, "mode": mode, "steps": 2,
                      "bands": 4, "num_classes": 6, "model_options": {}}
            found = plan.Measurement(mode=mode, side=side, status="ok", device_bytes=dev * side * side,
                                     host_bytes=0.5 * plan.GIB + host * side * side, step_s=1e-5 * side * side,
                                     step_cpu_s=(2e-5 if mode == "none" else 3e-5) * side * side)
            cache.mkdir(parents=True, exist_ok=True)
            (cache / plan._cache_key(params)).write_text(json.dumps(dataclasses.asdict(found)))


def test_plan_cli_predicts_from_cached_measurements_and_recommends(tmp_path: Path, capsys) -> None:
    from lrss_ds.cli import main

    _fake_cache(tmp_path, [128, 192], {"none": (1000.0, 2000.0), "ckpt_stage": (100.0, 400.0)})
    argv = ["plan", "--model", "ehsnet", "--size", "4000x4000", "--device-mem", "4G", "--host-mem", "8G",
            "--modes", "none,ckpt_stage", "--fit-sides", "128,192", "--cache", str(tmp_path), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    preds = {p["mode"]: p for p in out["predictions"]}
    # none: 16e6 px * 1000 B = 14.9 GiB device -> does not fit; ckpt_stage: 1.49 GiB device, 6.5 GiB host
    assert not preds["none"]["fits"] and preds["ckpt_stage"]["fits"]
    assert preds["ckpt_stage"]["host_bytes"] == pytest.approx(0.5 * plan.GIB + 400 * 16e6, rel=1e-6)
    assert out["recommendation"] == "ckpt_stage" and out["ds_config"]["zero_optimization"]["stage"] == 2
    assert main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert "recommendation: ckpt_stage" in text and "ds_configs/cpu.json" in text
    small = argv[:4] + ["64x64"] + argv[5:-1]
    assert main(small) == 0 and "recommendation: none" in capsys.readouterr().out  # fastest that fits
    tight = argv[:6] + ["1M"] + argv[7:-1]
    assert main(tight) == 1 and "no mode fits" in capsys.readouterr().out


def test_plan_cache_key_changes_with_the_code_and_the_allocator(monkeypatch) -> None:
    """A cached measurement must not outlive the code or allocator setting that produced it."""
    params = {"model": "ehsnet", "mode": "none", "height": 64, "width": 64}
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    base = plan._cache_key(params)
    assert plan._cache_key(dict(params)) == base
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert plan._cache_key(params) != base
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(plan, "_source_digest", lambda: "another-version")
    assert plan._cache_key(params) != base
