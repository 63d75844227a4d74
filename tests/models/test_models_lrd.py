"""Tests: the LRD module's shapes, structure, receptive field and gradients."""

from __future__ import annotations

import pytest
import torch

from lrss_ds.models.base import set_segment_runner
from lrss_ds.models.lrd import LRDModule


def test_shape_at_odd_sizes():
    torch.manual_seed(0)
    lrd = LRDModule(18, k=8, d=12)
    assert lrd(torch.randn(2, 18, 13, 17)).shape == (2, 12, 13, 17)
    assert lrd.out_channels == 12


def test_fusion_concatenates_the_unit_input_and_every_branch():
    lrd = LRDModule(4, k=8, d=8, dw_kernels=(7, 15, 31))
    # f_in, f_5, f_7, f_15, f_31 (Eq. 1) -> 5 * k channels into the fusing 1x1.
    assert lrd.unit.fuse[0].in_channels == 5 * 8
    assert [branch[0].kernel_size for branch in lrd.unit.depthwise] == [7, 15, 31]
    assert lrd.unit.dense[0].kernel_size == (5, 5)


def test_receptive_field_is_the_largest_kernel():
    """A centre output depends on inputs 15 pixels away (31x31) but not 16."""
    torch.manual_seed(1)
    lrd = LRDModule(2, k=4, d=4).eval()  # eval: batch-norm statistics would couple all pixels
    x = torch.randn(1, 2, 41, 41, requires_grad=True)
    lrd(x)[0, :, 20, 20].sum().backward()
    reach = x.grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(reach, as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (5, 35)
    assert (cols.min().item(), cols.max().item()) == (5, 35)


def test_fast_and_direct_depthwise_agree_and_all_parameters_learn():
    torch.manual_seed(2)
    fast = LRDModule(6, k=8, d=8)
    direct = LRDModule(6, k=8, d=8, dw_method="direct")
    direct.load_state_dict(fast.state_dict())
    x = torch.randn(2, 6, 19, 23, requires_grad=True)
    out_fast, out_direct = fast(x), direct(x)
    torch.testing.assert_close(out_fast, out_direct, rtol=1e-5, atol=1e-5)
    out_fast.square().mean().backward()
    out_direct.square().mean().backward()
    for (name, p_fast), p_direct in zip(fast.named_parameters(), direct.parameters()):
        assert p_fast.grad is not None and p_fast.grad.abs().sum() > 0, name
        torch.testing.assert_close(p_fast.grad, p_direct.grad, rtol=1e-4, atol=1e-6)


def test_unknown_activation():
    with pytest.raises(ValueError):
        LRDModule(4, k=4, d=4, activation="tanhh")


def test_split_fusion_equals_the_1x1_of_the_concatenation_in_float64():
    """Eq. (1)'s fusion computed term by term equals conv1x1(cat(f_in, f_5, f_7, f_15, f_31))."""
    torch.manual_seed(3)
    lrd = LRDModule(5, k=6, d=7).double()
    x = torch.randn(2, 5, 21, 19, dtype=torch.float64)
    unit = lrd.unit
    reduced = lrd.reduce(x)
    terms = [reduced, unit.dense(reduced)] + [branch(reduced) for branch in unit.depthwise]
    joint = torch.cat([term.weight for term in unit.fuse[0].terms], dim=1)  # the single 1x1's weight
    fused = torch.nn.functional.conv2d(torch.cat(terms, dim=1), joint)
    expected = lrd.increase(unit.fuse[2](unit.fuse[1](fused)))
    torch.testing.assert_close(lrd(x), expected, rtol=0, atol=1e-12)
    assert unit.fuse[0](terms).shape == fused.shape


def test_split_fusion_loads_the_single_1x1_weight_and_is_initialised_like_it():
    torch.manual_seed(7)
    lrd = LRDModule(4, k=6, d=6)
    state = lrd.state_dict()
    joint = torch.randn(6, 30, 1, 1)
    old_layout = {k: v for k, v in state.items() if not k.startswith("unit.fuse.0.terms.")}
    old_layout["unit.fuse.0.weight"] = joint
    lrd.load_state_dict(old_layout)  # strict: every key placed
    for i, term in enumerate(lrd.unit.fuse[0].terms):
        torch.testing.assert_close(term.weight, joint[:, 6 * i : 6 * (i + 1)])
    bound = 1 / 30 ** 0.5  # nn.Conv2d's default bound for the single 1x1 (fan-in 5k = 30)
    weights = torch.cat([t.weight for t in LRDModule(4, k=6, d=6).unit.fuse[0].terms], dim=1)
    assert weights.abs().max() <= bound and weights.abs().max() > 0.8 * bound


def test_every_term_is_a_segment_and_merge_runs_inside_the_first():
    torch.manual_seed(4)
    lrd = LRDModule(6, k=4, d=4)
    lrd.segment_prefix = "lrd."
    seen: list[tuple[str, list[tuple[int, ...]]]] = []

    def runner(name, fn, *args):
        seen.append((name, [tuple(a.shape) for a in args]))
        return fn(*args)

    set_segment_runner(lrd, runner)
    a, b = torch.randn(1, 2, 8, 8), torch.randn(1, 4, 8, 8)
    out = lrd(a, b, merge=lambda *maps: torch.cat(maps, dim=1))
    assert out.shape == (1, 4, 8, 8)
    assert [name for name, _ in seen] == lrd.segment_names() == [
        "lrd.reduce", "lrd.unit.0", "lrd.unit.1", "lrd.unit.2", "lrd.unit.3", "lrd.unit.4", "lrd.increase",
    ]
    assert seen[0][1] == [(1, 2, 8, 8), (1, 4, 8, 8)]  # the merge's inputs, not the merged map
    with pytest.raises(ValueError, match="one input map"):
        lrd(a, b)


def test_split_fusion_goes_through_the_installed_large_conv_banding(monkeypatch: pytest.MonkeyPatch):
    """Every fused term is a plain Conv2d module call, so the large-tensor banding covers it."""
    from lrss_ds.memory import large_conv

    torch.manual_seed(5)
    lrd = LRDModule(3, k=4, d=4).eval()  # eval: two calls give the same output
    x = torch.randn(1, 3, 16, 16)
    expected = lrd(x)
    large_conv.install_large_conv_banding(lrd)
    calls: list[int] = []
    original = large_conv._BandedConv2d.apply
    monkeypatch.setattr(large_conv._BandedConv2d, "apply", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(large_conv, "ONEDNN_LIMIT_BYTES", 512)
    monkeypatch.setattr(large_conv, "BAND_BYTES", 256)
    got = lrd(x)
    assert len(calls) >= 5  # at least every fused term (plus the other 1x1 and dense convs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
