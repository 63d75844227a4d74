"""Tests: the banded HRNet stem equals conv -> BatchNorm -> ReLU -> conv, and holds less."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrss_ds.errors import ConfigError
from lrss_ds.memory import MemoryMode, TorchCheckpointRunner, batchnorm_modules
from lrss_ds.memory.banded_stem import BandedStem, install_stem_banding
from lrss_ds.models.base import set_segment_runner
from lrss_ds.models.hrnet import HRNet


def _stem(dtype: torch.dtype, c_in: int = 3, width: int = 8, momentum: float | None = 0.1) -> list[nn.Module]:
    conv1 = nn.Conv2d(c_in, width, 3, 2, 1, bias=False)
    bn1 = nn.BatchNorm2d(width, momentum=momentum)
    conv2 = nn.Conv2d(width, width, 3, 2, 1, bias=False)
    with torch.no_grad():  # off-default affine parameters, so that the ReLU clips some of every channel
        bn1.weight.uniform_(0.5, 1.5)
        bn1.bias.uniform_(-0.3, 0.3)
        bn1.running_mean.uniform_(-0.2, 0.2)
        bn1.running_var.uniform_(0.5, 2.0)
    return [m.to(dtype) for m in (conv1, bn1, conv2)]


def _reference(x: torch.Tensor, conv1: nn.Module, bn1: nn.Module, conv2: nn.Module) -> torch.Tensor:
    return conv2(F.relu(bn1(conv1(x))))


CASES = [
    # (height, width, band rows, channels-last, training)
    (37, 29, 4, False, True),  # odd sizes: the last band is short, rows end on a halo
    (40, 23, 2, True, True),  # bands of one output row of conv2
    (33, 31, 6, False, False),  # eval: running statistics, no update
    (17, 18, 100, True, True),  # one band
    (64, 64, 8, True, True),
]


CASE_IDS = [f"{c[0]}x{c[1]}-r{c[2]}-{'cl' if c[3] else 'nchw'}-{'train' if c[4] else 'eval'}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_banded_stem_equals_the_layers_in_float64(case: tuple) -> None:
    height, width, rows, channels_last, training = case
    torch.manual_seed(0)
    ref = _stem(torch.float64)
    banded = copy.deepcopy(ref)
    for module in ref + banded:
        module.train(training)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, height, width, dtype=torch.float64).contiguous(memory_format=fmt)
    x_ref, x_banded = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = _reference(x_ref, *ref)
    out_banded = BandedStem(rows)(x_banded, *banded)
    torch.testing.assert_close(out_banded, out_ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out_ref)
    (out_ref * grad).sum().backward()
    (out_banded * grad).sum().backward()
    torch.testing.assert_close(x_banded.grad, x_ref.grad, rtol=0, atol=1e-12)
    for module_ref, module_banded in zip(ref, banded):
        for (name, p_ref), p_banded in zip(module_ref.named_parameters(), module_banded.parameters()):
            assert p_ref.grad.abs().sum() > 0, name
            torch.testing.assert_close(p_banded.grad, p_ref.grad, rtol=0, atol=1e-11, msg=name)
    bn_ref, bn_banded = ref[1], banded[1]
    torch.testing.assert_close(bn_banded.running_mean, bn_ref.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(bn_banded.running_var, bn_ref.running_var, rtol=0, atol=1e-13)
    assert int(bn_banded.num_batches_tracked) == int(bn_ref.num_batches_tracked) == (1 if training else 0)


def test_cumulative_average_running_statistics() -> None:
    """momentum=None: the update factor is 1 / num_batches_tracked, as nn.BatchNorm2d."""
    torch.manual_seed(1)
    ref = _stem(torch.float64, momentum=None)
    banded = copy.deepcopy(ref)
    for _ in range(3):
        x = torch.randn(1, 3, 21, 26, dtype=torch.float64)
        _reference(x, *ref)
        BandedStem(4)(x, *banded)
    torch.testing.assert_close(banded[1].running_mean, ref[1].running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(banded[1].running_var, ref[1].running_var, rtol=0, atol=1e-13)
    assert int(banded[1].num_batches_tracked) == 3


def test_banded_stem_under_bf16_autocast_is_close_to_the_layers() -> None:
    torch.manual_seed(2)
    ref = _stem(torch.float32)
    banded = copy.deepcopy(ref)
    x = torch.randn(1, 3, 48, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = _reference(x, *ref)
        out_banded = BandedStem(8)(x, *banded)
    assert out_banded.dtype == out_ref.dtype == torch.bfloat16
    torch.testing.assert_close(out_banded.float(), out_ref.float(), rtol=0.05, atol=0.05)
    out_ref.float().square().sum().backward()
    out_banded.float().square().sum().backward()
    for module_ref, module_banded in zip(ref, banded):
        for p_ref, p_banded in zip(module_ref.parameters(), module_banded.parameters()):
            assert p_banded.grad.dtype == torch.float32
            cosine = F.cosine_similarity(p_banded.grad.flatten(), p_ref.grad.flatten(), dim=0)
            assert cosine > 0.99


def test_banded_stem_saves_only_its_input_for_backward() -> None:
    """The point of it: no half-resolution map is kept for backward (the layers keep four)."""
    torch.manual_seed(3)
    x = torch.randn(1, 3, 64, 64)

    def saved_bytes(run) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.dim() == 4 and not isinstance(t, nn.Parameter):
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return total

    ref = _stem(torch.float32)
    banded = copy.deepcopy(ref)
    plain_bytes = saved_bytes(lambda: _reference(x.clone().requires_grad_(), *ref))
    banded_bytes = saved_bytes(lambda: BandedStem(8)(x.clone().requires_grad_(), *banded))
    assert banded_bytes == x.numel() * 4
    half_resolution_map = 8 * 32 * 32 * 4
    assert plain_bytes >= x.numel() * 4 + 2 * half_resolution_map


def test_hrnet_with_a_banded_stem_under_checkpointing_equals_the_plain_one() -> None:
    """Recomputation under the checkpoint runner leaves BatchNorm statistics as after one step."""
    torch.manual_seed(4)
    plain = HRNet(18, 3, 4).double()
    banded = copy.deepcopy(plain)
    assert install_stem_banding(banded, 4) == 1
    set_segment_runner(banded, TorchCheckpointRunner(banded.segment_plan("fine"), batchnorm_modules(banded)))
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    out_plain = plain(x)
    out_banded = banded(x)
    for a, b in zip(out_banded, out_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    sum(o.square().sum() for o in out_plain).backward()
    sum(o.square().sum() for o in out_banded).backward()
    for (name, p_plain), p_banded in zip(plain.named_parameters(), banded.parameters()):
        # gradients reach 1e5 here: compare relative to the largest (float64 rounding, not 1e-9 absolute)
        scale = float(p_plain.grad.abs().max())
        torch.testing.assert_close(p_banded.grad, p_plain.grad, rtol=0, atol=1e-11 * scale, msg=name)
    for bn_plain, bn_banded in zip(batchnorm_modules(plain), batchnorm_modules(banded)):
        torch.testing.assert_close(bn_banded.running_mean, bn_plain.running_mean, rtol=0, atol=1e-12)
        assert int(bn_banded.num_batches_tracked) == int(bn_plain.num_batches_tracked) == 1


def test_install_refuses_a_stem_it_cannot_band_and_none_restores_the_layers() -> None:
    model = HRNet(18, 3, 4)
    assert install_stem_banding(model, 16) == 1
    assert install_stem_banding(model, None) == 0 and model.stem_core is None
    model.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=True)
    with pytest.raises(ConfigError, match="memory.stem_band_rows"):
        install_stem_banding(model, 16)


@pytest.mark.parametrize("rows", [0, -2, True, 1.5])
def test_memory_mode_rejects_bad_stem_band_rows(rows: object) -> None:
    with pytest.raises(ConfigError, match="memory.stem_band_rows"):
        MemoryMode(stem_band_rows=rows)  # type: ignore[arg-type]


def test_runner_plan_with_a_banded_stem_uses_every_name() -> None:
    model = HRNet(18, 3, 8)
    install_stem_banding(model, 8)
    runner = TorchCheckpointRunner(model.segment_plan("fine"), batchnorm_modules(model))
    set_segment_runner(model, runner)
    model(torch.randn(1, 3, 128, 128))
    assert runner.unused_plan_names() == set()


def test_zero_stage_3_with_a_banded_stem_is_refused_with_the_key() -> None:
    """ZeRO-3 gathers parameters on module calls; the banded stem reads them without calling the layers."""
    from lrss_ds.memory import get_memory_mode, prepare_model
    from lrss_ds.models import build_model

    model = build_model("ehsnet", 6, 4)
    with pytest.raises(ConfigError, match="memory.stem_band_rows.*ZeRO stage 3"):
        prepare_model(model, get_memory_mode("fullres_fp32"), {"zero_optimization": {"stage": 3}})
    assert prepare_model(model, get_memory_mode("fullres_fp32"), {"zero_optimization": {"stage": 2}}) is not None
