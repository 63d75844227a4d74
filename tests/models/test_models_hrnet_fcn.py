"""Tests of the HRNet-FCN baseline: its three modes, head, config and plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model
from lrss_ds.models.hrnet_fcn import HRNetFCN


def test_holistic_shapes_and_plan() -> None:
    torch.manual_seed(0)
    model = build_model("hrnet_fcn", 3, 2)
    assert isinstance(model, HRNetFCN) and model.output_stride == 4 and model.pad_multiple == 32
    out = model(torch.randn(1, 2, 70, 45))
    assert out["logits"].shape == (1, 3, 24, 16) and out["aux"] == []
    assert out["padded_size"] == (96, 64) and out["input_size"] == (70, 45)
    assert model.checkpoint_plan("stage") == {"stem", "layer1", "stage2", "stage3", "stage4", "head"}
    assert model.head.classifier.in_channels == 18 + 36 + 72 + 144


def test_downsampled_mode_is_the_network_on_the_pooled_input() -> None:
    torch.manual_seed(0)
    small = build_model("hrnet_fcn", 3, 2, band_mean=[5.0, 1.0], band_std=[2.0, 4.0], mode="downsampled", downsample=2)
    assert small.output_stride == 8 and small.pad_multiple == 64
    full = build_model("hrnet_fcn", 3, 2, band_mean=[5.0, 1.0], band_std=[2.0, 4.0])
    full.load_state_dict(small.state_dict())
    small.eval(), full.eval()
    x = torch.rand(1, 2, 128, 64) * 10
    with torch.no_grad():
        small.train(True)
        small.backbone.eval(), small.head.eval()  # train-mode output dict, fixed BN statistics
        logits = small(x)["logits"]
        full.train(True)
        full.backbone.eval(), full.head.eval()
        reference = full(F.avg_pool2d(x, 2))["logits"]
    assert logits.shape == (1, 3, 16, 8)
    assert torch.allclose(logits, reference, atol=1e-5)
    small.eval()
    assert small(torch.rand(1, 2, 100, 70)).shape == (1, 3, 100, 70)


def test_patch_mode_records_its_tiling_and_config_rebuilds() -> None:
    model = build_model("hrnet_fcn", 4, 3, mode="patch", patch_size=(256, 384), overlap=32, backbone="hrnet_w32")
    assert model.patch_size == (256, 384) and model.overlap == 32
    config = model.config()
    assert config["mode"] == "patch" and config["patch_size"] == [256, 384] and config["backbone"] == "hrnet_w32"
    rebuilt = build_model(**config)
    assert rebuilt.config() == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="mode"):
        build_model("hrnet_fcn", 2, 3, mode="tiles")
    with pytest.raises(ConfigError, match="downsample"):
        build_model("hrnet_fcn", 2, 3, mode="downsampled", downsample=2.5)
    with pytest.raises(ConfigError, match="backbone"):
        build_model("hrnet_fcn", 2, 3, backbone="resnet50")
    with pytest.raises(ConfigError, match="patch_size"):
        build_model("hrnet_fcn", 2, 3, patch_size=64, overlap=64)
