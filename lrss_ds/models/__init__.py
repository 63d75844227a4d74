"""Segmentation models built by name, and the loader of pretrained backbone weights.

Adding a model: write a :class:`SegmentationModel` subclass (``base.py`` says what the engine
asks of one: ``config()``, ``checkpoint_plan``, ``pad_multiple``) whose constructor takes
``(num_classes, in_channels, band_mean=None, band_std=None, **options)`` and refuses unknown
options with a ``ConfigError``, and add one line to :data:`MODEL_BUILDERS`; experiments,
``lrss-ds models`` (with its default options) and the planner's probe reach it by name. Its
paper's loss, if not plain cross-entropy, is one line of :data:`DEFAULT_LOSS`. Optionally: variants
worth listing separately are rows of ``listing.VARIANTS``; a row of
``benchmarks/_workloads.METHODS`` puts it in the comparison tables (``options_for`` there sets
crop sizes that depend on the benchmark's patch).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel
from lrss_ds.models.ehsnet import EHSNet
from lrss_ds.models.fctl import build_fctl
from lrss_ds.models.glnet import build_glnet
from lrss_ds.models.glsnet import build_glsnet
from lrss_ds.models.hrnet_fcn import HRNetFCN
from lrss_ds.models.icnet import ICNet
from lrss_ds.models.isdnet import ISDNet
from lrss_ds.models.magnet import build_magnet
from lrss_ds.models.pretrained import PretrainedReport, load_pretrained
from lrss_ds.models.segnet import SegNet
from lrss_ds.models.smp_adapter import SmpModel, TorchvisionFCN
from lrss_ds.models.stdc import STDCSeg

# The only registry: model name -> constructor(num_classes, in_channels, band_mean=None,
# band_std=None, **options) returning a SegmentationModel.
MODEL_BUILDERS: dict[str, Callable[..., SegmentationModel]] = {
    "ehsnet": EHSNet,
    "hrnet_fcn": HRNetFCN,
    "glsnet": build_glsnet,
    "glnet": build_glnet,
    "isdnet": ISDNet,
    "stdc": STDCSeg,
    "magnet": build_magnet,
    "fctl": build_fctl,
    "smp": SmpModel,
    "tv_fcn": TorchvisionFCN,
    "segnet": SegNet,
    "icnet": ICNet,
}


# The loss each model's paper trains it with (a ``build_loss`` name); a model not listed trains
# with plain cross-entropy. The planner's probe and the benchmarks take their loss from here.
DEFAULT_LOSS: dict[str, str] = {
    "ehsnet": "ehsnet",
    "glsnet": "focal",
    "isdnet": "isdnet",
    "stdc": "stdc",
}


def default_loss(name: str) -> str:
    """The ``build_loss`` name model ``name`` trains with by default (``ce`` unless listed)."""
    return DEFAULT_LOSS.get(name, "ce")


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
            ``magnet``, ``fctl``, ``smp``, ``tv_fcn``, ``segnet``, ``icnet``).
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


__all__ = ["DEFAULT_LOSS", "MODEL_BUILDERS", "default_loss", "PretrainedReport", "SegmentationModel", "build_model", "load_pretrained"]
