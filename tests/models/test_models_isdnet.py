"""ISDNet: Laplacian residuals, N-band shapes, the RAF gates, and its SR and affinity loss terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model
from lrss_ds.models.aux_losses import affinity, affinity_loss, super_resolution_loss
from lrss_ds.models.isdnet import gaussian_kernel, laplacian_residuals
from lrss_ds.models.losses import build_loss

SMALL = {"channels": 32, "shallow_base": 16, "relation_groups": 4}


def _model(bands: int = 5, classes: int = 3, **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("isdnet", classes, bands, band_mean=[100.0] * bands, band_std=[50.0] * bands,
                       **{**SMALL, **options})


def test_laplacian_residuals_reconstruct_the_image_and_vanish_on_constants() -> None:
    """Burt-Adelson: g0 = r0 + expand(r1 + expand(g2)); a constant image has zero residuals."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    fine, coarse = laplacian_residuals(x, 2)
    assert fine.shape == x.shape and coarse.shape == (2, 3, 16, 24)
    kernel = gaussian_kernel(3, dtype=torch.float64)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (2, 2, 2, 2), mode="reflect"), t.new_ones(1) * kernel, groups=3)

    def expand(t: torch.Tensor) -> torch.Tensor:
        up = t.new_zeros(*t.shape[:2], t.shape[2] * 2, t.shape[3] * 2)
        up[..., ::2, ::2] = t
        return F.conv2d(F.pad(up, (2, 2, 2, 2), mode="reflect"), 4 * kernel, groups=3)

    g1 = blur(x)[..., ::2, ::2]
    g2 = blur(g1)[..., ::2, ::2]
    torch.testing.assert_close(fine + expand(coarse + expand(g2)), x)
    flat = laplacian_residuals(torch.full((1, 2, 16, 16), 7.0, dtype=torch.float64), 2)
    assert all(r.abs().max() < 1e-12 for r in flat)


@pytest.mark.parametrize("size", [(45, 67), (100, 33)])
def test_n_band_odd_sizes_give_same_size_logits(size: tuple[int, int]) -> None:
    model = _model(bands=5).eval()
    assert model.shallow.features[0].conv.in_channels == 10  # 2 residual levels x 5 bands
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 5, *size), dtype=torch.uint8))
    assert logits.shape == (2, 3, *size) and torch.isfinite(logits).all()


def test_train_outputs_strides_and_loss_terms_reach_every_parameter() -> None:
    """The paper's zero gates: after one step on the ISDNet loss every parameter has had a gradient."""
    model = _model(bands=4).train()
    x = torch.randint(0, 256, (1, 4, 70, 90), dtype=torch.uint8)
    target = torch.randint(0, 3, (1, 70, 90), dtype=torch.uint8)
    target[0, :5, :5] = 255
    out = model(x)
    assert out["padded_size"] == (96, 96) and out["logits"].shape[-2:] == (12, 12)
    assert [a.shape[-1] for a in out["aux"]] == [3, 6, 12, 3]
    sr_image, sr_target = out["sr"]
    assert sr_image.shape == (1, 4, 48, 48) and sr_target.shape == (1, 4, 96, 96) and not sr_target.requires_grad
    assert out["affinity"][0].shape == (1, 32, 3, 3) and out["affinity"][1].shape == (1, 32, 48, 48)
    loss_fn = build_loss("isdnet", 3, 255)
    loss = loss_fn(out, target)
    assert torch.isfinite(loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss.backward()
    gated = {n for n, p in model.named_parameters() if "_mlp." in n}
    dead = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert dead == gated, sorted(dead - gated)  # zero gates: the relation MLPs wait one step
    assert all(model.get_parameter(n.replace("spatial_mlp.0.weight", "g1")).grad.abs() > 0 for n in gated
               if n.endswith("spatial_mlp.0.weight"))
    optimizer.step()
    optimizer.zero_grad()
    loss_fn(model(x), target).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_isdnet_loss_adds_its_weighted_terms_and_needs_their_outputs() -> None:
    model = _model(bands=3).train()
    torch.manual_seed(1)
    out = model(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    target = torch.randint(0, 3, (1, 64, 64))
    plain = build_loss("isdnet", 3, 255, sr_weight=0.0, affinity_weight=0.0)(out, target)
    full = build_loss("isdnet", 3, 255)(out, target)
    sr = super_resolution_loss(*out["sr"], (64, 64))
    fa = affinity_loss(*out["affinity"], (64, 64), (64, 64))
    torch.testing.assert_close(full, plain + 0.1 * sr + 1.0 * fa)
    with pytest.raises(ValueError, match="sr_weight"):
        build_loss("ce", 3, 255, sr_weight=0.1)({**out, "sr": None}, target)


def test_super_resolution_loss_ignores_the_padding_margin() -> None:
    target = torch.zeros(1, 2, 8, 8)
    target[..., 6:, :] = 100.0  # only in rows a 6-row input never has
    prediction = torch.zeros(1, 2, 4, 4)
    assert super_resolution_loss(prediction, target, (6, 8)) == 0
    assert super_resolution_loss(prediction, target, (8, 8)) > 0


def test_affinity_is_cosine_per_position_and_pooled_beyond_the_cap() -> None:
    features = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]]])  # positions (1, 0) and (2, 0)
    torch.testing.assert_close(affinity(features), torch.ones(1, 2, 2), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    seg = torch.randn(1, 8, 10, 10, requires_grad=True)
    sr = torch.randn(1, 8, 40, 40, requires_grad=True)
    equal = affinity_loss(seg, F.avg_pool2d(seg, 1).repeat_interleave(4, -1).repeat_interleave(4, -2), (80, 80), (80, 80))
    assert equal < 1e-5  # the SR map, averaged onto the grid, is the seg map itself
    capped = affinity_loss(seg, sr, (80, 80), (80, 80), max_positions=30)
    capped.backward()
    assert sr.grad is None and seg.grad is not None  # SR side detached
    # 100 positions capped at 30: pooled by 2 (25 positions), as a direct computation gives
    direct = F.l1_loss(affinity(F.avg_pool2d(seg, 2)), affinity(F.avg_pool2d(F.avg_pool2d(sr, 4), 2)))
    torch.testing.assert_close(capped, direct)


def test_bad_options_are_refused_and_config_rebuilds() -> None:
    with pytest.raises(ConfigError, match="relation_groups"):
        _model(channels=30, relation_groups=4)
    with pytest.raises(ConfigError, match="downsample"):
        _model(downsample=3)
    model = _model(bands=4)
    config = model.config()
    twin = build_model(**config)
    assert config["name"] == "isdnet" and twin.config() == config
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, options", [("isdnet", SMALL), ("stdc", {"base": 16, "context_channels": 32})])
def test_checkpointed_segments_give_the_plain_loss_and_gradients(name: str, options: dict) -> None:
    """Every segment of the block plan is recomputable: same loss and gradients, in float64."""
    from lrss_ds.memory.activation_checkpointing import TorchCheckpointRunner, batchnorm_modules
    from lrss_ds.models.base import set_segment_runner

    x = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    target = torch.randint(0, 3, (1, 64, 96))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model(name, 3, 3, band_mean=[100.0] * 3, band_std=[50.0] * 3, **options).double().train()
        if checkpointed:
            set_segment_runner(model, TorchCheckpointRunner(model.checkpoint_plan("block"), batchnorm_modules(model)))
        loss = build_loss(name, 3, 255)(model(x), target)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad, msg=key)
