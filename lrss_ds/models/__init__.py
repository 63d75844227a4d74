"""Segmentation models built by name, and the loader of pretrained backbone weights."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel
from lrss_ds.models.ehsnet import EHSNet
from lrss_ds.models.glnet import build_glnet
from lrss_ds.models.glsnet import build_glsnet
from lrss_ds.models.hrnet_fcn import HRNetFCN
from lrss_ds.models.icnet import ICNet
from lrss_ds.models.pretrained import PretrainedReport, load_pretrained
from lrss_ds.models.segnet import SegNet
from lrss_ds.models.smp_adapter import SmpModel, TorchvisionFCN

# The only registry: model name -> constructor(num_classes, in_channels, band_mean=None,
# band_std=None, **options) returning a SegmentationModel.
MODEL_BUILDERS: dict[str, Callable[..., SegmentationModel]] = {
    "ehsnet": EHSNet,
    "hrnet_fcn": HRNetFCN,
    "glsnet": build_glsnet,
    "glnet": build_glnet,
    "smp": SmpModel,
    "tv_fcn": TorchvisionFCN,
    "segnet": SegNet,
    "icnet": ICNet,
}


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    band_mean: Sequence[float] | None = None,
    band_std: Sequence[float] | None = None,
    **options: Any,
) -> SegmentationModel:
    """Build the model called ``name``; ``build_model(**model.config())`` rebuilds a model.

    Args:
        name: a key of :data:`MODEL_BUILDERS` (``ehsnet``, ``hrnet_fcn``, ``glsnet``, ``glnet``,
            ``smp``, ``tv_fcn``, ``segnet``, ``icnet``).
        num_classes: K.
        in_channels: input bands C.
        band_mean: per-band mean of the raw input (kept in the model's state dict).
        band_std: per-band standard deviation of the raw input.
        **options: the model's own options (see each model's docstring).

    Returns:
        the model, in train mode, with freshly initialised weights.

    Raises:
        ConfigError: for an unknown name or option, or a bad option value.
    """
    if name not in MODEL_BUILDERS:
        raise ConfigError("model.name", f"unknown model {name!r}; choose from {sorted(MODEL_BUILDERS)}")
    try:
        return MODEL_BUILDERS[name](num_classes, in_channels, band_mean=band_mean, band_std=band_std, **options)
    except TypeError as error:
        # An unknown keyword reaches the constructor as a TypeError; say which key it was.
        if "unexpected keyword argument" in str(error):
            key = str(error).split("'")[1] if "'" in str(error) else "?"
            raise ConfigError(f"model.{key}", f"unknown option for model {name!r}") from error
        raise


__all__ = ["MODEL_BUILDERS", "PretrainedReport", "SegmentationModel", "build_model", "load_pretrained"]
