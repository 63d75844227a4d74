"""Shared fixtures for the prediction tests: stand-in models, real DeepSpeed checkpoints, GeoTIFFs.

The stand-in models follow the model contract (``config()``, a normaliser with ``mean``/``std``
buffers, eval forward ``(B, C, H, W) -> (B, K, H, W)``) but are tiny, and one of them is purely
pointwise, so holistic and sliding-window prediction must agree on it exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

from lrss_ds.engine.rendezvous import free_port

REPO = Path(__file__).resolve().parents[2]

DATASET: dict[str, Any] = {
    "name": "tiny",
    "classes": ["water", "forest", "urban"],
    "palette": [[0, 0, 255], [0, 128, 0], [200, 0, 0]],
    "ignore_index": 255,
    "label_encoding": "index",
    "bands": ["R", "G", "B"],
    "label_suffix": "",
    "image_suffix": "",
    "label_map": None,
    "ignore_colours": [],
    "splits": {},
    "default_split": "train",
    "description": "prediction tests",
}


class _Normalizer(nn.Module):
    """Raw bands of any dtype -> float32 ``(x - mean) / std`` (the contract's InputNormalizer)."""

    def __init__(self, channels: int, mean: list[float] | None, std: list[float] | None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean or [0.0] * channels))
        self.register_buffer("std", torch.tensor(std or [1.0] * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class PointNet(nn.Module):
    """Pointwise (1x1 convolutions only): every output pixel depends on its own input pixel only."""

    def __init__(
        self, num_classes: int, in_channels: int, band_mean: Any = None, band_std: Any = None, **options: Any
    ) -> None:
        super().__init__()
        self.name, self.num_classes, self.in_channels, self.options = "pointnet", num_classes, in_channels, options
        self.normalizer = _Normalizer(in_channels, band_mean, band_std)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, num_classes, 1)
        )

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "in_channels": self.in_channels, **self.options}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalizer(x))


class ContextNet(PointNet):
    """Adds a 3x3 convolution and the scene mean: outputs depend on the whole input."""

    def __init__(
        self, num_classes: int, in_channels: int, band_mean: Any = None, band_std: Any = None, **options: Any
    ) -> None:
        super().__init__(num_classes, in_channels, band_mean, band_std, **options)
        self.name = "contextnet"
        self.spatial = nn.Conv2d(in_channels, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalizer(x)
        return self.body(z) + self.spatial(z) + 3 * self.spatial(z).mean(dim=(2, 3), keepdim=True)


STAND_INS = {"pointnet": PointNet, "contextnet": ContextNet}


def build_stand_in(name: str, num_classes: int, in_channels: int, **options: Any) -> nn.Module:
    """``build_model`` for the stand-ins."""
    return STAND_INS[name](num_classes=num_classes, in_channels=in_channels, **options)


def write_geotiff(
    path: Path, array: np.ndarray, crs: str | None = "EPSG:32633", transform: Any = None, nodata: float | None = None
) -> Path:
    """Write ``array (C, H, W)`` as a GeoTIFF (identity transform and no CRS when ``crs`` is None)."""
    count, height, width = array.shape
    if transform is None:
        transform = rasterio.Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0) if crs else rasterio.Affine.identity()
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=array.dtype.name,
        transform=transform,
        nodata=nodata,
    )
    if crs:
        profile["crs"] = crs
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(array)
    return path


def make_checkpoints(specs: list[dict[str, Any]], world_size: int = 1) -> None:
    """Train each model a step or two with DeepSpeed in fresh processes and save real checkpoints.

    Subprocesses keep DeepSpeed's process group and environment out of the test process; with
    ``world_size > 1`` each rank is one process (gloo on loopback), so ZeRO shards the optimizer.

    Args:
        specs: dicts with ``run_dir``, ``config`` (stand-in config), ``stage`` (ZeRO stage),
            ``input_dtype``, ``band_mean``, ``band_std`` (optional ``real``, ``size``, ``steps``).
        world_size: number of ranks.
    """
    port = str(free_port())
    code = (
        "import json, sys; from tests.engine.test_predict_helpers import _save_all; _save_all(json.loads(sys.argv[1]))"
    )
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_SIZE=str(world_size),
            DS_ACCELERATOR="cpu",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(specs)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    if any(proc.returncode != 0 for proc in procs):
        raise RuntimeError("checkpoint subprocess failed:\n" + "\n".join(out[-3000:] for out in outputs))


def _save_all(specs: list[dict[str, Any]]) -> None:
    """Subprocess body of :func:`make_checkpoints`."""
    import deepspeed

    for spec in specs:
        torch.manual_seed(spec.get("seed", 0))
        real = spec.get("real", False)
        if real:  # the project's own build_model and loss (train mode returns the output dict)
            from lrss_ds.models import build_model
            from lrss_ds.models.losses import build_loss

            model = build_model(**spec["config"], band_mean=spec["band_mean"], band_std=spec["band_std"])
            loss_fn = build_loss("ce", spec["config"]["num_classes"], 255)
        else:
            model = build_stand_in(**spec["config"], band_mean=spec["band_mean"], band_std=spec["band_std"])
            loss_fn = lambda outputs, target: nn.functional.cross_entropy(outputs, target.long())  # noqa: E731
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": spec["stage"]},
            "zero_allow_untested_optimizer": True,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        channels = spec["config"]["in_channels"]
        size = spec.get("size", 24)
        for _ in range(spec.get("steps", 2)):
            x = torch.randint(0, 255, (1, channels, size, size), dtype=torch.uint8)
            target = torch.randint(0, spec["config"]["num_classes"], (1, size, size), dtype=torch.uint8)
            loss = loss_fn(engine(x), target)
            engine.backward(loss)
            engine.step()
        root = Path(spec["run_dir"]) / "checkpoints"
        tag = f"step_{spec.get('steps', 2):07d}"
        engine.save_checkpoint(str(root), tag=tag)
        meta = {
            "model": model.config(),
            "dataset": spec.get("dataset", DATASET),
            "input_dtype": spec["input_dtype"],
            "band_mean": spec["band_mean"],
            "band_std": spec["band_std"],
            "iteration": spec.get("steps", 2),
            "metrics": {"miou": 0.5},
        }
        if int(os.environ.get("RANK", "0")) == 0:
            (root / tag / "lrss_meta.json").write_text(json.dumps(meta))


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    """Run ``lrss-ds argv``; assert exit 1 and one ``lrss-ds <command>: error:`` line holding ``fragments``."""
    from lrss_ds.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lrss-ds {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err
