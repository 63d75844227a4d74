"""GLSNet: shapes at odd sizes, gradients, whole image = crops one by one, attention extents."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models import glsnet as glsnet_module
from lrss_ds.models.base import upsample_logits
from lrss_ds.models.glsnet import GLSNet, build_glsnet
from lrss_ds.models.tiling import crop_raw, plan_tiling, stitch

# Small but complete: default depths (ResNet-18 global, ResNet-50 local) unless a test says
# otherwise; 64-pixel crops and a 32-pixel global margin keep every test to a few seconds.
SMALL: dict[str, Any] = {"crop_size": 64, "d_model": 32, "global_context": 32, "crop_batch": 3}


def small(seed: int = 0, **options: Any) -> GLSNet:
    torch.manual_seed(seed)
    return build_glsnet(5, 4, band_mean=[100.0] * 4, band_std=[50.0] * 4, **{**SMALL, **options})


def raw(b: int, h: int, w: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 4, h, w), generator=g, dtype=torch.uint8)


def bn_eval(model: nn.Module) -> nn.Module:
    """Train mode (dict outputs) with BatchNorm on running stats, so outputs do not depend on chunks."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def test_tiling_is_balanced_and_padded_to_32() -> None:
    t = plan_tiling((6800, 7200), 512)
    assert (t.rows, t.cols, t.crop, t.padded) == (14, 15, (512, 480), (7168, 7200))
    t = plan_tiling((131, 97), 64)
    assert (t.rows, t.cols, t.crop, t.padded) == (3, 2, (64, 64), (192, 128))
    t = plan_tiling((300, 417), 512)  # smaller than one crop: one crop, padded to 32 only
    assert (t.rows, t.cols, t.crop, t.padded) == (1, 1, (320, 448), (320, 448))
    assert t.windows() == [(0, 0, 320, 448)]
    t = plan_tiling((300, 517), 512)  # 517 -> 544 > 512: two columns of 288
    assert (t.rows, t.cols, t.crop, t.padded) == (1, 2, (320, 288), (320, 576))


