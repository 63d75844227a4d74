"""Tests: the LRD module's shapes, structure, receptive field and gradients."""

from __future__ import annotations

import pytest
import torch

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
