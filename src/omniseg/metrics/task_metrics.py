"""The metric of each task, behind one interface, so that training validation and ``omniseg
evaluate`` score any model the same way: ``update(image_id, gt, pred)`` with ground-truth and
predicted :class:`~omniseg.structures.Segments`, ``merge`` (workers), ``compute`` (the full
result), ``summary`` (named scalars, ``monitor`` among them: the one that picks ``best``) and
``table`` (markdown).

:func:`metric_for_task` is the only place that maps a task name to its metric.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from omniseg.metrics.instance import InstanceAP
from omniseg.metrics.panoptic import PanopticQuality
from omniseg.metrics.semantic import SemanticMetric
from omniseg.metrics.table import format_table
from omniseg.structures import CategoryTable, Segments

__all__ = ["BoxAPMetric", "MaskAPMetric", "PQMetric", "SemanticIoUMetric", "TaskMetric", "metric_for_task"]

IGNORE = 255


class TaskMetric:
    """Interface of the per-task metrics (see the module docstring)."""

    monitor: str = ""
    table_kind: str = ""

    def __init__(self, categories: CategoryTable) -> None:
        self.categories = categories

    def update(self, image_id: int | str, gt: Segments, pred: Segments) -> None:  # pragma: no cover
        raise NotImplementedError

    def merge(self, other: TaskMetric) -> TaskMetric:  # pragma: no cover
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def summary(self, result: dict[str, Any]) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def table(self, result: dict[str, Any]) -> str:
        return format_table(result, self.table_kind, self.categories)


class SemanticIoUMetric(TaskMetric):
    """Class IoU over the category table's classes; unlabelled ground-truth pixels are left out,
    unlabelled predicted pixels count as wrong."""

    monitor = "miou"
    table_kind = "semantic"

    def __init__(self, categories: CategoryTable) -> None:
        super().__init__(categories)
        self.metric = SemanticMetric(len(categories), ignore_index=IGNORE, class_names=categories.names)
        self._lookup = categories.id_lookup(fill=-1)

    def _indices(self, segments: Segments, void: int) -> np.ndarray:
        ids = segments.to_semantic(void_value=-1)
        index = np.full(ids.shape, void, dtype=np.int64)
        known = (ids >= 0) & (ids < len(self._lookup))
        index[known] = self._lookup[ids[known]]
        index[index < 0] = void
        return index

    def update(self, image_id: int | str, gt: Segments, pred: Segments) -> None:
        self.metric.update(self._indices(pred, -1), self._indices(gt, IGNORE))

    def merge(self, other: SemanticIoUMetric) -> SemanticIoUMetric:
        self.metric.merge(other.metric)
        return self

    def compute(self) -> dict[str, Any]:
        return self.metric.compute()

    def summary(self, result: dict[str, Any]) -> dict[str, float]:
        return {"miou": float(result["miou"]), "pixel_accuracy": float(result["pixel_accuracy"])}


class MaskAPMetric(TaskMetric):
    """COCO mask and box AP (pycocotools) of instance predictions."""

    monitor = "mask_ap"
    table_kind = "instance"

    def __init__(self, categories: CategoryTable) -> None:
        super().__init__(categories)
        self.metric = InstanceAP(categories)

    def update(self, image_id: int | str, gt: Segments, pred: Segments) -> None:
        self.metric.update(image_id, gt, pred)

    def merge(self, other: MaskAPMetric) -> MaskAPMetric:
        self.metric.merge(other.metric)
        return self

    def compute(self) -> dict[str, Any]:
        return self.metric.compute()

    def summary(self, result: dict[str, Any]) -> dict[str, float]:
        # COCOeval's -1 ("nothing to score") counts as 0 for model selection
        return {
            f"{name}_{stat.lower()}": max(float(result[kind][stat]), 0.0)
            for kind, name in (("segm", "mask"), ("bbox", "box"))
            for stat in ("AP", "AP50")
            if kind in result
        }


class BoxAPMetric(MaskAPMetric):
    """COCO box AP of a box detector (its segments are filled boxes, so mask AP says nothing)."""

    monitor = "box_ap"

    def compute(self) -> dict[str, Any]:
        result = self.metric.compute()
        result.pop("segm", None)
        return result


class PQMetric(TaskMetric):
    """Panoptic quality (COCO panoptic rules), overall and for things and stuff."""

    monitor = "pq"
    table_kind = "panoptic"

    def __init__(self, categories: CategoryTable) -> None:
        super().__init__(categories)
        self.metric = PanopticQuality(categories)

    def update(self, image_id: int | str, gt: Segments, pred: Segments) -> None:
        self.metric.update_segments(gt, pred)

    def merge(self, other: PQMetric) -> PQMetric:
        self.metric.merge(other.metric)
        return self

    def compute(self) -> dict[str, Any]:
        return self.metric.compute()

    def summary(self, result: dict[str, Any]) -> dict[str, float]:
        return {"pq": result["All"]["pq"], "pq_things": result["Things"]["pq"], "pq_stuff": result["Stuff"]["pq"]}


TASK_METRICS: dict[str, type[TaskMetric]] = {
    "semantic": SemanticIoUMetric,
    "instance": MaskAPMetric,
    "detection": BoxAPMetric,
    "panoptic": PQMetric,
}


def metric_for_task(task: str, categories: CategoryTable) -> TaskMetric:
    """The accumulator that scores ``task`` (mIoU, mask AP, box AP or PQ)."""
    if task not in TASK_METRICS:
        raise ValueError(f"no metric for task {task!r}; known: {', '.join(TASK_METRICS)}")
    return TASK_METRICS[task](categories)
