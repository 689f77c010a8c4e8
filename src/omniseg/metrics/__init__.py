"""Metrics: mIoU (semantic), COCO mask/box AP (instance), PQ/SQ/RQ (panoptic).

Every metric is a streaming accumulator with ``update``, ``merge`` (combine workers) and
``compute``; :mod:`omniseg.metrics.files` evaluates prediction files on disk.
"""

from omniseg.metrics.files import (
    EvaluationError,
    evaluate_instance_files,
    evaluate_panoptic_files,
    evaluate_semantic_dirs,
    read_label_png,
    read_panoptic_png,
)
from omniseg.metrics.instance import InstanceAP
from omniseg.metrics.panoptic import PanopticQuality
from omniseg.metrics.semantic import SemanticMetric
from omniseg.metrics.table import format_table
from omniseg.structures import CategoryTable, Segments


def segments_metric(task: str, categories: CategoryTable) -> InstanceAP | PanopticQuality:
    """The accumulator that scores a model of ``task`` from predicted :class:`Segments`: PQ for
    panoptic models, COCO mask and box AP for instance models and box detectors."""
    if task == "panoptic":
        return PanopticQuality(categories)
    if task in ("instance", "detection"):
        return InstanceAP(categories)
    raise ValueError(f"no segments metric for task {task!r}; expected instance, detection or panoptic")


def update_segments_metric(
    metric: InstanceAP | PanopticQuality, image_id: int | str, gt: Segments, pred: Segments
) -> None:
    """Add one image's ground truth and prediction to an accumulator from :func:`segments_metric`."""
    if isinstance(metric, PanopticQuality):
        metric.update_segments(gt, pred)
    else:
        metric.update(image_id, gt, pred)

__all__ = [
    "EvaluationError",
    "InstanceAP",
    "PanopticQuality",
    "SemanticMetric",
    "evaluate_instance_files",
    "evaluate_panoptic_files",
    "evaluate_semantic_dirs",
    "format_table",
    "read_label_png",
    "read_panoptic_png",
    "segments_metric",
    "update_segments_metric",
]
