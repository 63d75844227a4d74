"""Tests of the HRNetV2 backbone: official names, strides, segments and checkpoint plans."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import set_segment_runner
from lrss_ds.models.hrnet import HRNet

# Keys (and shapes for W18) of the official HRNet-W18 ImageNet classification checkpoint.
OFFICIAL_W18 = {
    "conv1.weight": (64, 3, 3, 3),
    "bn2.running_var": (64,),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.3.conv3.weight": (256, 64, 1, 1),
    "transition1.0.0.weight": (18, 256, 3, 3),
    "transition1.1.0.0.weight": (36, 256, 3, 3),
    "transition2.2.0.0.weight": (72, 36, 3, 3),
    "transition3.3.0.1.bias": (144,),
    "stage2.0.branches.1.3.conv2.weight": (36, 36, 3, 3),
    "stage2.0.fuse_layers.0.1.0.weight": (18, 36, 1, 1),
    "stage2.0.fuse_layers.1.0.0.0.weight": (36, 18, 3, 3),
    "stage3.3.fuse_layers.2.0.1.0.weight": (72, 18, 3, 3),
    "stage4.2.fuse_layers.3.0.0.0.weight": (18, 18, 3, 3),
    "stage4.2.fuse_layers.3.0.2.1.running_mean": (144,),
    "stage4.2.fuse_layers.0.3.1.weight": (18,),
}


def test_official_key_names_and_widths() -> None:
    state = HRNet(18, in_channels=3).state_dict()
    for key, shape in OFFICIAL_W18.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("transition2.0", "transition2.1", "transition3.0")) for k in state)
    assert len([k for k in state if k.startswith("stage3.") and k.endswith("conv1.weight")]) == 4 * 3 * 4
    assert HRNet(32).out_channels == [32, 64, 128, 256]
    assert HRNet(48).out_channels == [48, 96, 192, 384]


def test_output_stride_8_keeps_every_weight_shape() -> None:
    s4 = {k: v.shape for k, v in HRNet(18, 4, output_stride=4).state_dict().items()}
    s8 = {k: v.shape for k, v in HRNet(18, 4, output_stride=8).state_dict().items()}
    assert s4 == s8
    with pytest.raises(ConfigError, match="output_stride"):
        HRNet(18, 3, output_stride=16)
    with pytest.raises(ConfigError, match="width"):
        HRNet(24)


@pytest.mark.parametrize("output_stride", [4, 8])
def test_branch_shapes(output_stride: int) -> None:
    torch.manual_seed(0)
    model = HRNet(18, 2, output_stride).eval()
    h, w = 2 * 64, 3 * 64
    with torch.no_grad():
        outs = model(torch.randn(1, 2, h, w))
    for i, out in enumerate(outs):
        stride = output_stride * 2**i
        assert out.shape == (1, 18 * 2**i, h // stride, w // stride)


def test_segments_nest_and_plans_cover_the_forward() -> None:
    model = HRNet(18, 1, 8).eval()
    seen: list[str] = []

    def record(name, fn, *args):
        seen.append(name)
        return fn(*args)

    set_segment_runner(model, record)
    model(torch.randn(1, 1, 64, 64), input_transform=lambda t: t * 2)
    assert seen[:4] == ["stem", "stem.conv1", "stem.conv2", "layer1"]
    assert "transition2" in seen and "stage3.3" in seen and "stage4.2" in seen
    for granularity in ("stage", "block", "fine"):
        plan = model.segment_plan(granularity)
        assert set(plan) <= set(seen), granularity
        assert plan[0] in ("stem", "stem.conv1")  # the first segment holds the input transform
        # non-nesting: no name is a dotted prefix of another
        assert not any(b.startswith(a + ".") for a in plan for b in plan), granularity
    assert model.segment_plan("fine")[:3] == ["stem", "layer1.0-1", "layer1.2-3"]


def test_checkpointed_segments_give_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = HRNet(18, 3, 4)
    model.eval()  # fixed BN statistics, so recomputation is exactly repeatable
    x = torch.randn(1, 3, 32, 32)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        sum(o.square().mean() for o in model(x)).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    plan = set(model.segment_plan("block"))

    def runner(name, fn, *args):
        if name in plan:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    set_segment_runner(model, runner)
    for a, b in zip(plain, grads()):
        assert torch.allclose(a, b, atol=1e-6)
