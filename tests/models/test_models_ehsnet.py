"""Tests of EHSNet: outputs per mode, the paper's knobs, the ECR's valid region and checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model, load_pretrained
from lrss_ds.models.base import set_segment_runner
from lrss_ds.models.ehsnet import EHSNet
from lrss_ds.models.hrnet import HRNet


def _small(**options: object) -> EHSNet:
    """An EHSNet with a light LRD/ECR so the tests stay fast; the backbone is the real W18."""
    defaults = {"lrd_k": 32, "lrd_d": 32, "dw_kernels": (3, 7)}
    model = build_model("ehsnet", 3, 4, **{**defaults, **options})
    assert isinstance(model, EHSNet)
    return model


def test_defaults_are_the_papers() -> None:
    config = build_model("ehsnet", 24, 4).config()
    assert config["backbone"] == "hrnet_w18" and config["output_stride"] == 8
    assert config["lrd_k"] == config["lrd_d"] == 256 and config["dw_kernels"] == [7, 15, 31]
    assert config["dense_kernel"] == 5 and config["hard_ratio"] == 0.1
    assert config["use_lrd"] and config["use_ecr"]


def test_train_and_eval_outputs() -> None:
    torch.manual_seed(0)
    model = _small()
    x = torch.randint(0, 256, (1, 4, 75, 50), dtype=torch.uint8)
    out = model(x)
    assert out["logits"].shape == (1, 3, 128 // 8, 64 // 8)
    assert len(out["aux"]) == 1 and out["aux"][0].shape == out["logits"].shape
    assert out["input_size"] == (75, 50) and out["padded_size"] == (128, 64)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 3, 75, 50)


def test_table_knobs_reach_the_modules() -> None:
    model = _small(hard_ratio=0.05, lrd_k=24, lrd_d=40, dense_kernel=3, ecr_heads=2)
    assert model.ecr is not None and model.ecr.hard_ratio == 0.05 and model.ecr.heads == 2
    convs = [m for m in model.lrd.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 24 and convs[-1].out_channels == 40
    assert any(m.kernel_size == (3, 3) and m.groups == 1 for m in convs)
    assert model.head.conv.in_channels == 40
    ablated = _small(use_lrd=False, use_ecr=False)
    assert ablated.ecr is None and "ecr" not in ablated.checkpoint_plan("stage")
    assert ablated(torch.randn(1, 4, 128, 64))["logits"].shape == (1, 3, 16, 8)
    for bad in ({"hard_ratio": 0.0}, {"lrd_k": 0}, {"backbone": "hrnet_w64"}):
        with pytest.raises(ConfigError):
            _small(**bad)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("ehsnet", 1, 3)


def test_ecr_sees_only_positions_covering_the_input() -> None:
    torch.manual_seed(0)
    model = _small().eval()
    seen: list[tuple[int, ...]] = []
    model.ecr.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.randn(1, 4, 70, 90))
    assert seen == [(1, 32, 9, 12)]  # ceil(70/8) x ceil(90/8) of the padded 16 x 16


def test_checkpointed_plan_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = _small().eval()  # fixed BN statistics: recomputation repeats exactly
    x = torch.randn(1, 4, 64, 64)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    plan = model.checkpoint_plan("fine")
    called: list[str] = []

    def runner(name, fn, *args):
        if name in plan:
            called.append(name)
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    set_segment_runner(model, runner)
    again = grads()
    assert set(called) == plan
    assert len(plain) == len(again)
    for a, b in zip(plain, again):
        assert torch.allclose(a, b, atol=1e-6)


def test_official_hrnet_file_loads_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = HRNet(18, 3).state_dict()
    path = tmp_path / "hrnetv2_w18_imagenet_pretrained.pth"
    torch.save(state, path)
    model = _small()
    report = load_pretrained(model, path)
    assert report.prefix == "backbone." and report.adapted == ["backbone.conv1.weight"] and not report.missing
    assert torch.equal(model.backbone.stage4[2].fuse_layers[0][3][0].weight, state["stage4.2.fuse_layers.0.3.0.weight"])


def test_too_small_training_sample_gets_a_sized_error() -> None:
    """At output stride 8, a 64 px sample leaves HRNet's 1/64 branch one pixel: say so, with sizes."""
    net = build_model("ehsnet", 6, 4, lrd_k=16, lrd_d=16).train()
    with pytest.raises(ValueError, match=r"64x64 training sample .* larger than 64 px"):
        net(torch.zeros(1, 4, 64, 64, dtype=torch.uint8))
    net.eval()  # inference normalises with running statistics: any size works
    assert net(torch.zeros(1, 4, 64, 64, dtype=torch.uint8)).shape == (1, 6, 64, 64)
