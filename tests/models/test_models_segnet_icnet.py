"""SegNet and ICNet: the papers' structure (sizes, unpooling, cascade outputs) and option errors."""

from __future__ import annotations

import pytest
import torch

from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model


def test_segnet_has_vgg16_encoder_and_mirrored_decoder() -> None:
    """At width 64 and 3 bands: 26 convolutions (13 + 13) and the paper's 29.5 M parameters."""
    model = build_model("segnet", 11, 3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 + 13 + 1  # encoder, decoder, classifier
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 29.5
    assert [c.out_channels for c in convs[:13]] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert convs[0].in_channels == 3 and build_model("segnet", 11, 5).encoder[0][0].in_channels == 5


def test_segnet_decoder_places_values_at_the_pooling_indices() -> None:
    """The unpooled map is zero except at the encoder's argmax positions (no learned upsampling)."""
    torch.manual_seed(0)
    model = build_model("segnet", 3, 4, width=8).eval()
    seen = {}
    model.decoder[0].register_forward_pre_hook(lambda module, args: seen.setdefault("unpooled", args[0]))
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 4, 33, 50), dtype=torch.uint8))
    assert logits.shape == (1, 3, 33, 50)
    unpooled = seen["unpooled"]  # (1, 8, 64, 64): one non-zero at most per 2x2 window
    per_window = (unpooled != 0).float().unfold(2, 2, 2).unfold(3, 2, 2).sum(dim=(-1, -2))
    assert per_window.max() <= 1 and per_window.sum() > 0
    with pytest.raises(ConfigError, match=r"^model.width: must be an integer >= 1"):
        build_model("segnet", 3, 4, width=0)


def test_icnet_cascade_outputs_and_strides() -> None:
    """Main logits at 1/4, cascade-label logits at 1/16 and 1/8; branch strides 1/8, 1/16, 1/32."""
    torch.manual_seed(0)
    model = build_model("icnet", 3, 4, backbone="resnet18").train()
    out = model(torch.randint(0, 256, (2, 4, 63, 65), dtype=torch.uint8))  # padded to 64 x 96
    assert out["padded_size"] == (64, 96)
    assert out["logits"].shape == (2, 3, 16, 24)
    assert [tuple(a.shape) for a in out["aux"]] == [(2, 3, 4, 6), (2, 3, 8, 12)]
    x = torch.zeros(1, 4, 64, 96, dtype=torch.uint8)
    with torch.no_grad():
        conv3_1 = model._sub2(x)
        assert model._sub1(x).shape[-2:] == (8, 12)
        assert conv3_1.shape[-2:] == (4, 6)
        assert model._sub4(conv3_1).shape[-2:] == (2, 3)
    with pytest.raises(ConfigError, match=r"^model.backbone: unknown icnet backbone 'vgg'"):
        build_model("icnet", 3, 4, backbone="vgg")
