"""Evaluate a checkpoint on a dataset split (``omniseg evaluate --checkpoint ... --data ...``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from omniseg.data import open_dataset
from omniseg.metrics.semantic import SemanticMetric
from omniseg.predictor import load_predictor


def evaluate_checkpoint(
    checkpoint: str,
    data_spec: dict,
    *,
    flip: bool = False,
    scales: Sequence[float] | None = None,
    crf: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Semantic metrics of a checkpoint on a labelled split, with optional TTA and CRF."""
    predictor = load_predictor(checkpoint)
    dataset = open_dataset(data_spec)
    categories = predictor.categories
    if dataset.categories.ids != categories.ids:
        raise ValueError(
            f"dataset categories {dataset.categories.ids} differ from the model's {categories.ids}"
        )
    lookup = categories.id_lookup(fill=255)
    metric = SemanticMetric(len(categories), ignore_index=255, class_names=categories.names)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in tqdm(range(n), desc="evaluate", unit="img", disable=not progress):
        image, label = dataset.load_pair(i)
        gt = np.where(label == dataset.ignore_index, 255, lookup[np.minimum(label, len(lookup) - 1)])
        pred = predictor.predict(image, crf=crf, flip=flip, scales=scales).to_semantic(void_value=255)
        metric.update(lookup[pred], gt)
    result = metric.compute()
    result["_categories"] = categories
    return result
