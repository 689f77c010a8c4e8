"""What the box-based methods (RetinaNet, Mask R-CNN, Panoptic FPN) share around the network.

* pre-processing: resize so the short side is ``min_size`` (long side at most ``max_size``), pad
  the batch to a multiple of 32 -- exactly torchvision's ``GeneralizedRCNNTransform`` minus the
  normalisation, because omniseg models take normalised images;
* targets: from :class:`~omniseg.structures.Segments` (:func:`targets_from_segments`), checked
  and cleaned (:func:`clean_targets`) so that empty images, boxes outside the image and
  degenerate boxes train instead of crashing;
* post-processing: boxes back to each image's own size, 28x28 mask probabilities pasted into
  the image (:func:`paste_masks`, all masks at once), or straight to COCO RLE without ever
  holding one full-size mask per detection (:func:`mask_rles`);
* results as :class:`~omniseg.structures.Segments` (:func:`detections_to_segments`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import expand_boxes
from torchvision.models.detection.transform import resize_boxes

from omniseg.data.targets import finalize_target, training_target
from omniseg.structures import CategoryTable, Segments

__all__ = [
    "ImageList",
    "as_category_table",
    "as_image_list",
    "mask_crops",
    "resolve_num_classes",
    "clean_targets",
    "detection_segments",
    "detections_to_segments",
    "encode_detection_targets",
    "label_category_ids",
    "mask_rles",
    "paste_masks",
    "preprocess",
    "postprocess_boxes",
    "targets_from_segments",
]

Target = dict[str, Tensor]


# ------------------------------------------------------------------------------ categories
def as_category_table(categories: CategoryTable | Sequence[Mapping] | None) -> CategoryTable | None:
    """A ``CategoryTable`` from a table or its ``to_dicts()`` form (what a model config stores)."""
    if categories is None or isinstance(categories, CategoryTable):
        return categories
    return CategoryTable.from_dicts(categories)


def resolve_num_classes(num_classes: int | None, categories: CategoryTable | None) -> int:
    """torchvision's convention: ``num_classes`` counts the background (label 0)."""
    if categories is not None:
        expected = len(label_category_ids(categories)) + 1
        if num_classes is not None and num_classes != expected:
            raise ValueError(
                f"num_classes={num_classes} but the category table has {expected - 1} thing categories "
                f"(num_classes counts the background: expected {expected})"
            )
        return expected
    if num_classes is None:
        raise ValueError("give num_classes (including background) or categories")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    return num_classes


def label_category_ids(categories: CategoryTable) -> list[int]:
    """Category id of each contiguous label ``1..K`` (index ``label - 1``): the thing categories.

    A table with no category marked as a thing (e.g. built with ``from_names``) is taken to be
    all things, so a plain instance dataset works without flags.
    """
    things = categories.thing_ids
    return things if things else categories.ids


# ------------------------------------------------------------------------------- targets
def targets_from_segments(segments: Segments, categories: CategoryTable | None = None) -> Target:
    """Detection targets of one image from its ground-truth segments, exactly as training builds
    them (:func:`omniseg.data.targets.training_target`, then :func:`encode_detection_targets`).

    ``{"boxes": float32 (N, 4) xyxy, "labels": int64 (N,) in 1..K, "masks": bool (N, H, W)}``.
    Crowd segments and stuff are skipped; segments whose box is under 1 px wide or high (empty,
    or outside the image) are dropped.
    """
    categories = categories if categories is not None else segments.categories
    if categories is None:
        raise ValueError("targets_from_segments needs a CategoryTable (the segments carry none)")
    typed = finalize_target(training_target(segments, categories))
    target = encode_detection_targets([typed], categories, len(label_category_ids(categories)) + 1)[0]
    target.pop("semantic", None)
    return target


