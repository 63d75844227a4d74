"""TransUNet: ViT-B/16's transformer, one token per 1/16 position at any size, the cascaded upsampler's skips."""

from __future__ import annotations

import pytest
import torch

from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model

LIGHT = {"resnet_depth": 18, "hidden": 32, "layers": 2, "heads": 2, "mlp": 64}


def test_transunet_defaults_are_vit_b16_on_resnet50() -> None:
    """12 layers of width 768 with 12 heads and MLP 3072: ViT-B's 85,054,464 transformer parameters;
    tokens from ResNet-50's 1024-channel layer3; no layer4."""
    with torch.device("meta"):
        model = build_model("transunet", 6, 4)
    assert sum(p.numel() for p in model.vit.parameters()) == 85_054_464
    assert len(model.vit) == 12 and model.vit[0].heads == 12
    assert model.patch_embed.in_channels == 1024 and model.backbone.layer4 is None
    assert model.backbone.conv1.in_channels == 4
    assert [block.convs[0][0].in_channels for block in model.decoder] == [512 + 512, 256 + 256, 128 + 64, 64]


def test_tokens_follow_the_input_grid_and_skips_enter_the_decoder() -> None:
    """A 70x90 input (padded to 80x96) gives 5x6 tokens with the 14x14 position embedding resized;
    the decoder sees its skips at 1/8, 1/4, 1/2 and the logits are full size."""
    torch.manual_seed(0)
    model = build_model("transunet", 3, 4, **LIGHT).train()
    seen: dict[str, list] = {}

    def record(name: str):
        def hook(module, args) -> None:  # a pre-hook that returns None leaves the inputs alone
            seen[name] = [tuple(a.shape) for a in args]
        return hook

    model.vit[0].register_forward_pre_hook(record("tokens"))
    for i, block in enumerate(model.decoder):
        block.register_forward_pre_hook(record(f"dec{i}"))
    out = model(torch.randint(0, 256, (1, 4, 70, 90), dtype=torch.uint8))
    assert out["padded_size"] == (80, 96) and out["logits"].shape == (1, 3, 80, 96)
    assert seen["tokens"] == [(1, 5 * 6, 32)]
    assert seen["dec0"] == [(1, 512, 5, 6), (1, 128, 10, 12)]
    assert seen["dec1"] == [(1, 256, 10, 12), (1, 64, 20, 24)]
    assert seen["dec2"] == [(1, 128, 20, 24), (1, 64, 40, 48)]
    assert seen["dec3"] == [(1, 64, 40, 48)]


def test_position_embedding_matters_and_is_learned() -> None:
    """Changing the position embedding changes the logits (it is added to the tokens)."""
    torch.manual_seed(0)
    model = build_model("transunet", 3, 4, **LIGHT, dropout=0.0).eval()
    x = torch.randint(0, 256, (1, 4, 48, 64), dtype=torch.uint8)
    with torch.no_grad():
        before = model(x)
        model.pos_embed.add_(torch.randn_like(model.pos_embed))
        assert not torch.allclose(model(x), before)


@pytest.mark.parametrize(
    "options, key",
    [({"resnet_depth": 34}, "resnet_depth"), ({"hidden": 0}, "hidden"), ({"hidden": 30, "heads": 4}, "heads"),
     ({"dropout": -0.1}, "dropout"), ({"pos_grid": 1.5}, "pos_grid")],
)
def test_transunet_refuses_bad_options(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^model.{key}: "):
        build_model("transunet", 3, 4, **options)


def test_torchvision_resnet_weights_load_into_the_backbone(tmp_path) -> None:
    """A torchvision-named ResNet-18 file loads under ``backbone.``; its layer4 and fc are reported
    as unexpected (the hybrid has no layer4), nothing of the backbone is missing."""
    from lrss_ds.models import load_pretrained
    from lrss_ds.models.resnet import ResNet

    torch.manual_seed(1)
    state = ResNet(18, 3).state_dict()
    state["fc.weight"] = torch.zeros(1000, 512)
    torch.save(state, tmp_path / "resnet18.pth")
    model = build_model("transunet", 3, 4, **LIGHT)
    report = load_pretrained(model, tmp_path / "resnet18.pth")
    assert report.prefix == "backbone." and report.adapted == ["backbone.conv1.weight"]
    assert not report.missing and report.unexpected and all(k.startswith(("layer4.", "fc.")) for k in report.unexpected)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
