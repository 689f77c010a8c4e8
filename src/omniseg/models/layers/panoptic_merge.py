"""Detectron2's heuristic panoptic merge of instance detections and a semantic segmentation
(``combine_semantic_and_instance_outputs``), for box-based panoptic methods (Panoptic FPN).

Instances by descending score (score >= ``instance_score_thresh``), each dropped if more than
``overlap_thresh`` of it is already taken, else it takes its free pixels; then each stuff class
takes the still free pixels it wins, if at least ``stuff_area_thresh`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from omniseg.models.layers.detection import mask_crops
from omniseg.structures import CategoryTable, Segments

__all__ = ["panoptic_merge"]


def panoptic_merge(
    detection: dict[str, Tensor],
    semantic_prob: Tensor,
    image_size: tuple[int, int],
    *,
    thing_ids: Sequence[int],
    stuff_ids: Sequence[int],
    categories: CategoryTable | None = None,
    overlap_thresh: float = 0.5,
    stuff_area_thresh: int = 4096,
    instance_score_thresh: float = 0.5,
    mask_threshold: float = 0.5,
) -> Segments:
    """Detectron2's heuristic merge of one image's instances and semantic probabilities.

    ``detection``: ``boxes`` (at ``image_size``), ``labels`` (1..K), ``scores``, ``mask_probs`` 28x28;
    ``semantic_prob``: ``(1 + num_stuff, H, W)`` softmax at ``image_size``. Instance masks are
    pasted box by box; no full-size mask per instance is ever held.
    """
    h, w = image_size
    id_map = np.zeros((h, w), dtype=np.int32)
    infos: list[dict] = []
    scores = detection["scores"]
    order = torch.argsort(scores, descending=True, stable=True)
    crops = list(
        mask_crops(detection["mask_probs"][order], detection["boxes"][order], image_size, mask_threshold)
    )
    labels = detection["labels"][order].tolist()
    for rank, (y0, y1, x0, x1, crop) in enumerate(crops):
        score = float(scores[order[rank]])
        if score < instance_score_thresh:
            break
        area = int(crop.sum())
        if area == 0:
            continue
        region = id_map[y0:y1, x0:x1]
        taken = crop & (region > 0)
        if taken.sum() / area > overlap_thresh:
            continue
        segment_id = len(infos) + 1
        region[crop & (region == 0)] = segment_id
        infos.append(
            {"id": segment_id, "category_id": int(thing_ids[labels[rank] - 1]), "iscrowd": 0, "score": score}
        )
    confidence, semantic = semantic_prob.max(0)
    semantic, confidence = semantic.cpu().numpy(), confidence.cpu().numpy()
    free = id_map == 0
    for cls in np.unique(semantic).tolist():
        if cls == 0:  # the "things" class: left to the instances
            continue
        mask = (semantic == cls) & free
        area = int(mask.sum())
        if area < stuff_area_thresh:
            continue
        segment_id = len(infos) + 1
        id_map[mask] = segment_id
        infos.append(
            {
                "id": segment_id,
                "category_id": int(stuff_ids[cls - 1]),
                "iscrowd": 0,
                "score": float(confidence[mask].mean()),
            }
        )
    return Segments.from_panoptic(id_map, infos, categories=categories)
