"""STDC: the STDC module's widths and strides, STDC-Seg's outputs, and the detail loss."""

from __future__ import annotations

import pytest
import torch

from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model
from lrss_ds.models.aux_losses import detail_loss, detail_targets
from lrss_ds.models.losses import build_loss
from lrss_ds.models.stdc import STDCModule, STDCNet

SMALL = {"base": 16, "context_channels": 32}


def _model(bands: int = 4, classes: int = 3, **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("stdc", classes, bands, band_mean=[100.0] * bands, band_std=[50.0] * bands,
                       **{**SMALL, **options})


def test_stdc_module_concatenates_halving_blocks() -> None:
    module = STDCModule(64, 256, blocks=4, stride=2)
    assert [c.conv.out_channels for c in module.conv_list] == [128, 64, 32, 32]
    assert module(torch.randn(1, 64, 16, 20)).shape == (1, 256, 8, 10)
    assert STDCModule(256, 256)(torch.randn(1, 256, 5, 7)).shape == (1, 256, 5, 7)
    with pytest.raises(ConfigError):
        STDCModule(8, 12, blocks=4)


def test_stdc1_backbone_layout_and_official_key_names() -> None:
    net = STDCNet(3)
    assert net.out_channels == [256, 512, 1024] and net.strides == [8, 16, 32]
    assert len(net.features) == 2 + 6
    keys = set(net.state_dict())
    # names of the official STDC1 ImageNet file's backbone (features.N...)
    for key in ("features.0.conv.weight", "features.1.bn.running_mean", "features.2.conv_list.1.conv.weight",
                "features.2.avd_layer.0.weight", "features.7.conv_list.3.bn.weight"):
        assert key in keys, key
    maps = net(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 12), (4, 6), (2, 3)]


@pytest.mark.parametrize("backbone", ["stdc1", "stdc2"])
def test_n_band_odd_size_gives_same_size_logits(backbone: str) -> None:
    model = _model(bands=6, backbone=backbone).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 6, 53, 77), dtype=torch.uint8))
    assert logits.shape == (1, 3, 53, 77) and torch.isfinite(logits).all()


def test_train_outputs_and_loss_reach_every_parameter() -> None:
    model = _model().train()
    x = torch.randint(0, 256, (1, 4, 70, 90), dtype=torch.uint8)
    target = torch.randint(0, 3, (1, 70, 90), dtype=torch.uint8)
    out = model(x)
    assert out["logits"].shape[-2:] == (12, 12) and [a.shape[-1] for a in out["aux"]] == [12, 6]
    assert out["detail"].shape == (1, 1, 12, 12)
    loss = build_loss("stdc", 3, 255)(out, target)
    assert torch.isfinite(loss)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    plain = build_loss("stdc", 3, 255, detail_weight=0.0)(out, target)
    torch.testing.assert_close(loss, plain + detail_loss(out["detail"], target, 255, (96, 96), (70, 90)))
    no_detail = _model(use_detail=False).train()
    assert "detail" not in no_detail(x)
    with pytest.raises(ValueError, match="detail"):
        build_loss("stdc", 3, 255)(no_detail(x), target)


def test_detail_targets_mark_one_side_of_a_class_change_and_skip_ignored_and_image_edges() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 2
    detail = detail_targets(labels, 255)[0]
    # The Laplacian clamped at 0 is positive on the higher class's side: columns 4 (stride 1)
    # and 4-5 (the stride-2 map, upsampled by nearest, covers columns 4 and 5).
    assert detail[:, :4].sum() == 0 and detail[:, 4].all() and detail[:, 5].all() and detail[:, 6:].sum() == 0
    uniform = torch.full((1, 8, 8), 3, dtype=torch.long)
    assert detail_targets(uniform, 255).sum() == 0  # no boundary at the image edge
    uniform[:, 2:5, 2:5] = 255
    assert detail_targets(uniform, 255).sum() == 0  # nor around an ignored block


def test_detail_loss_is_low_for_a_matching_head_and_ignores_ignored_pixels() -> None:
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 1
    truth = detail_targets(labels, 255)
    good = detail_loss((truth * 40 - 20)[:, None], labels, 255, (16, 16), (16, 16))
    bad = detail_loss((20 - truth * 40)[:, None], labels, 255, (16, 16), (16, 16))
    assert good < 0.05 < 1.0 < bad
    ignored = labels.clone()
    ignored[:, :, :8] = 255  # the class change is now next to ignored pixels: no detail anywhere
    assert detail_targets(ignored, 255).sum() == 0
    wrong_there = torch.full((1, 1, 16, 16), -20.0)
    wrong_there[..., :8] = 20.0
    assert detail_loss(wrong_there, ignored, 255, (16, 16), (16, 16)) < 0.05
    assert detail_loss(wrong_there, torch.ones_like(labels), 255, (16, 16), (16, 16)) > 1.0


def test_bad_options_are_refused_and_config_rebuilds() -> None:
    with pytest.raises(ConfigError, match="backbone"):
        _model(backbone="stdc3")
    model = _model()
    assert build_model(**model.config()).config() == model.config()
