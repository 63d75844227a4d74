"""The spatial layers against their one-rank versions, on ranks that are threads of this process."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import Resize, SegmentationModel
from lrss_ds.models.ecr import ECRModule
from lrss_ds.models.hrnet_fcn import HRNetFCN
from lrss_ds.models.large_kernel import DepthwiseConv2d
from lrss_ds.parallel import HaloConv2d, SpatialBatchNorm2d, SpatialGroup, SpatialResize, band_bounds, spatialize
from lrss_ds.parallel import batchnorm as batchnorm_module
from lrss_ds.parallel.attention import SpatialECR
from lrss_ds.parallel.halo import HaloDepthwiseConv2d
from lrss_ds.parallel.halo import _transfers
from tests.parallel.threads import run_threads


def test_bands_are_near_equal_multiples_of_the_stride_with_an_uneven_last() -> None:
    assert band_bounds(80, 2, 32) == [(0, 64), (64, 80)]
    assert band_bounds(136, 4, 32) == [(0, 64), (64, 96), (96, 128), (128, 136)]
    assert band_bounds(128, 4, 32) == [(0, 32), (32, 64), (64, 96), (96, 128)]
    for height, ranks, multiple in ((1000, 3, 32), (4096, 4, 64), (97, 3, 8)):
        bounds = band_bounds(height, ranks, multiple)
        assert bounds[0][0] == 0 and bounds[-1][1] == height
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all((stop - start) % multiple == 0 for start, stop in bounds[:-1])
        heights = [stop - start for start, stop in bounds[:-1]]
        assert max(heights) - min(heights) <= multiple
    with pytest.raises(ValueError, match="fewer than the 4 spatial ranks"):
        band_bounds(96, 4, 32)


def test_a_halo_taller_than_a_band_comes_from_every_rank_it_lies_on() -> None:
    rows = [8, 8, 8, 8]
    sends, receives, first, stop = _transfers(rows, 2, top=15, bottom=15)
    # band 2 covers rows 16..23; it needs 1..38 clipped to the scene (0..31)
    assert (first, stop) == (1, 32)
    assert receives == {0: (1, 8), 1: (0, 8), 3: (0, 8)}
    assert sends == {0: (0, 7), 1: (0, 8), 3: (0, 8)}  # band 0 needs rows up to 22


def _split(x: Tensor, rows: list[int]) -> list[Tensor]:
    return list(torch.split(x, rows, dim=2))


def _banded(
    ranks: int, rows: list[int], make: Callable[[SpatialGroup], nn.Module], x: Tensor, grad_out: Tensor | None = None,
    call: Callable[[nn.Module, Tensor], Tensor] = lambda m, t: m(t),
) -> tuple[Tensor, Tensor, dict[str, Tensor], list[nn.Module]]:
    """Run ``make(group)`` on each band of ``x``; return the joined output, input gradient,
    group-summed parameter gradients and the rank modules."""
    bands = [b.detach().clone().requires_grad_() for b in _split(x, rows)]
    modules: list[nn.Module] = []

    def work(rank: int, comm: Any) -> tuple[Tensor, dict[str, Tensor]]:
        group = SpatialGroup(comm, rank, ranks)
        group.rows = list(rows)
        module = make(group)
        modules.append(module)
        out = call(module, bands[rank])
        if grad_out is None:
            out.square().sum().backward()
        else:
            out.backward(_split(grad_out, [o * out.shape[2] // rows[rank] for o in rows])[rank])
        grads = {n: comm.all_reduce(p.grad) for n, p in module.named_parameters()}
        return out.detach(), grads

    results = run_threads(ranks, work)
    out = torch.cat([r[0] for r in results], dim=2)
    return out, torch.cat([b.grad for b in bands], dim=2), results[0][1], modules


CONVS = [
    # (in, out, kernel, stride, padding, dilation, groups)
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, 1, 1, 1),
    (4, 6, 1, 2, 0, 1, 1),
    (4, 6, 5, 1, 2, 1, 2),
    (4, 4, 3, 1, 2, 2, 1),
    (4, 4, 31, 1, 15, 1, 4),  # depth-wise 31 x 31: its halo spans several 8-row bands
    (4, 4, (7, 3), (2, 1), (3, 1), 1, 1),
]


@pytest.mark.parametrize("spec", CONVS, ids=[f"k{c[2]}s{c[3]}p{c[4]}d{c[5]}g{c[6]}" for c in CONVS])
def test_halo_conv_equals_conv2d(spec: tuple) -> None:
    c_in, c_out, kernel, stride, padding, dilation, groups = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups).double()
    rows = [8, 16, 8, 8]  # uneven bands, all multiples of the stride
    x = torch.randn(2, c_in, sum(rows), 11, dtype=torch.float64, requires_grad=True)
    ref = conv(x)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    out, grad_x, grads, modules = _banded(
        4, rows, lambda g: HaloConv2d.from_conv(copy.deepcopy(conv), g), x.detach(), grad_out
    )
    assert all(isinstance(m, HaloConv2d) for m in modules)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["weight"], conv.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["bias"], conv.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel, halo", [(3, 1), (5, 2)])
def test_a_group_counts_the_halo_bytes_it_sends(kernel: int, halo: int) -> None:
    conv = nn.Conv2d(4, 6, kernel, padding=kernel // 2).double()
    x = torch.randn(2, 4, 16, 11, dtype=torch.float64)

    def work(rank: int, comm: Any) -> int:
        group = SpatialGroup(comm, rank, 2)
        group.rows = [8, 8]
        band = x[:, :, 8 * rank : 8 * rank + 8].clone().requires_grad_()
        HaloConv2d.from_conv(copy.deepcopy(conv), group)(band).sum().backward()
        return group.halo_bytes_sent

    # each rank sends its `halo` boundary rows forward and the gradient of the rows it received back
    row_bytes = 2 * 4 * 11 * 8
    assert run_threads(2, work) == [2 * halo * row_bytes] * 2


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_spatial_resize_equals_bilinear_upsampling(factor: int) -> None:
    torch.manual_seed(1)
    rows = [2, 3, 1]
    x = torch.randn(1, 3, sum(rows), 5, dtype=torch.float64, requires_grad=True)
    size = (sum(rows) * factor, 5 * factor)
    ref = Resize()(x, size)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    out, grad_x, _, _ = _banded(
        3, rows, SpatialResize, x.detach(), grad_out, call=lambda m, t: m(t, (t.shape[2] * factor, 5 * factor))
    )
    torch.testing.assert_close(out, ref.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("momentum, chunk", [(0.1, None), (None, None), (0.1, 70)], ids=["m0.1", "mNone", "row-chunks"])
def test_spatial_batchnorm_uses_the_scenes_statistics(
    momentum: float | None, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:  # 70 elements: the float64 sums go one row of 2 x 5 x 7 at a time
        monkeypatch.setattr(batchnorm_module, "SUM_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(5, momentum=momentum).double()
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -1, 1)
    rows = [4, 12, 2]
    x = (3 + 2 * torch.randn(2, 5, sum(rows), 7, dtype=torch.float64)).requires_grad_()
    reference = copy.deepcopy(bn)
    ref = reference(x)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    out, grad_x, grads, modules = _banded(
        3, rows, lambda g: SpatialBatchNorm2d.from_batchnorm(copy.deepcopy(bn), g), x.detach(), grad_out
    )
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["weight"], reference.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["bias"], reference.bias.grad, rtol=1e-12, atol=1e-12)
    for module in modules:  # every rank's running statistics are the one-rank ones
        torch.testing.assert_close(module.running_mean, reference.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(module.running_var, reference.running_var, rtol=1e-12, atol=1e-12)
        assert int(module.num_batches_tracked) == int(reference.num_batches_tracked) == 1
    module = modules[0].eval()  # eval: the running statistics, no communication
    torch.testing.assert_close(module(x[:, :, :4]), reference.eval()(x[:, :, :4]))


class _OneRankComm:
    """The collectives of a group of one: every sum is the rank's own."""

    def all_reduce(self, tensor: Tensor, op: Any = None, group: Any = None) -> Tensor:
        return tensor

    def exchange(self, sends: Any, receives: Any, like: Tensor, group: Any = None) -> dict[int, Tensor]:
        return {}


