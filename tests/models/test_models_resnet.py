"""ResNet backbone: torchvision key names, strides with dilation, any band count, segments."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from lrss_ds.errors import ConfigError
from lrss_ds.models.resnet import ResNet

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(depth: int) -> list[str]:
    """torchvision's ``resnet18``/``resnet50`` state-dict keys without ``fc.*``, from its layout."""
    blocks, convs = {18: ((2, 2, 2, 2), 2), 50: ((3, 4, 6, 3), 3)}[depth]
    keys = ["conv1.weight", *(f"bn1.{s}" for s in BN)]
    for layer, n in enumerate(blocks, start=1):
        for b in range(n):
            for c in range(1, convs + 1):
                keys += [f"layer{layer}.{b}.conv{c}.weight", *(f"layer{layer}.{b}.bn{c}.{s}" for s in BN)]
            # the first block projects its shortcut when the shape changes (layer1 only for ResNet-50)
            if b == 0 and (layer > 1 or depth == 50):
                keys += [f"layer{layer}.0.downsample.0.weight", *(f"layer{layer}.0.downsample.1.{s}" for s in BN)]
    return keys


@pytest.mark.parametrize("depth, count", [(18, 120), (50, 318)])
def test_state_dict_keys_are_torchvisions(depth: int, count: int) -> None:
    expected = torchvision_keys(depth)
    # torchvision's files hold 122 / 320 keys; the two fc keys are not part of the backbone
    assert len(expected) == count
    for literal in ("layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "bn1.num_batches_tracked"):
        assert literal in expected
    assert ("layer1.0.downsample.1.weight" in expected) == (depth == 50)
    model = ResNet(depth, in_channels=3)
    assert list(model.state_dict()) == expected


def test_parameter_counts_match_torchvision_without_fc() -> None:
    # torchvision: resnet18 11,689,512 and resnet50 25,557,032 parameters including the fc layer
    r18 = sum(p.numel() for p in ResNet(18, 3).parameters())
    r50 = sum(p.numel() for p in ResNet(50, 3).parameters())
    assert r18 == 11_689_512 - (512 * 1000 + 1000)
    assert r50 == 25_557_032 - (2048 * 1000 + 1000)


def test_shapes_strides_and_any_band_count() -> None:
    torch.manual_seed(0)
    model = ResNet(18, in_channels=5).eval()
    assert model.conv1.weight.shape == (64, 5, 7, 7)
    with torch.no_grad():
        feats = model(torch.randn(2, 5, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    assert model.out_channels == [64, 128, 256, 512] and model.output_stride == 32


def test_dilation_follows_torchvision() -> None:
    torch.manual_seed(0)
    model = ResNet(50, in_channels=2, replace_stride_with_dilation=(False, True, True)).eval()
    assert model.strides == [4, 8, 8, 8] and model.out_channels == [256, 512, 1024, 2048]
    # the first block of a dilated layer keeps the previous dilation; the others take the new one
    assert model.layer3[0].conv2.dilation == (1, 1) and model.layer3[0].conv2.stride == (1, 1)
    assert model.layer3[1].conv2.dilation == (2, 2)
    assert model.layer4[0].conv2.dilation == (2, 2) and model.layer4[1].conv2.dilation == (4, 4)
    assert model.layer3[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        feats = model(torch.randn(1, 2, 32, 32))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 8), (4, 4), (4, 4), (4, 4)]
    dilated18 = ResNet(18, 3, (False, False, True)).eval()
    with torch.no_grad():
        assert tuple(dilated18(torch.randn(1, 3, 64, 64))[-1].shape) == (1, 512, 4, 4)


def test_segments_run_and_plans_start_with_the_input_transform() -> None:
    model = ResNet(18, in_channels=3)
    model.segment_prefix = "g."
    stack: list[str] = []
    seen: list[str] = []
    transform_inside: list[list[str]] = []

    def runner(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        seen.append(name)
        stack.append(name)
        try:
            return fn(*args)
        finally:
            stack.pop()

    def transform(t: torch.Tensor) -> torch.Tensor:
        transform_inside.append(list(stack))
        return t.float()

    for module in model.modules():
        if hasattr(module, "_segment_runner"):
            module._segment_runner = runner
    model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), input_transform=transform)
    assert seen[:3] == ["g.stem", "g.stem.conv1", "g.stem.pool"]
    assert {"g.layer1", "g.layer4", "g.layer4.1"} <= set(seen)
    for granularity in ("stage", "block", "fine"):
        plan = model.segment_plan(granularity)
        assert set(plan) <= set(seen)
        assert plan[0] in transform_inside[0]  # the first planned segment holds the normaliser
        for a in plan:  # non-nesting
            assert not any(b != a and b.startswith(a + ".") for b in plan)
    assert model.segment_plan("fine")[:4] == ["g.stem.conv1", "g.stem.pool", "g.layer1.0", "g.layer1.1"]
    with pytest.raises(ConfigError):
        model.segment_plan("layer")


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="depth"):
        ResNet(20)
    with pytest.raises(ConfigError, match="replace_stride_with_dilation"):
        ResNet(18, 3, (True,))
