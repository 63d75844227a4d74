"""Training faults end as one named line and keep what is worth keeping: a full disk during a
checkpoint save, a read-only run directory, DeepSpeed refusing an override, a killed training's
data workers, and (with real small runs) damaged checkpoints, a changed store and bad options."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lrss_ds.engine import training_checkpoints
from lrss_ds.engine.config import DataConfig, SynthConfig, load_config
from lrss_ds.engine.demo import launcher_env
from lrss_ds.engine.synthetic_store import prepare_synthetic_store
from lrss_ds.errors import ConfigError, TrainingError
from tests.engine.test_engine_units import experiment, stand_in_run

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300

# Tiny EHSNet on 128x128 scenes, SGD (no DeepSpeedCPUAdam build), a checkpoint every iteration.
TINY = """
model: {{name: ehsnet, options: {{backbone: hrnet_w18, output_stride: 8, lrd_k: 32, lrd_d: 32}}}}
data: {{store: {store}, workers: 1, val_split: ""}}
optim: {{type: sgd, lr: 0.01, momentum: 0.9}}
memory: {{preset: ckpt_stage}}
deepspeed: {{config: {ds_json}}}
train: {{seed: 3, iterations: 2, checkpoint_every: 1, eval_every: 0, keep_last: 3}}
"""


def make_store(path: Path, side: int, bands: int = 4) -> Path:
    synth = SynthConfig(train_scenes=1, val_scenes=0, height=side, width=side, bands=bands, seed=5)
    prepare_synthetic_store(DataConfig(store=str(path), synthetic=synth), log=lambda line: None)
    return path


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    store = make_store(root / "store", 128)
    path = root / "tiny.yaml"
    path.write_text(TINY.format(store=store, ds_json=REPO / "ds_configs" / "cpu.json"))
    return path


def train_cli(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lrss_ds.cli", "train", "--config", str(config), "--output", str(out), *extra]
    return subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one ``lrss-ds train: error:`` line and no traceback."""
    assert result.returncode == 1, result.stdout[-1500:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("lrss-ds train: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# -- full disk, read-only directory, DeepSpeed refusals (one process, no training) ------------------


def failing_torch_save(fail_on: int, error: BaseException):
    """torch.save that raises ``error`` from its ``fail_on``-th call on, after writing half a file."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= fail_on:
            Path(path).write_bytes(b"half a file")
            raise error
        return real_save(obj, path, *args, **kwargs)

    return save


class _Usage:
    """What ``shutil.disk_usage`` reports for a 100 GiB device with ``free`` bytes left."""

    def __init__(self, free: int) -> None:
        self.free, self.total, self.used = free, 100 << 30, (100 << 30) - free


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"),
     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 79936 vs 79830")],
    ids=["ENOSPC", "torch-short-write"],
)
def test_full_disk_during_checkpoint_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """The third save fails as on a full disk: one line naming the directory and the full disk,
    nothing of step 3 at any name, and step 2 is still what --resume takes."""
    from lrss_ds.engine.trainer import train

    run = stand_in_run(tmp_path, nan_calls=set(), iterations=3, max_nonfinite=0)
    run.config.train.checkpoint_every = 1
    # two files per save (model states, RNG state): the fifth call is the third save's first file
    monkeypatch.setattr(torch, "save", failing_torch_save(5, error))
    # torch's short-write error carries no errno; the device is what says it is full
    monkeypatch.setattr(training_checkpoints.shutil, "disk_usage", lambda path: _Usage(free=1 << 20))
    with pytest.raises(TrainingError) as info:
        train(run, resume=False)
    root = tmp_path / "checkpoints"
    message = str(info.value)
    assert message.startswith(f"{root}: cannot save checkpoint step_0000003: the disk is full") and "\n" not in message
    assert "step_0000002 stays the checkpoint --resume uses" in message
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_0000001", "step_0000002"]
    assert training_checkpoints.latest_tag(root) == "step_0000002"
    assert training_checkpoints.find_resumable(root) == ("step_0000002", [])


def test_read_only_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run directory that cannot be created, or exists but cannot be written, is one line naming
    it (tests run as root, whom chmod does not stop, so the refusal is the file system's errno)."""
    from lrss_ds.engine.trainer import run_training

    read_only = tmp_path / "ro"
    real_mkdir, real_open = os.mkdir, os.open

    def refuse(path: os.PathLike | str) -> None:
        if str(path).startswith(str(read_only)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: (refuse(path), real_mkdir(path, *a, **k))[1])
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (refuse(path), real_open(path, *a, **k))[1])
    config = experiment(tmp_path, {}, f"train.output={read_only / 'run'}")
    where = read_only / "run"
    with pytest.raises(TrainingError, match=rf"^{where}: cannot create the run directory: Permission denied$"):
        run_training(config)

    monkeypatch.setattr(os, "mkdir", real_mkdir)
    (read_only / "run").mkdir(parents=True)
    with pytest.raises(TrainingError, match=rf"^{where}: cannot write in the run directory: Permission denied$"):
        run_training(config)
    assert (read_only / "run").is_dir()  # not created by this run: left alone


@pytest.mark.parametrize(
    ("override", "reason"),
    [("deepspeed.override.zero_optimization.stage=7", "stage: Input should be 0, 1, 2, 3"),
     ("deepspeed.override.zero_optimization.offload_optimizer.device=gpu", "Input should be 'none', 'cpu' or 'nvme'"),
     ("deepspeed.override.gradient_accumulation_steps=0", "has to be greater than 0"),
     ("deepspeed.override.bf16.enabled=maybe", "Input should be a valid boolean")],
)
def test_deepspeed_refusing_an_override_names_it(tmp_path: Path, override: str, reason: str) -> None:
    from lrss_ds.engine.setup import load_deepspeed_json

    config = experiment(tmp_path, json.loads((REPO / "ds_configs" / "cpu.json").read_text()),
                        "deepspeed.override.steps_per_print=10", override)
    with pytest.raises(ConfigError) as info:
        load_deepspeed_json(config)
    message = str(info.value)
    assert message.startswith(f"command line: {override}: DeepSpeed refuses it: ") and reason in message, message
    assert "\n" not in message and "pydantic.dev" not in message


# -- a killed training's DataLoader workers ---------------------------------------------------------

_SLOW_LOADER = """
import sys, time, torch
from torch.utils.data import Dataset
from lrss_ds.engine.loaders import ResumableSampler, make_train_loader, worker_batches

class SlowScenes(Dataset):  # a whole-scene read that takes long
    def __len__(self):
        return 4
    def __getitem__(self, index):
        print("worker", __import__("os").getpid(), flush=True)
        time.sleep(60)
        return {"image": torch.zeros(1), "label": torch.zeros(1), "scene": "s", "window": (0, 0, 1, 1)}

loader = make_train_loader(SlowScenes(), ResumableSampler(4, 0, 1, 0), 1, workers=1, prefetch=2,
                           device=torch.device("cpu"))
with worker_batches(loader) as batches:
    next(batches)
"""


def test_data_workers_die_with_a_killed_training(tmp_path: Path) -> None:
    """SIGKILL the training process while its worker reads a scene: the worker is gone within
    seconds (torch checks for a dead parent only between samples, here after a 60 s read)."""
    script = tmp_path / "slow_loader.py"
    script.write_text(_SLOW_LOADER)
    process = subprocess.Popen([sys.executable, str(script)], env=launcher_env(), stdout=subprocess.PIPE, text=True)
    try:
        worker = int(process.stdout.readline().split()[1])
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.1)
        assert not _alive(worker), f"worker {worker} outlived its killed parent"
    finally:
        process.kill()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- real small training runs -----------------------------------------------------------------------


