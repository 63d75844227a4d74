"""Benchmarks follow the accelerator they run on: every copy goes to the engine's or accelerator's device.

No GPU is needed: the ``meta`` device stands in for the accelerator (a ``meta`` tensor meeting a
``cpu`` one raises, so a copy left on the host shows), and recording stand-ins for the predictor
and the checkpoint loader say which device each one was handed. Training runs through
``lrss-ds train``, whose devices the engine's own tests check.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402
import _workloads  # noqa: E402

from lrss_ds.engine import isolated  # noqa: E402

META = torch.device("meta")


class _Float(nn.Module):
    """uint8 to float, as the models' normalisers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def _net(bands: int = 4, classes: int = 6) -> nn.Sequential:
    return nn.Sequential(_Float(), nn.Conv2d(bands, classes, 1), nn.BatchNorm2d(classes))


class _FakeAccelerator:
    """What ``deepspeed.accelerator.get_accelerator()`` answers on a node whose device is ``meta``."""

    def current_device_name(self) -> str:
        return "meta"


def _recording_evaluate(seen: list[torch.device]) -> Any:
    def evaluate(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append(_workloads.model_device(model))
        return {"miou": 0.0, "iou": {}, "test_s": 0.0, "test_s_all": [0.0]}

    return evaluate


def test_cuda_probe_sees_any_nvidia_device_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-modeset"):  # the driver's nodes, present without a GPU
        (tmp_path / name).touch()
    assert not isolated.has_cuda_cheap(tmp_path)
    (tmp_path / "nvidia3").touch()  # a job that was given the node's fourth GPU only
    assert isolated.has_cuda_cheap(tmp_path)
    assert not isolated.has_cuda_cheap(tmp_path / "missing")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # CUDA's own spelling of "no device"
    assert not isolated.has_cuda_cheap(tmp_path / "missing")


def test_evaluation_predicts_on_the_models_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import lrss_ds.engine.inference as inference

    devices = []

    class RecordingPredictor:
        def __init__(self, model: nn.Module, num_classes: int, device: Any = "cpu", **kwargs: Any) -> None:
            devices.append(torch.device(device))

        def strips(self, source: Any) -> Any:
            yield 0, np.zeros((source.height, source.width), np.uint8), None

    monkeypatch.setattr(inference, "Predictor", RecordingPredictor)
    scenes = _workloads.synthetic_scenes(1, 16, 4, seed=0)
    _workloads.score_scenes(_net().to(META).eval(), scenes, 6, None, 0)
    assert devices == [META]


def test_inference_probes_run_on_the_accelerator_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import deepspeed.accelerator
    import lrss_ds.engine.model_io as model_io

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _FakeAccelerator())
    evaluated: list[torch.device] = []
    monkeypatch.setattr(_workloads, "score_scenes", _recording_evaluate(evaluated))
    _workloads.infer("downsampled HRNet", size=64, patch=32, view="global")

    loaded_to: list[torch.device] = []

    def load_model(checkpoint: str, device: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
        loaded_to.append(torch.device(device))
        net = _net().to(device)
        net.num_classes = 6
        return net, {"model": {"name": "toy", "num_classes": 6}}

    monkeypatch.setattr(model_io, "load_model", load_model)
    _workloads.evaluate_checkpoint(str(tmp_path / "run"), size=16, patch=8, val_scenes=1)
    assert evaluated == [META, META] and loaded_to == [META]


def test_benchmark_header_names_the_accelerator_device_and_backend() -> None:
    header = _harness.machine_header("test")
    accelerator = header["accelerator"]
    assert accelerator["name"] == "cpu" and accelerator["device"] == "cpu"
    assert accelerator["backend"] in ("gloo", "ccl")


def test_memory_time_note_names_the_accelerator_that_ran() -> None:
    import memory_time

    cpu = {"name": "cpu", "device": "cpu", "backend": "gloo", "device_model": None}
    gpu = {"name": "cuda", "device": "cuda:0", "backend": "nccl", "device_model": "NVIDIA A100-SXM4-80GB"}
    cpu_note = memory_time._device_note(cpu)
    assert "simulated" in cpu_note and "measured" not in cpu_note and "backend gloo" in cpu_note
    note = memory_time._device_note(gpu)
    assert "cuda:0" in note and "nccl" in note and "A100" in note and "measured" in note and "simulated" not in note


@pytest.mark.parametrize("gpu", [True, False])
def test_bf16_convergence_runs_keep_the_nodes_accelerator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         gpu: bool) -> None:
    import subprocess

    import bf16_convergence

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    envs = []

    def run(command: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess:
        envs.append(env)
        return subprocess.CompletedProcess(command, 1, stdout="stand-in")

    monkeypatch.setattr(bf16_convergence.subprocess, "run", run)
    (tmp_path / "runs" / "fp32_seed0").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="stand-in"):
        bf16_convergence.train_once(tmp_path, "fp32", 0, [], threads=1)
    assert envs[0].get("DS_ACCELERATOR") == (None if gpu else "cpu")



def test_fullscene_leaves_the_accelerator_to_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the parent (on a GPU node) nor the child sets DS_ACCELERATOR or a backend of its own."""
    import argparse
    import subprocess

    import deepspeed

    import fullscene_train
    import lrss_ds.engine.setup as setup

    class Stop(Exception):
        pass

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    envs = []

    def run(command: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess:
        envs.append(env)
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="stand-in")

    monkeypatch.setattr(fullscene_train.subprocess, "run", run)
    args = argparse.Namespace(need_gib=0.0, max_wait=0.0, preset="none", height=128, width=128, bands=4, steps=1,
                              dw_method="auto", default_allocator=True, simulate_device=True)
    with pytest.raises(SystemExit):
        fullscene_train._run_child(args, "fp32")
    assert "DS_ACCELERATOR" not in envs[0]

    backends = []

    def init(*args: Any, **kwargs: Any) -> None:
        backends.append(kwargs.get("dist_backend"))
        raise Stop

    monkeypatch.setattr(deepspeed, "init_distributed", init)
    monkeypatch.setattr(setup, "init_distributed", init)
    with pytest.raises(Stop):
        fullscene_train.run_step(args)
    assert "DS_ACCELERATOR" not in os.environ and backends == [None]


def test_lrd_kernel_timings_run_on_the_accelerator_and_wait_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.accelerator

    import lrd_kernels

    class Accelerator(_FakeAccelerator):
        syncs = 0

        def synchronize(self) -> None:
            Accelerator.syncs += 1

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    devices = []
    original = lrd_kernels.depthwise_conv2d

    def recording(x: torch.Tensor, weight: torch.Tensor, *args: Any) -> torch.Tensor:
        devices.append((x.device, weight.device))
        return original(x, weight, *args)

    monkeypatch.setattr(lrd_kernels, "depthwise_conv2d", recording)
    lrd_kernels.bench_depthwise(4, 8, 8, 3, torch.float32, "direct", repeats=2)
    assert set(devices) == {(META, META)}
    assert Accelerator.syncs == 2 * (1 + 2)  # forward and train step: warm-up + 2 timed runs each