def encode_detection_targets(
    targets: Sequence[Mapping[str, Tensor]], categories: CategoryTable | None, num_classes: int
) -> list[Target]:
    """torchvision-style detection targets from omniseg's typed training targets
    (:func:`omniseg.data.targets.training_target`): the non-crowd things, labelled ``1..K`` in the
    order of :func:`label_category_ids`; boxes under 1 px wide or high dropped. Targets that
    already carry ``labels`` (torchvision style) pass through unchanged."""
    encoded = []
    for target in targets:
        if "labels" in target or "category_ids" not in target:
            encoded.append(dict(target))
            continue
        ids = target["category_ids"]
        if categories is not None:
            label_of = torch.zeros(max([*categories.ids, int(ids.max()) if len(ids) else 0]) + 1, dtype=torch.int64)
            label_of[torch.as_tensor(label_category_ids(categories))] = torch.arange(1, num_classes)
            labels = label_of[ids]
        else:
            labels = ids.clone()
        boxes = target["boxes"].float()
        keep = (labels > 0) & ~target["iscrowd"]
        keep &= ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        entry = {"boxes": boxes[keep], "labels": labels[keep], "masks": target["masks"][keep].bool()}
        if "has_mask" in target:  # box-only segments (Mask^X R-CNN's partial supervision)
            entry["has_mask"] = target["has_mask"][keep]
        if "semantic" in target:
            entry["semantic"] = target["semantic"]
        encoded.append(entry)
    return encoded


def detection_segments(
    outputs: Sequence[Mapping[str, Tensor]],
    image_sizes: Sequence[Sequence[int]],
    *,
    categories: CategoryTable | None,
    mask_threshold: float = 0.5,
    score_thresh: float | None = None,
) -> list[Segments]:
    """Instance ``Segments`` per image from raw detections (boxes at the image's own size), the
    detections scoring below ``score_thresh`` left out before any mask is pasted."""
    results = []
    for detection, size in zip(outputs, image_sizes, strict=True):
        if score_thresh is not None:
            keep = detection["scores"] >= score_thresh
            detection = {k: v[keep] if isinstance(v, Tensor) and len(v) == len(keep) else v for k, v in detection.items()}
        results.append(
            detections_to_segments(
                detection, (int(size[0]), int(size[1])), categories=categories, mask_threshold=mask_threshold
            )
        )
    return results


def clean_targets(
    targets: Sequence[Target],
    image_sizes: Sequence[tuple[int, int]],
    *,
    need_masks: bool = False,
    num_classes: int | None = None,
) -> list[Target]:
    """Checked copies of ``targets``: boxes clipped to the image, boxes under 1 px dropped.

    Raises ``ValueError`` naming the image for what cannot be repaired (wrong shapes or dtypes).
    """
    if len(targets) != len(image_sizes):
        raise ValueError(f"{len(targets)} targets for {len(image_sizes)} images")
    cleaned = []
    for i, (target, (h, w)) in enumerate(zip(targets, image_sizes, strict=True)):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"target {i}: needs 'boxes' and 'labels' (got {sorted(target)})")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"target {i}: {len(boxes)} boxes but {len(labels)} labels")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"target {i}: boxes contain NaN or inf")
        if len(labels) and (
            (labels < 1).any() or (num_classes is not None and (labels >= num_classes).any())
        ):
            top = "K" if num_classes is None else str(num_classes - 1)
            raise ValueError(
                f"target {i}: labels must be in 1..{top} (0 is background), got {labels.tolist()}"
            )
        out: Target = {}
        boxes = torch.stack(
            [
                boxes[:, 0].clamp(0, w),
                boxes[:, 1].clamp(0, h),
                boxes[:, 2].clamp(0, w),
                boxes[:, 3].clamp(0, h),
            ],
            1,
        )
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        out["boxes"], out["labels"] = boxes[keep], labels[keep]
        if "masks" in target or need_masks:
            if "masks" not in target:
                raise ValueError(f"target {i}: this model needs 'masks'")
            masks = torch.as_tensor(target["masks"])
            if masks.dim() != 3 or masks.shape[0] != len(labels) or tuple(masks.shape[1:]) != (h, w):
                raise ValueError(
                    f"target {i}: masks must be (N={len(labels)}, H={h}, W={w}), got {tuple(masks.shape)}"
                )
            out["masks"] = masks[keep].bool()
        for key, value in target.items():  # method-specific extras (e.g. Panoptic FPN's "semantic")
            if key not in out and key not in ("boxes", "labels", "masks"):
                out[key] = value
        cleaned.append(out)
    return cleaned


