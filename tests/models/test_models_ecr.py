"""Tests: efficient attention and the ECR module's hard-region gather/scatter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrss_ds.models.ecr import ECRModule, efficient_attention


def test_efficient_attention_equals_explicit_formula():
    torch.manual_seed(0)
    q = torch.randn(2, 5, 4, dtype=torch.float64)
    k = torch.randn(2, 9, 4, dtype=torch.float64)
    v = torch.randn(2, 9, 3, dtype=torch.float64)
    qs = torch.softmax(q, dim=-1)  # over features
    ks = torch.softmax(k, dim=-2)  # over positions
    want = torch.zeros(2, 5, 3, dtype=torch.float64)
    for b in range(2):
        for n in range(5):
            for m in range(9):
                # The explicit (Nq x Nk) form: weight of key m for query n, times value m.
                want[b, n] += (qs[b, n] * ks[b, m]).sum() * v[b, m]
    # keys and values go in channels first
    torch.testing.assert_close(efficient_attention(q, k.transpose(1, 2), v.transpose(1, 2)), want)


def _aux_with_margins(margins: torch.Tensor, classes: int = 3) -> torch.Tensor:
    """Aux logits (B, K, h, w) whose top-1 minus top-2 margin is ``margins`` (B, h, w)."""
    logits = torch.zeros(margins.shape[0], classes, *margins.shape[1:])
    logits[:, 1] = margins
    logits[:, 2] = -5.0
    return logits


def test_selects_the_least_confident_positions():
    torch.manual_seed(1)
    h, w = 7, 9
    margins = torch.rand(2, h, w) + 1.0
    low = torch.tensor([[3, 10, 40, 62, 0, 17], [5, 6, 7, 8, 9, 50]])
    for b in range(2):
        margins[b].view(-1)[low[b]] = torch.linspace(0.01, 0.5, 6)
    ecr = ECRModule(8, hard_ratio=6 / (h * w))
    idx = ecr.select_hard(_aux_with_margins(margins))
    assert idx.shape == (2, 6)
    assert torch.equal(idx, low)  # sorted by increasing margin


def test_scatters_to_exactly_the_selected_positions():
    torch.manual_seed(2)
    ecr = ECRModule(6, hard_ratio=0.1)
    features = torch.randn(2, 6, 11, 13)
    aux = torch.randn(2, 4, 11, 13)
    out, idx = ecr(features, aux, return_indices=True)
    assert idx.shape == (2, round(0.1 * 11 * 13))
    changed = (out != features).any(dim=1).flatten(1)  # (B, N)
    selected = torch.zeros_like(changed)
    selected.scatter_(1, idx, True)
    assert torch.equal(changed, selected)
    # Bit-identical elsewhere, and the selected positions hold gather + reproject(attention).
    assert torch.equal(out.flatten(2)[~selected.unsqueeze(1).expand(-1, 6, -1)],
                       features.flatten(2)[~selected.unsqueeze(1).expand(-1, 6, -1)])
    hard = features.flatten(2).gather(2, idx.unsqueeze(1).expand(-1, 6, -1)).transpose(1, 2)
    keys = ecr.key(features).flatten(2)  # the 1x1 convolutions themselves, channels first
    values = ecr.value(features).flatten(2)
    want = hard + ecr.reproject(efficient_attention(ecr.query(hard), keys, values))
    got = out.flatten(2).gather(2, idx.unsqueeze(1).expand(-1, 6, -1)).transpose(1, 2)
    torch.testing.assert_close(got, want)


def test_gradients_reach_every_parameter_and_the_features():
    torch.manual_seed(3)
    ecr = ECRModule(8, hard_ratio=0.2, heads=2)
    features = torch.randn(1, 8, 9, 10, requires_grad=True)
    ecr(features, torch.randn(1, 5, 9, 10)).square().sum().backward()
    for name, param in ecr.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert features.grad.abs().sum() > 0


def test_memory_is_linear_in_positions():
    """No saved activation is anywhere near N x N (N = 4096 positions here)."""
    torch.manual_seed(4)
    ecr = ECRModule(8, hard_ratio=0.1)
    features = torch.randn(1, 8, 64, 64, requires_grad=True)
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ecr(features, torch.randn(1, 3, 64, 64)).sum().backward()
    positions = 64 * 64
    assert largest <= 8 * positions  # O(N * C), while N^2 would be 16.7 M


def test_deterministic_and_validates_input():
    torch.manual_seed(5)
    ecr = ECRModule(4)
    features, aux = torch.randn(1, 4, 6, 7), torch.randn(1, 3, 6, 7)
    assert torch.equal(ecr(features, aux), ecr(features, aux))
    with pytest.raises(ValueError):
        ecr(features, torch.randn(1, 3, 6, 8))
    with pytest.raises(ValueError):
        ecr(features, torch.randn(1, 1, 6, 7))
    with pytest.raises(ValueError):
        ECRModule(4, hard_ratio=0.0)


def test_every_parameter_is_read_inside_its_own_modules_call() -> None:
    # ZeRO-3 gathers a module's parameters in that module's forward pre-hook: a weight read from
    # outside its module's call would be an empty partition there.
    ecr = ECRModule(8, hard_ratio=0.2, heads=2)
    inside: list[nn.Module] = []
    reads: list[str] = []

    def enter(module: nn.Module, _inputs: object) -> None:
        inside.append(module)

    def leave(module: nn.Module, _inputs: object, _output: object) -> None:
        inside.pop()

    owners = {id(p): (name, m) for name, m in ecr.named_modules() for p in m.parameters(recurse=False)}
    for module in ecr.modules():
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    class Reads(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            for arg in [*args, *(kwargs or {}).values()]:
                if isinstance(arg, torch.Tensor) and id(arg) in owners:
                    name, owner = owners[id(arg)]
                    if not inside or inside[-1] is not owner:
                        reads.append(name)
            return func(*args, **(kwargs or {}))

    with Reads():
        ecr(torch.randn(1, 8, 9, 10), torch.randn(1, 5, 9, 10))
    assert reads == []
