"""Metrics: mIoU (semantic), COCO mask/box AP (instance), PQ/SQ/RQ (panoptic).

Every metric is a streaming accumulator with ``update``, ``merge`` (combine workers) and
``compute``; :mod:`omniseg.metrics.task_metrics` puts them behind one interface, one per task
(what training validation and ``omniseg evaluate`` use); :mod:`omniseg.metrics.files` evaluates
prediction files on disk.
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
from omniseg.metrics.task_metrics import TaskMetric, metric_for_task

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
    "TaskMetric",
    "metric_for_task",
]