@pytest.mark.slow
def test_resume_skips_a_truncated_checkpoint_and_refuses_another_store(tiny_yaml: Path, tmp_path: Path) -> None:
    """A latest checkpoint cut short (or losing a file) is skipped for the newest intact one, with
    a line saying so; resuming against a store with other bands names what differs."""
    out = tmp_path / "run"
    first = train_cli(tiny_yaml, out)
    assert first.returncode == 0, first.stderr[-3000:]
    root = out / "checkpoints"
    assert training_checkpoints.find_resumable(root) == ("step_0000002", [])
    assert not list(root.glob("*.partial"))
    states = root / "step_0000002" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    with open(states, "r+b") as handle:
        handle.truncate(size // 2)

    resumed = train_cli(tiny_yaml, out, "--resume", "train.iterations=3")
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"--resume: skipping step_0000002 has mp_rank_00_model_states.pt cut to {size // 2} of {size} bytes" in log
    assert "resumed from step_0000001 (the newest intact one) (iteration 1)" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["iteration"] for h in metrics["history"]] == [1, 2, 3]
    assert training_checkpoints.find_resumable(root) == ("step_0000003", [])

    (root / "step_0000003" / "rng_rank0.pt").unlink()
    assert training_checkpoints.find_resumable(root) == ("step_0000002", ["step_0000003 lacks rng_rank0.pt"])

    other = three_band_store(tmp_path)
    refused = train_cli(tiny_yaml, out, "--resume", "train.iterations=4", f"data.store={other}")
    line = one_error_line(refused)
    assert f"{root / 'step_0000002'}: cannot resume: model.num_classes 6 in the checkpoint, 7 now, " in line
    assert "model.in_channels 4 in the checkpoint, 3 now" in line and f"data.store {other}" in line


def three_band_store(tmp_path: Path) -> Path:
    """A store of 3-band 128x128 scenes with one class more than the synthetic dataset."""
    import yaml

    from lrss_ds.data.ingest import ingest
    from lrss_ds.data.synth import synthesize

    synthesize(tmp_path / "raw3", 1, (128, 128), bands=3, seed=5, overwrite=True, log=lambda line: None)
    dataset = tmp_path / "three_band.yaml"
    dataset.write_text(yaml.safe_dump({
        "name": "three_band", "classes": ["background", "field", "road", "building", "river", "lake", "cloud"],
        "ignore_index": 255, "label_encoding": "index", "bands": ["R", "G", "B"],
    }))
    store = tmp_path / "store3"
    ingest(store, str(tmp_path / "raw3" / "images"), str(tmp_path / "raw3" / "labels"), str(dataset), split="train",
           log=lambda line: None)
    return store


@pytest.mark.slow
def test_colliding_in_channels_is_one_line_and_leaves_no_run_directory(tiny_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    line = one_error_line(train_cli(tiny_yaml, out, "model.options.in_channels=3"))
    assert line.endswith("command line: model.options.in_channels=3: 3 collides with the store's 4 "
                         f"(data.store {load_config(tiny_yaml).data.store}); the store decides it, remove the key")
    assert not out.exists() and out.parent.is_dir()


@pytest.mark.slow
def test_samples_too_small_for_the_model_are_refused_before_training(tiny_yaml: Path, tmp_path: Path) -> None:
    small = make_store(tmp_path / "store64", 64)
    out = tmp_path / "run"
    result = train_cli(tiny_yaml, out, f"data.store={small}")
    line = one_error_line(result)
    assert "data.store=" in line and "a 64x64 training sample is too small for ehsnet" in line, line
    assert "larger than 64 px on a side" in line
    assert "training ehsnet for" not in result.stdout
    assert not out.exists()


def test_unsafe_or_truncated_weights_are_refused_without_torch_advice(tmp_path: Path) -> None:
    """``model.pretrained`` (read by the trainer) and exported weights (read by predict) holding a
    pickled object: torch's advice to re-run with weights_only=False never reaches the user."""
    import argparse

    from lrss_ds.engine.model_io import _torch_load
    from lrss_ds.errors import InputFileError
    from lrss_ds.models.pretrained import read_state_dict

    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, pickled)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(pickled.read_bytes()[:200])
    for read in (read_state_dict, lambda path: _torch_load(path, weights_only=True)):
        with pytest.raises(InputFileError) as info:
            read(pickled)
        message = str(info.value)
        assert message.startswith(f"{pickled}: ") and "pickled Python objects (argparse.Namespace)" in message
        assert "weights_only" not in message and "trust" not in message and "\x1b" not in message, message
        with pytest.raises(InputFileError, match=r"truncated or not a torch file \(its zip archive cannot be read\)$"):
            read(truncated)


def test_failed_run_removes_only_a_run_directory_it_created_with_nothing_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lrss_ds.engine import trainer

    def fails(config, out: Path, checkpoint: bool):  # build_run failing after its first writes
        out.mkdir(parents=True, exist_ok=True)
        (out / "log.txt").write_text("started\n")
        if checkpoint:
            (out / "checkpoints" / "step_0000001").mkdir(parents=True)
        raise TrainingError("loss", "went non-finite")

    for checkpoint, kept in ((False, False), (True, True)):
        out = tmp_path / f"run_{checkpoint}"
        monkeypatch.setattr(trainer, "build_run", lambda config, out, c=checkpoint: fails(config, out, c))
        with pytest.raises(TrainingError, match="went non-finite"):
            trainer.run_training(experiment(tmp_path, {}, f"train.output={out}"))
        assert out.exists() == kept
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(TrainingError):
        trainer.run_training(experiment(tmp_path, {}, f"train.output={existing}"))
    assert (existing / "log.txt").is_file()  # not this run's directory: left as it is


def test_patches_too_small_name_the_patch_size(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lrss_ds.engine.trainer import check_sample_sizes

    model = SimpleNamespace(pad_multiple=64)
    config = experiment(tmp_path, {}, "data.mode=patch", "data.patch_size=48")
    with pytest.raises(ConfigError, match=r"^command line: data.patch_size=48: a 48x48 training sample is too small"):
        check_sample_sizes(config, model, [(512, 512), (40, 900)], micro_batch=1)
    check_sample_sizes(config, model, [(512, 512)], micro_batch=2)  # two samples: BatchNorm has 2 values
    check_sample_sizes(experiment(tmp_path, {}), model, [(65, 20), (512, 512)], micro_batch=1)
    with pytest.raises(ConfigError, match=r"a 60x64 training sample"):
        check_sample_sizes(experiment(tmp_path, {}), model, [(1, 4000), (60, 64)], micro_batch=1)
