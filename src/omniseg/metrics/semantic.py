"""Semantic segmentation metrics from a streaming confusion matrix (mIoU, accuracies, FWIoU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def as_numpy(array: Any) -> np.ndarray:
    """A numpy view of a numpy array or a (possibly GPU) torch tensor, without importing torch."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


class SemanticMetric:
    """Confusion-matrix metric over ``num_classes`` contiguous labels.

    ``update(pred, gt)`` takes ``(H, W)`` integer label maps (numpy or torch). Ground-truth pixels
    equal to ``ignore_index`` are left out; predicted labels outside ``[0, num_classes)`` count as
    wrong for their ground-truth class (and as no class's prediction). Accumulators are plain
    counts, so workers can each keep one and :meth:`merge` them.
    """

    def __init__(
        self, num_classes: int, ignore_index: int | None = 255, class_names: Sequence[str] | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        # rows: ground truth; columns: prediction, the last column gathers invalid predictions
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred_labels: Any, gt_labels: Any) -> None:
        pred = as_numpy(pred_labels)
        gt = as_numpy(gt_labels)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} does not match ground truth shape {gt.shape}")
        gt = gt.reshape(-1)
        pred = pred.reshape(-1)
        if self.ignore_index is not None:
            keep = gt != self.ignore_index
            if not keep.all():
                gt, pred = gt[keep], pred[keep]
        if gt.size == 0:
            return
        gt = gt.astype(np.int64, copy=False)
        lo, hi = int(gt.min()), int(gt.max())
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"ground-truth label {bad} is outside [0, {self.num_classes}) and is not the "
                f"ignore index {self.ignore_index}"
            )
        pred = pred.astype(np.int64, copy=False)
        invalid = (pred < 0) | (pred >= self.num_classes)
        if invalid.any():
            pred = np.where(invalid, self.num_classes, pred)
        n = self.num_classes + 1
        self.confusion += np.bincount(gt * n + pred, minlength=self.num_classes * n).reshape(
            self.num_classes, n
        )

    def merge(self, other: SemanticMetric) -> SemanticMetric:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge metrics over {self.num_classes} and {other.num_classes} classes")
        self.confusion += other.confusion
        return self

    def compute(self) -> dict[str, Any]:
        """``miou``, ``per_class_iou`` (NaN where a class is in neither gt nor pred), accuracies, ``fwiou``."""
        conf = self.confusion.astype(np.float64)
        tp = np.diag(conf[:, : self.num_classes])
        gt_count = conf.sum(axis=1)
        pred_count = conf[:, : self.num_classes].sum(axis=0)
        union = gt_count + pred_count - tp
        total = gt_count.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            class_acc = np.where(gt_count > 0, tp / gt_count, np.nan)
        present = union > 0
        in_gt = gt_count > 0
        result: dict[str, Any] = {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "per_class_iou": [float(v) for v in iou],
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_accuracy": float(class_acc[in_gt].mean()) if in_gt.any() else float("nan"),
            "fwiou": float((gt_count[in_gt] / total * iou[in_gt]).sum()) if total else float("nan"),
        }
        if self.class_names is not None:
            result["class_names"] = list(self.class_names)
        return result