def test_spatial_batchnorm_holds_no_float64_copy_of_its_band() -> None:
    """Forward and backward allocate about what nn.BatchNorm2d does, not float64 copies of the band.

    The float64 statistics once cast the whole band (and squared it): measured on a 128 MiB
    float32 band, 514 MiB above the input in forward and 801 MiB in backward, where
    nn.BatchNorm2d needs 130 and 162 MiB; at a scene's stem that ate the halving of the band.
    """
    import psutil

    from lrss_ds.engine.resident_memory import PeakMemory

    if PeakMemory().source != "VmHWM":
        pytest.skip("no resettable high-water mark here")
    torch.manual_seed(5)
    reference = nn.BatchNorm2d(32)
    bn = SpatialBatchNorm2d.from_batchnorm(copy.deepcopy(reference), SpatialGroup(_OneRankComm(), 0, 1))
    x = torch.randn(1, 32, 512, 1024, requires_grad=True)  # 64 MiB: above malloc's mmap threshold
    grad_out = torch.randn_like(x)
    band = x.numel() * x.element_size()
    process = psutil.Process()
    before = process.memory_info().rss
    peak = PeakMemory()
    out = bn(x)
    forward = peak.bytes() - before
    before = process.memory_info().rss
    peak.restart()
    out.backward(grad_out)
    backward = peak.bytes() - before
    assert forward < 3.6 * band, f"forward peak {forward / band:.2f} x the band"  # the output, the saved xhat, chunks
    assert backward < 2.5 * band, f"backward peak {backward / band:.2f} x the band"  # the input gradient
    ref = reference(x.detach().requires_grad_())
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-4, atol=1e-4)


