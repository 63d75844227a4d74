"""The library models (``smp``, ``tv_fcn``): odd N-band sizes, no downloads, one-line errors; every generic
model (these, SegNet, ICNet) trains under DeepSpeed with a memory mode."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lrss_ds.errors import ConfigError
from lrss_ds.models import build_model, load_pretrained
from lrss_ds.models import smp_adapter
from lrss_ds.models.smp_adapter import library_problem

LIBRARY_MODELS = ("smp", "tv_fcn")
# The papers' generic rows and smp's transformer decoder; resnet18 keeps each build to a second.
ARCHS = ("unet", "pspnet", "deeplabv3plus", "fpn", "upernet", "segformer")
CLASSES, BANDS = 3, 4


def skip_if_unavailable(name: str) -> None:
    """Skip, with the one-line reason, when ``name`` is a library model whose library cannot be
    imported here (a torchvision wheel built for another torch, say); other names return at once."""
    if name in LIBRARY_MODELS and (problem := library_problem(name)):
        pytest.skip(problem)


def _build(name: str, **options: Any) -> Any:
    torch.manual_seed(0)
    return build_model(name, CLASSES, BANDS, band_mean=[100.0] * BANDS, band_std=[50.0] * BANDS, **options)


def test_unknown_arch_is_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("smp", CLASSES, BANDS, arch="unet3")
    message = str(info.value)
    assert message.startswith("model.arch: unknown smp architecture 'unet3'") and "\n" not in message
    with pytest.raises(ConfigError, match=r"^model.backbone: unknown tv_fcn backbone 'vgg16'"):
        build_model("tv_fcn", CLASSES, BANDS, backbone="vgg16")
    with pytest.raises(ConfigError, match=r"^model.arch_options: \['encoder_weights'\] are set by the adapter"):
        build_model("smp", CLASSES, BANDS, arch="unet", arch_options={"encoder_weights": "imagenet"})


@pytest.mark.parametrize(
    "name, module, package",
    [("smp", "segmentation_models_pytorch", "segmentation-models-pytorch==0.6.0"),
     ("tv_fcn", "torchvision", "torchvision==0.28.0")],
)
def test_a_missing_library_is_one_line_naming_the_package(
    name: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like to import
    with pytest.raises(ConfigError) as info:
        build_model(name, CLASSES, BANDS)
    message = str(info.value)
    assert message.startswith(f"model.name: model {name!r} needs {package}") and "\n" not in message
    assert "ModuleNotFoundError" in message or "ImportError" in message


def test_a_broken_library_names_the_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision wheel built for a CUDA torch, beside a CPU torch, fails with a RuntimeError
    (not ImportError) on import: that is reported too, with its first line."""

    def broken(module: str) -> None:
        raise RuntimeError("operator torchvision::nms does not exist\n(traceback detail)")

    monkeypatch.setattr(smp_adapter.importlib, "import_module", broken)
    with pytest.raises(ConfigError) as info:
        build_model("smp", CLASSES, BANDS, arch="upernet")
    assert str(info.value) == (
        "model.name: model 'smp' needs segmentation-models-pytorch==0.6.0 (with timm and torchvision), but importing "
        "segmentation_models_pytorch failed: RuntimeError: operator torchvision::nms does not exist"
    )
    assert library_problem("tv_fcn") is not None


def test_the_installed_generic_extra_imports_beside_this_torch() -> None:
    """launch/env.sh installs the ``generic`` extra. PyPI's torchvision is built for the CUDA torch;
    beside the CPU build its compiled ops do not load, and it imports only through the adapter's
    declared operators: checked in a fresh process, where torchvision is imported for the first time."""
    for distribution in ("torchvision", "segmentation-models-pytorch", "timm"):
        importlib.metadata.version(distribution)  # PackageNotFoundError: install the extra (README)
    check = (
        "from lrss_ds.models.smp_adapter import library_problem\n"
        "problems = [library_problem(name) for name in ('tv_fcn', 'smp')]\n"
        "assert problems == [None, None], problems\n"
        "import torchvision, torch\n"
        "try:\n"
        "    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "except (RuntimeError, NotImplementedError):\n"
        "    pass  # no kernel where the compiled ops did not load; runs where they did\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_maps_odd_four_band_input_to_same_size_logits(arch: str) -> None:
    skip_if_unavailable("smp")
    model = _build("smp", arch=arch, encoder="resnet18").eval()
    assert model.net.encoder.conv1.in_channels == BANDS
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, BANDS, 45, 67), dtype=torch.uint8))
    assert logits.shape == (1, CLASSES, 45, 67) and torch.isfinite(logits).all()
    assert model.pad_multiple == model.net.encoder.output_stride
    rebuilt = build_model(**model.config())
    assert rebuilt.config() == model.config() and set(rebuilt.state_dict()) == set(model.state_dict())


