"""Simplified GLNet: shapes at odd sizes, gradients, window resampling, crop batching."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lrss_ds.errors import ConfigError
from lrss_ds.models.glnet import GLNet, build_glnet, window_grid

# ResNet-18 branches and a narrow FPN keep the tests fast; the layout is the same as depth 50.
SMALL: dict[str, Any] = {"crop_size": 64, "global_size": 64, "depth": 18, "fpn_width": 16, "crop_batch": 3}


def small(seed: int = 0, **options: Any) -> GLNet:
    torch.manual_seed(seed)
    return build_glnet(4, 3, band_mean=[120.0] * 3, band_std=[60.0] * 3, **{**SMALL, **options})


def raw(b: int, h: int, w: int, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def test_window_grid_resamples_exact_windows() -> None:
    fmap = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    # the map covers a 64 x 64 padded image at stride 8; a window on whole global pixels
    grid = window_grid([(16, 24, 16, 16), (0, 0, 64, 64)], (64, 64), (2, 2), torch.device("cpu"))
    out = F.grid_sample(fmap.expand(2, -1, -1, -1), grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[0], fmap[0, :, 2:4, 3:5])
    whole = window_grid([(0, 0, 64, 64)], (64, 64), (8, 8), torch.device("cpu"))
    torch.testing.assert_close(F.grid_sample(fmap, whole, align_corners=False), fmap)


def test_eval_shape_at_odd_size() -> None:
    model = small().eval()
    with torch.no_grad():
        out = model(raw(1, 131, 97))
    assert out.shape == (1, 4, 131, 97) and torch.isfinite(out).all()


def test_train_outputs_at_odd_size() -> None:
    model = small(crop_size=256, global_size=128)
    out = model(raw(1, 300, 517).float())
    # 300 -> 320 = 2 x 160; 517 -> 544 = 3 x 192; the global input is scaled to 128 on its long side
    assert out["padded_size"] == (320, 576) and out["input_size"] == (300, 517)
    assert model.global_input_size((320, 576)) == (64, 128)
    assert out["logits"].shape == (1, 4, 80, 144) and model.output_stride == 4
    assert [tuple(a.shape) for a in out["aux"]] == [(1, 4, 16, 32), (1, 4, 80, 144)]


def test_default_depth_train_shapes() -> None:
    model = small(depth=50, fpn_width=32)
    assert model.local_fpn.toplayer.in_channels == 2 * 2048  # local c5 + the global c5 cut
    out = model(raw(1, 97, 131))
    assert out["padded_size"] == (128, 192) and out["logits"].shape == (1, 4, 32, 48)
    assert [tuple(a.shape) for a in out["aux"]] == [(1, 4, 8, 16), (1, 4, 32, 48)]


def test_gradients_reach_every_parameter_and_detach_global() -> None:
    model = small()
    out = model(raw(2, 64, 100))  # 1 x 2 crops per image
    (out["logits"].square().mean() + sum(a.square().mean() for a in out["aux"])).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []

    # the main logits reach the global branch through the shared maps, unless detached
    for detach in (False, True):
        model = small(detach_global=detach)
        model(raw(1, 64, 64))["logits"].sum().backward()
        reached = model.global_backbone.conv1.weight.grad is not None
        assert reached == (not detach)


def test_eval_is_independent_of_crop_batch_and_deterministic() -> None:
    x = raw(2, 100, 70)
    with torch.no_grad():
        one = small(crop_batch=1).eval()(x)
        many = small(crop_batch=16).eval()(x)
        again = small(crop_batch=1).eval()(x)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-4)
    assert torch.equal(one, again)


def test_param_groups_segments_and_config() -> None:
    model = small()
    groups = model.param_groups(1e-4, 2e-5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert {g["name"]: g["lr"] for g in groups} == {"global": 1e-4, "local": 2e-5, "ensemble": 1e-4}
    plan = model.checkpoint_plan("stage")
    assert {"global.stem", "global.fpn", "local.stem", "local.fpn"} <= plan
    rebuilt = build_glnet(**{k: v for k, v in model.config().items() if k != "name"})
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ConfigError, match="global_size"):
        build_glnet(3, 3, global_size=100)
    with pytest.raises(ConfigError, match="patch_size"):
        build_glnet(3, 3, patch_size=512)
