"""The saved-tensor ledger counts known tensors exactly, once per storage, and releases them."""

from __future__ import annotations

import torch
from torch import nn

from lrss_ds.memory import SavedTensorHooks, SavedTensorLedger


def test_ledger_counts_a_known_saved_tensor_and_releases_it() -> None:
    ledger = SavedTensorLedger()
    base = torch.randn(1000, requires_grad=True)
    with SavedTensorHooks(ledger, offload=False).installed():
        hidden = base * 2.0  # scalar multiply saves nothing
        out = hidden.exp()  # saves its result: 1000 float32 = 4000 bytes
        assert ledger.device_bytes == 4000 and ledger.offloaded_bytes == 0
        both = out * hidden  # saves out (already held: not counted again) and hidden
        assert ledger.device_bytes == 8000
        both.sum().backward()
    assert ledger.device_bytes == 0
    assert ledger.peak_device_bytes == 8000 and ledger.peak_total_bytes == 8000
    assert ledger.saved_count == 3
    torch.testing.assert_close(base.grad, (2 * (base * 2).exp() * (1 + 2 * base)))


def test_ledger_ignores_parameters_and_their_views() -> None:
    ledger = SavedTensorLedger()
    linear = nn.Linear(10, 10, bias=False)
    x = torch.randn(4, 10, requires_grad=True) * 1.0  # non-leaf 160 bytes
    with SavedTensorHooks(ledger, offload=False).installed():
        y = linear(x)  # saves x and weight.t() (a view of the parameter)
        assert ledger.device_bytes == 160
        y.sum().backward()
    assert ledger.device_bytes == 0


def test_offload_counts_saved_tensors_as_offloaded_and_gives_same_gradients() -> None:
    ledger = SavedTensorLedger()
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(1, 3, 16, 16)
    conv(x).square().sum().backward()
    expected = conv.weight.grad.clone()
    conv.zero_grad()
    with SavedTensorHooks(ledger, offload=True).installed():
        out = conv(x).square()  # conv saves x (3072 B, a leaf not needing grad), square saves conv out (5120 B)
        assert ledger.device_bytes == 0 and ledger.offloaded_bytes == 3 * 256 * 4 + 5 * 256 * 4
        out.sum().backward()
    assert ledger.offloaded_bytes == 0 and ledger.peak_offloaded_bytes == 8192
    torch.testing.assert_close(conv.weight.grad, expected, rtol=0, atol=0)


def test_reset_peaks_starts_from_current_and_summary_is_one_line() -> None:
    ledger = SavedTensorLedger()
    token = ledger.hold("a", 1 << 30, offloaded=False)
    ledger.release(token)
    ledger.reset_peaks()
    assert ledger.snapshot()["peak_device_bytes"] == 0
    ledger.hold("b", 1 << 29, offloaded=True)
    line = ledger.summary()
    assert "\n" not in line and "host 0.50G" in line
