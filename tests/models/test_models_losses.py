"""Tests: BAE boundary weights, the three losses, and the row-banded evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import upsample_logits
from lrss_ds.models.losses import bae_weights, boundary_mask, build_loss, upsample_rows

IGNORE = 255


def test_bae_weights_of_a_vertical_edge():
    mask = torch.zeros(1, 9, 12, dtype=torch.uint8)
    mask[:, :, 6:] = 3
    weights = bae_weights(mask, IGNORE, kernel_size=5)
    # A 5x5 window straddles the edge between columns 5 and 6 from columns 4..7.
    expected = torch.ones(1, 9, 12)
    expected[:, :, 4:8] = 2.0
    assert torch.equal(weights, expected)  # the scene border itself is no boundary


def test_bae_weights_with_kernel_3_and_a_corner():
    mask = torch.zeros(1, 6, 6, dtype=torch.long)
    mask[:, 3:, 3:] = 1
    boundary = boundary_mask(mask, IGNORE, kernel_size=3)
    expected = torch.zeros(1, 6, 6, dtype=torch.bool)
    expected[:, 2:4, 2:] = True
    expected[:, 2:, 2:4] = True
    assert torch.equal(boundary, expected)


def test_ignored_pixels_create_no_boundary_and_weigh_zero():
    mask = torch.ones(1, 12, 12, dtype=torch.uint8)
    mask[:, 4:8, 4:8] = IGNORE
    weights = bae_weights(mask, IGNORE)
    expected = torch.ones(1, 12, 12)
    expected[:, 4:8, 4:8] = 0.0
    assert torch.equal(weights, expected)
    # Two classes separated by an ignored strip wider than the window: no boundary either.
    mask = torch.zeros(1, 8, 14, dtype=torch.uint8)
    mask[:, :, 5:9] = IGNORE
    mask[:, :, 9:] = 2
    assert not boundary_mask(mask, IGNORE).any()


def test_ehsnet_loss_equals_explicit_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    target = torch.randint(0, 4, (2, 16, 16))
    target[0, :3] = IGNORE
    loss = build_loss("ehsnet", 4, IGNORE)(dict(logits=logits, aux=[aux], input_size=(16, 16), padded_size=(16, 16)), target)
    weights = bae_weights(target, IGNORE, 5)
    safe = torch.where(target == IGNORE, 0, target)

    def term(x):
        ce = -F.log_softmax(x, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
        return (weights * ce).sum() / weights.sum()

    torch.testing.assert_close(loss, term(logits) + 0.4 * term(aux))


def test_focal_loss_formula_and_two_aux_terms():
    torch.manual_seed(1)
    maps = [torch.randn(1, 3, 10, 11) for _ in range(3)]
    target = torch.randint(0, 3, (1, 10, 11), dtype=torch.uint8)
    target[0, 0, :4] = IGNORE
    outputs = dict(logits=maps[0], aux=maps[1:], input_size=(10, 11), padded_size=(10, 11))
    valid = target != IGNORE
    safe = torch.where(valid, target.long(), 0)

    def term(x):
        p_t = F.softmax(x, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
        return (-(1 - p_t) ** 6 * p_t.log())[valid].mean()

    loss = build_loss("focal", 3, IGNORE)(outputs, target)
    torch.testing.assert_close(loss, term(maps[0]) + 0.15 * (term(maps[1]) + term(maps[2])))
    plain = build_loss("ce", 3, IGNORE, aux_weight=0.0)(outputs, target)
    torch.testing.assert_close(build_loss("focal", 3, IGNORE, gamma=0.0, aux_weight=0.0)(outputs, target), plain)


def test_upsample_rows_equals_upsample_then_slice():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 9, 11)
    full = upsample_logits(logits, (72, 88), (67, 83))
    for start, stop in [(0, 1), (0, 13), (5, 40), (60, 67), (33, 34)]:
        torch.testing.assert_close(upsample_rows(logits, (72, 88), (67, 83), start, stop), full[:, :, start:stop], rtol=0, atol=1e-6)


def _train_outputs(seed: int, classes: int, size: tuple[int, int], aux_count: int):
    """Stride-8 main logits and stride-4 aux logits of an odd-sized input, requiring grad."""
    torch.manual_seed(seed)
    padded = (-(-size[0] // 8) * 8, -(-size[1] // 8) * 8)
    logits = torch.randn(2, classes, padded[0] // 8, padded[1] // 8, requires_grad=True)
    aux = [torch.randn(2, classes, padded[0] // 4, padded[1] // 4, requires_grad=True) for _ in range(aux_count)]
    target = torch.randint(0, classes, (2, *size), dtype=torch.uint8)
    target[:, size[0] // 3 : size[0] // 2, 5:20] = IGNORE
    target[1, size[0] // 2 :, : size[1] // 2] = 1  # a long straight boundary
    return dict(logits=logits, aux=aux, input_size=size, padded_size=padded), target


@pytest.mark.parametrize(
    "name,aux_count,band_rows,size",
    # 2 rows = the Sobel halo; 64 > the 53 rows of the target (one band).
    [
        ("ehsnet", 1, 2, (21, 29)),
        ("ehsnet", 1, 7, (53, 61)),
        ("ehsnet", 1, 64, (53, 61)),
        ("focal", 2, 11, (53, 61)),
        ("ce", 1, 9, (53, 61)),
    ],
)
def test_banded_loss_equals_unbanded(name, aux_count, band_rows, size):
    outputs, target = _train_outputs(3, 5, size, aux_count)
    tensors = [outputs["logits"], *outputs["aux"]]
    whole = build_loss(name, 5, IGNORE)(outputs, target)
    grads_whole = torch.autograd.grad(whole, tensors)
    banded = build_loss(name, 5, IGNORE, band_rows=band_rows)(outputs, target)
    grads_banded = torch.autograd.grad(banded, tensors)
    torch.testing.assert_close(banded, whole, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_banded, grads_whole):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _blocky_outputs(size, padded, map_sizes, seed=0, classes=4):
    """Float64 logits of the given sizes and a piecewise-constant target of ``size``.

    Random labels make nearly every pixel a BAE boundary, which would hide a band whose
    Sobel window lacks its neighbouring rows; blocks of 3..6 rows and columns leave
    interior pixels, boundaries at every offset from a band edge, an ignored rectangle and
    fully ignored rows.
    """
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, classes, *hw, generator=gen, dtype=torch.float64, requires_grad=True) for hw in map_sizes]

    def edges(n):
        steps = torch.randint(3, 7, (n,), generator=gen)
        return torch.bucketize(torch.arange(n), steps.cumsum(0), right=True)

    coarse = torch.randint(0, classes, (2, size[0], size[1]), generator=gen, dtype=torch.uint8)
    target = coarse[:, edges(size[0])][:, :, edges(size[1])]
    target[0, size[0] // 3 : size[0] // 2 + 1, 2 : size[1] // 2] = IGNORE
    target[1, size[0] // 2 : size[0] // 2 + 3] = IGNORE
    outputs = dict(logits=maps[0], aux=maps[1:], input_size=size, padded_size=padded)
    return outputs, target


@pytest.mark.parametrize("name", ["ehsnet", "focal", "ce", "bae7"])
@pytest.mark.parametrize(
    "size,padded,map_sizes,band_rows",
    [
        # EHSNet at 64x96 (padded to 64x128): stride 8 main + stride 8 aux, the lever test's case
        ((64, 96), (64, 128), [(8, 16), (8, 16)], 16),
        # odd height, neither a multiple of the band nor of the stride; strides 8, 4, 2
        ((37, 45), (40, 48), [(5, 6), (10, 12), (20, 24)], 5),
        # one-row bands; a stride-1 aux map (no upsampling)
        ((37, 45), (40, 48), [(5, 6), (40, 48)], 1),
        # bands of the Sobel halo (2 rows); heavy cropping from stride 32 and 16
        ((33, 31), (64, 64), [(2, 2), (4, 4), (16, 16)], 2),
        # one band larger than the image
        ((21, 29), (24, 32), [(3, 4)], 100),
        # last band of one row; a non-integer scale (40 / 7)
        ((37, 45), (40, 48), [(7, 9), (10, 12)], 9),
    ],
)
def test_banded_loss_equals_unbanded_in_float64(name, size, padded, map_sizes, band_rows):
    """Banded and unbanded agree to float64 rounding: any band-edge error would show at 1e-10."""
    outputs, target = _blocky_outputs(size, padded, map_sizes)
    aux_weight = [0.4, 0.25][: len(map_sizes) - 1]
    opts = dict(aux_weight=aux_weight, boundary_kernel=7, boundary_weight=2.0) if name == "bae7" else dict(aux_weight=aux_weight)
    preset = "ehsnet" if name == "bae7" else name
    tensors = [outputs["logits"], *outputs["aux"]]
    whole = build_loss(preset, 4, IGNORE, **opts)(outputs, target)
    grads_whole = torch.autograd.grad(whole, tensors)
    banded = build_loss(preset, 4, IGNORE, band_rows=band_rows, **opts)(outputs, target)
    grads_banded = torch.autograd.grad(banded, tensors)
    assert whole.dtype == banded.dtype == torch.float64
    torch.testing.assert_close(banded, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_banded, grads_whole):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))


def test_banded_loss_never_saves_full_resolution_logits():
    outputs, target = _train_outputs(4, 6, (61, 101), 1)
    full_numel = 2 * 6 * 61 * 101
    for band_rows, bound in [(None, None), (16, full_numel // 2)]:
        largest = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal largest
            largest = max(largest, t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = build_loss("ehsnet", 6, IGNORE, band_rows=band_rows)(outputs, target)
        loss.backward()
        if bound is None:
            assert largest >= full_numel  # the unbanded loss does keep them
        else:
            assert largest < bound


def test_uint8_and_long_targets_agree():
    outputs, target = _train_outputs(5, 4, (17, 19), 1)
    loss_fn = build_loss("ehsnet", 4, IGNORE)
    torch.testing.assert_close(loss_fn(outputs, target), loss_fn(outputs, target.long()))


def test_errors():
    outputs, target = _train_outputs(6, 4, (17, 19), 1)
    with pytest.raises(ConfigError):
        build_loss("dice", 4, IGNORE)
    with pytest.raises(ConfigError):
        build_loss("ce", 4, IGNORE, band_row=4)
    with pytest.raises(ConfigError):
        build_loss("ce", 4, IGNORE, band_rows=0)
    bad = target.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("ce", 4, IGNORE)(outputs, bad)
    negative = target.long()
    negative[0, 1, 1] = -1
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("ce", 4, IGNORE)(outputs, negative)
    with pytest.raises(ValueError, match="input size"):
        build_loss("ce", 4, IGNORE)(outputs, target[:, :-1])
    with pytest.raises(ValueError, match="aux"):
        build_loss("ce", 4, IGNORE, aux_weight=[0.4, 0.4])(outputs, target)