def test_swin_upernet_takes_any_size_not_only_its_224_pixel_grid() -> None:
    # timm builds Swin for 224 x 224 inputs by default; the adapter asks it for any size, so
    # windows of training, sliding windows and whole scenes all run (EHSNet Table 1's "Swin")
    skip_if_unavailable("smp")
    model = _build("smp", arch="upernet", encoder="tu-swin_tiny_patch4_window7_224").eval()
    with torch.no_grad():
        for height, width in ((45, 67), (64, 64), (100, 37)):
            logits = model(torch.randint(0, 256, (1, BANDS, height, width), dtype=torch.uint8))
            assert logits.shape == (1, CLASSES, height, width) and torch.isfinite(logits).all()
    assert model.config()["arch_options"] == {}  # the any-size options are the adapter's, not saved


def test_tv_fcn_maps_odd_four_band_input_to_same_size_logits() -> None:
    skip_if_unavailable("tv_fcn")
    model = _build("tv_fcn", aux=True)
    out = model(torch.randint(0, 256, (1, BANDS, 45, 67), dtype=torch.uint8))
    assert out["logits"].shape[-2:] == (48 // 8, 72 // 8) and len(out["aux"]) == 1
    with torch.no_grad():
        assert model.eval()(torch.rand(1, BANDS, 45, 67) * 255).shape == (1, CLASSES, 45, 67)


def test_nothing_is_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every arch and the FCN build with the network refused, and smp is asked for no weights."""
    skip_if_unavailable("smp")
    skip_if_unavailable("tv_fcn")
    import segmentation_models_pytorch as smp

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    asked: list[Any] = []
    real = smp.create_model
    monkeypatch.setattr(smp, "create_model", lambda *a, **k: (asked.append(k["encoder_weights"]), real(*a, **k))[1])
    for arch in ARCHS:
        _build("smp", arch=arch, encoder="resnet18")
    _build("tv_fcn")
    assert asked == [None] * len(ARCHS)


def test_unknown_encoder_and_option_are_one_line_config_errors() -> None:
    skip_if_unavailable("smp")
    for encoder in ("resnet19", "tu-no_such_model"):
        with pytest.raises(ConfigError) as info:
            build_model("smp", CLASSES, BANDS, arch="unet", encoder=encoder)
        message = str(info.value)
        assert message.startswith(f"model.encoder: smp 'unet' cannot use encoder {encoder!r}") and "\n" not in message
    with pytest.raises(ConfigError, match=r"^model.arch_options: smp 'unet' does not take"):
        build_model("smp", CLASSES, BANDS, arch="unet", encoder="resnet18", arch_options={"no_such": 1})


def test_pretrained_encoder_file_loads_into_the_wrapper(tmp_path: Path) -> None:
    """A 3-band torchvision-named ResNet file lands in ``net.encoder.`` with its stem adapted."""
    skip_if_unavailable("smp")
    from segmentation_models_pytorch.encoders import get_encoder

    torch.manual_seed(1)
    encoder = get_encoder("resnet18", in_channels=3, weights=None)
    torch.save(encoder.state_dict(), tmp_path / "resnet18.pth")
    model = _build("smp", arch="fpn", encoder="resnet18")
    report = load_pretrained(model, tmp_path / "resnet18.pth")
    assert report.prefix == "net.encoder." and report.adapted == ["net.encoder.conv1.weight"]
    assert torch.equal(model.net.encoder.layer4[1].conv2.weight, encoder.layer4[1].conv2.weight)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, options",
    [("smp", {"arch": "unet", "encoder": "resnet18"}), ("tv_fcn", {}), ("segnet", {"width": 16}),
     ("icnet", {"backbone": "resnet18"})],
)
def test_trains_under_deepspeed_with_checkpointing(name: str, options: dict[str, Any]) -> None:
    """Two DeepSpeed training steps (the planner's probe: the trainer's step and memory mode) in a
    fresh process; stage checkpointing keeps fewer saved activations than none."""
    skip_if_unavailable(name)
    from lrss_ds.engine.isolated import run_isolated

    saved = {}
    for mode in ("none", "ckpt_stage"):
        run = run_isolated(
            "lrss_ds.engine.probe:probe_training_step",
            {"model": name, "height": 63, "width": 65, "mode": mode, "steps": 2, "bands": BANDS,
             "num_classes": CLASSES, "model_options": options},
            timeout_s=600,
        )
        assert run.fits, run.error[-2000:]
        assert run.result["loss"] == run.result["loss"]  # finite, not NaN
        saved[mode] = run.result["saved_activation_peak_bytes"]
    assert saved["ckpt_stage"] < saved["none"]