class _NeighbourComm:
    """A middle rank's exchanges with stand-in neighbours: every received row is zero."""

    def all_reduce(self, tensor: Tensor, op: Any = None, group: Any = None) -> Tensor:
        return tensor

    def exchange(self, sends: Any, receives: Any, like: Tensor, group: Any = None) -> dict[int, Tensor]:
        return {peer: like.new_zeros(tuple(shape)) for peer, shape in receives.items()}


@pytest.mark.parametrize("layer", ["conv", "depthwise"])
@pytest.mark.parametrize("rank, ranks", [(0, 1), (1, 3)], ids=["one-rank", "middle-of-three"])
def test_halo_conv_holds_no_copy_of_its_band(rank: int, ranks: int, layer: str) -> None:
    """After forward HaloConv2d holds about what nn.Conv2d does: its output, and the band it was given.

    Convolving one block of band and halo rows (padded again at the scene's edges) saved that
    block for backward: measured on a 64 MiB float32 band (32 x 512 x 1024, 3 x 3), 2.15 x the
    band held after forward and a 3.15 x peak, where nn.Conv2d holds 1.13 x and peaks at 2.12 x.
    HaloDepthwiseConv2d (15 x 15, direct) held 2.26 x where DepthwiseConv2d holds 1.16 x; its
    halo blocks are 3 x 7 rows a side, so it gets a little more room.
    """
    import psutil

    from lrss_ds.engine.resident_memory import PeakMemory

    if PeakMemory().source != "VmHWM":
        pytest.skip("no resettable high-water mark here")
    torch.manual_seed(6)
    comm = _OneRankComm() if ranks == 1 else _NeighbourComm()
    group = SpatialGroup(comm, rank, ranks)  # type: ignore[arg-type]
    group.rows = [512] * ranks
    conv: nn.Module
    halo: nn.Module
    if layer == "conv":
        conv = nn.Conv2d(32, 32, 3, padding=1)
        halo, rows, allowed = HaloConv2d.from_conv(conv, group), 1, 1.4
    else:
        conv = DepthwiseConv2d(32, 15, method="direct")
        halo, rows, allowed = HaloDepthwiseConv2d.from_depthwise(conv, group), 7, 1.6
    x = torch.randn(1, 32, 512, 1024, requires_grad=True)  # 64 MiB: above malloc's mmap threshold
    band = x.numel() * x.element_size()
    process = psutil.Process()
    before = process.memory_info().rss
    peak = PeakMemory()
    out = halo(x)
    held = process.memory_info().rss - before
    forward = peak.bytes() - before
    assert held < allowed * band, f"held {held / band:.2f} x the band after forward"  # the output and a few rows
    assert forward < 2.6 * band, f"forward peak {forward / band:.2f} x the band"
    out.backward(torch.ones_like(out))
    assert x.grad is not None and x.grad.shape == x.shape
    ref = conv(x.detach())
    if ranks == 1:
        torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    else:  # zero neighbours: the one-rank convolution in the band's interior rows
        torch.testing.assert_close(out.detach()[:, :, rows:-rows], ref[:, :, rows:-rows], rtol=1e-5, atol=1e-5)


