"""Tests of pretrained loading: official HRNet names, wrappers, band adaptation and refusals."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from lrss_ds.errors import InputFileError
from lrss_ds.models.hrnet import HRNet
from lrss_ds.models.pretrained import adapt_input_bands, load_pretrained


class _WithBackbone(nn.Module):
    """A model that holds an HRNet under ``backbone.`` and a head the file does not cover."""

    def __init__(self, width: int, bands: int) -> None:
        super().__init__()
        self.backbone = HRNet(width, bands)
        self.head = nn.Conv2d(width, 2, 1)


def _official_file(directory: Path, width: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 3-band checkpoint laid out like the official HRNet ImageNet file, re-saved by a trainer."""
    torch.manual_seed(1)
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in HRNet(width, 3).state_dict().items()}
    # old files lack num_batches_tracked; the classification head has no place in the backbone
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["classifier.weight"] = torch.randn(1000, 2048)
    state["incre_modules.0.0.conv1.weight"] = torch.randn(32, 18, 1, 1)
    path = directory / f"hrnetv2_w{width}_imagenet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 100}, path)
    return path, state


# Built once per module: writing the 10-30 MB files is the slow part of these tests.
@pytest.fixture(scope="module")
def w18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    return _official_file(tmp_path_factory.mktemp("w18"), 18)


@pytest.fixture(scope="module")
def w32_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    return _official_file(tmp_path_factory.mktemp("w32"), 32)


def test_three_band_file_loads_into_four_band_model(w18_file: tuple, caplog: pytest.LogCaptureFixture) -> None:
    path, state = w18_file
    model = _WithBackbone(18, 4)
    head_before = model.head.weight.clone()
    with caplog.at_level(logging.INFO, logger="lrss_ds.models.pretrained"):
        report = load_pretrained(model, path)
    assert report.prefix == "backbone."
    assert sorted(report.unexpected) == ["classifier.weight", "incre_modules.0.0.conv1.weight"]
    assert report.missing == [] and report.adapted == ["backbone.conv1.weight"]
    assert "2 unexpected" in caplog.text and path.name in caplog.text
    ours = model.state_dict()
    for key, value in state.items():
        if key.startswith(("classifier", "incre")) or key == "conv1.weight":
            continue
        assert torch.equal(ours["backbone." + key], value), key
    stem, rgb = model.backbone.conv1.weight, state["conv1.weight"]
    assert stem.shape == (64, 4, 3, 3)
    assert torch.allclose(stem[:, :3], rgb * 0.75)
    assert torch.allclose(stem[:, 3], rgb.mean(dim=1) * 0.75)
    assert torch.allclose(stem.sum(dim=1), rgb.sum(dim=1), atol=1e-5)  # the documented invariant
    assert torch.equal(model.head.weight, head_before)


def test_bare_backbone_and_explicit_prefix(w18_file: tuple) -> None:
    path, state = w18_file
    backbone = HRNet(18, 3)
    report = load_pretrained(backbone, path)
    assert report.prefix == "" and report.adapted == []
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])
    report = load_pretrained(_WithBackbone(18, 3), path, prefix="backbone")
    assert report.prefix == "backbone." and not report.missing


def test_missing_keys_are_reported(w18_file: tuple, tmp_path: Path) -> None:
    path, state = w18_file[0], dict(w18_file[1])
    del state["stage4.2.fuse_layers.0.3.0.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    report = load_pretrained(HRNet(18, 3), partial)
    assert report.missing == ["stage4.2.fuse_layers.0.3.0.weight"]


def test_mismatched_file_is_refused_and_nothing_loaded(w32_file: tuple) -> None:
    path, _ = w32_file
    model = HRNet(18, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputFileError, match=r"hrnetv2_w32_imagenet\.pth: shapes do not fit.*layer1|transition1"):
        load_pretrained(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unreadable_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="not found"):
        load_pretrained(HRNet(18, 3), tmp_path / "absent.pth")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": nn.Conv2d(1, 1, 1)}, unsafe)  # a pickled module: refused by weights_only
    with pytest.raises(InputFileError, match="pickled Python objects") as refused:
        load_pretrained(HRNet(18, 3), unsafe)
    assert "weights_only" not in str(refused.value)  # torch's advice to unpickle is not ours to give
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.proj.weight": torch.zeros(3)}, foreign)
    with pytest.raises(InputFileError, match="no key matches"):
        load_pretrained(HRNet(18, 3), foreign)


def test_adapt_fewer_bands_keeps_the_filter_sum() -> None:
    weight = torch.randn(8, 3, 7, 7)
    for bands in (1, 2, 5):
        out = adapt_input_bands(weight, bands)
        assert out.shape == (8, bands, 7, 7)
        assert torch.allclose(out.sum(dim=1), weight.sum(dim=1), atol=1e-5)


def test_torchvision_resnet_files_find_their_branch_of_glsnet(tmp_path: Path) -> None:
    """GLSNet holds a ResNet-18 and a ResNet-50: each file must pick its own branch by itself."""
    from lrss_ds.models import build_model
    from lrss_ds.models.resnet import ResNet

    model = build_model("glsnet", 3, 4, d_model=32)
    where = {arch: path + "." for path, arch in model.pretrained_backbones().items()}
    for depth in (18, 50):
        state = ResNet(depth, 3).state_dict()
        state["fc.weight"] = torch.zeros(1000, 512 if depth == 18 else 2048)
        path = tmp_path / f"resnet{depth}.pth"
        torch.save(state, path)
        report = load_pretrained(model, path)
        assert report.prefix == where[f"resnet{depth}"]
        assert report.unexpected == ["fc.weight"] and not report.missing
        assert report.adapted == [report.prefix + "conv1.weight"]
