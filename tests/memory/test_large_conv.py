"""Row-banded convolution equals F.conv2d (output and gradients) and is installed on Conv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrss_ds.memory import large_conv
from lrss_ds.memory.large_conv import banded_conv2d, install_large_conv_banding, needs_banding

CASES = [  # (in ch, out ch, kernel, stride, padding, dilation, groups, height, width)
    (4, 8, 3, 2, 1, 1, 1, 37, 23),   # EHSNet's stem: 3x3 stride 2, odd height
    (6, 6, 3, 1, 1, 1, 1, 20, 9),
    (4, 8, 5, 1, 2, 2, 2, 31, 17),   # dilated, grouped
    (3, 5, 1, 1, 0, 1, 1, 13, 11),   # 1x1
    (4, 4, 7, 3, 0, 1, 4, 40, 16),   # depth-wise, no padding, stride 3
    (2, 3, (3, 5), 1, (1, 2), 1, 1, 12, 10),  # rectangular kernel
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_banded_conv_equals_conv2d_in_float64(case: tuple, channels_last: bool) -> None:
    cin, cout, kernel, stride, padding, dilation, groups, height, width = case
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    padding = padding if isinstance(padding, tuple) else (padding, padding)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, height, width, dtype=torch.float64, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin // groups, *kernel, dtype=torch.float64, generator=gen)
    bias = torch.randn(cout, dtype=torch.float64, generator=gen)
    args = ((stride, stride), padding, (dilation, dilation), groups)
    grads = []
    outputs = []
    for banded in (False, True):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        if banded:  # bands of one output row: every band edge is exercised
            out = banded_conv2d(xs, ws, bs, *args, band_bytes=1)
        else:
            out = F.conv2d(xs, ws, bs, *args)
        grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out.backward(grad_out)
        outputs.append(out.detach())
        grads.append((xs.grad, ws.grad, bs.grad))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-12)
    for banded_grad, plain_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(banded_grad, plain_grad, rtol=1e-12, atol=1e-12)


def test_banded_conv_under_bf16_autocast_matches_conv2d() -> None:
    x = torch.randn(2, 4, 33, 20).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(4, 8, 3, 2, 1)
    grads = []
    for banded in (False, True):
        xs = x.clone().requires_grad_()
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if banded:
                out = banded_conv2d(xs, conv.weight, conv.bias, (2, 2), (1, 1), band_bytes=1)
            else:
                out = conv(xs)
        assert out.dtype == torch.bfloat16
        (out.float().square().sum()).backward()
        grads.append((out.detach().float(), xs.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for banded_value, plain_value in zip(grads[1], grads[0]):
        assert banded_value.dtype == torch.float32
        # bf16 rounds single elements by up to ~1e-2 relative; compare whole tensors
        assert float((banded_value - plain_value).norm() / plain_value.norm()) < 1e-2


def test_installed_forward_bands_only_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 16, 12, dtype=torch.float64)
    model = model.double()
    reference = model(x)
    assert install_large_conv_banding(model) == 2
    assert install_large_conv_banding(model) == 0  # idempotent
    calls: list[int] = []
    original = large_conv._BandedConv2d.apply
    monkeypatch.setattr(large_conv._BandedConv2d, "apply", lambda *a: calls.append(1) or original(*a))
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    assert calls == []  # small tensors go straight to F.conv2d
    monkeypatch.setattr(large_conv, "ONEDNN_LIMIT_BYTES", 1024)
    monkeypatch.setattr(large_conv, "BAND_BYTES", 512)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-12)
    assert len(calls) == 2


def test_needs_banding_counts_bytes_of_the_compute_dtype() -> None:
    x = torch.empty(1, 64, 8, 8)
    weight = torch.empty(64, 64, 3, 3)
    limit = 64 * 8 * 8 * 4 - 1
    assert needs_banding(x, weight, (1, 1), (1, 1), (1, 1), limit_bytes=limit)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not needs_banding(x, weight, (1, 1), (1, 1), (1, 1), limit_bytes=limit)


class Standardised(nn.Conv2d):
    """Stands for a convolution subclass with its own weight transform, which banding must not bypass."""


def test_install_leaves_subclasses_and_string_padding_alone_and_pickles(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), Standardised(4, 4, 1), nn.Conv2d(4, 2, 1))
    assert install_large_conv_banding(model) == 2
    assert type(model[1]) is Standardised
    assert isinstance(model[0], large_conv.LargeSafeConv2d)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_installed_1x1_convolutions_past_the_threshold_run_as_matrix_products(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 2, 1, stride=2)).double()
    x = torch.randn(1, 3, 16, 12, dtype=torch.float64, requires_grad=True)
    reference = model(x)
    reference_grad = torch.autograd.grad(reference.sum(), x)[0]
    install_large_conv_banding(model)
    products: list[tuple] = []
    original = large_conv.pointwise_conv2d
    monkeypatch.setattr(large_conv, "pointwise_conv2d", lambda *a: products.append(a[1].shape) or original(*a))
    model(x)
    assert products == []  # under the threshold: the ordinary convolution
    monkeypatch.setattr(large_conv, "POINTWISE_MATMUL_BYTES", 1024)
    out = model(x)
    assert products == [(5, 4, 1, 1)]  # the plain 1x1 only: not the 3x3, not the strided 1x1
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], reference_grad)
