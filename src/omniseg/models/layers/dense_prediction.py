"""Dense class scores -> semantic :class:`~omniseg.structures.Segments` (shared by every model whose
raw output, or an intermediate of it, is a per-pixel score map)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from omniseg.structures import CategoryTable, Segments

__all__ = ["scores_to_image_size", "semantic_segments_from_scores"]


def scores_to_image_size(scores: Tensor, image_size: Sequence[int]) -> Tensor:
    """``(C, h, w)`` scores of one image at its own ``image_size``: the top-left crop when the
    scores cover a padded batch at input resolution, a bilinear resize otherwise."""
    h, w = int(image_size[0]), int(image_size[1])
    if scores.shape[-2] >= h and scores.shape[-1] >= w and (scores.shape[-2], scores.shape[-1]) != (h, w):
        # at input resolution: the image sits top-left in the padded batch
        return scores[:, :h, :w]
    if tuple(scores.shape[-2:]) != (h, w):
        return F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return scores


def semantic_segments_from_scores(
    scores: Tensor, image_sizes: Sequence[Sequence[int]], categories: CategoryTable | None
) -> list[Segments]:
    """One semantic ``Segments`` per image from ``(B, C, h, w)`` class scores (logits or log
    probabilities): class = argmax, each segment's score = the mean softmax confidence of its
    pixels. Class index ``k`` is ``categories``' ``k``-th category (the index itself without one)."""
    if scores.ndim != 4 or len(image_sizes) != scores.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} do not fit {len(image_sizes)} image sizes")
    ids = np.asarray(categories.ids if categories is not None else range(scores.shape[1]), dtype=np.int64)
    if len(ids) != scores.shape[1]:
        raise ValueError(f"{scores.shape[1]} classes scored, {len(ids)} categories known")
    results = []
    for image_scores, size in zip(scores, image_sizes, strict=True):
        confidence, index = scores_to_image_size(image_scores, size).float().softmax(0).max(0)
        label = ids[index.cpu().numpy()]
        length = int(ids.max()) + 1
        sums = np.bincount(label.ravel(), weights=confidence.cpu().numpy().ravel(), minlength=length)
        counts = np.bincount(label.ravel(), minlength=length)
        results.append(
            Segments.from_semantic(
                label, categories=categories, ignore_index=None, scores=sums / np.maximum(counts, 1)
            )
        )
    return results
