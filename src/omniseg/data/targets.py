"""Typed training targets: one structure per image, derived once from its ground-truth ``Segments``
and moved through torchvision transforms v2 together with the image.

The target is a dict of tv_tensors, so every v2 transform (scale, crop, flip, colour) applies to
every task's targets alike:

* ``"semantic"``: :class:`SemanticMap` ``(H, W) int64``, the contiguous class index of each pixel
  (class ``k`` = the dataset's ``k``-th category), ``ignore_index`` where unlabelled;
* ``"masks"``: ``tv_tensors.Mask (K, H, W) uint8``, one per segment (things and stuff, crowd
  included and flagged); ``"boxes"``: ``tv_tensors.BoundingBoxes (K, 4)`` XYXY;
  ``"category_ids"`` ``(K,) int64``, ``"iscrowd"`` ``(K,) bool``; ``"has_mask"`` ``(K,) bool``
  where some segments are labelled by a box only (their mask is the filled box).

A panoptic annotation thus gives the semantic, instance and panoptic targets at once (OneFormer's
point). What one method makes of them -- labels 1..K, heatmaps, anchors, matching -- happens in
that method's own file; this module imports no model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from omniseg.structures import CategoryTable, Segments

__all__ = ["SEGMENT_FIELDS", "SemanticMap", "finalize_target", "training_target"]

SEGMENT_FIELDS = ("masks", "boxes", "category_ids", "iscrowd")


class SemanticMap(tv_tensors.Mask):
    """A per-pixel class-index map. Its own type so that transforms v2 pad it with the ignore index
    (``fill={SemanticMap: 255}``) while instance masks are padded with 0."""


def training_target(
    segments: Segments,
    categories: CategoryTable,
    *,
    with_segments: bool = True,
    ignore_index: int = 255,
    box_only: np.ndarray | None = None,
) -> dict[str, Tensor]:
    """The typed target of one image (see the module docstring); ``with_segments=False`` leaves out
    the per-segment masks for models that learn from the semantic map alone. ``box_only`` (one
    bool per segment, :attr:`Sample.box_only`) adds ``has_mask``: False where a segment's mask is
    only its box, which mask losses leave out."""
    if len(categories) > ignore_index:
        raise ValueError(f"{len(categories)} categories do not fit below the ignore index {ignore_index}")
    lookup = categories.id_lookup(fill=ignore_index)
    ids = segments.to_semantic(void_value=-1)
    known = (ids >= 0) & (ids < len(lookup))
    semantic = np.full(ids.shape, ignore_index, dtype=np.int64)
    semantic[known] = lookup[ids[known]]
    target: dict[str, Tensor] = {"semantic": SemanticMap(torch.from_numpy(semantic))}
    if with_segments:
        h, w = segments.image_size
        masks = segments.masks() if len(segments) else np.zeros((0, h, w), dtype=bool)
        target["masks"] = tv_tensors.Mask(torch.from_numpy(masks.view(np.uint8)))
        target["boxes"] = tv_tensors.BoundingBoxes(
            torch.from_numpy(segments.boxes()).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        )
        target["category_ids"] = torch.as_tensor(segments.category_ids, dtype=torch.int64)
        target["iscrowd"] = torch.as_tensor(segments.iscrowd, dtype=torch.bool)
        if box_only is not None:
            if len(box_only) != len(segments):
                raise ValueError(f"box_only has {len(box_only)} flags for {len(segments)} segments")
            target["has_mask"] = torch.from_numpy(~np.asarray(box_only, dtype=bool))
    return target


def finalize_target(target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """After the transforms: plain tensors, boolean masks, boxes tight around the transformed masks
    (x2/y2 exclusive, as :meth:`Segments.boxes`), and segments cropped away entirely dropped."""
    out = {key: value.as_subclass(Tensor) if isinstance(value, Tensor) else value for key, value in target.items()}
    if "masks" not in out:
        return out
    masks = out["masks"].bool()
    keep = masks.flatten(1).any(1)
    masks = masks[keep]
    boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]) if len(masks) else torch.zeros((0, 4))
    out.update(
        masks=masks,
        boxes=boxes.float(),
        category_ids=out["category_ids"][keep],
        iscrowd=out["iscrowd"][keep],
    )
    if "has_mask" in out:
        out["has_mask"] = out["has_mask"][keep]
    return out