# ------------------------------------------------------------------------- pre-processing
def as_image_list(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """``(B, 3, H, W)`` batch or a list of ``(3, H, W)`` images -> list of images."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W) or a list of (3, H, W), got {tuple(images.shape)}")
        return list(images.unbind(0))
    images = list(images)
    if not images:
        raise ValueError("no images")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i}: expected a (3, H, W) tensor, got {shape}")
    return images


def _resize(
    image: Tensor, min_size: int | None, max_size: int, target: Target | None
) -> tuple[Tensor, Target | None]:
    """torchvision's ``_resize_image_and_masks`` (bilinear image, nearest masks), same arithmetic.
    ``min_size=None`` keeps the image's own size (the data pipeline chose the scale)."""
    h, w = image.shape[-2:]
    if min_size is None:
        return image, None if target is None else dict(target)
    scale = min(min_size / min(h, w), max_size / max(h, w))
    new_size = (math.floor(h * scale), math.floor(w * scale))
    if new_size != (h, w):
        image = F.interpolate(
            image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
        )[0]
    # else: at scale ~1 the recomputed factor is exactly 1 and interpolation is a copy; skip it
    if target is None:
        return image, None
    target = dict(target)
    if tuple(image.shape[-2:]) != (h, w):
        target["boxes"] = resize_boxes(target["boxes"], [h, w], list(image.shape[-2:]))
        if "masks" in target:
            masks = target["masks"]
            target["masks"] = (
                F.interpolate(masks[:, None].float(), scale_factor=scale, recompute_scale_factor=True)[:, 0]
                > 0.5
                if len(masks)
                else masks.new_zeros((0, *image.shape[-2:]))
            )
        if "semantic" in target:
            sem = target["semantic"]
            target["semantic"] = F.interpolate(
                sem[None, None].float(), size=image.shape[-2:], mode="nearest"
            )[0, 0].to(sem.dtype)
    return image, target


def preprocess(
    images: Tensor | Sequence[Tensor],
    targets: Sequence[Target] | None,
    *,
    min_size: int | Sequence[int] | None,
    max_size: int,
    size_divisible: int = 32,
    training: bool = False,
    need_masks: bool = False,
    num_classes: int | None = None,
) -> tuple[ImageList, list[Target] | None, list[tuple[int, int]]]:
    """Resize and pad a batch; returns ``(ImageList, resized targets, original sizes)``.

    In training a ``min_size`` sequence means multi-scale training (one size drawn per image, as
    torchvision does); in evaluation the last size is used. ``min_size=None`` resizes nothing:
    training crops keep the scale the data pipeline gave them and evaluation runs at the input's
    own resolution (e.g. Cityscapes frames at 1280x640).
    """
    image_list = as_image_list(images)
    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in image_list]
    if targets is not None:
        targets = clean_targets(targets, original_sizes, need_masks=need_masks, num_classes=num_classes)
    sizes = [min_size] if isinstance(min_size, int) or min_size is None else list(min_size)
    resized, new_targets = [], []
    for i, img in enumerate(image_list):
        if training and len(sizes) > 1:
            size = sizes[int(torch.empty(1).uniform_(0.0, float(len(sizes))).item())]
        else:
            size = sizes[-1]
        img, tgt = _resize(img, size, max_size, None if targets is None else targets[i])
        resized.append(img)
        new_targets.append(tgt)
    image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in resized]
    stride = float(size_divisible)
    pad_h = int(math.ceil(max(s[0] for s in image_sizes) / stride) * stride)
    pad_w = int(math.ceil(max(s[1] for s in image_sizes) / stride) * stride)
    if len(resized) == 1 and (pad_h, pad_w) == image_sizes[0]:
        batch = resized[0][None]
    else:
        # zero padding of normalised images = torchvision's padding after its normalisation
        batch = resized[0].new_zeros((len(resized), resized[0].shape[0], pad_h, pad_w))
        for i, img in enumerate(resized):
            batch[i, :, : img.shape[1], : img.shape[2]].copy_(img)
    return ImageList(batch, image_sizes), (new_targets if targets is not None else None), original_sizes


