"""Mask classification results -> :class:`~omniseg.structures.Segments` (Mask2Former's inference).

A mask-classification model (MaskFormer, Mask2Former, OneFormer, MaX-DeepLab) predicts per image
``Q`` queries, each a class distribution ``class_logits (Q, C + 1)`` (the last class is "no
object") and a mask ``mask_logits (Q, h, w)``. One prediction serves all three tasks:

* semantic: pixel class = argmax over classes of ``sum_q softmax(class_q)[c] * sigmoid(mask_q)``;
* instance: the top-k (query, class) pairs by class probability, mask ``sigmoid > 0.5``, score =
  class probability x mean mask probability inside the mask;
* panoptic: the queries confidently predicting an object; each pixel goes to the query with the
  highest ``class probability x mask probability`` (void where that mask is below 0.5); queries
  left with less than ``overlap_thresh`` of their own mask are dropped; stuff queries of one
  class become one segment.

Mask logits are upsampled bilinearly to each image's size before the sigmoid, as Mask2Former does.
Class index ``k`` is ``categories``' ``k``-th category (the index itself without a table).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.structures import CategoryTable, Segments

__all__ = ["instance_inference", "panoptic_inference", "semantic_inference"]


def _check_inputs(
    class_logits: Tensor,
    mask_logits: Tensor,
    image_sizes: Sequence[Sequence[int]],
    categories: CategoryTable | None,
) -> None:
    if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"expected class logits (B, Q, C + 1) and mask logits (B, Q, h, w), got "
            f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )
    if len(image_sizes) != class_logits.shape[0]:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {class_logits.shape[0]}")
    if categories is not None and len(categories) != class_logits.shape[-1] - 1:
        raise ValueError(
            f"{class_logits.shape[-1] - 1} classes (plus no-object) predicted, {len(categories)} categories known"
        )


def _category_ids(categories: CategoryTable | None, num_classes: int) -> np.ndarray:
    return np.asarray(categories.ids if categories is not None else range(num_classes), dtype=np.int64)


def _upsampled(mask_logits: Tensor, image_size: Sequence[int]) -> Tensor:
    """``(N, h, w)`` mask logits bilinearly resized to ``image_size`` (float32)."""
    size = (int(image_size[0]), int(image_size[1]))
    mask_logits = mask_logits.float()
    if tuple(mask_logits.shape[-2:]) == size:
        return mask_logits
    return F.interpolate(mask_logits[None], size=size, mode="bilinear", align_corners=False)[0]


def semantic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    image_sizes: Sequence[Sequence[int]],
    *,
    categories: CategoryTable | None = None,
) -> list[Segments]:
    """One semantic ``Segments`` per image (MaskFormer's ``semantic_inference``).

    Each segment's score is the mean, over its pixels, of the winning class's share of the
    pixel's summed class scores (the class scores are not probabilities; their shares are).
    """
    _check_inputs(class_logits, mask_logits, image_sizes, categories)
    ids = _category_ids(categories, class_logits.shape[-1] - 1)
    results = []
    for image_class_logits, image_mask_logits, size in zip(
        class_logits, mask_logits, image_sizes, strict=True
    ):
        class_prob = image_class_logits.float().softmax(-1)[:, :-1]
        mask_prob = _upsampled(image_mask_logits, size).sigmoid()
        class_scores = torch.einsum("qc,qhw->chw", class_prob, mask_prob)
        best, index = class_scores.max(0)
        share = (best / class_scores.sum(0)).cpu().numpy().ravel()
        label = ids[index.cpu().numpy()]
        sums = np.bincount(label.ravel(), weights=share, minlength=int(ids.max()) + 1)
        counts = np.bincount(label.ravel(), minlength=int(ids.max()) + 1)
        results.append(
            Segments.from_semantic(
                label, categories=categories, ignore_index=None, scores=sums / np.maximum(counts, 1)
            )
        )
    return results


def instance_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    image_sizes: Sequence[Sequence[int]],
    *,
    categories: CategoryTable | None = None,
    top_k: int = 100,
    things_only: bool = False,
    score_thresh: float = 0.0,
) -> list[Segments]:
    """One instance ``Segments`` per image (Mask2Former's ``instance_inference``), highest score first.

    The ``top_k`` best (query, class) pairs by class probability, so one query may give several
    instances of different classes; ``things_only`` then keeps the thing classes (Mask2Former's
    instance output of a panoptic model). Instances scoring below ``score_thresh`` are dropped
    (with the default 0, all ``top_k`` are kept, empty masks included, as Mask2Former evaluates).
    """
    _check_inputs(class_logits, mask_logits, image_sizes, categories)
    num_classes = class_logits.shape[-1] - 1
    ids = _category_ids(categories, num_classes)
    is_thing = torch.tensor(
        [c.isthing for c in categories] if categories is not None else [True] * num_classes
    )
    results = []
    for image_class_logits, image_mask_logits, size in zip(
        class_logits, mask_logits, image_sizes, strict=True
    ):
        class_prob = image_class_logits.float().softmax(-1)[:, :-1]
        class_scores, pair = class_prob.flatten().topk(min(top_k, class_prob.numel()))
        query, label = pair // num_classes, pair % num_classes
        if things_only:
            thing = is_thing.to(label.device)[label]
            class_scores, query, label = class_scores[thing], query[thing], label[thing]
        if len(query) == 0:  # no thing class among the top pairs
            results.append(Segments.empty((int(size[0]), int(size[1])), categories=categories))
            continue
        logits = _upsampled(image_mask_logits[query], size)
        masks = logits > 0
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        scores = class_scores * mask_scores
        keep = torch.argsort(scores, descending=True, stable=True)
        keep = keep[scores[keep] >= score_thresh]
        results.append(
            Segments.from_masks(
                masks[keep].cpu().numpy(),
                ids[label[keep].cpu().numpy()],
                categories=categories,
                scores=scores[keep].cpu().numpy(),
            )
        )
    return results


def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    image_sizes: Sequence[Sequence[int]],
    *,
    categories: CategoryTable | None = None,
    object_mask_thresh: float = 0.8,
    overlap_thresh: float = 0.8,
) -> list[Segments]:
    """One panoptic ``Segments`` per image (Mask2Former's ``panoptic_inference``).

    Kept queries: class not "no object" and probability above ``object_mask_thresh``. A query
    keeps its segment when the pixels it wins (``argmax`` of probability x mask probability) are
    at least ``overlap_thresh`` of its own mask (mask probability >= 0.5) and it is left with a
    pixel whose mask probability is >= 0.5; only those pixels are its segment. Stuff queries of
    one class (``categories``' non-things; without a table every class is a thing) form one
    segment, scored and numbered after its first query. Segment ids are 1, 2, ... in query order.
    """
    _check_inputs(class_logits, mask_logits, image_sizes, categories)
    num_classes = class_logits.shape[-1] - 1
    ids = _category_ids(categories, num_classes)
    is_thing = np.array([c.isthing for c in categories] if categories is not None else [True] * num_classes)
    results = []
    for image_class_logits, image_mask_logits, size in zip(
        class_logits, mask_logits, image_sizes, strict=True
    ):
        scores, labels = image_class_logits.float().softmax(-1).max(-1)
        kept = (labels != num_classes) & (scores > object_mask_thresh)
        if not kept.any():
            results.append(Segments.empty((int(size[0]), int(size[1])), categories=categories))
            continue
        scores, labels = scores[kept], labels[kept]
        mask_prob = _upsampled(image_mask_logits[kept], size).sigmoid()
        owner = (scores[:, None, None] * mask_prob).argmax(0)  # the query each pixel goes to
        covered = mask_prob.gather(0, owner[None])[0] >= 0.5  # ... and whether its mask covers it
        n = len(scores)
        won_area = torch.bincount(owner.flatten(), minlength=n).double()
        mask_area = (mask_prob >= 0.5).flatten(1).sum(1).double()
        covered_area = torch.bincount(owner[covered], minlength=n)
        valid = (won_area > 0) & (mask_area > 0) & (covered_area > 0)
        valid &= won_area / mask_area.clamp_min(1) >= overlap_thresh
        queries = valid.nonzero()[:, 0].cpu().numpy()
        labels_np, scores_np = labels.cpu().numpy(), scores.cpu().numpy()
        # one segment per thing query, one per stuff class; numbered in order of first query
        key = np.where(is_thing[labels_np[queries]], num_classes + queries, labels_np[queries])
        _, first, segment = np.unique(key, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first)] = np.arange(len(first))
        segment_of_query = np.zeros(n, dtype=np.int32)
        segment_of_query[queries] = rank[segment.reshape(-1)] + 1
        lookup = torch.from_numpy(segment_of_query).to(owner.device)
        id_map = torch.where(covered, lookup[owner], 0).cpu().numpy()
        leaders = queries[np.sort(first)]  # each segment's first query, in segment-id order
        results.append(
            Segments(
                (int(size[0]), int(size[1])),
                ids[labels_np[leaders]],
                categories=categories,
                scores=scores_np[leaders],
                segment_ids=np.arange(1, len(leaders) + 1),
                id_map=id_map,
            )
        )
    return results
