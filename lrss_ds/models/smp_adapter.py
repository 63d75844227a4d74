"""Generic segmentation networks from segmentation-models-pytorch and torchvision, wrapped as models.

The papers' comparison tables list generic semantic-segmentation networks (U-Net, PSPNet,
DeepLabv3+, UPerNet, FCN, ...). They are not rewritten here: :class:`SmpModel` builds any
architecture of ``segmentation-models-pytorch`` (``smp``) by name and :class:`TorchvisionFCN`
builds torchvision's FCN, and both only add what every model of this package has: the band
normaliser, padding to the network's stride and cropping back, named segments for the memory
modes, and the train/eval output contract of :class:`~lrss_ds.models.base.SegmentationModel`.

Nothing is downloaded: encoders are built with ``encoder_weights=None`` (``weights=None`` for
torchvision), and ImageNet weights come from a local file through ``model.pretrained``
(:func:`~lrss_ds.models.pretrained.load_pretrained` finds the encoder inside the wrapper by key
name: smp's ResNet encoders keep torchvision's names under ``net.encoder.``; ``tu-`` timm
encoders keep timm's under ``net.encoder.model.``).

The libraries are imported when a model is built, not when this module is imported, so the
rest of the package works without them; a missing or broken library is a one-line
:class:`~lrss_ds.errors.ConfigError` naming the package and the import's own error.

PyPI's torchvision 0.28.0 wheel for x86-64 is built against the CUDA torch 2.13.0: beside the
CPU build of the same torch its compiled ops (``_C.so``, which links ``libtorch_cuda.so``) do not
load, and ``import torchvision`` then stops with ``operator torchvision::nms does not exist``,
because two of its fake-tensor registrations (``nms``, ``qnms``) assume the ops are there. The
networks wrapped here are pure Python (ResNet encoders, FCN heads) and use none of the compiled
detection ops, so :func:`import_library` declares those two operators' schemas, without kernels,
when that import fails for exactly this reason, and imports again: smp and torchvision's
segmentation models then build and run (tests), and a call of ``torchvision.ops.nms`` still fails
with PyTorch's "no kernel" error. Where the compiled ops load (a CUDA node with the matching
wheel) nothing is declared.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from types import ModuleType
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel

# smp 0.6.0's architectures (its MODEL_ARCHITECTURES_MAPPING keys), checked before the import
# so that a misspelt name is reported the same way whether or not the library imports.
SMP_ARCHITECTURES: tuple[str, ...] = (
    "unet",
    "unetplusplus",
    "manet",
    "linknet",
    "fpn",
    "pspnet",
    "deeplabv3",
    "deeplabv3plus",
    "pan",
    "upernet",
    "segformer",
    "dpt",
)
# What each library needs, for the error that names the package to install.
REQUIREMENTS: dict[str, str] = {
    "segmentation_models_pytorch": "segmentation-models-pytorch==0.6.0 (with timm and torchvision)",
    "torchvision": "torchvision==0.28.0 (built for the installed torch)",
}
TV_FCN_BACKBONES: tuple[str, ...] = ("resnet50", "resnet101")
# The operators torchvision 0.28's import registers fake kernels for unconditionally (its other
# meta registrations check that the operator exists first), with their schemas.
TORCHVISION_IMPORT_OPERATORS: dict[str, str] = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# timm builds Swin for one input size (224: its window masks and patch grid) unless told
# otherwise; these options let it take any multiple of the encoder stride, which the adapter
# pads to. An option the user gives in arch_options wins.
TIMM_SWIN_ANY_SIZE: dict[str, Any] = {"dynamic_img_size": True, "strict_img_size": False}
# Packages whose half-finished import is dropped before importing again.
_IMPORT_RETRY_PACKAGES: tuple[str, ...] = ("torchvision", "timm", "segmentation_models_pytorch")
_log = logging.getLogger(__name__)
# The model names whose network comes from a library that may be missing or broken.
LIBRARY_MODELS: tuple[str, ...] = ("smp", "tv_fcn")


def import_library(module: str, model: str) -> ModuleType:
    """Import ``module`` for model ``model``, or say in one line why it cannot be used.

    Args:
        module: ``segmentation_models_pytorch`` or ``torchvision``.
        model: the model name asking for it (for the message).

    Returns:
        the imported module.

    Raises:
        ConfigError: if the import fails for any reason. A torchvision wheel built for another
            torch imports with ``RuntimeError: operator torchvision::nms does not exist`` (its
            compiled ops need the torch libraries it was built against), not ImportError, and
            smp imports torchvision itself, so every exception is reported.
    """
    try:
        try:
            return importlib.import_module(module)
        except RuntimeError as error:
            if not _declare_missing_torchvision_operators(error):
                raise
            return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import failure means the model cannot be built
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(
            "model.name",
            f"model {model!r} needs {REQUIREMENTS[module]}, but importing {module} failed: "
            f"{type(error).__name__}: {first}",
        ) from error


def _declare_missing_torchvision_operators(error: RuntimeError) -> bool:
    """Declare the operators a torchvision import stopped on (module docstring); True if any was.

    Only for the error a torchvision wheel whose compiled ops did not load gives; the
    half-finished imports are dropped from ``sys.modules`` so that the next import starts over.
    """
    if "operator torchvision::" not in str(error) or "does not exist" not in str(error):
        return False
    missing = [name for name in TORCHVISION_IMPORT_OPERATORS if not hasattr(torch.ops.torchvision, name)]
    if not missing:
        return False
    for name in missing:
        torch.library.define(f"torchvision::{name}", TORCHVISION_IMPORT_OPERATORS[name])
    for loaded in [m for m in sys.modules if m.split(".")[0] in _IMPORT_RETRY_PACKAGES]:
        del sys.modules[loaded]
    _log.info(
        "torchvision's compiled ops do not load beside torch %s; declared %s without kernels so that its "
        "pure-Python networks import",
        torch.__version__,
        ", ".join(missing),
    )
    return True


def library_problem(model: str) -> str | None:
    """Why model ``model`` (``smp`` or ``tv_fcn``) cannot be built here, or None if it can."""
    module = "torchvision" if model == "tv_fcn" else "segmentation_models_pytorch"
    try:
        import_library(module, model)
    except ConfigError as error:
        return str(error)
    return None


class _LibraryModel(SegmentationModel):
    """The wrapper's shared forward: ``encoder`` (normaliser, padding, network encoder),
    ``decoder`` and ``head`` segments around three callables a subclass sets up."""

    def _encode(self, x: Tensor) -> Any:
        """Normalised, padded ``x`` through the library's encoder (subclasses implement this)."""
        raise NotImplementedError

    def _decode(self, *features: Tensor) -> Tensor:
        """Encoder features to decoder features (subclasses implement this)."""
        raise NotImplementedError

    def _head(self, decoded: Tensor) -> Tensor:
        """Decoder features to class logits (subclasses implement this)."""
        raise NotImplementedError

    def _aux(self, *features: Tensor) -> list[Tensor]:
        """Auxiliary logits from the encoder features (none unless a subclass has an aux head)."""
        return []

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` for the output contract.

        Returns:
            eval: ``(B, K, H, W)`` logits; train: ``dict(logits=(B, K, Hp/os, Wp/os), aux,
            input_size, padded_size)``.
        """
        input_size, padded = self.sizes(x)
        features = self.segment("encoder", lambda raw: self._encode(self.prepare_input(raw)), x)
        decoded = self.segment("decoder", self._decode, *features)
        logits = self.segment("head", self._head, decoded)
        aux = self._aux(*features) if self.training else []
        return self.outputs(logits, aux, input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """``encoder``, ``decoder``, ``head`` at every granularity: the library's modules are
        checkpointed whole (their inner blocks are the library's code, not cut into segments)."""
        return ["encoder", "decoder", "head"]


class SmpModel(_LibraryModel):
    """Any ``segmentation-models-pytorch`` architecture with any of its encoders.

    ``model: {name: smp, arch: upernet, encoder: resnet50}``. The network is smp's own,
    built with ``encoder_weights=None``; its ``segmentation_head`` upsamples to the padded input
    size, so the logits are at stride 1 (``output_stride = 1``) and the loss needs no upsampling.
    The input is padded to the encoder's output stride (what smp's ``check_input_shape``
    demands; DeepLabV3/V3+ and PSPNet encoders have a smaller one) and the logits cropped back.

    Segments: ``encoder`` (normaliser, padding and smp's encoder), ``decoder`` and ``head``.

    Batch size: smp's UPerNet and PSPNet pool to 1x1 and then apply BatchNorm, and so does
    DeepLabV3/V3+'s ASPP image-pooling branch; BatchNorm cannot train on one value per channel,
    so these architectures need two or more samples per rank and step in training
    ("Expected more than 1 value per channel when training"). UPerNet and PSPNet train at batch 1
    with ``arch_options: {decoder_use_norm: {type: layernorm, eps: 0.01}}`` (smp's own
    option); U-Net and FPN have no such branch.

    Args:
        num_classes: K.
        in_channels: input bands (smp adapts the encoder's first convolution to them).
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        arch: one of :data:`SMP_ARCHITECTURES` (``unet``, ``pspnet``, ``deeplabv3plus``,
            ``fpn``, ``upernet``, ``segformer``, ...).
        encoder: an smp encoder name (``resnet18``, ``resnet50``, ``mit_b0``, ...) or a timm
            one with the ``tu-`` prefix (``tu-convnext_tiny``, ...).
        arch_options: further keyword arguments of the smp architecture (``decoder_channels``,
            ``encoder_depth``, ``encoder_output_stride``, ...), passed through as given.

    Raises:
        ConfigError: for an unknown arch, encoder or arch option, or when smp cannot be
            imported (naming the package and the import's error).
    """

    name = "smp"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        arch: str = "unet",
        encoder: str = "resnet50",
        arch_options: Mapping[str, Any] | None = None,
    ) -> None:
        arch = str(arch).lower()
        if arch not in SMP_ARCHITECTURES:
            raise ConfigError("model.arch", f"unknown smp architecture {arch!r}; choose from {list(SMP_ARCHITECTURES)}")
        extra = dict(arch_options or {})
        reserved = {"encoder_name", "encoder_weights", "in_channels", "classes"} & set(extra)
        if reserved:
            raise ConfigError("model.arch_options", f"{sorted(reserved)} are set by the adapter (use encoder, in_channels)")
        super().__init__(
            num_classes, in_channels, band_mean, band_std, arch=arch, encoder=str(encoder), arch_options=extra
        )
        smp = import_library("segmentation_models_pytorch", "smp")
        self.net = _create_smp(smp, arch, str(encoder), self.in_channels, self.num_classes, extra)
        self.output_stride = 1
        self.pad_multiple = int(self.net.encoder.output_stride)

    def _encode(self, x: Tensor) -> list[Tensor]:
        return self.net.encoder(x)

    def _decode(self, *features: Tensor) -> Tensor:
        return self.net.decoder(list(features))

    def _head(self, decoded: Tensor) -> Tensor:
        return self.net.segmentation_head(decoded)


def _create_smp(smp: ModuleType, arch: str, encoder: str, in_channels: int, classes: int, extra: dict[str, Any]) -> nn.Module:
    """``smp.create_model`` with no weights, its errors turned into one-line ConfigErrors."""
    # smp's architectures take **kwargs and hand them to timm encoders only: with any other
    # encoder an unknown key would be dropped without a word, so it is refused here.
    named = {
        key for key, param in inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[arch].__init__).parameters.items()
        if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
    }
    unknown = sorted(set(extra) - named)
    if unknown and not encoder.startswith("tu-"):
        raise ConfigError("model.arch_options", f"smp {arch!r} does not take {unknown} (its options: {sorted(named - {'self'})})")
    if encoder.startswith("tu-swin"):
        extra = {**TIMM_SWIN_ANY_SIZE, **extra}
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes, **extra)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise ConfigError("model.arch_options", f"smp {arch!r} does not take {str(error).split('argument')[-1].strip()}") from error
        raise
    except (KeyError, RuntimeError) as error:
        # smp's unknown encoder is a KeyError, timm's (``tu-`` names) a RuntimeError "Unknown
        # model"; any other error is not about the name and goes up as it is.
        text = str(error).strip("'\" ").splitlines()[0] if str(error).strip() else type(error).__name__
        if not (isinstance(error, KeyError) or "Unknown model" in text):
            raise
        raise ConfigError(
            "model.encoder",
            f"smp {arch!r} cannot use encoder {encoder!r}: {text[:200]} "
            "(smp names such as resnet18/resnet50/mit_b0, or a timm model as tu-<name>)",
        ) from error


class TorchvisionFCN(_LibraryModel):
    """torchvision's FCN (Long et al.) with a dilated ResNet backbone, for N bands.

    A model name of its own (``tv_fcn``) rather than an smp ``arch``: it comes from another
    library, smp has no FCN, and its options (``backbone``, ``aux``) are torchvision's.
    ``torchvision.models.segmentation.fcn_resnet50`` / ``fcn_resnet101`` are built with
    ``weights=None, weights_backbone=None``; their ResNet runs at output stride 8 (layers 3
    and 4 dilated), and the FCN head's logits (stride 8) are upsampled by the loss / eval path
    as for the other models. The stem convolution is replaced by one taking ``in_channels``
    bands (same shape otherwise, so a 3-band ImageNet file still loads through
    ``model.pretrained`` with its input bands adapted).

    Segments: ``encoder`` (normaliser, padding and the backbone), ``decoder`` (the FCN head's
    3x3 conv-BN-ReLU) and ``head`` (its dropout and 1x1 classifier).

    Args:
        num_classes: K.
        in_channels: input bands.
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        backbone: ``resnet50`` or ``resnet101``.
        aux: also train torchvision's auxiliary FCN head on layer 3 (the paper's deep
            supervision is not FCN's; torchvision's training recipe uses it with weight 0.5,
            here it is one more entry of ``aux`` weighted by the loss settings).

    Raises:
        ConfigError: for an unknown backbone, or when torchvision cannot be imported.
    """

    name = "tv_fcn"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        backbone: str = "resnet50",
        aux: bool = False,
    ) -> None:
        if backbone not in TV_FCN_BACKBONES:
            raise ConfigError("model.backbone", f"unknown tv_fcn backbone {backbone!r}; choose from {list(TV_FCN_BACKBONES)}")
        super().__init__(num_classes, in_channels, band_mean, band_std, backbone=backbone, aux=bool(aux))
        import_library("torchvision", "tv_fcn")
        segmentation = importlib.import_module("torchvision.models.segmentation")
        builder = getattr(segmentation, f"fcn_{backbone}")
        net = builder(weights=None, weights_backbone=None, num_classes=self.num_classes, aux_loss=bool(aux))
        stem = net.backbone.conv1
        net.backbone.conv1 = nn.Conv2d(
            self.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False
        )
        self.net = net
        self.output_stride = 8
        self.pad_multiple = 8

    def _encode(self, x: Tensor) -> list[Tensor]:
        # IntermediateLayerGetter returns {"out": layer4, "aux": layer3}; a list keeps the
        # segment's outputs plain tensors.
        found = self.net.backbone(x)
        return [found["out"], found["aux"]] if "aux" in found else [found["out"]]

    def _decode(self, *features: Tensor) -> Tensor:
        # FCNHead = Sequential(conv3x3, BN, ReLU, Dropout, conv1x1): the first three are the
        # "decoder", the last two the classifier.
        body = self.net.classifier
        return body[2](body[1](body[0](features[0])))

    def _head(self, decoded: Tensor) -> Tensor:
        body = self.net.classifier
        return body[4](body[3](decoded))

    def _aux(self, *features: Tensor) -> list[Tensor]:
        if self.net.aux_classifier is None or len(features) < 2:
            return []
        return [self.net.aux_classifier(features[1])]