def test_eval_shape_at_odd_size_default_depths() -> None:
    model = small().eval()
    with torch.no_grad():
        out = model(raw(1, 131, 97))
    assert out.shape == (1, 5, 131, 97) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_train_outputs_at_odd_size() -> None:
    model = small(local_depth=18, crop_size=256, global_context=64)
    out = model(raw(1, 300, 517).float())
    # 300 -> 320 = 2 x 160; 517 -> 544 = 3 x 192 (crops of at most 256)
    assert out["input_size"] == (300, 517) and out["padded_size"] == (320, 576)
    assert out["logits"].shape == (1, 5, 320 // 16, 576 // 16)
    global_logits, local_logits = out["aux"]
    assert global_logits.shape == (1, 5, 10, 18) and local_logits.shape == (1, 5, 20, 36)
    assert model.output_stride == 16


def test_gradients_reach_every_parameter() -> None:
    model = small(local_depth=18)
    out = model(raw(2, 70, 100))
    loss = out["logits"].square().mean() + sum(a.square().mean() for a in out["aux"])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_whole_image_equals_crops_one_by_one() -> None:
    model = small(local_depth=18).eval()
    x = raw(2, 100, 70)  # 2 x 2 crops of 64 per image
    with torch.no_grad():
        whole = model(x)
        # by hand: one global pass, then every crop alone with its window of the global map
        tiling = model.tiling((100, 70))
        global_map, _ = model.global_features(x, tiling.padded)
        crops = []
        for b in range(2):
            for window in tiling.windows():
                crop, valid = crop_raw(x[b], window)
                g, g_valid = model.global_windows(global_map, [(b, window)])
                main, _ = model.crop_forward(crop[None], [valid], g, g_valid)
                crops.append(main)
        by_hand = upsample_logits(stitch(torch.cat(crops), tiling, 2), tiling.padded, (100, 70))
    torch.testing.assert_close(whole, by_hand, rtol=1e-4, atol=1e-4)


def test_local_branch_is_crop_local_and_global_map_is_shared() -> None:
    model = bn_eval(small(local_depth=18, global_context=0))
    x = raw(1, 128, 128)  # 2 x 2 crops of 64
    y = x.clone()
    y[:, :, 70:90, 70:90] = 255 - y[:, :, 70:90, 70:90]  # inside crop (1, 1) only
    with torch.no_grad():
        a, b = model(x), model(y)
    local_a, local_b = a["aux"][1], b["aux"][1]  # stride 16: crop (1, 1) is rows/cols 4..7
    assert torch.equal(local_a[..., :4, :], local_b[..., :4, :])
    assert torch.equal(local_a[..., :, :4], local_b[..., :, :4])
    assert not torch.equal(local_a[..., 4:, 4:], local_b[..., 4:, 4:])
    # the change reaches crop (0, 0)'s main logits only through the shared global map
    assert not torch.equal(a["aux"][0], b["aux"][0])
    assert not torch.equal(a["logits"][..., :4, :4], b["logits"][..., :4, :4])


def test_attention_extents_per_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], tuple[int, ...], bool]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, **kw: Any) -> Tensor:
        calls.append((tuple(q.shape), tuple(k.shape), attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(glsnet_module.F, "scaled_dot_product_attention", spy)
    model = small(local_depth=18, crop_batch=4, num_heads=2).eval()
    with torch.no_grad():
        model(raw(1, 128, 128))
    # one chunk of 4 crops; local tokens: (64/16)^2 = 16; global: ((64 + 2*32)/32)^2 = 16
    ll, lg = 16, 16
    assert [c[:2] for c in calls] == [
        ((4, 2, lg, 16), (4, 2, ll, 16)),  # encoder 1: global queries, local keys/values
        ((4, 2, ll, 16), (4, 2, lg, 16)),  # encoder 2: local queries, global keys/values
        ((4, 2, ll, 16), (4, 2, lg, 16)),  # decoder: local-global queries, global-local memory
    ]
    assert [c[2] for c in calls] == [False, True, True]  # the margin leaves the image at the borders
    window, valid = model.global_windows(torch.ones(1, 32, 4, 4), [(0, (0, 0, 64, 64))])
    assert window.shape == (1, 32, 4, 4) and valid is not None
    assert valid.reshape(4, 4)[0].tolist() == [False] * 4 and valid.reshape(4, 4)[1:, 1:].all()


def test_eval_is_independent_of_crop_batch_and_deterministic() -> None:
    x = raw(1, 64, 130)  # 1 x 3 crops
    with torch.no_grad():
        one = small(local_depth=18, crop_batch=1).eval()(x)
        many = small(local_depth=18, crop_batch=16).eval()(x)
        again = small(local_depth=18, crop_batch=1).eval()(x)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-4)
    assert torch.equal(one, again)


def test_param_groups_config_and_counts() -> None:
    model = small()
    groups = model.param_groups(1e-4, 2e-5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert {g["name"]: g["lr"] for g in groups} == {"global": 1e-4, "local": 2e-5, "fusion": 1e-4}
    config = model.config()
    assert config["name"] == "glsnet" and config["crop_size"] == 64
    rebuilt = build_glsnet(**{k: v for k, v in config.items() if k != "name"})
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    # default model: ResNet-18 and ResNet-50 (torchvision counts without fc) + 1x1 projections
    full = build_glsnet(7, 3)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in full.named_children()}
    assert counts["global_branch"] == 11_176_512 + 512 * 256 + 2 * 256 + 256 * 7 + 7
    assert counts["local_branch"] == 23_508_032 + 2048 * 256 + 2 * 256 + 256 * 7 + 7
    assert counts["fusion"] == 3 * 2 * 256 and counts["head"] == 256 * 7 + 7
    assert full.pretrained_backbones() == {"global_branch.backbone": "resnet18", "local_branch.backbone": "resnet50"}


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="crop_size"):
        build_glsnet(3, 3, crop_size=100)
    with pytest.raises(ConfigError, match="global_context"):
        build_glsnet(3, 3, global_context=48)
    with pytest.raises(ConfigError, match="num_heads"):
        build_glsnet(3, 3, d_model=30, num_heads=4)
    with pytest.raises(ConfigError, match="patch_size"):
        build_glsnet(3, 3, patch_size=512)


def test_whole_scene_on_meta_keeps_attention_per_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 6800 x 7200 scene with default options (but crop_batch), shapes only: meta tensors hold no data."""
    extents: list[tuple[int, int]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, **kw: Any) -> Tensor:
        extents.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(glsnet_module.F, "scaled_dot_product_attention", spy)
    with torch.device("meta"):
        model = build_glsnet(7, 4, crop_batch=16).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 4, 6800, 7200, dtype=torch.uint8))
    assert out.shape == (1, 7, 6800, 7200)
    # 14 x 15 crops of 512 x 480: three attentions per chunk of 16 crops, each at most
    # (512/16 * 480/16) local x ((512 + 512)/32 * (480 + 512)/32) global tokens
    assert len(extents) == 3 * math.ceil(14 * 15 / 16)
    assert max(q * k for q, k in extents) == (32 * 30) * (32 * 31)
