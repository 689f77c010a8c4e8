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

__all__ = ["mask_id_panoptic_inference", "merge_mask_id_views", "max_over_slots", "panoptic_to_task", "upsampled_mask_id"]


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
        n = len(confidence)
        top_slot, owner, prob = upsampled_mask_id(
            image_mask_logits.float(), size, None if bool(kept.all()) else kept.nonzero().squeeze(1)
        )
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


def bilinear_row_weights(source: int, target: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``(lower, upper, upper_weight)`` that bilinear resizing (``align_corners=False``) of
    ``source`` rows to ``target`` blends for each output row: PyTorch's own source-index rule."""
    scale = source / target
    position = ((torch.arange(target, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    lower = position.long().clamp_max(source - 1)
    upper = (lower + 1).clamp_max(source - 1)
    return lower, upper, position - lower


def max_over_slots(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x.max(1)`` of a ``(b, N, W)`` band — the maxima and the first slot that holds each — in
    a third of its time on CPU: ``amax`` is vectorised where max-with-index is not, and the first
    slot equal to the maximum (``x == max`` exactly where ``x`` is a maximum) is found as the
    largest of descending uint8 ranks on those slots."""
    n = x.shape[1]
    top = x.amax(1)
    if n > 255 or not x.is_floating_point():  # ranks must fit in uint8
        return top, x.argmax(1)
    ranks = torch.arange(n, 0, -1, dtype=torch.uint8, device=x.device).view(1, n, 1)
    first = (x == top[:, None]).view(torch.uint8).mul_(ranks).amax(1)
    # no slot equals a NaN maximum: give it the last slot rather than an index out of range
    return top, (n - first.long()).clamp_(max=n - 1)


def upsampled_mask_id(
    mask_logits: Tensor, size: tuple[int, int], kept_slots: Tensor | None = None, band_rows: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-pixel mask-ID reductions of ``mask_logits (N, h, w)`` resized bilinearly to ``size``:
    ``(top_slot, owner, prob)`` — each pixel's best slot among all, its best among ``kept_slots``
    (all when None) and that slot's mask-ID probability (softmax over all N slots).

    Equal to resizing the N maps to full size and reducing them, but the full-size ``(N, H, W)``
    stack (100 x 640 x 1280 floats: 330 MB, written and read three times) never exists: columns are
    resized once at stride-4 height, then bands of ``band_rows`` output rows are blended from their
    two source rows and reduced while they are still in cache (written by hand because no library op
    fuses a resize with a reduction over channels)."""
    height, width = size
    n, h, _ = mask_logits.shape
    # columns resized by 1-D linear interpolation of the rows laid out (h, N, w): the same weights as
    # the 2-D resize's horizontal pass, and a band's source rows are then whole contiguous blocks
    columns = F.interpolate(mask_logits.transpose(0, 1).contiguous(), size=width, mode="linear", align_corners=False)
    lower, upper, weight = bilinear_row_weights(h, height, mask_logits.device)
    top_slot = torch.empty((height, width), dtype=torch.long, device=mask_logits.device)
    owner = top_slot if kept_slots is None else torch.empty_like(top_slot)
    prob = torch.empty((height, width), dtype=mask_logits.dtype, device=mask_logits.device)
    band = columns.new_empty((band_rows, n, width))
    upper_rows = torch.empty_like(band)
    for start in range(0, height, band_rows):
        rows = slice(start, min(start + band_rows, height))
        b = rows.stop - rows.start
        t = weight[rows, None, None]
        blend = torch.index_select(columns, 0, lower[rows], out=band[:b]).mul_(1 - t)
        blend.addcmul_(torch.index_select(columns, 0, upper[rows], out=upper_rows[:b]), t.expand_as(blend))
        top, top_slot[rows] = max_over_slots(blend)
        if kept_slots is None:
            best = top.clone()
        else:
            best, index = max_over_slots(blend.index_select(1, kept_slots))
            owner[rows] = kept_slots[index]
        # softmax's denominator, shifted by the maximum; below -80 a term is < 2e-35 of the top's (no
        # float32 sum can notice) and its exp would be subnormal, which costs x86 ten times a normal one
        total = blend.sub_(top[:, None]).clamp_(min=-80.0).exp_().sum(1)
        torch.div(best.sub_(top).clamp_(min=-80.0).exp_(), total, out=prob[rows])
    return top_slot, owner, prob


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
