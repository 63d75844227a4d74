"""Eval-mode banding: every model's banded forward equals its plain eval forward; halos are what make it exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from torch.utils._python_dispatch import TorchDispatchMode

import lrss_ds.memory.banded_inference as banded_inference
from lrss_ds.memory.banded_inference import StreamedECR, banded_eval, receptive_radius, row_logits, run_in_row_bands
from lrss_ds.models import MODEL_BUILDERS, build_model
from lrss_ds.models.base import SegmentationModel
from lrss_ds.models.ecr import ECRModule
from tests.models.test_models_smp import skip_if_unavailable

# Light options per model (as tests/models/test_models_all.py), 24 classes as in the paper.
SMALL: dict[str, dict[str, Any]] = {
    "ehsnet": {"lrd_k": 32, "lrd_d": 32, "dw_kernels": (3, 7)},
    "hrnet_fcn": {},
    "glsnet": {"crop_size": 64, "d_model": 32},
    "glnet": {"crop_size": 64, "global_size": 64, "fpn_width": 32},
    "isdnet": {"channels": 32, "shallow_base": 16, "relation_groups": 4},
    "stdc": {"base": 16, "context_channels": 32},
    "magnet": {"crop_size": 64, "depth": 18, "fpn_width": 32},
    "fctl": {"crop_size": 64, "depth": 18, "fpn_width": 32, "corr_width": 32, "key_width": 16},
    "smp": {"arch": "unet", "encoder": "resnet18"},
    "tv_fcn": {},
    "segnet": {"width": 16},
    "icnet": {"backbone": "resnet18"},
    "fcn8s": {"width": 16, "fc_channels": 64},
    "transunet": {"resnet_depth": 18, "hidden": 32, "layers": 2, "heads": 2, "mlp": 64},
}
BANDS = 4


def eval_model(name: str, classes: int = 5, seed: int = 0, **extra: Any) -> SegmentationModel:
    """A small model in eval mode whose BatchNorms hold non-trivial running statistics."""
    skip_if_unavailable(name)
    torch.manual_seed(seed)
    model = build_model(name, classes, BANDS, band_mean=[100.0] * BANDS, band_std=[50.0] * BANDS,
                        **{**SMALL[name], **extra})
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_every_registered_model_has_small_options() -> None:
    assert set(SMALL) >= set(MODEL_BUILDERS), "add light options for new models here"


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_banded_forward_equals_plain_eval_forward(name: str) -> None:
    """Odd-sized input, bands far smaller than the maps: every band boundary is exercised."""
    model = eval_model(name)
    x = torch.randint(0, 256, (1, BANDS, 121, 139), dtype=torch.uint8)
    with torch.inference_mode():
        plain = model(x)
        with banded_eval(model, band_rows=8, stem_band_rows=8):
            logits = row_logits(model(x))
        rows = torch.cat([logits.rows(start, min(start + 50, 121)) for start in range(0, 121, 50)], dim=2)
    if model.output_stride > 1:  # full-resolution networks (SegNet, smp's heads) have no lower one
        assert logits.logits.shape[-1] < 139, "the forward inside banded_eval must stay at the network's resolution"
    assert rows.shape == plain.shape
    torch.testing.assert_close(rows, plain, atol=2e-5, rtol=1e-5)
    # everything is put back: the plain forward returns full-resolution logits again
    with torch.inference_mode():
        assert model(x).shape == plain.shape


def test_banded_eval_refuses_a_training_model() -> None:
    model = eval_model("hrnet_fcn").train()
    with pytest.raises(RuntimeError, match="eval"):
        with banded_eval(model):
            pass


def test_bands_are_exact_with_the_receptive_halo_and_not_without() -> None:
    """A stride-2 stack of 3x3 convolutions: halo = its radius is exact, one row less is not."""
    torch.manual_seed(1)
    stack = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 5, 1, 2))
    radius = receptive_radius(stack)
    assert radius == 1 + 2 + 4
    x = torch.randn(1, 3, 77, 31)
    with torch.no_grad():
        whole = stack(x)
        exact = run_in_row_bands(stack, x, 2, radius + radius % 2, 5)
        short = run_in_row_bands(stack, x, 2, radius - 3, 5)
    torch.testing.assert_close(exact, whole)
    assert not torch.allclose(short, whole, atol=1e-3)


# float64 and many small bands: the banded forward then equals the plain one to float rounding
TIGHT: dict[str, dict[str, Any]] = {
    "ehsnet, 2 attention heads": {"name": "ehsnet", "ecr_heads": 2},
    "ehsnet without LRD": {"name": "ehsnet", "use_lrd": False},
    "ehsnet at output stride 4": {"name": "ehsnet", "output_stride": 4},
    "hrnet_fcn downsampled": {"name": "hrnet_fcn", "mode": "downsampled", "downsample": 2},
    "hrnet_fcn at output stride 8": {"name": "hrnet_fcn", "output_stride": 8},
}


def _network_logits(model: SegmentationModel, x: torch.Tensor, **bands: int) -> torch.Tensor:
    """Logits at the output stride of the plain eval forward (no ``bands``) or the banded one."""
    with torch.inference_mode():
        if bands:
            with banded_eval(model, **bands):
                return model(x)["logits"]
        model.defer_upsampling = True
        try:
            return model(x)["logits"]
        finally:
            model.defer_upsampling = False


SMALL_BANDS = {"band_rows": 4, "stem_band_rows": 8, "front_band_rows": 16}


@pytest.mark.parametrize("case", sorted(TIGHT))
def test_banded_forward_equals_plain_forward_in_float64(case: str) -> None:
    options = dict(TIGHT[case])
    model = eval_model(options.pop("name"), **options).double()
    x = torch.randint(0, 256, (1, BANDS, 97, 71), dtype=torch.uint8)
    torch.testing.assert_close(_network_logits(model, x, **SMALL_BANDS), _network_logits(model, x), atol=1e-10, rtol=0)


def test_a_front_halo_one_stride_short_breaks_the_banded_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = eval_model("ehsnet").double()
    x = torch.randint(0, 256, (1, BANDS, 97, 71), dtype=torch.uint8)
    plain = _network_logits(model, x)
    # EHSNet's front reads 39 rows (48 on the 16-row grid); 32 rows is one grid step short
    assert banded_inference._front_halo(model.backbone) == 39
    monkeypatch.setattr(banded_inference, "_front_halo", lambda backbone: 32)
    assert (_network_logits(model, x, **SMALL_BANDS) - plain).abs().max() > 1e-8


@pytest.mark.parametrize("heads", [1, 2])
def test_streamed_ecr_equals_the_module_on_the_whole_map(heads: int) -> None:
    """Fed in bands of 3 rows, the streamed ECR picks the same hard positions and enhances them
    as the module does on the whole map (keys normalised over every band)."""
    torch.manual_seed(2)
    ecr = ECRModule(16, hard_ratio=0.1, heads=heads).double().eval()
    # keys with a large spread, so that later bands raise the running maximum
    features = torch.randn(2, 16, 13, 11, dtype=torch.float64) * 4
    aux = torch.randn(2, 5, 13, 11, dtype=torch.float64)
    with torch.no_grad():
        whole, hard_idx = ecr(features, aux, return_indices=True)
        streamed = StreamedECR(ecr, (13, 11))
        for first in range(0, 13, 3):
            streamed.add(features[..., first : first + 3, :], aux[..., first : first + 3, :], first)
        index, enhanced = streamed.finish()
    assert index.shape == hard_idx.shape == (2, ecr.num_hard(13 * 11))
    for b in range(2):
        order = index[b].argsort()
        assert torch.equal(index[b][order], hard_idx[b].sort().values)
        torch.testing.assert_close(enhanced[b][:, order], whole[b].flatten(1)[:, index[b][order]], atol=1e-12, rtol=0)


class _WholeMaps(TorchDispatchMode):
    """Records the channels of every float map an operation returns, by its (rows, columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.channels: dict[tuple[int, int], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.ndim == 4 and t.is_floating_point():
                size = (int(t.shape[-2]), int(t.shape[-1]))
                self.channels[size] = max(self.channels.get(size, 0), int(t.shape[1]))
        return out


def test_ehsnet_holds_only_the_hrnet_branches_and_logits_whole() -> None:
    """Padded 256 x 128 at output stride 8: the stride-1/2/4 grids (normalised input, stem,
    layer1's input) never exist whole, and on the stride-8 grid only HRNet's first branch (18
    channels) and the logits do, not layer1's 256 channels or F_in's d = 80."""
    model = eval_model("ehsnet", lrd_k=32, lrd_d=80)
    x = torch.randint(0, 256, (1, BANDS, 245, 121), dtype=torch.uint8)
    with torch.inference_mode(), banded_eval(model, band_rows=8, stem_band_rows=8, front_band_rows=64), _WholeMaps() as maps:
        model(x)
    for stride in (1, 2, 4):
        assert (256 // stride, 128 // stride) not in maps.channels, f"a whole stride-{stride} map"
    assert maps.channels[(32, 16)] == 18
