"""Mask-ID results -> :class:`~omniseg.structures.Segments` (deeplab2's MaX-DeepLab and kMaX-DeepLab
post-processors).

A mask-ID model predicts per image ``N`` slots, each a class distribution ``class_logits (N, K + 1)``
(last = no object) and mask logits ``(N, h, w)`` whose softmax over the slots gives every pixel a
distribution over slots. Panoptic result:

1. a slot's class is its best real class (no-object excluded), its confidence that probability;
   slots whose confidence is below ``thing_thresh`` (thing classes) / ``stuff_thresh`` (stuff) are
   dropped (MaX-DeepLab: 0.7 for both; kMaX-DeepLab: 0.7 / 0.5);
2. each pixel goes to the kept slot of highest mask-ID probability (logits resized bilinearly to
   the image first, as deeplab2); pixels where that probability is below ``pixel_thresh`` are void
   (MaX-DeepLab: 0.4);
3. kMaX's mask-wise merge: a kept slot that is left with less than ``overlap_thresh`` of the pixels
   it would own among all slots (its argmax mask) is dropped, its pixels void (kMaX: 0.8; 0 turns
   the check off);
4. stuff slots of one class are one segment; segments smaller than ``thing_area_limit`` /
   ``stuff_area_limit`` pixels are void.

Scores: the class confidence (``mask_score=True``: times the mean mask-ID probability over the
segment's pixels, kMaX's ranking score). The semantic view is the panoptic result's category map
(void stays void), the instance view its thing segments. Segment ids are 1, 2, ... in slot order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.structures import CategoryTable, Segments

__all__ = ["mask_id_panoptic_inference", "merge_mask_id_views", "panoptic_to_task"]


def mask_id_panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    image_sizes: Sequence[Sequence[int]],
    *,
    categories: CategoryTable | None = None,
    thing_thresh: float = 0.7,
    stuff_thresh: float = 0.7,
    pixel_thresh: float = 0.4,
    overlap_thresh: float = 0.0,
    thing_area_limit: int = 0,
    stuff_area_limit: int = 0,
    mask_score: bool = False,
) -> list[Segments]:
    """One panoptic ``Segments`` per image (see the module docstring); ``class_logits (B, N, K + 1)``,
    ``mask_logits (B, N, h, w)``. Without ``categories`` every class is a thing, ids are indices."""
    if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"expected class logits (B, N, K + 1) and mask logits (B, N, h, w), got "
            f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )
    if len(image_sizes) != class_logits.shape[0]:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {class_logits.shape[0]}")
    num_classes = class_logits.shape[-1] - 1
    if categories is not None and len(categories) != num_classes:
        raise ValueError(f"{num_classes} classes predicted, {len(categories)} categories known")
    ids = np.asarray(categories.ids if categories is not None else range(num_classes), dtype=np.int64)
    is_thing = torch.tensor(
        [c.isthing for c in categories] if categories is not None else [True] * num_classes
    )
    results = []
    for image_class_logits, image_mask_logits, size in zip(
        class_logits, mask_logits, image_sizes, strict=True
    ):
        size = (int(size[0]), int(size[1]))
        confidence, label = image_class_logits.float().softmax(-1)[:, :-1].max(-1)
        thing = is_thing.to(label.device)[label]
        kept = confidence >= torch.where(thing, thing_thresh, stuff_thresh)
        if not kept.any():
            results.append(Segments.empty(size, categories=categories))
            continue
        logits = F.interpolate(
            image_mask_logits[None].float(), size=size, mode="bilinear", align_corners=False
        )[0]
        n = len(confidence)
        mask_prob = logits.softmax(0)  # over all N slots
        # one pass over all slots gives kMaX's argmax masks; the kept slots' best only needs another
        # when some slots were dropped, and then over those kept alone (no masked (N, H, W) copy)
        top_prob, top_slot = mask_prob.max(0)
        if bool(kept.all()):
            prob, owner = top_prob, top_slot
        else:
            kept_slots = kept.nonzero().squeeze(1)
            prob, best = mask_prob.index_select(0, kept_slots).max(0)
            owner = kept_slots[best]
        owned = prob >= pixel_thresh
        won = torch.bincount(owner[owned], minlength=n)
        if overlap_thresh > 0:  # kMaX: a slot must keep most of its own argmax mask
            original = torch.bincount(top_slot.flatten(), minlength=n)
            survives = won >= overlap_thresh * original.clamp_min(1)
            owned &= survives[owner]
            won = torch.bincount(owner[owned], minlength=n)
        # segments: one per thing slot, one per stuff class (keyed by class index below num_classes)
        key = torch.where(thing, num_classes + torch.arange(n, device=label.device), label)
        area = torch.zeros(num_classes + n, dtype=won.dtype, device=won.device).index_add_(0, key, won)
        limit = torch.where(thing, thing_area_limit, stuff_area_limit)
        big = area[key] >= limit.clamp_min(1)
        owned &= big[owner]
        slot_of_pixel = torch.where(owned, owner, -1).cpu().numpy()
        present = np.flatnonzero(np.bincount(slot_of_pixel[slot_of_pixel >= 0], minlength=n))
        if len(present) == 0:
            results.append(Segments.empty(size, categories=categories))
            continue
        key_np = key.cpu().numpy()
        unique_keys, first, segment = np.unique(key_np[present], return_index=True, return_inverse=True)
        rank = np.empty(len(unique_keys), dtype=np.int64)
        rank[np.argsort(first)] = np.arange(len(unique_keys))  # number segments in order of first slot
        segment_of_slot = np.zeros(n + 1, dtype=np.int32)  # index n: void
        segment_of_slot[present] = rank[segment.reshape(-1)] + 1
        id_map = segment_of_slot[np.where(slot_of_pixel >= 0, slot_of_pixel, n)]
        leaders = present[np.sort(first)]  # each segment's first slot, in segment-id order
        scores = confidence.cpu().numpy()
        if mask_score:
            sums = np.bincount(id_map.ravel(), weights=prob.cpu().numpy().ravel(), minlength=len(leaders) + 1)
            counts = np.bincount(id_map.ravel(), minlength=len(leaders) + 1)
            segment_scores = scores[leaders] * sums[1:] / np.maximum(counts[1:], 1)
        else:
            segment_scores = scores[leaders]
        results.append(
            Segments(
                size,
                ids[label.cpu().numpy()[leaders]],
                categories=categories,
                scores=segment_scores,
                segment_ids=np.arange(1, len(leaders) + 1),
                id_map=id_map,
            )
        )
    return results


def panoptic_to_task(panoptic: Sequence[Segments], task: str) -> list[Segments]:
    """The ``task`` view of panoptic results: themselves, their thing segments (``instance``) or
    their category map (``semantic``, one segment per category, void kept void)."""
    if task == "panoptic":
        return list(panoptic)
    if task == "instance":
        return [segments.things() for segments in panoptic]
    if task != "semantic":
        raise ValueError(f"unknown task {task!r}")
    results = []
    for segments in panoptic:
        void = int(max(segments.categories.ids if segments.categories is not None else [0], default=0)) + 1
        void = max(void, int(segments.category_ids.max(initial=0)) + 1)
        label = segments.to_semantic(void_value=void)
        results.append(Segments.from_semantic(label, categories=segments.categories, ignore_index=void))
    return results


def merge_mask_id_views(
    views: Sequence[tuple[Mapping[str, Tensor], float, bool]], size: Sequence[int]
) -> dict[str, Tensor]:
    """Test-time views ``[(outputs, scale, flipped)]`` of a mask-ID model merged into one output.

    The slots are the same learned memory in every view, so slot ``n`` of one view is slot ``n`` of
    another: class probabilities are averaged per slot, mask-ID probabilities (softmax over slots)
    per slot and pixel after un-flipping and resizing each view to stride 4 of ``size``; both are
    returned as log-probabilities, whose softmax gives the averages back.
    """
    if not views:
        raise ValueError("no test-time views to merge")
    stride4 = (max(1, -(-int(size[0]) // 4)), max(1, -(-int(size[1]) // 4)))
    class_prob = mask_prob = None
    for outputs, _, flipped in views:
        logits = outputs["mask_logits"].float()
        logits = logits.flip(-1) if flipped else logits
        logits = F.interpolate(logits, size=stride4, mode="bilinear", align_corners=False)
        view_class, view_mask = outputs["class_logits"].float().softmax(-1), logits.softmax(1)
        class_prob = view_class if class_prob is None else class_prob + view_class
        mask_prob = view_mask if mask_prob is None else mask_prob + view_mask
    return {"class_logits": (class_prob / len(views)).log(), "mask_logits": (mask_prob / len(views)).log()}
