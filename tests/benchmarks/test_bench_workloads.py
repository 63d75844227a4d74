"""Tests of the benchmark training workload: sampling, augmentation and BatchNorm recalibration."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _workloads  # noqa: E402


def _scenes(count: int = 3, size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        image = rng.integers(0, 255, (2, size, size), dtype=np.uint8)
        out.append((image, image[0].copy()))  # the label is band 0: alignment is checkable
    return out


class _Float(nn.Module):
    """uint8 to float, as the models' normalisers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def _net() -> nn.Sequential:
    return nn.Sequential(_Float(), nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3))


def test_samples_keep_image_and_label_aligned_and_use_all_eight_views() -> None:
    scenes = _scenes(1)
    rng = np.random.default_rng(1)
    views = set()
    for _ in range(64):
        images, labels = _workloads.sample(scenes, None, rng)
        assert images.shape == (1, 2, 16, 16) and labels.shape == (1, 16, 16)
        assert np.array_equal(images[0, 0], labels[0])
        views.add(images[0, 0].tobytes())
    assert len(views) == 8
    images, labels = _workloads.sample(scenes, 8, rng, batch=5)
    assert images.shape == (5, 2, 8, 8) and np.array_equal(images[:, 0], labels)


def test_recalibration_sets_the_mean_of_per_sample_statistics() -> None:
    torch.manual_seed(0)
    net = _net()
    scenes = _scenes()
    bn = net[2]
    bn.running_mean.fill_(5.0)
    count = _workloads.recalibrate_batchnorm(net.eval(), scenes, None, 4 * 16 * 16, np.random.default_rng(2))
    assert count == 4 and not net.training and bn.momentum == 0.1
    # The same four samples, drawn again: the running mean is the plain mean of their means.
    rng = np.random.default_rng(2)
    with torch.no_grad():
        means = [net[1](torch.from_numpy(_workloads.sample(scenes, None, rng)[0]).float()).mean((0, 2, 3))
                 for _ in range(4)]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))


def test_no_recalibration_keeps_the_running_statistics() -> None:
    net = _net()
    net[2].running_mean.fill_(5.0)
    assert _workloads.recalibrate_batchnorm(net, _scenes(), None, 0, np.random.default_rng(0)) == 0
    assert torch.equal(net[2].running_mean, torch.full((3,), 5.0))
