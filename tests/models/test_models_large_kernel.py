"""Tests: the fast depth-wise convolution equals F.conv2d in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrss_ds.models.large_kernel import (
    DepthwiseConv2d,
    depthwise_conv2d,
    depthwise_weight_grad_fft,
    next_fast_len,
    resolve_method,
)


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor):
    """Output and gradients of the plain grouped F.conv2d."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_() if bias is not None else None
    out = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    out.backward(grad)
    return out.detach(), x.grad, weight.grad, bias.grad if bias is not None else None


def _fast(x, weight, bias, grad, method="fast"):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_() if bias is not None else None
    out = depthwise_conv2d(x, weight, bias, method)
    out.backward(grad)
    return out.detach(), x.grad, weight.grad, bias.grad if bias is not None else None


@pytest.mark.parametrize("kernel", [7, 15, 31])
@pytest.mark.parametrize("shape", [(2, 3, 13, 17), (1, 4, 37, 29)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_equals_conv2d_in_float64(kernel, shape, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], 1, kernel, kernel, dtype=torch.float64)
    bias = torch.randn(shape[1], dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    for got, want in zip(_fast(x, weight, bias, grad), _reference(x, weight, bias, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", [7, 15, 31])
def test_fast_equals_conv2d_in_float32(kernel):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 23, 19)
    weight = torch.randn(5, 1, kernel, kernel)
    grad = torch.randn(2, 5, 23, 19)
    for got, want in zip(_fast(x, weight, None, grad)[:3], _reference(x, weight, None, grad)[:3]):
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-6)


def test_output_keeps_the_input_memory_format():
    x = torch.randn(1, 3, 20, 21)
    weight = torch.randn(3, 1, 31, 31)
    assert depthwise_conv2d(x, weight, method="fast").is_contiguous()
    out = depthwise_conv2d(x.contiguous(memory_format=torch.channels_last), weight, method="fast")
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_matches_float32_reference():
    torch.manual_seed(2)
    x = torch.randn(1, 4, 21, 25)
    weight = torch.randn(4, 1, 15, 15) / 15
    grad = torch.randn(1, 4, 21, 25)
    want = _reference(x, weight, None, grad)
    got = _fast(x.bfloat16(), weight.bfloat16(), None, grad.bfloat16())
    for g, w in zip(got[:3], want[:3]):
        assert g.dtype == torch.bfloat16
        assert ((g.float() - w).abs().max() / w.abs().max()) < 3e-2


def test_autocast_bfloat16_gradients_have_the_parameter_dtypes():
    torch.manual_seed(4)
    x = torch.randn(1, 3, 17, 19)
    weight = torch.randn(3, 1, 15, 15) / 15
    bias = torch.randn(3)
    grad = torch.randn(1, 3, 17, 19)
    want = _reference(x, weight, bias, grad)
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv2d(x, weight, bias, "fast")
    assert out.dtype == torch.bfloat16
    out.backward(grad.bfloat16())
    for got, ref in zip((out, x.grad, weight.grad, bias.grad), want):
        assert ((got.float() - ref).abs().max() / ref.abs().max()) < 3e-2
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.float32,) * 3


def test_weight_grad_fft_matches_explicit_sum():
    torch.manual_seed(3)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    grad = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    kernel, pad = 5, 2
    xp = F.pad(x, (pad, pad, pad, pad))
    want = torch.zeros(2, 1, kernel, kernel, dtype=torch.float64)
    for i in range(kernel):
        for j in range(kernel):
            want[:, 0, i, j] = (grad * xp[:, :, i : i + 6, j : j + 5]).sum(dim=(0, 2, 3))
    torch.testing.assert_close(depthwise_weight_grad_fft(x, grad, kernel), want)


def test_module_state_dict_is_that_of_nn_conv2d():
    conv = nn.Conv2d(6, 6, 15, padding=7, groups=6)
    fast = DepthwiseConv2d(6, 15)
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(1, 6, 19, 23)
    torch.testing.assert_close(fast(x), conv(x), rtol=1e-5, atol=1e-5)
    assert fast.weight.shape == (6, 1, 15, 15) and fast.bias.shape == (6,)


def test_auto_method_choice():
    cpu = torch.device("cpu")
    assert resolve_method("auto", 31, cpu) == "fast"
    assert resolve_method("auto", 3, cpu) == "direct"
    assert resolve_method("auto", 31, torch.device("cuda")) == "direct"
    assert resolve_method("direct", 31, cpu) == "direct"


def test_next_fast_len():
    assert next_fast_len(127) == 128
    assert next_fast_len(11) == 12
    assert next_fast_len(1) == 1
    for n in (97, 851, 1000):
        m = next_fast_len(n)
        assert m >= n and all(next_fast_len(k) == m for k in range(n, m + 1))


def test_rejects_bad_kernels():
    with pytest.raises(ValueError):
        DepthwiseConv2d(4, 8)
    with pytest.raises(ValueError):
        depthwise_conv2d(torch.randn(1, 4, 9, 9), torch.randn(4, 1, 3, 5))
    with pytest.raises(ValueError):
        depthwise_conv2d(torch.randn(1, 4, 9, 9), torch.randn(4, 1, 3, 3), method="magic")
