"""Confusion-matrix segmentation metrics (IoU, precision, recall, F1, mIoU, mean F1, OA)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed

from lrss_ds.engine import comm

# Pixels counted per bincount call: bounds the int64 index buffer (8 B/px) for a whole scene.
_CHUNK_PIXELS = 1 << 22


class ConfusionMatrix:
    """Accumulates a (K, K) int64 confusion matrix: rows are the target class, columns the prediction.

    The metrics follow GLSNet §4.3 and EHSNet: for class ``k`` with true positives TP, false
    positives FP and false negatives FN, ``IoU = TP / (TP + FP + FN)``,
    ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``F1 = 2PR / (P + R)`` (computed as
    ``2TP / (2TP + FP + FN)``, equal wherever P and R are defined, and 0 rather than undefined for a
    class that is present but never predicted correctly); mIoU and mean F1 average over classes;
    OA = correctly classified pixels / all counted pixels.

    Undefined values are NaN: a class absent from both the target and the prediction has NaN IoU
    and F1 and is left out of mIoU and mean F1 (counting it as 0 would punish a scene for not
    containing a class, counting it as 1 would reward it; the papers average over classes that
    occur). Precision is NaN for a class never predicted, recall NaN for a class absent from the
    target. Pixels whose target equals ``ignore_index`` are not counted at all.

    Args:
        num_classes: K, the number of classes (class indices ``0..K-1``).
        ignore_index: target value that is skipped (None: no value is skipped).
        class_names: K names used in :meth:`compute`'s output (default: ``"0"``, ``"1"``, ...).

    Raises:
        ValueError: ``num_classes < 1`` or ``class_names`` of the wrong length.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = [str(n) for n in class_names] if class_names else [str(k) for k in range(num_classes)]
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Set every count back to zero."""
        self.matrix.zero_()

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Count one batch of predictions against its targets.

        Args:
            pred: predicted class indices, any integer dtype, any shape (e.g. (B, H, W) or (H, W));
                torch (any device) or numpy.
            target: target class indices, same shape as ``pred``; values equal to
                ``ignore_index`` are skipped.

        Raises:
            ValueError: shapes differ, or a counted pixel has a class outside ``0..K-1`` (in
                ``target``, or in ``pred``), which would otherwise corrupt the matrix silently.
        """
        pred_t = _as_int64_tensor(pred)
        target_t = _as_int64_tensor(target)
        if pred_t.shape != target_t.shape:
            raise ValueError(f"pred shape {tuple(pred_t.shape)} != target shape {tuple(target_t.shape)}")
        pred_flat, target_flat = pred_t.reshape(-1), target_t.reshape(-1)
        k = self.num_classes
        counts = torch.zeros(k * k, dtype=torch.int64, device=pred_flat.device)
        for start in range(0, pred_flat.numel(), _CHUNK_PIXELS):
            p = pred_flat[start : start + _CHUNK_PIXELS]
            t = target_flat[start : start + _CHUNK_PIXELS]
            if self.ignore_index is not None:
                keep = t != self.ignore_index
                p, t = p[keep], t[keep]
            if t.numel() == 0:
                continue
            _check_range(t, k, "target")
            _check_range(p, k, "pred")
            counts += torch.bincount(t * k + p, minlength=k * k)
        self.matrix += counts.to("cpu").reshape(k, k)

    def all_reduce(self, group: Any = None) -> "ConfusionMatrix":
        """Sum the matrix over all ranks in place (no-op unless torch.distributed is initialised).

        Call it once, after the last :meth:`update` of an evaluation; calling it twice would count
        every rank's pixels again. The reduction runs on the device the communication backend
        serves (:func:`lrss_ds.engine.comm.collective_device`: the CUDA device under nccl, the
        host under gloo); the matrix stays on the host.

        Args:
            group: process group (default: the world).

        Returns:
            self, for chaining (``cm.all_reduce().compute()``).
        """
        self.matrix = comm.all_reduce(self.matrix, torch.distributed.ReduceOp.SUM, group).to("cpu")
        return self

    def compute(self) -> dict[str, Any]:
        """Compute the metrics from the counts so far.

        Returns:
            dict with ``classes`` (K names, the order of every per-class list), per-class lists
            ``iou``, ``precision``, ``recall``, ``f1`` and ``support`` (target pixels per class),
            scalars ``miou``, ``mean_f1``, ``oa`` and ``pixels`` (counted pixels), and
            ``matrix`` (K x K nested int lists, rows = target, columns = prediction). Undefined
            values are float NaN (see the class docstring); :func:`jsonable` turns them into None.
        """
        m = self.matrix.to(torch.float64)
        tp = torch.diagonal(m)
        fp = m.sum(dim=0) - tp
        fn = m.sum(dim=1) - tp
        iou = _divide(tp, tp + fp + fn)
        precision = _divide(tp, tp + fp)
        recall = _divide(tp, tp + fn)
        f1 = _divide(2 * tp, 2 * tp + fp + fn)
        total = float(m.sum())
        return {
            "classes": list(self.class_names),
            "iou": iou.tolist(),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": [int(v) for v in self.matrix.sum(dim=1).tolist()],
            "miou": _nanmean(iou),
            "mean_f1": _nanmean(f1),
            "oa": float(tp.sum()) / total if total > 0 else math.nan,
            "pixels": int(total),
            "matrix": self.matrix.tolist(),
        }


def jsonable(value: Any) -> Any:
    """Return ``value`` with every float NaN/inf replaced by None (strict JSON has no NaN).

    Args:
        value: nested dicts/lists/tuples of numbers and strings (e.g. :meth:`ConfusionMatrix.compute`).

    Returns:
        the same structure with non-finite floats replaced by None.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _as_int64_tensor(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Return ``values`` as an int64 torch tensor (numpy arrays are wrapped, not copied twice)."""
    if isinstance(values, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(values).astype(np.int64, copy=False))
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex():
            raise ValueError(f"class indices must be integers, got {values.dtype}")
        return values.to(torch.int64)
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(values).__name__}")


def _check_range(values: torch.Tensor, num_classes: int, what: str) -> None:
    """Raise ValueError if any value in ``values`` (1-D int64) is outside ``0..num_classes-1``."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{what} has class {bad}, outside 0..{num_classes - 1}")


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Elementwise ``numerator / denominator`` with NaN where the denominator is 0."""
    out = torch.full_like(numerator, math.nan)
    defined = denominator > 0
    out[defined] = numerator[defined] / denominator[defined]
    return out


def _nanmean(values: torch.Tensor) -> float:
    """Mean over the non-NaN entries of ``values`` (NaN if there are none)."""
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan
