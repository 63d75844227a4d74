"""Holistic prediction in row bands: the same classes and probabilities as one unbanded forward,
nodata masked as before, and no full-resolution logits (or stem maps) held whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lrss_ds.engine.prediction_writer as prediction_writer
import lrss_ds.memory.banded_inference as banded_inference
from lrss_ds.data.rasters import RasterSource, open_geotiff
from lrss_ds.engine.inference import Predictor, fold_outputs_agree
from lrss_ds.memory.device_sim import DeviceMemorySimulator
from lrss_ds.memory.fold_batchnorm import folded_batchnorm
from lrss_ds.models import MODEL_BUILDERS
from tests.engine.test_predict_helpers import write_geotiff
from tests.memory.test_banded_inference import BANDS, eval_model

NODATA = 0


def _scene(tmp_path: Path, height: int, width: int) -> Path:
    """An odd-sized uint8 scene whose top-left corner block is nodata in every band."""
    image = np.random.default_rng(3).integers(1, 255, size=(BANDS, height, width)).astype("uint8")
    image[:, :9, :13] = NODATA
    image[1, 5, 5] = 7  # one band valid: not nodata
    return write_geotiff(tmp_path / "scene.tif", image, nodata=NODATA)


def _strips(predictor: Predictor, path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(predictor.strips(open_geotiff(path), probabilities=True))
    return np.concatenate([c for _, c, _ in rows], axis=0), np.concatenate([p for _, _, p in rows], axis=1)


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_banded_holistic_prediction_equals_one_unbanded_forward(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # small blocks and bands so that a small scene crosses many band boundaries
    monkeypatch.setattr(prediction_writer, "BLOCK", 40)
    monkeypatch.setattr(banded_inference, "BAND_ROWS", 8)
    monkeypatch.setattr(banded_inference, "STEM_BAND_ROWS", 8)
    monkeypatch.setattr(banded_inference, "FRONT_BAND_ROWS", 32)
    model = eval_model(name)
    path = _scene(tmp_path, 157, 131)
    classes, probs = _strips(Predictor(model=model, num_classes=5, ignore_index=255), path)

    image = open_geotiff(path).read(0, 0, 157, 131)
    x = torch.from_numpy(image)[None]
    # the reference folds BatchNorm as the predictor does: folding moves logits by float
    # rounding, which flips MagNet's median-filtered top-k refinement choice at a few tied
    # points (0.9997 agreement unfolded); banding is what this test compares
    with torch.inference_mode(), folded_batchnorm(model, lambda: model(x[..., :64, :64]), lambda a, b: True):
        ref_probs = torch.softmax(model(x)[0], dim=0).numpy()
    ref_classes = ref_probs.argmax(axis=0).astype("uint8")
    nodata = (image == NODATA).all(axis=0)
    assert nodata.sum() == 9 * 13 - 1
    ref_classes[nodata] = 255
    ref_probs[:, nodata] = np.nan

    assert (classes == ref_classes).mean() >= 0.9999
    assert (classes[nodata] == 255).all() and not (classes[~nodata] == 255).any()
    np.testing.assert_allclose(probs, ref_probs, atol=1e-4, rtol=0)  # NaN where nodata, in both


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_holistic_prediction_never_holds_full_resolution_logits_or_stem_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 classes (the paper's): whole logits would be 24 values per pixel, the stem's first
    map 16; banded, nothing larger than the padded input's 4 bands-equivalent is made."""
    monkeypatch.setattr(prediction_writer, "BLOCK", 32)
    model = eval_model("ehsnet", classes=24)
    height, width = 256, 128
    path = _scene(tmp_path, height, width)
    predictor = Predictor(model=model, num_classes=24, ignore_index=255)
    with _LargestTensor() as mode:
        for _ in predictor.strips(open_geotiff(path), probabilities=True):
            pass
    # folding BatchNorm into the convolutions makes one folded copy of each folded weight
    largest_weight = max(p.numel() for p in model.parameters())
    assert mode.largest <= max(5 * height * width, largest_weight), f"{mode.largest / (height * width):.1f} values per pixel"


def test_a_bf16_prediction_checks_its_batchnorm_fold_in_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fold's check must compare fp32 logits: bf16 rounding of a corner's logits now and then
    # exceeds any bound that still catches a wrong fold, refusing correct folds at random.
    import lrss_ds.engine.inference as inference

    model = eval_model("ehsnet")
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    checked_dtypes: set[torch.dtype] = set()
    fold = inference.folded_batchnorm

    def recording_fold(model_, run, check, **options):  # type: ignore[no-untyped-def]
        hooks = [c.register_forward_hook(lambda m, i, out: checked_dtypes.add(out.dtype)) for c in convolutions]
        try:
            run()
        finally:
            for hook in hooks:
                hook.remove()
        return fold(model_, run, check, **options)

    monkeypatch.setattr(inference, "folded_batchnorm", recording_fold)
    classes, _ = _strips(Predictor(model=model, num_classes=5, ignore_index=255, bf16=True), _scene(tmp_path, 70, 60))
    assert classes.shape == (70, 60)
    assert checked_dtypes == {torch.float32}


class _ConvReadTwice(nn.Module):
    """A segmentation model whose first convolution's output is read by its BatchNorm and a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(BANDS, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x.float())
        return self.head(self.bn(z) + z)


def test_a_batchnorm_fold_that_moves_the_logits_is_refused_but_a_few_moved_points_are_not(tmp_path: Path) -> None:
    model = _ConvReadTwice().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.25, 4)
    with pytest.raises(RuntimeError, match="changed its output"):
        _strips(Predictor(model=model, num_classes=5, ignore_index=255), _scene(tmp_path, 70, 60))

    # a discrete choice (MagNet's top-k over tied scores) moves a few points when rounding
    # reorders the ties: that is not a wrong fold
    unfolded = torch.randn(1, 5, 64, 64)
    few_moved, all_moved = unfolded.clone(), unfolded * 1.01
    few_moved[..., :3, :] += 1.0  # 3 of 64 rows: 4.7 % of the logits
    assert fold_outputs_agree(unfolded, unfolded + 1e-7)
    assert fold_outputs_agree(unfolded, few_moved)
    assert not fold_outputs_agree(unfolded, all_moved)


class _AsFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def test_holistic_prediction_keeps_no_folded_copy_of_the_weights() -> None:
    # The BatchNorm fold keeps the original weights for its exit; folded copies beside them
    # for the whole forward were one more model's worth of convolution weights (GLSNet: 135 MiB,
    # 760 vs 610 MiB peak RSS on a whole 1024 x 1024 scene).
    channels, classes = 64, 5
    layers: list[nn.Module] = [_AsFloat(), nn.Conv2d(BANDS, channels, 3, padding=1), nn.BatchNorm2d(channels)]
    for _ in range(7):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)]
    layers.append(nn.Conv2d(channels, classes, 1))
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for bn in (m for m in model if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    weight_bytes = sum(m.weight.nbytes for m in model if isinstance(m, nn.Conv2d))
    image = np.random.default_rng(5).integers(1, 255, size=(BANDS, 8, 8)).astype("uint8")
    source = RasterSource.from_array(image, "scene", where="synthetic scene")
    predictor = Predictor(model=model, num_classes=classes, ignore_index=None)
    sim = DeviceMemorySimulator()
    with sim:
        rows = [c for _, c, _ in predictor.strips(source)]
    assert np.concatenate(rows).shape == (8, 8)
    # the 8 x 8 maps are small: the peak is the one folded weight of the call at hand
    assert sim.peak_new_bytes < weight_bytes / 2
