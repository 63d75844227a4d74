"""Tests of the trainer's features: BatchNorm recalibration, the CPU/wall budget, their config keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrss_ds.engine.batchnorm_recalibration import recalibrate_batchnorm, recalibration, recalibration_indices
from lrss_ds.engine.config import ExperimentConfig, load_config
from lrss_ds.errors import ConfigError
from tests.engine.test_engine_units import Scenes, StandInEngine


class BatchNormSegmenter(nn.Module):
    """conv-BN-ReLU-conv-BN, plus an auxiliary conv-BN that only training forwards run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)
        self.aux, self.bn_aux = nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> Any:
        hidden = F.relu(self.bn1(self.conv1(x.float() / 255)))
        logits = self.bn2(self.conv2(hidden))
        if self.training:
            return {"logits": logits, "aux": self.bn_aux(self.aux(hidden))}
        return logits


def direct_statistics(model: BatchNormSegmenter, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of bn1's and bn2's per-batch mean and unbiased variance (batch-normalised path)."""
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for x in batches:
            a = model.conv1(x.float() / 255)
            mean1, var1 = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False)
            hidden = F.relu((a - mean1[:, None, None]) / torch.sqrt(var1[:, None, None] + model.bn1.eps)
                            * model.bn1.weight[:, None, None] + model.bn1.bias[:, None, None])
            b = model.conv2(hidden)
            for name, value in (("bn1.mean", mean1), ("bn1.var", a.var((0, 2, 3))),
                                ("bn2.mean", b.mean((0, 2, 3))), ("bn2.var", b.var((0, 2, 3)))):
                sums[name] = sums.get(name, 0) + value
    return {name: value / len(batches) for name, value in sums.items()}


def stale_model() -> BatchNormSegmenter:
    """The model with running statistics far from anything its weights produce."""
    torch.manual_seed(0)
    model = BatchNormSegmenter()
    for bn in (model.bn1, model.bn2, model.bn_aux):
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(100.0)
    return model


def batches_of(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 255, (2, 2, 8, 8), generator=generator, dtype=torch.uint8) for _ in range(count)]


def assert_statistics(model: BatchNormSegmenter, expected: dict[str, torch.Tensor]) -> None:
    for name in ("bn1", "bn2"):
        bn = getattr(model, name)
        torch.testing.assert_close(bn.running_mean, expected[f"{name}.mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, expected[f"{name}.var"], rtol=1e-5, atol=1e-6)


def test_recalibration_replaces_stale_statistics_by_those_of_the_weights() -> None:
    model = stale_model()
    model.train()
    batches = batches_of(5)
    assert recalibrate_batchnorm(model, batches) == 5
    assert_statistics(model, direct_statistics(model, batches))
    # the module modes and momenta are back; the aux head, which eval forwards skip, kept its own
    assert model.training and model.bn1.training and model.bn1.momentum == 0.1
    assert float(model.bn_aux.running_mean[0]) == 5.0 and float(model.bn_aux.running_var[0]) == 100.0


def _recalibrate_on_rank(rank: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    model = stale_model()
    with recalibration(model, across_ranks=True):
        with torch.no_grad():
            for x in batches_of(5)[rank::2]:  # 3 batches on rank 0, 2 on rank 1
                model(x)
    torch.save({k: v for k, v in model.state_dict().items() if "running" in k}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_recalibration_across_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Each rank forwards its share; the count-weighted average leaves both ranks with the statistics
    one process gets from all the batches."""
    import torch.multiprocessing as mp

    mp.spawn(_recalibrate_on_rank, args=(str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = stale_model()
    recalibrate_batchnorm(single, batches_of(5))
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
        torch.testing.assert_close(value, single.state_dict()[key], rtol=1e-5, atol=1e-6)


def stand_in_run(tmp_path: Path, **train: Any) -> Any:
    """A Run over the stand-in engine and BatchNormSegmenter; ``train`` sets train.* fields."""
    from lrss_ds.engine.setup import DistInfo
    from lrss_ds.engine.trainer import Run
    from lrss_ds.memory import MemoryMode, SavedTensorLedger, prepare_model

    config = ExperimentConfig()
    config.data.workers = 0
    config.train.output = str(tmp_path)
    for key, value in train.items():
        setattr(config.train, key, value)
    model = stale_model()
    mode = MemoryMode()
    prepare_model(model, mode)

    def loss_fn(outputs: dict, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs["logits"], target.long())

    return Run(config=config, dist=DistInfo(0, 1, 0), out=tmp_path, engine=StandInEngine(model), loss_fn=loss_fn,
               memory_mode=mode, ledger=SavedTensorLedger(), train_set=Scenes(), val_set=None,
               meta={"model": {"name": "bn"}}, class_names=["a", "b", "c"], num_classes=3, ignore_index=255)


def test_trainer_recalibrates_with_the_final_weights(tmp_path: Path) -> None:
    from lrss_ds.engine.trainer import train

    run = stand_in_run(tmp_path, iterations=3, recalibrate_bn=2)
    assert train(run, resume=False) == 0
    model = run.engine.module
    chosen = recalibration_indices(len(run.train_set), 2, run.config.train.seed, 0, 1)
    batches = [run.train_set[i]["image"][None] for i in chosen]  # un-augmented, one sample per micro-batch
    assert_statistics(model, direct_statistics(model, batches))


class FakeClock:
    """A clock that reads ``per_step`` seconds per optimizer step the engine has taken."""

    def __init__(self, run: Any, per_step: float) -> None:
        self.run, self.per_step = run, per_step

    def __call__(self) -> float:
        return self.per_step * self.run.engine.global_steps


@pytest.mark.parametrize("key", ["budget_cpu_s", "budget_wall_s"])
def test_a_budget_stops_the_loop_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    from lrss_ds.engine import budget
    from lrss_ds.engine.trainer import train

    run = stand_in_run(tmp_path, iterations=50, **{key: 2.5})
    monkeypatch.setattr(budget, "cpu_clock" if key == "budget_cpu_s" else "wall_clock", FakeClock(run, 1.0))
    assert train(run, resume=False) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["iteration"] == 3 and metrics["stopped_by"] == key and metrics["finished"]


def test_iterations_stop_a_run_within_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lrss_ds.engine import budget
    from lrss_ds.engine.trainer import train

    run = stand_in_run(tmp_path, iterations=4, budget_cpu_s=100.0)
    monkeypatch.setattr(budget, "cpu_clock", FakeClock(run, 1.0))
    assert train(run, resume=False) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["iteration"] == 4 and metrics["stopped_by"] == "iterations"
    assert metrics["budget"]["spent"]["cpu_s"] == 4.0


def write_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text("data: {store: s}\n")
    return path


@pytest.mark.parametrize(
    "override, key, problem",
    [
        ("train.augment=flips", "train.augment", "must be one of none, d4"),
        ("train.recalibrate_bn=-1", "train.recalibrate_bn", "must be zero (off) or positive"),
        ("train.budget_cpu_s=0", "train.budget_cpu_s", "must be a positive number of seconds"),
        ("train.budget_wall_s=-3", "train.budget_wall_s", "must be a positive number of seconds"),
        ("train.budget_wall_s=.inf", "train.budget_wall_s", "must be a positive number of seconds"),
        ("train.budget_cpu_s=soon", "train.budget_cpu_s", "expected float"),
    ],
)
def test_bad_feature_values_are_one_line_errors_naming_the_key(tmp_path: Path, override: str, key: str,
                                                               problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write_yaml(tmp_path), [override])
    message = str(error.value)
    assert "\n" not in message and key in message and problem in message


def test_feature_values_load(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path), ["train.augment=d4", "train.recalibrate_bn=8", "train.budget_cpu_s=90",
                                                "data.synthetic={water_scale: 2.5}"])
    assert (config.train.augment, config.train.recalibrate_bn, config.train.budget_cpu_s) == ("d4", 8, 90.0)
    assert config.train.budget_wall_s is None and config.data.synthetic.water_scale == 2.5
    assert os.path.basename(config.source) == "exp.yaml"


def test_the_main_job_trains_with_the_features_on_widened_water() -> None:
    main_job = load_config(Path(__file__).resolve().parents[2] / "ds_configs" / "ehsnet_synthetic.yaml")
    assert main_job.train.augment == "d4" and main_job.train.recalibrate_bn > 0
    assert main_job.data.synthetic is not None and main_job.data.synthetic.water_scale > 1


def test_the_synthetic_store_is_drawn_with_its_water_scale(tmp_path: Path) -> None:
    import numpy as np

    from lrss_ds.data import TileStore
    from lrss_ds.data.synth import make_layout, render_scene
    from lrss_ds.engine.config import DataConfig, SynthConfig
    from lrss_ds.engine.synthetic_store import prepare_synthetic_store

    synth = SynthConfig(train_scenes=1, val_scenes=0, height=96, width=96, seed=2, water_scale=2.5)
    store = prepare_synthetic_store(DataConfig(store=str(tmp_path / "s"), synthetic=synth), log=lambda _: None)
    _, label = TileStore.open(store).read("synth_2_0000")
    assert np.array_equal(label, render_scene(make_layout(2, 0, 96, 96, 2.5))[1])
