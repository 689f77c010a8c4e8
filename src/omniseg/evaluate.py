"""Evaluate a checkpoint on a dataset split (``omniseg evaluate --checkpoint ... --data ...``).

It sits beside :mod:`omniseg.predictor`, above the engine: evaluation is the predictor's inference
scored by the task's metric, and the engine (training) imports neither.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from omniseg.batch import Progress
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
    task = task or predictor.task
    scored = score_predictions(
        predictor, data_spec, task=task, metrics=[metric or task], flip=flip, scales=scales, crf=crf,
        limit=limit, progress=progress,
    )  # fmt: skip
    return scored.results[metric or task], scored.scorers[metric or task]


@dataclass
class ScoredPredictions:
    """One inference pass scored by several metrics: ``results[m]`` is ``scorers[m].compute()``."""

    task: str
    results: dict[str, dict]
    scorers: dict[str, TaskMetric]
    images: int
    seconds_per_image: float  # prediction alone (inference, TTA, post-processing), not data loading


def score_predictions(
    predictor: Predictor,
    data_spec: dict,
    *,
    task: str,
    metrics: Sequence[str],
    flip: bool | None = None,
    scales: Sequence[float] | None = None,
    crf: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> ScoredPredictions:
    """Predict ``task`` once per image of a labelled split and score it with every metric in
    ``metrics`` (cross-task figures cost no extra inference)."""
    dataset = open_dataset(data_spec)
    if dataset.categories.ids != predictor.categories.ids:
        raise ValueError(
            f"dataset categories {dataset.categories.ids} differ from the model's {predictor.categories.ids}"
        )
    scorers = {name: metric_for_task(name, predictor.categories) for name in metrics}
    n = len(dataset) if limit is None else min(limit, len(dataset))
    elapsed = 0.0
    # a live bar on a terminal, a line every tenth of the images (or 30 s) in a log, as segment does
    shown = Progress(n, quiet=not progress, desc="evaluate", skipped=None)
    for i in range(n):
        sample = dataset[i]
        start = time.perf_counter()
        pred = predictor.predict(sample.image, task=task, crf=crf, flip=flip, scales=scales)
        elapsed += time.perf_counter() - start
        for scorer in scorers.values():
            scorer.update(sample.image_id, sample.segments, pred)
        shown.update()
    shown.close()
    results = {name: scorer.compute() for name, scorer in scorers.items()}
    return ScoredPredictions(task, results, scorers, n, elapsed / max(n, 1))
