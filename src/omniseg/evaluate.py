"""Evaluate a checkpoint on a dataset split (``omniseg evaluate --checkpoint ... --data ...``).

It sits beside :mod:`omniseg.predictor`, above the engine: evaluation is the predictor's inference
scored by the task's metric, and the engine (training) imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from omniseg.data import open_dataset
from omniseg.metrics.task_metrics import TaskMetric, metric_for_task
from omniseg.predictor import Predictor, load_predictor


def evaluate_checkpoint(
    checkpoint: str | Predictor,
    data_spec: dict,
    *,
    task: str | None = None,
    metric: str | None = None,
    flip: bool | None = None,
    scales: Sequence[float] | None = None,
    crf: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[dict, TaskMetric]:
    """The metric of ``task`` (the model's first by default) for a checkpoint on a labelled split,
    and the metric object (its ``table`` formats the result). Inference is exactly
    ``omniseg segment``'s: ``flip`` and ``scales`` left ``None`` take the checkpoint's recorded
    settings; detections are not score-filtered (AP ranks them all). ``checkpoint`` may be a
    loaded :class:`Predictor`.

    ``metric`` (default: ``task``'s) scores the task's output with another task's metric — the
    cross-task figures: a panoptic model's mIoU or mask AP from its panoptic output, an instance
    model's PQ (things only: it predicts no stuff), a semantic model's PQ (one segment per class).
    """
    predictor = checkpoint if isinstance(checkpoint, Predictor) else load_predictor(checkpoint)
    dataset = open_dataset(data_spec)
    if dataset.categories.ids != predictor.categories.ids:
        raise ValueError(
            f"dataset categories {dataset.categories.ids} differ from the model's {predictor.categories.ids}"
        )
    task = task or predictor.task
    scorer = metric_for_task(metric or task, predictor.categories)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in tqdm(range(n), desc="evaluate", unit="img", disable=not progress):
        sample = dataset[i]
        pred = predictor.predict(sample.image, task=task, crf=crf, flip=flip, scales=scales)
        scorer.update(sample.image_id, sample.segments, pred)
    return scorer.compute(), scorer