def postprocess_boxes(boxes: Tensor, image_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
    """Boxes from the resized image back to the original image (torchvision's ``resize_boxes``)."""
    if tuple(image_size) == tuple(original_size):
        return boxes
    return resize_boxes(boxes, list(image_size), list(original_size))


# ------------------------------------------------------------------------- mask pasting
def _paste_boxes(boxes: Tensor, mask_size: int, padding: int = 1) -> Tensor:
    """Integer boxes the padded masks are pasted into (torchvision's ``paste_masks_in_image``)."""
    scale = float(mask_size + 2 * padding) / mask_size
    return expand_boxes(boxes, scale).to(dtype=torch.int64)


def _resize_matrices(lo: Tensor, hi: Tensor, extent: int, source: int) -> Tensor:
    """``(N, extent, source)`` bilinear weights along one image axis.

    Row ``p`` of mask ``n`` holds the weights with which ``F.interpolate(mode="bilinear",
    align_corners=False)`` resizes a length-``source`` axis to ``hi - lo + 1`` samples, read at
    position ``p - lo``; rows outside ``[lo, hi]`` (and outside the image) are zero. A resize is
    separable, so ``Ry @ mask @ Rx^T`` is the resized mask pasted at its place.
    """
    n = lo.shape[0]
    pos = torch.arange(extent, device=lo.device)
    length = (hi - lo + 1).clamp(min=1)
    local = pos[None] - lo[:, None]
    inside = ((local >= 0) & (pos[None] <= hi[:, None])).float()
    # float32 throughout, as PyTorch's CPU kernel computes its source indices
    scale = torch.tensor(float(source), device=lo.device) / length.float()
    src = ((local.float() + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=source - 1)
    l1 = (src - i0.float()).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=source - 1)
    weights = torch.zeros((n, extent, source), device=lo.device)
    weights.scatter_add_(2, i0[..., None], ((1 - l1) * inside)[..., None])
    weights.scatter_add_(2, i1[..., None], (l1 * inside)[..., None])
    return weights


def _paste_setup(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Padded masks ``(N, M+2, M+2)``, integer boxes, and the row / column resize matrices."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    padded = F.pad(masks, (1, 1, 1, 1))
    ibox = _paste_boxes(boxes, masks.shape[-1])
    h, w = image_size
    rows = _resize_matrices(ibox[:, 1], ibox[:, 3], h, padded.shape[-2])
    cols = _resize_matrices(ibox[:, 0], ibox[:, 2], w, padded.shape[-1])
    return padded, ibox, rows, cols


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(N, 1, H, W)`` mask probabilities in the image, as torchvision's ``paste_masks_in_image``.

    torchvision resizes each mask, copies it into its own zeroed full-size canvas and stacks the
    canvases (three passes over N full-size images, in a Python loop). Here the output is zeroed
    once and each mask is resized straight into its box region: two small matrix products with
    the same bilinear weights F.interpolate uses.
    """
    h, w = image_size
    if len(masks) == 0:
        return masks.new_zeros((0, 1, h, w))
    padded, ibox, rows, cols = _paste_setup(masks, boxes, image_size)
    # every output value is written once: the box region by its mask, the rest with zeros
    out = masks.new_empty((len(masks), 1, h, w))
    for n, (x0, y0, x1, y1) in enumerate(ibox.tolist()):
        ya, yb, xa, xb = max(y0, 0), min(y1 + 1, h), max(x0, 0), min(x1 + 1, w)
        canvas = out[n, 0]
        if ya >= yb or xa >= xb:
            canvas.zero_()
            continue
        canvas[:ya].zero_()
        canvas[yb:].zero_()
        canvas[ya:yb, :xa].zero_()
        canvas[ya:yb, xb:].zero_()
        canvas[ya:yb, xa:xb] = rows[n, ya:yb] @ padded[n] @ cols[n, xa:xb].T
    return out


def mask_crops(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5
) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
    """Per detection ``(y0, y1, x0, x1, crop)``: the binary pasted mask inside its (clipped) paste box.

    Pixels outside the box are 0 by construction, so the crop is the whole mask; an empty crop
    (box outside the image) comes back with ``y0 == y1``.
    """
    if len(masks) == 0:
        return
    h, w = image_size
    padded, ibox, rows, cols = _paste_setup(masks, boxes, image_size)
    for n, (x0, y0, x1, y1) in enumerate(ibox.tolist()):
        ya, yb = max(y0, 0), min(y1 + 1, h)
        xa, xb = max(x0, 0), min(x1 + 1, w)
        if ya >= yb or xa >= xb:
            yield ya, ya, xa, xa, np.zeros((0, 0), dtype=bool)
            continue
        crop = rows[n, ya:yb] @ padded[n] @ cols[n, xa:xb].T
        yield ya, yb, xa, xb, (crop > threshold).cpu().numpy()


def mask_rles(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5
) -> list[dict]:
    """COCO RLEs of the pasted masks thresholded at ``threshold``, computed box by box.

    Memory is one ``H x W`` byte canvas, whatever the number of detections: each mask is resized
    inside its box only, written to the canvas, encoded and erased.
    """
    h, w = image_size
    canvas = np.zeros((h, w), dtype=np.uint8, order="F")
    rles = []
    for y0, y1, x0, x1, crop in mask_crops(masks, boxes, image_size, threshold):
        canvas[y0:y1, x0:x1] = crop
        rles.append(mask_utils.encode(canvas[:, :, None])[0])
        canvas[y0:y1, x0:x1] = 0
    return rles


# ----------------------------------------------------------------------------- results
def detections_to_segments(
    detection: dict[str, Tensor],
    image_size: tuple[int, int],
    *,
    categories: CategoryTable | None = None,
    mask_threshold: float = 0.5,
) -> Segments:
    """One image's detections (boxes/labels/scores and 28x28 ``mask_logits`` probabilities or
    pasted ``masks``) as instance :class:`Segments` (RLE storage) at ``image_size``.

    Without masks (RetinaNet), each segment is its filled box.
    """
    boxes, labels, scores = detection["boxes"], detection["labels"], detection["scores"]
    h, w = image_size
    if "mask_probs" in detection:
        rles = mask_rles(detection["mask_probs"], boxes, image_size, mask_threshold)
    elif "masks" in detection:
        masks = detection["masks"]
        masks = (masks[:, 0] if masks.dim() == 4 else masks) > mask_threshold
        rles = [
            mask_utils.encode(np.asfortranarray(m)[:, :, None].astype(np.uint8))[0]
            for m in masks.cpu().numpy()
        ]
    else:
        canvas = np.zeros((h, w), dtype=np.uint8, order="F")
        rles = []
        for x0, y0, x1, y1 in boxes.tolist():
            ya, yb, xa, xb = max(int(y0), 0), min(math.ceil(y1), h), max(int(x0), 0), min(math.ceil(x1), w)
            canvas[ya:yb, xa:xb] = 1
            rles.append(mask_utils.encode(canvas[:, :, None])[0])
            canvas[ya:yb, xa:xb] = 0
    label_list = labels.tolist()
    if categories is not None:
        ids = label_category_ids(categories)
        category_ids = [ids[label - 1] for label in label_list]
    else:
        category_ids = label_list
    return Segments(
        (h, w),
        np.asarray(category_ids, dtype=np.int64),
        categories=categories,
        scores=scores.detach().cpu().numpy(),
        rles=rles,
    )