def _group() -> SpatialGroup:
    return SpatialGroup(comm=None, rank=0, size=2)  # type: ignore[arg-type]  # refused before any collective


def test_spatialize_keeps_the_parameters_and_state_dict() -> None:
    model = HRNetFCN(3, 3, output_stride=8)
    before = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    spatialize(model, _group())
    assert list(model.state_dict()) == keys
    assert all(p is before[n] for n, p in model.named_parameters())
    assert not any(type(m) in (nn.Conv2d, nn.BatchNorm2d, Resize) for m in model.modules())


class _OtherModel(SegmentationModel):
    name = "glsnet"


@pytest.mark.parametrize("make, words", [
    (lambda: _OtherModel(3, 3), "model 'glsnet' has no spatial version"),
    (lambda: HRNetFCN(3, 3, mode="downsampled"), "mode 'downsampled'"),
])
def test_unsupported_models_are_refused_naming_the_option(make: Callable[[], nn.Module], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as error:
        spatialize(make(), _group())
    assert str(error.value).startswith("parallel.spatial:") and "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["direct", "fast"])
def test_halo_depthwise_equals_the_lrd_depthwise(method: str) -> None:
    torch.manual_seed(3)
    conv = DepthwiseConv2d(3, 15, method=method).double()
    rows = [4, 8, 4, 4]  # the 7-row halo spans two bands
    x = torch.randn(1, 3, sum(rows), 9, dtype=torch.float64, requires_grad=True)
    ref = conv(x)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    out, grad_x, grads, _ = _banded(4, rows, lambda g: HaloDepthwiseConv2d.from_depthwise(copy.deepcopy(conv), g), x.detach(), grad_out)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["weight"], conv.weight.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("heads", [1, 2])
def test_spatial_ecr_enhances_the_scenes_hard_positions(heads: int) -> None:
    torch.manual_seed(4)
    ecr = ECRModule(8, hard_ratio=0.2, heads=heads).double()
    rows = [4, 2, 6]
    features = torch.randn(2, 8, sum(rows), 5, dtype=torch.float64, requires_grad=True)
    aux = torch.randn(2, 3, sum(rows), 5, dtype=torch.float64)
    ref, ref_idx = ecr(features, aux, return_indices=True)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    aux_bands = _split(aux, rows)
    out, grad_x, grads, modules = _banded(
        3, rows, lambda g: SpatialECR.from_ecr(copy.deepcopy(ecr), g), features.detach(), grad_out,
        call=lambda m, t: m(t, aux_bands[m.spatial.rank]),
    )
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, features.grad, rtol=1e-12, atol=1e-12)
    for name, parameter in ecr.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-11, atol=1e-12)


def test_spatial_ecr_takes_exactly_the_hard_count_when_margins_tie() -> None:
    ecr = ECRModule(4, hard_ratio=0.25)
    rows = [2, 2, 4]
    aux = torch.zeros(1, 2, sum(rows), 4)
    aux[0, 0] = torch.tensor([0.0, 1.0]).repeat(sum(rows) * 2).view(sum(rows), 4)  # margins 0 or 1, half each
    aux_bands = _split(aux, rows)
    wanted = ecr.num_hard(sum(rows) * 4)

    def work(rank: int, comm: Any) -> Tensor:
        group = SpatialGroup(comm, rank, 3)
        return SpatialECR.from_ecr(ecr, group).select_hard_band(aux_bands[rank])[0]

    chosen = run_threads(3, work)
    assert sum(c.numel() for c in chosen) == wanted == 8
    # all 16 margins of 0 tie; the first 8 in scene order are taken: the two top bands' 4 each
    assert [c.numel() for c in chosen] == [4, 4, 0]
