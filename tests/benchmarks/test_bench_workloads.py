"""Tests of the benchmark training workload: every method is trained by `lrss-ds train` on a tile store."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _workloads  # noqa: E402


def _fake_product(monkeypatch: pytest.MonkeyPatch, argvs: list[list[str]]) -> None:
    """``lrss_ds.cli.main`` recording its arguments and writing the metrics a finished run has."""
    import lrss_ds.cli as cli

    def main(argv: list[str]) -> int:
        argvs.append(list(argv))
        config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
        run = Path(config["train"]["output"])
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({
            "iteration": 7, "history": [{"loss": 2.0}, {"loss": 1.5}], "stopped_by": "budget_cpu_s",
            "budget": {"spent": {"cpu_s": 3.0, "wall_s": 4.0}},
        }))
        return 0

    monkeypatch.setattr(cli, "main", main)
    monkeypatch.setattr(_workloads, "evaluate_checkpoint",
                        lambda checkpoint, *args, **kwargs: {"miou": 50.0, "checkpoint": checkpoint, "inference": "local"})


@pytest.mark.parametrize("method, mode, micro_batch, recalibrate, lr", [
    ("patch HRNet", "patch", 8, 8 * 64 * 64 // (16 * 16), _workloads.COMMON_LR),
    ("EHSNet", "whole", 1, 8, _workloads.COMMON_LR),
    ("GLNet", "whole", 1, 8, _workloads.FPN_LR),  # its FPN head diverges at the common rate
])
def test_methods_train_through_lrss_ds_train_with_augmentation_recalibration_and_a_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, method: str, mode: str, micro_batch: int, recalibrate: int,
    lr: float,
) -> None:
    argvs: list[list[str]] = []
    _fake_product(monkeypatch, argvs)
    result = _workloads.product_train(method, budget_cpu_s=30.0, scene_size=64, patch=16, run_dir=str(tmp_path),
                                      train_scenes=3, bn_scenes=8.0)
    assert argvs == [["train", "--config", str(tmp_path / "experiment.yaml")]]
    config = yaml.safe_load((tmp_path / "experiment.yaml").read_text())
    train = config["train"]
    assert (train["augment"], train["budget_cpu_s"], train["recalibrate_bn"]) == ("d4", 30.0, recalibrate)
    assert config["data"]["mode"] == mode and config["data"]["synthetic"]["train_scenes"] == 3
    assert config["deepspeed"]["override"]["train_micro_batch_size_per_gpu"] == micro_batch
    assert config["loss"]["name"] == _workloads.METHODS[method].loss
    assert config["optim"] == {"type": "adamw", "lr": lr, "weight_decay": 1e-4}
    assert result["checkpoint"] == str(tmp_path / "run")  # the product's run is what is scored
    assert (result["steps"], result["train_cpu_s"], result["stopped_by"], result["final_loss"]) == (
        7, 3.0, "budget_cpu_s", 1.5)
