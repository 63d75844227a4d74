"""End-to-end training runs: 2 ranks under the real deepspeed launcher, kill -9 + resume, SIGTERM,
and the loss falling on the synthetic task with the main job's own experiment file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lrss_ds.cli import main
from lrss_ds.engine.config import DataConfig, SynthConfig
from lrss_ds.engine.demo import deepspeed_command, launcher_env
from lrss_ds.engine.synthetic_store import prepare_synthetic_store

REPO = Path(__file__).resolve().parents[2]
MAIN_JOB = REPO / "ds_configs" / "ehsnet_synthetic.yaml"
TIMEOUT = 900

# Tiny EHSNet on 128x128 scenes (the smallest size whose last HRNet branch still has >1 pixel
# at output stride 8); SGD so that no DeepSpeedCPUAdam build is needed by these runs.
TINY = """
model: {{name: ehsnet, options: {{backbone: hrnet_w18, output_stride: 8, lrd_k: 32, lrd_d: 32}}}}
data: {{store: {store}, workers: 1}}
optim: {{type: sgd, lr: 0.01, momentum: 0.9, head_lr_mult: 10, head_keys: [lrd, ecr, head]}}
schedule: {{warmup_iters: 2, warmup_lr: 1.0e-3, milestones: [5]}}
memory: {{preset: ckpt_stage}}
deepspeed: {{config: {ds_json}}}
loss: {{name: ehsnet}}
train: {{seed: 3, iterations: 6, checkpoint_every: 3, eval_every: 0, keep_last: 3}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine_store") / "store"
    synth = SynthConfig(train_scenes=2, val_scenes=1, height=128, width=128, bands=4, seed=5)
    prepare_synthetic_store(DataConfig(store=str(path), synthetic=synth), log=lambda line: None)
    return path


@pytest.fixture(scope="module")
def tiny_yaml(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine_yaml") / "tiny.yaml"
    path.write_text(TINY.format(store=store, ds_json=REPO / "ds_configs" / "cpu.json"))
    return path


def launch(config: Path, out: Path, ranks: int, *extra: str, resume: bool = False, env: dict | None = None) -> int:
    """Run training through the deepspeed launcher; return its exit status (output to out.log)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = deepspeed_command(config, ranks, ["--output", str(out), *extra], resume=resume)
    with open(f"{out}.log", "a") as log:
        return subprocess.run(command, env={**launcher_env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT, cwd=REPO).returncode


def final_weights(out: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model weights DeepSpeed saved in ``tag`` (ZeRO-2 keeps whole fp32 weights in model_states)."""
    states = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["module"]


def read_log(out: Path) -> str:
    log = Path(f"{out}.log")
    return log.read_text()[-3000:] if log.exists() else "(no log)"


@pytest.fixture(scope="module")
def two_rank_run(tiny_yaml: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 iterations on 2 ranks in one go, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("two_rank") / "full"
    status = launch(tiny_yaml, out, 2)
    assert status == 0, read_log(out)
    return out


@pytest.mark.slow
@pytest.mark.launcher
def test_two_ranks_keep_parameters_equal(two_rank_run: Path) -> None:
    metrics = json.loads((two_rank_run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iteration"] == 6 and metrics["finished"]
    digests = metrics["parameter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 6 and all(l == l and abs(l) < 1e6 for l in losses)  # finite
    assert 0.0 <= metrics["final"]["miou"] <= 1.0
    # the lr followed the schedule: warm-up, base, step decay at 5
    lrs = [h["lr"] for h in metrics["history"]]
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(0.01) and lrs[5] == pytest.approx(1e-3)
    meta = json.loads((two_rank_run / "checkpoints" / "step_0000006" / "lrss_meta.json").read_text())
    assert meta["model"]["name"] == "ehsnet" and meta["iteration"] == 6
    assert meta["dataset"]["name"] == "synthetic" and meta["input_dtype"] == "uint8" and len(meta["band_mean"]) == 4
    for rank in (0, 1):
        assert (two_rank_run / "checkpoints" / "step_0000006" / f"rng_rank{rank}.pt").is_file()


@pytest.mark.slow
@pytest.mark.launcher
def test_kill9_then_resume_equals_uninterrupted(two_rank_run: Path, tiny_yaml: Path, tmp_path: Path) -> None:
    """3 steps, SIGKILL right after the step-3 checkpoint, --resume, 3 more == 6 in one run."""
    out = tmp_path / "interrupted"
    status = launch(tiny_yaml, out, 2, env={"LRSS_DS_KILL_AFTER_CHECKPOINT": "3"})
    assert status != 0, "the run should have been killed"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not (out / "checkpoints" / "step_0000006").exists() and not (out / "metrics.json").exists()

    status = launch(tiny_yaml, out, 2, resume=True)
    assert status == 0, read_log(out)
    resumed, full = final_weights(out, "step_0000006"), final_weights(two_rank_run, "step_0000006")
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    history = json.loads((out / "metrics.json").read_text())["history"]
    full_history = json.loads((two_rank_run / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in history] == [h["loss"] for h in full_history]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tiny_yaml: Path, tmp_path: Path) -> None:
    """SIGTERM (SLURM preemption) mid-run: a checkpoint of the current iteration, exit 143."""
    out = tmp_path / "preempted"
    command = [sys.executable, "-m", "lrss_ds.train", "--config", str(tiny_yaml), "--output", str(out),
               "train.iterations=1000", "train.checkpoint_every=0"]
    with open(tmp_path / "preempted.log", "w") as log:
        process = subprocess.Popen(command, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + TIMEOUT
        while " it 1 " not in ((out / "log.txt").read_text() if (out / "log.txt").exists() else ""):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "preempted.log").read_text()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=TIMEOUT)
    assert status == 128 + signal.SIGTERM, (tmp_path / "preempted.log").read_text()[-2000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / tag / "lrss_meta.json").read_text())
    assert meta["iteration"] >= 1 and tag == f"step_{meta['iteration']:07d}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is False and metrics["iteration"] == meta["iteration"]
    assert "SIGTERM: saved" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_main_job_loss_falls(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The main job's experiment (EHSNet, ZeRO-2 + CPU offload, DeepSpeedCPUAdam, checkpointing,
    flips/turns, BatchNorm recalibration) run by `lrss-ds train` on small scenes: the loss falls,
    the statistics are recalibrated before the final evaluation, the run directory is complete."""
    out = tmp_path / "main_job"
    argv = ["train", "--config", str(MAIN_JOB), "--output", str(out), f"data.store={store}", "data.synthetic=null",
            "train.iterations=16", "train.eval_every=0", "train.checkpoint_every=0", "schedule.milestones=[100]"]
    command = [sys.executable, "-m", "lrss_ds.cli", *argv]
    result = subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"]]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses
    assert "eval @ 16: mIoU" in result.stdout
    assert result.stdout.index("recalibrated BatchNorm statistics over 24 batch(es)") < result.stdout.index("eval @ 16")
    assert metrics["stopped_by"] == "iterations"
    for name in ("config.yaml", "ds_config.json", "log.txt", "checkpoints/latest", "checkpoints/step_0000016/lrss_meta.json"):
        assert (out / name).exists(), name
    assert (out / "monitor" / "train" / "Train_loss.csv").is_file()
    # a fresh run over a run directory with checkpoints is refused without --resume; the refusal
    # comes before DeepSpeed starts, so the same command line runs in this process
    capsys.readouterr()
    assert main(argv) == 1 and "already holds checkpoints" in capsys.readouterr().err


# A model of the papers' comparison tables, tiny, trained under the launcher with checkpointing.
MODEL_RUN = """
model: {{name: {name}, options: {options}}}
data: {{store: {store}, workers: 1}}
optim: {{type: sgd, lr: 0.01, momentum: 0.9}}
memory: {{preset: ckpt_stage}}
deepspeed: {{config: {ds_json}}}
loss: {{name: {loss}}}
train: {{seed: 3, iterations: 2, checkpoint_every: 0, eval_every: 0}}
"""


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.parametrize("name, options", [
    ("isdnet", "{channels: 32, shallow_base: 16, relation_groups: 4}"),
    ("stdc", "{base: 16, context_channels: 32}"),
    ("fcn8s", "{width: 16, fc_channels: 64}"),
    ("transunet", "{resnet_depth: 18, hidden: 32, layers: 2, heads: 2, mlp: 64}"),
    ("magnet", "{crop_size: 64, depth: 18, fpn_width: 32}"),
    ("fctl", "{crop_size: 64, depth: 18, fpn_width: 32, corr_width: 32, key_width: 16}"),
    ("smp", "{arch: unet, encoder: resnet18}"),
    ("segnet", "{width: 8}"),
    ("icnet", "{backbone: resnet18}"),
    ("tv_fcn", "{backbone: resnet50, aux: true}"),
])
def test_model_trains_under_the_launcher_with_checkpointing_and_predicts_a_geotiff(
    name: str, options: str, store: Path, tmp_path: Path
) -> None:
    """The model's own loss preset (auxiliary terms included), ``ckpt_stage``, then ``lrss-ds predict``."""
    import math

    import numpy as np
    import rasterio

    from lrss_ds.models import default_loss
    from tests.engine.test_predict_helpers import write_geotiff

    config = tmp_path / f"{name}.yaml"
    config.write_text(MODEL_RUN.format(name=name, options=options, loss=default_loss(name), store=store,
                                      ds_json=REPO / "ds_configs" / "cpu.json"))
    out = tmp_path / "run"
    assert launch(config, out, 1) == 0, read_log(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iteration"] == 2 and all(math.isfinite(h["loss"]) for h in metrics["history"]), metrics
    image = np.random.default_rng(0).integers(0, 255, size=(4, 45, 67)).astype("uint8")  # odd-sized scene
    source, output = write_geotiff(tmp_path / "scene.tif", image), tmp_path / "pred.tif"
    from lrss_ds.cli import main

    # in this process: the launcher's start-up already dominates the test's time
    assert main(["predict", "--checkpoint", str(out), "--input", str(source), "--output", str(output)]) == 0
    with rasterio.open(output) as pred, rasterio.open(source) as src:
        assert pred.shape == src.shape and pred.transform == src.transform
        assert set(np.unique(pred.read(1))) <= set(range(6))
