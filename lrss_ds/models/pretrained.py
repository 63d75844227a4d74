"""Load public ImageNet backbone weights (HRNet, torchvision ResNet) into a model by key name."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lrss_ds.errors import InputFileError

log = logging.getLogger(__name__)

# Keys of the input convolution in every supported file format (HRNet and torchvision ResNet).
STEM_KEYS: tuple[str, ...] = ("conv1.weight",)
# Wrappers used by training scripts around the state dict (the official HRNet files are
# bare; many re-saved files use one of these).
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state", "net")


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did.

    Attributes:
        path: the weights file.
        prefix: where in the model the file was loaded (``""`` = the model itself,
            ``"backbone."`` = its backbone).
        loaded: model keys set from the file (including ``adapted``).
        adapted: stem keys whose input bands were adapted (3 -> N bands).
        missing: model keys under ``prefix`` the file did not set (``num_batches_tracked``
            excluded: old files lack it and its value does not matter).
        unexpected: file keys the model has no place for (e.g. a classifier head).
    """

    path: str
    prefix: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, and the first few missing/unexpected keys."""

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")

        parts = [f"{self.path}: loaded {len(self.loaded)} tensors into {self.prefix or 'the model'!r}"]
        if self.adapted:
            parts.append(f"adapted input bands of {few(self.adapted)}")
        parts.append(f"{len(self.missing)} missing" + (f" ({few(self.missing)})" if self.missing else ""))
        parts.append(f"{len(self.unexpected)} unexpected" + (f" ({few(self.unexpected)})" if self.unexpected else ""))
        return "; ".join(parts)


def torch_load_problem(error: BaseException) -> str:
    """What ``torch.load`` refused, in our words, without torch's advice to load unsafely.

    torch's refusal of a pickled Python object suggests re-running with ``weights_only=False``,
    which would let the file run code; a weights file only needs tensors, so the remedy given is
    to save those.
    """
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds pickled Python objects{what}, which a weights file may not; save only tensors "
                "(torch.save(model.state_dict(), path)) or use `lrss-ds export` on a checkpoint")
    if "central directory" in text or "PytorchStreamReader" in text:
        return "it is truncated or not a torch file (its zip archive cannot be read)"
    first = text.splitlines()[0] if text else type(error).__name__
    return first.split(". ")[0]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a weights file safely and unwrap it to a flat ``name -> tensor`` dict.

    Args:
        path: a ``.pth``/``.pt`` file saved with ``torch.save``.

    Returns:
        the state dict, with a common ``module.`` prefix (DataParallel) removed.

    Raises:
        InputFileError: if the file is missing, not loadable with ``weights_only=True`` or
            holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "weights file not found (nothing is downloaded; give a local file)")
    try:
        # weights_only: a weights file must not be able to run code when it is read.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise InputFileError(path, f"cannot be read as a weights file: {torch_load_problem(error)}") from error
    while isinstance(obj, dict):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise InputFileError(path, f"holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise InputFileError(path, "holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def adapt_input_bands(weight: Tensor, bands: int) -> Tensor:
    """Turn a 3-band (RGB) stem filter bank into one for ``bands`` bands.

    Bands 1-3 start from the RGB filters and every further band from their mean (fewer
    than 3 bands: every band from the mean). The result is then scaled by ``3 / bands``
    so that the sum of each filter over its bands is the pretrained sum: an input that is
    the same in every band (the common, correlated part of multispectral bands) gives the
    same response as before, so the pretrained BN statistics after the stem still fit.

    Args:
        weight: ``(O, 3, kh, kw)`` pretrained filters.
        bands: N, the model's input bands.

    Returns:
        ``(O, N, kh, kw)`` filters.
    """
    mean = weight.mean(dim=1, keepdim=True)
    if bands >= 3:
        out = torch.cat([weight, mean.expand(-1, bands - 3, -1, -1)], dim=1)
    else:
        out = mean.expand(-1, bands, -1, -1)
    return (out * (3.0 / bands)).contiguous()


def _candidate_prefixes(model_keys: dict[str, Tensor], file_state: dict[str, Tensor]) -> dict[str, tuple[int, int]]:
    """Score every prefix p for which some ``p + file_key`` is a model key: (names, shapes) matched."""
    scores: dict[str, list[int]] = {}
    for model_key, value in model_keys.items():
        parts = model_key.split(".")
        for i in range(len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in file_state:
                prefix = ".".join(parts[:i]) + ("." if i else "")
                score = scores.setdefault(prefix, [0, 0])
                score[0] += 1
                score[1] += int(file_state[suffix].shape == value.shape)
    return {p: (s[0], s[1]) for p, s in scores.items()}


def load_pretrained(model: nn.Module, path: str | Path, prefix: str | None = None) -> PretrainedReport:
    """Load backbone weights from ``path`` into ``model`` by key name.

    Supports the official HRNet ImageNet classification files and torchvision's ResNet
    files (and any state dict whose names match a part of the model). The place to load into
    is detected as the prefix under which most file keys name a model tensor (``""`` for a
    bare backbone, ``"backbone."`` for EHSNet's), or given. A 3-band ``conv1.weight`` is
    adapted to the model's N bands (:func:`adapt_input_bands`). Keys of the model not in the
    file keep their values; they and the file's keys the model lacks are reported and logged.
    Nothing is loaded unless everything that matches by name also fits by shape.

    Args:
        model: the model (or backbone) to load into.
        path: the local weights file (nothing is downloaded).
        prefix: where to load, e.g. ``"backbone."``; ``None`` detects it.

    Returns:
        the :class:`PretrainedReport`.

    Raises:
        InputFileError: if the file cannot be read, no key matches the model, the prefix is
            ambiguous, or a matching key has another shape (naming the first such keys).
    """
    file_state = read_state_dict(path)
    model_state = model.state_dict()
    if prefix is None:
        scores = _candidate_prefixes(model_state, file_state)
        if not scores:
            raise InputFileError(path, f"no key matches the model (file keys start {sorted(file_state)[:3]})")
        best = max(scores.values())
        tied = sorted(p for p, s in scores.items() if s == best)
        if len(tied) > 1:
            raise InputFileError(path, f"fits several parts of the model equally ({tied}); pass prefix=")
        prefix = tied[0]
    elif prefix and not prefix.endswith("."):
        prefix += "."

    loaded: dict[str, Tensor] = {}
    adapted: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in file_state.items():
        target = prefix + key
        if target not in model_state:
            unexpected.append(key)
            continue
        want = model_state[target].shape
        if value.shape == want:
            loaded[target] = value
        elif key in STEM_KEYS and value.dim() == 4 and value.shape[1] == 3 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            loaded[target] = adapt_input_bands(value, int(want[1]))
            adapted.append(target)
        else:
            mismatched.append(f"{key} {list(value.shape)} vs model {list(want)}")
    if mismatched:
        shown = "; ".join(mismatched[:3]) + (f"; and {len(mismatched) - 3} more" if len(mismatched) > 3 else "")
        raise InputFileError(path, f"shapes do not fit the model under prefix {prefix!r}: {shown}")
    if not loaded:
        raise InputFileError(path, f"no key matches the model under prefix {prefix!r}")

    for target, value in loaded.items():
        with torch.no_grad():
            model_state[target].copy_(value.to(model_state[target].dtype))
    missing = [
        k
        for k in model_state
        if k.startswith(prefix) and k not in loaded and not k.endswith("num_batches_tracked")
    ]
    report = PretrainedReport(str(path), prefix, sorted(loaded), adapted, missing, unexpected)
    log.info("%s", report.summary())
    return report
