"""Eval-mode banding: every model's banded forward equals its plain eval forward; halos are what make it exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lrss_ds.memory.banded_inference import banded_eval, receptive_radius, row_logits, run_in_row_bands
from lrss_ds.models import MODEL_BUILDERS, build_model
from lrss_ds.models.base import SegmentationModel
from tests.models.test_models_smp import skip_if_unavailable

# Light options per model (as tests/models/test_models_all.py), 24 classes as in the paper.
SMALL: dict[str, dict[str, Any]] = {
    "ehsnet": {"lrd_k": 32, "lrd_d": 32, "dw_kernels": (3, 7)},
    "hrnet_fcn": {},
    "glsnet": {"crop_size": 64, "d_model": 32},
    "glnet": {"crop_size": 64, "global_size": 64, "fpn_width": 32},
    "isdnet": {"channels": 32, "shallow_base": 16, "relation_groups": 4},
    "stdc": {"base": 16, "context_channels": 32},
    "magnet": {"crop_size": 64, "depth": 18, "fpn_width": 32},
    "fctl": {"crop_size": 64, "depth": 18, "fpn_width": 32, "corr_width": 32, "key_width": 16},
    "smp": {"arch": "unet", "encoder": "resnet18"},
    "tv_fcn": {},
    "segnet": {"width": 16},
    "icnet": {"backbone": "resnet18"},
}
BANDS = 4


def eval_model(name: str, classes: int = 5, seed: int = 0, **extra: Any) -> SegmentationModel:
    """A small model in eval mode whose BatchNorms hold non-trivial running statistics."""
    skip_if_unavailable(name)
    torch.manual_seed(seed)
    model = build_model(name, classes, BANDS, band_mean=[100.0] * BANDS, band_std=[50.0] * BANDS,
                        **{**SMALL[name], **extra})
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_every_registered_model_has_small_options() -> None:
    assert set(SMALL) >= set(MODEL_BUILDERS), "add light options for new models here"


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_banded_forward_equals_plain_eval_forward(name: str) -> None:
    """Odd-sized input, bands far smaller than the maps: every band boundary is exercised."""
    model = eval_model(name)
    x = torch.randint(0, 256, (1, BANDS, 121, 139), dtype=torch.uint8)
    with torch.inference_mode():
        plain = model(x)
        with banded_eval(model, band_rows=8, stem_band_rows=8):
            logits = row_logits(model(x))
        rows = torch.cat([logits.rows(start, min(start + 50, 121)) for start in range(0, 121, 50)], dim=2)
    if model.output_stride > 1:  # full-resolution networks (SegNet, smp's heads) have no lower one
        assert logits.logits.shape[-1] < 139, "the forward inside banded_eval must stay at the network's resolution"
    assert rows.shape == plain.shape
    torch.testing.assert_close(rows, plain, atol=2e-5, rtol=1e-5)
    # everything is put back: the plain forward returns full-resolution logits again
    with torch.inference_mode():
        assert model(x).shape == plain.shape


def test_banded_eval_refuses_a_training_model() -> None:
    model = eval_model("hrnet_fcn").train()
    with pytest.raises(RuntimeError, match="eval"):
        with banded_eval(model):
            pass


def test_bands_are_exact_with_the_receptive_halo_and_not_without() -> None:
    """A stride-2 stack of 3x3 convolutions: halo = its radius is exact, one row less is not."""
    torch.manual_seed(1)
    stack = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 5, 1, 2))
    radius = receptive_radius(stack)
    assert radius == 1 + 2 + 4
    x = torch.randn(1, 3, 77, 31)
    with torch.no_grad():
        whole = stack(x)
        exact = run_in_row_bands(stack, x, 2, radius + radius % 2, 5)
        short = run_in_row_bands(stack, x, 2, radius - 3, 5)
    torch.testing.assert_close(exact, whole)
    assert not torch.allclose(short, whole, atol=1e-3)
