"""The trainer's spatial set-up: refusals before any group is built, and its collectives on the accelerator's device."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch.distributed as dist

from lrss_ds.engine.config import load_config
from lrss_ds.engine.spatial_run import SpatialRun, start_spatial
from lrss_ds.engine.trainer import peak_rss_per_rank
from lrss_ds.errors import ConfigError
from tests.engine.test_engine_devices import Reached, RecordingDist, recording  # noqa: F401 - the fixture

EXPERIMENT = """
model: {name: ehsnet}
data: {store: stores/x}
deepspeed: {config: cpu.json}
parallel: {spatial: 2}
"""


@pytest.fixture
def config(tmp_path: Path) -> Any:
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT)
    return load_config(path)


def _world(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: size)


@pytest.mark.parametrize("world, zero, height, words", [
    (3, 2, 256, "2 does not divide the 3 ranks of the job"),
    (2, 3, 256, "ZeRO-3 with spatial groups trains but does not match one rank"),
    (2, 2, 64, "scene s1: a scene of 64 rows holds 1 bands of 64 rows"),
])
def test_spatial_settings_that_cannot_run_are_refused_before_any_group(
    config: Any, monkeypatch: pytest.MonkeyPatch, world: int, zero: int, height: int, words: str
) -> None:
    _world(monkeypatch, world)
    model = SimpleNamespace(pad_multiple=64)  # spatialize would fail on it: the refusal comes first
    with pytest.raises(ConfigError, match=words) as error:
        start_spatial(config, model, {"zero_optimization": {"stage": zero}}, [("s0", 256), ("s1", height)])
    assert "parallel.spatial" in str(error.value) and "\n" not in str(error.value)


def test_one_rank_per_scene_builds_nothing(config: Any) -> None:
    config.parallel.spatial = 1
    assert start_spatial(config, None, {}, []) is None


def test_the_scene_loss_is_reduced_on_the_accelerator(recording: RecordingDist) -> None:
    topology = SimpleNamespace(spatial=2, data=1, spatial_group=None)
    run = SpatialRun(topology=topology, group=SimpleNamespace(rank=0), pad_multiple=64)  # type: ignore[arg-type]
    with pytest.raises(Reached):
        run.scene_loss(0.5)
    assert recording.calls == [("all_reduce", "meta")]


def test_every_ranks_peak_is_gathered_on_the_accelerator(recording: RecordingDist) -> None:
    with pytest.raises(Reached):
        peak_rss_per_rank()
    assert recording.calls and set(recording.calls) == {("all_gather", "meta")}
