"""Evaluate a checkpoint on a dataset split (``omniseg evaluate --checkpoint ... --data ...``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from omniseg.data import open_dataset
from omniseg.metrics import SemanticMetric, segments_metric, update_segments_metric
from omniseg.predictor import load_predictor


def evaluate_checkpoint(
    checkpoint: str,
    data_spec: dict,
    *,
    flip: bool | None = None,
    scales: Sequence[float] | None = None,
    crf: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Metrics of a checkpoint on a labelled split: mIoU for semantic models (with optional TTA and
    CRF; ``flip`` and ``scales`` left ``None`` take the checkpoint's recorded inference settings, so
    the figure is that of ``omniseg segment``), COCO mask and box AP for instance models (box AP
    only for box detectors), PQ for panoptic models. ``result["_task"]`` says which."""
    predictor = load_predictor(checkpoint)
    dataset = open_dataset(data_spec)
    categories = predictor.categories
    if dataset.categories.ids != categories.ids:
        raise ValueError(
            f"dataset categories {dataset.categories.ids} differ from the model's {categories.ids}"
        )
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images = tqdm(range(n), desc="evaluate", unit="img", disable=not progress)
    if predictor.task != "semantic":
        if flip or scales or crf:
            raise ValueError(f"--flip, --scales and --crf apply to semantic models, not to a {predictor.task} model")
        metric = segments_metric(predictor.task, categories)
        for i in images:
            sample = dataset[i]
            update_segments_metric(metric, sample.image_id, sample.segments, predictor.predict(sample.image))
        result = metric.compute()
        if predictor.task == "detection":  # a box detector's "masks" are its filled boxes
            result.pop("segm")
        result["_task"] = "panoptic" if predictor.task == "panoptic" else "instance"
        result["_categories"] = categories
        return result
    lookup = categories.id_lookup(fill=255)
    metric = SemanticMetric(len(categories), ignore_index=255, class_names=categories.names)
    for i in images:
        image, label = dataset.load_pair(i)
        gt = np.where(label == dataset.ignore_index, 255, lookup[np.minimum(label, len(lookup) - 1)])
        pred = predictor.predict(image, crf=crf, flip=flip, scales=scales).to_semantic(void_value=255)
        metric.update(lookup[pred], gt)
    result = metric.compute()
    result["_task"] = "semantic"
    result["_categories"] = categories
    return result
