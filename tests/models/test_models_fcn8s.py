"""FCN-8s: the paper's layers and sizes, bilinear-initialised upsampling, skip fusion and option errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model
from lrss_ds.models.fcn8s import upsampler


def test_fcn8s_has_the_papers_layers_and_size() -> None:
    """VGG-16's 13 convolutions, fc6 7x7 and fc7 at 4096, three score layers; the paper's 134 M
    parameters at 3 bands and 21 classes (BN's 8.4 k aside), N bands in the first convolution."""
    with torch.device("meta"):  # shapes only: no 0.5 GB of initialised weights
        model = build_model("fcn8s", 21, 3)
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert tuple(model.fc[0].weight.shape) == (4096, 512, 7, 7) and tuple(model.fc[3].weight.shape) == (4096, 4096, 1, 1)
    assert [model.score_pool3.in_channels, model.score_pool4.in_channels, model.score_fr.in_channels] == [256, 512, 4096]
    bn = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert round((sum(p.numel() for p in model.parameters()) - bn) / 1e6) == 134
    assert build_model("fcn8s", 21, 5, width=8, fc_channels=16).encoder[0][0].in_channels == 5


def test_upsampler_starts_as_bilinear_interpolation() -> None:
    """The 2x and 8x transposed convolutions equal bilinear interpolation at initialisation, away
    from the border (where the transposed convolution sees zeros beyond the map)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 7)
    for factor in (2, 8):
        with torch.no_grad():
            up = upsampler(3, factor)(x)
        reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        assert up.shape == reference.shape
        inner = slice(factor, -factor)
        torch.testing.assert_close(up[..., inner, inner], reference[..., inner, inner], atol=1e-5, rtol=1e-5)


def test_fcn8s_fuses_pool3_pool4_and_pool5_scores() -> None:
    """Train-mode logits at 1/8 of the padded input; each of the three score layers changes them
    (the skips are connected), and the learned final upsampling gives full-size logits."""
    torch.manual_seed(0)
    model = build_model("fcn8s", 3, 4, width=8, fc_channels=16, dropout=0.0).train()
    x = torch.randint(0, 256, (1, 4, 45, 70), dtype=torch.uint8)
    out = model(x)
    assert out["padded_size"] == (64, 96) and out["logits"].shape == (1, 3, 8, 12) and out["aux"] == []
    for layer in (model.score_fr, model.score_pool4, model.score_pool3):
        with torch.no_grad():
            layer.bias.add_(1.0)
            changed = model(x)["logits"]
            layer.bias.sub_(1.0)
        assert not torch.allclose(changed, out["logits"]), layer
    learned = build_model("fcn8s", 3, 4, width=8, fc_channels=16, final_upsampling="learned").train()
    assert learned.output_stride == 1 and learned(x)["logits"].shape == (1, 3, 64, 96)
    assert learned.eval()(x).shape == (1, 3, 45, 70)


@pytest.mark.parametrize(
    "options, key",
    [({"width": 0}, "width"), ({"fc_channels": 2.5}, "fc_channels"), ({"dropout": 1.0}, "dropout"),
     ({"final_upsampling": "nearest"}, "final_upsampling")],
)
def test_fcn8s_refuses_bad_options(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^model.{key}: "):
        build_model("fcn8s", 3, 4, **options)
