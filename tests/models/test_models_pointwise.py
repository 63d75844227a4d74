"""1x1 convolutions as matrix products: the convolution's values and gradients in either memory format."""

from __future__ import annotations

import pytest
import torch

from lrss_ds.models.pointwise import pointwise_conv2d, project_positions


def _conv_and_input(bias: bool, channels_last: bool) -> tuple[torch.nn.Conv2d, torch.Tensor]:
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(6, 4, 1, bias=bias).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return conv, x.requires_grad_(True)


def _grads(out: torch.Tensor, conv: torch.nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> tuple:
    return torch.autograd.grad(out, [x, *conv.parameters()], grad)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv2d_is_the_convolution_with_its_gradients_and_memory_format(bias: bool, channels_last: bool) -> None:
    conv, x = _conv_and_input(bias, channels_last)
    grad = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    want = conv(x)
    got = pointwise_conv2d(x, conv.weight, conv.bias)
    torch.testing.assert_close(got, want)
    for g, w in zip(_grads(got, conv, x, grad), _grads(want, conv, x, grad)):
        torch.testing.assert_close(g, w)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)  # the next convolution sees the layout it expects


@pytest.mark.parametrize("channels_last", [False, True])
def test_projecting_positions_is_the_convolution_channels_first(channels_last: bool) -> None:
    conv, x = _conv_and_input(True, channels_last)
    grad = torch.randn(2, 4, 35, dtype=torch.float64)
    want = conv(x).flatten(2)
    got = project_positions(conv.weight, conv.bias, x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want)
    for g, w in zip(_grads(got, conv, x, grad), _grads(want, conv, x, grad)):
        torch.testing.assert_close(g, w)


def test_both_follow_autocast_as_the_convolution_does() -> None:
    conv, x = _conv_and_input(True, False)
    conv, x = conv.float(), x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
        assert pointwise_conv2d(x, conv.weight, conv.bias).dtype == torch.bfloat16
        assert project_positions(conv.weight, conv.bias, x).dtype == torch.bfloat16
