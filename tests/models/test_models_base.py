"""Tests of the model base: normaliser, segment runner, padding, upsampling and outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import (
    InputNormalizer,
    SegmentationModel,
    Segmented,
    crop_to,
    pad_to_multiple,
    padded_size,
    set_segment_runner,
    upsample_logits,
)


def test_normalizer_converts_uint8_and_uint16_to_float32() -> None:
    norm = InputNormalizer(2, mean=[10.0, 100.0], std=[2.0, 50.0])
    raw = np.array([[[[10, 12]], [[100, 200]]]], dtype=np.uint16)
    for x in (torch.from_numpy(raw), torch.from_numpy(raw.astype(np.uint8)), torch.from_numpy(raw).float()):
        out = norm(x)
        assert out.dtype == torch.float32
        assert torch.allclose(out, torch.tensor([[[[0.0, 1.0]], [[0.0, 2.0]]]]))
    assert set(norm.state_dict()) == {"mean", "std"}


def test_normalizer_rejects_bad_statistics() -> None:
    with pytest.raises(ConfigError, match="band_mean"):
        InputNormalizer(3, mean=[0.0, 1.0])
    with pytest.raises(ConfigError, match="band_std"):
        InputNormalizer(2, std=[1.0, 0.0])


def test_pad_crop_and_upsample_sizes() -> None:
    x = torch.randn(1, 2, 97, 131)
    padded = pad_to_multiple(x, 32)
    assert padded.shape[-2:] == (128, 160) == padded_size((97, 131), 32)
    assert torch.equal(padded[..., :97, :131], x)
    assert padded[..., 97:, :].abs().sum() == 0
    assert pad_to_multiple(padded, 32) is padded
    assert torch.equal(crop_to(padded, (97, 131)), x)
    logits = torch.randn(2, 3, 16, 20)
    up = upsample_logits(logits, (128, 160), (97, 131))
    assert up.shape == (2, 3, 97, 131)
    ref = torch.nn.functional.interpolate(logits, size=(128, 160), mode="bilinear", align_corners=False)
    assert torch.equal(up, ref[..., :97, :131])


class _Inner(Segmented):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment("inner", self.conv, x)


class _Toy(SegmentationModel):
    name = "toy"
    output_stride = 2
    pad_multiple = 4

    def __init__(self, num_classes: int, in_channels: int, **options: object) -> None:
        super().__init__(num_classes, in_channels, **options)
        self.inner = _Inner()
        self.head = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor):
        input_size, padded = self.sizes(x)
        x = self.segment("stem", lambda t: self.prepare_input(t)[..., ::2, ::2], x)
        x = self.segment("block", lambda t: self.inner(t), x)
        logits = self.segment("head", self.head, x)
        return self.outputs(logits, [logits * 2], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        return ["stem", "block", "head"]


def test_segment_runner_reaches_nested_modules_and_outputs_follow_mode() -> None:
    model = _Toy(3, 1, tile=(2, 2))
    calls: list[str] = []

    def runner(name, fn, *args):
        calls.append(name)
        return fn(*args)

    set_segment_runner(model, runner)
    out = model(torch.zeros(1, 1, 7, 9, dtype=torch.uint8))
    assert calls == ["stem", "block", "inner", "head"]
    assert set(out) == {"logits", "aux", "input_size", "padded_size"}
    assert out["logits"].shape == (1, 3, 4, 6) and out["padded_size"] == (8, 12) and out["input_size"] == (7, 9)
    set_segment_runner(model, None)
    calls.clear()
    model.eval()
    assert model(torch.zeros(1, 1, 7, 9)).shape == (1, 3, 7, 9)
    assert calls == []
    assert model.config() == {"name": "toy", "num_classes": 3, "in_channels": 1, "tile": [2, 2]}
    assert model.checkpoint_plan("fine") == {"stem", "block", "head"}
    with pytest.raises(ConfigError, match="granularity"):
        model.checkpoint_plan("layer")
