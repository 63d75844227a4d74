"""BatchNorm folded into convolutions: the same outputs, the right pairs only, and the model put back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lrss_ds.memory.banded_inference import banded_eval, row_logits
from lrss_ds.memory.device_sim import DeviceMemorySimulator
from lrss_ds.memory.fold_batchnorm import find_conv_bn_pairs, folded_batchnorm
from lrss_ds.models.large_kernel import DepthwiseConv2d
from tests.memory.test_banded_inference import BANDS, eval_model


def _randomise_affine(model: nn.Module) -> None:
    """Non-trivial gamma and beta too (eval_model sets the running statistics)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


def _never(a: Tensor, b: Tensor) -> bool:
    return True


@pytest.mark.parametrize("per_call", [True, False])
@pytest.mark.parametrize("name,banded", [("ehsnet", False), ("ehsnet", True), ("hrnet_fcn", False)])
def test_folded_model_equals_the_unfolded_one_in_float64(name: str, banded: bool, per_call: bool) -> None:
    model = eval_model(name)
    _randomise_affine(model)
    model = model.double()
    x = torch.rand(1, BANDS, 75, 61, dtype=torch.float64) * 255

    def forward() -> Tensor:
        if banded:
            with banded_eval(model):
                out = row_logits(model(x))
            return out.rows(0, 75)
        return model(x)

    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        expected = forward()
        with folded_batchnorm(model, forward, _never, per_call=per_call) as folded:
            got = forward()
    # all but the BatchNorms that follow no single convolution (fusion sums, the banded stem's)
    assert folded >= 0.8 * bn_count
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_call", [True, False])
def test_folding_restores_the_same_parameters_and_forwards(per_call: bool) -> None:
    model = eval_model("ehsnet")
    _randomise_affine(model)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    dw = next(m for m in model.modules() if isinstance(m, DepthwiseConv2d))
    assert dw.bias is None and "bias" not in dw._parameters
    x = torch.rand(1, BANDS, 64, 64) * 255
    with torch.no_grad():
        with folded_batchnorm(model, lambda: model(x), _never, per_call=per_call) as folded:
            assert folded > 0 and isinstance(dw.bias, nn.Parameter)
            model(x)  # a call between the checks and the exit
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value), name
    assert dw.bias is None and "bias" not in dw._parameters
    assert not any("forward" in vars(m) for m in model.modules())


def _wide_stack(layers: int = 6, channels: int = 64) -> nn.Sequential:
    """Eval-mode conv + BatchNorm layers whose weights outweigh the maps of a small input."""
    blocks: list[nn.Module] = []
    for _ in range(layers):
        bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        blocks += [nn.Conv2d(channels, channels, 3, padding=1), bn]
    return nn.Sequential(*blocks).eval()


@pytest.mark.parametrize("per_call", [True, False])
def test_per_call_folding_keeps_no_second_copy_of_the_weights(per_call: bool) -> None:
    # The original weights stay for the exit; folded copies kept beside them for the whole
    # context are one more model's worth of convolution weights (GLSNet: 135 MiB on a whole
    # scene). Per call, at most one layer's folded weight exists at a time.
    model = _wide_stack()
    x = torch.randn(1, 64, 8, 8)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    weight_bytes = sum(c.weight.nbytes for c in convs)
    sim = DeviceMemorySimulator()
    with torch.inference_mode(), sim:
        expected = model(x)
        with folded_batchnorm(model, lambda: model(x), _never, per_call=per_call) as folded:
            got = model(x)
    assert folded == len(convs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if per_call:
        assert sim.peak_new_bytes < 2 * convs[0].weight.nbytes
    else:  # the kept copies (for sliding windows, which call the model thousands of times)
        assert sim.peak_new_bytes >= weight_bytes


class _ConvReadTwice(nn.Module):
    """``bn(conv(x)) + conv(x)``: the convolution's output is read by more than its BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        return self.bn(z) + z


def test_a_fold_that_changes_the_output_is_refused() -> None:
    model = _ConvReadTwice().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        with pytest.raises(RuntimeError, match="changed its output"):
            with folded_batchnorm(model, lambda: model(x), lambda a, b: torch.allclose(a, b, atol=1e-5)):
                pass
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # put back after the refusal


def test_only_batchnorms_fed_by_one_convolution_pair_up() -> None:
    conv_a, conv_b, dw = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), DepthwiseConv2d(2, 3, bias=False)
    bn_sum, bn_a, bn_dw = nn.BatchNorm2d(2), nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    model = nn.ModuleList([conv_a, conv_b, dw, bn_sum, bn_a, bn_dw]).eval()
    x = torch.randn(1, 2, 5, 5)

    def run() -> Tensor:
        return bn_sum(conv_a(x) + conv_b(x)) + bn_a(conv_a(x)) + bn_dw(dw(x))

    pairs = find_conv_bn_pairs(model, run)
    assert pairs == [(dw, bn_dw)]  # one call of conv_a feeds a sum, not bn_a; bn_sum reads no convolution
