"""Engine pieces in one process: sample order, LR schedule, DeepSpeed JSON checks, retention,
argument parsing, and the loop's non-finite-loss handling (with a stand-in engine)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lrss_ds.engine import training_checkpoints
from lrss_ds.engine.config import ExperimentConfig, ScheduleConfig, load_config
from lrss_ds.engine.loaders import ResumableSampler
from lrss_ds.engine.setup import lr_factor
from lrss_ds.errors import ConfigError, OutputExistsError, TrainingError

REPO = Path(__file__).resolve().parents[2]


def take(sampler: ResumableSampler, n: int) -> list[int]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(n)]


def test_sampler_resumes_mid_stream_and_shards_epochs() -> None:
    full = take(ResumableSampler(5, rank=1, world_size=2, seed=7), 12)
    for start in (0, 1, 3, 4, 7):
        assert take(ResumableSampler(5, rank=1, world_size=2, seed=7, start=start), 12 - start) == full[start:]
    # within an epoch the ranks' shares cover every sample (padded by wrapping to 3 each)
    r0 = ResumableSampler(5, rank=0, world_size=2, seed=7).epoch_order(2)
    r1 = ResumableSampler(5, rank=1, world_size=2, seed=7).epoch_order(2)
    assert len(r0) == len(r1) == 3 and set(r0) | set(r1) == set(range(5))
    # epochs differ, seeds differ
    sampler = ResumableSampler(50, 0, 1, seed=7)
    assert sampler.epoch_order(0) != sampler.epoch_order(1)
    assert sampler.epoch_order(0) != ResumableSampler(50, 0, 1, seed=8).epoch_order(0)


def test_lr_factor_policies() -> None:
    step = lr_factor(ScheduleConfig(warmup_iters=2, warmup_lr=0.001, milestones=[4, 6], gamma=0.5), base_lr=0.01)
    assert [round(step(i), 6) for i in range(8)] == [0.1, 0.1, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    poly = lr_factor(ScheduleConfig(policy="poly", milestones=[10], min_lr=0.001), base_lr=0.01)
    assert poly(0) == 1.0 and poly(5) == pytest.approx(0.5**0.9) and poly(10) == pytest.approx(0.1)
    constant = lr_factor(ScheduleConfig(policy="constant"), base_lr=0.01)
    assert constant(0) == constant(10_000) == 1.0


def experiment(tmp_path: Path, ds_json: dict[str, Any], *overrides: str) -> ExperimentConfig:
    (tmp_path / "ds.json").write_text(json.dumps(ds_json))
    (tmp_path / "exp.yaml").write_text(f"data: {{store: s}}\ndeepspeed: {{config: ds.json}}\ntrain: {{output: {tmp_path / 'out'}}}\n")
    return load_config(tmp_path / "exp.yaml", overrides)


def test_deepspeed_json_checks(tmp_path: Path) -> None:
    from lrss_ds.engine.setup import load_deepspeed_json

    base = {"zero_optimization": {"stage": 2}, "csv_monitor": {"enabled": True}, "train_batch_size": 8}
    ds = load_deepspeed_json(experiment(tmp_path, base, "deepspeed.override.gradient_accumulation_steps=3"))
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == 1
    assert "train_batch_size" not in ds  # derived by DeepSpeed from ranks x micro x accumulation
    assert ds["csv_monitor"]["output_path"] == str(tmp_path / "out" / "monitor")
    with pytest.raises(ConfigError, match=r"ds.json: optimizer: set the optimizer in the experiment YAML"):
        load_deepspeed_json(experiment(tmp_path, {**base, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"fp16.enabled: fp16 is refused"):
        load_deepspeed_json(experiment(tmp_path, {**base, "fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"data_types.buffer_dtype"):
        load_deepspeed_json(experiment(tmp_path, {**base, "bf16": {"enabled": True}}))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_deepspeed_json(experiment(tmp_path, base, f"deepspeed.config={tmp_path / 'bad.json'}"))


def test_shipped_deepspeed_jsons_pass_the_checks(tmp_path: Path) -> None:
    """Every JSON in ds_configs/ is accepted on this CPU, except the GPU-only ones: fp16 (refused by
    the CPU accelerator) and the GPU bf16 variants (their BatchNorm buffers stay fp32)."""
    from lrss_ds.engine.setup import load_deepspeed_json

    for path in sorted((REPO / "ds_configs").glob("*.json")):
        config = experiment(tmp_path, json.loads(path.read_text()))
        if "fp16" in path.name or ("bf16" in path.name and not path.name.startswith("cpu")):
            with pytest.raises(ConfigError, match="fp16|buffer_dtype"):
                load_deepspeed_json(config)
        else:
            assert load_deepspeed_json(config)["train_micro_batch_size_per_gpu"] == 1, path.name


def test_prune_keeps_last_latest_and_best(tmp_path: Path) -> None:
    for it in (1, 2, 3, 4, 5):
        (tmp_path / training_checkpoints.tag_for(it)).mkdir()
    (tmp_path / "latest").write_text("step_0000005")
    training_checkpoints.mark_best(tmp_path, "step_0000002", 0.5)
    deleted = training_checkpoints.prune(tmp_path, keep_last=2)
    assert deleted == ["step_0000001", "step_0000003"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_0000002", "step_0000004", "step_0000005"]
    assert training_checkpoints.read_best(tmp_path) == ("step_0000002", 0.5)
    assert (tmp_path / "best").read_text() == "step_0000002"


def test_fresh_run_over_checkpoints_is_refused(tmp_path: Path) -> None:
    from lrss_ds.engine.trainer import check_output

    check_output(tmp_path, resume=False)  # empty: fine
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000003")
    with pytest.raises(OutputExistsError, match="--resume"):
        check_output(tmp_path, resume=False)
    check_output(tmp_path, resume=True)


def test_train_module_parses_launcher_arguments() -> None:
    """The launcher puts --local_rank first; overrides may come between options."""
    import argparse

    from lrss_ds.engine import train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_intermixed_args(["--local_rank=1", "--config", "x.yaml", "a.b=1", "--resume", "c=2"])
    assert args.config == "x.yaml" and args.resume and args.overrides == ["a.b=1", "c=2"] and args.local_rank == 1


class StandInEngine(nn.Module):
    """The slice of DeepSpeedEngine the loop uses, over a plain SGD step (no distributed)."""

    def __init__(self, module: nn.Module, accumulation: int = 1) -> None:
        super().__init__()
        self.module = module
        self.accumulation = accumulation
        self.micro_steps = 0
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        self.global_steps = 0
        self.skipped_steps = 0  # the fp16 loss scaler's count (never skips here)
        self.global_rank = 0
        self.device = torch.device("cpu")
        self.monitor = None

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.global_steps += 1

    def get_lr(self) -> list[float]:
        return [0.1]

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def train_micro_batch_size_per_gpu(self) -> int:
        return 1

    def zero_optimization_stage(self) -> int:
        return 0

    def bfloat16_enabled(self) -> bool:
        return False

    def fp16_enabled(self) -> bool:
        return False

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool = True) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), **client_state}, Path(root) / tag / "mp_rank_00_model_states.pt")
        if save_latest:
            (Path(root) / "latest").write_text(tag)


class TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> Any:
        return {"logits": self.conv(x.float())}


class Scenes(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randint(0, 255, (2, 8, 8), generator=g, dtype=torch.uint8),
                "label": torch.randint(0, 3, (8, 8), generator=g, dtype=torch.uint8), "scene": f"s{i}", "window": (0, 0, 8, 8)}


def stand_in_run(tmp_path: Path, nan_calls: set[int], iterations: int, max_nonfinite: int, accumulation: int = 1) -> Any:
    from lrss_ds.engine.setup import DistInfo
    from lrss_ds.engine.trainer import Run
    from lrss_ds.memory import MemoryMode, SavedTensorLedger, prepare_model

    torch.manual_seed(0)
    config = ExperimentConfig()
    config.train.iterations, config.train.max_nonfinite, config.train.output = iterations, max_nonfinite, str(tmp_path)
    config.data.workers = 0
    calls = {"n": 0}

    def loss_fn(outputs: dict, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = nn.functional.cross_entropy(outputs["logits"], target.long())
        return loss * float("nan") if calls["n"] in nan_calls else loss

    model = TinySegmenter()
    mode = MemoryMode()
    prepare_model(model, mode)
    return Run(config=config, dist=DistInfo(0, 1, 0), out=tmp_path, engine=StandInEngine(model, accumulation), loss_fn=loss_fn,
               memory_mode=mode, ledger=SavedTensorLedger(), train_set=Scenes(), val_set=None,
               meta={"model": {"name": "tiny"}}, class_names=["a", "b", "c"], num_classes=3, ignore_index=255)


def test_nonfinite_loss_is_skipped_then_too_many_stop(tmp_path: Path) -> None:
    from lrss_ds.engine.trainer import train

    run = stand_in_run(tmp_path / "a", nan_calls={2}, iterations=3, max_nonfinite=2)
    assert train(run, resume=False) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["nonfinite_skipped"] == 1 and metrics["iteration"] == 3 and len(metrics["history"]) == 3
    assert all(h["loss"] == h["loss"] for h in metrics["history"])
    assert "non-finite loss" in (tmp_path / "a" / "log.txt").read_text() if (tmp_path / "a" / "log.txt").exists() else True

    run = stand_in_run(tmp_path / "b", nan_calls={2, 3, 4}, iterations=5, max_nonfinite=2)
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train(run, resume=False)
    assert run.engine.global_steps == 1  # the skipped micro-batches never stepped the optimizer


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    """An iteration is one optimizer step: with accumulation 3 it takes 3 micro-batches (a skipped
    non-finite one is replaced by the next), and its logged loss is their mean."""
    from lrss_ds.engine.trainer import train

    run = stand_in_run(tmp_path, nan_calls={2}, iterations=2, max_nonfinite=1, accumulation=3)
    assert train(run, resume=False) == 0
    assert run.engine.global_steps == 2 and run.engine.micro_steps == 6
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["iteration"] for h in metrics["history"]] == [1, 2] and metrics["nonfinite_skipped"] == 1


_FAILING_LOOP = """
import torch
from torch.utils.data import DataLoader, Dataset
from lrss_ds.engine.loaders import _worker_init, worker_batches

class Numbers(Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, index):
        return torch.tensor(index)

loader = DataLoader(Numbers(), num_workers=1, worker_init_fn=_worker_init)
with worker_batches(loader) as batches:
    next(batches)
    raise RuntimeError("failed mid-epoch")
"""


def test_run_failing_with_live_workers_exits(tmp_path: Path) -> None:
    """Workers ignore SIGTERM, so an exception with a live loader iterator used to hang the
    interpreter at exit (multiprocessing's exit hook SIGTERMs, then joins); it must exit."""
    import os
    import subprocess
    import sys

    script = tmp_path / "failing_loop.py"
    script.write_text(_FAILING_LOOP)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "failed mid-epoch" in done.stderr


@pytest.mark.parametrize("size", ["999999999x999999999", "100001x64", "0x64"])
def test_plan_refuses_sizes_it_cannot_plan(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A 999999999-px side once ran the probes and printed columns pushed apart by its numbers."""
    from lrss_ds.cli import main

    assert main(["plan", "--model", "ehsnet", "--size", size, "--cache", "/nonexistent/never-used"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"lrss-ds plan: error: --size: '{size}': ") and captured.err.count("\n") == 1
