"""Panoptic FPN (Kirillov et al. 2019): Mask R-CNN plus a semantic FPN branch for stuff, merged.

    FPN P2-P5 -> Mask R-CNN (things)
             -> semantic branch: each level brought to 1/4 scale by conv-GN-ReLU (+ 2x bilinear
                upsample) stages -- 1 stage for P2 and P3, 2 for P4, 3 for P5 -- summed, 1x1
                classifier over the stuff classes plus one "things" class (index 0), 4x upsample
    merge: instances by descending score (score >= ``instance_score_thresh``), each dropped if
           more than ``overlap_thresh`` of it is already taken, else it takes its free pixels;
           then each stuff class takes the still free pixels it wins, if at least
           ``stuff_area_thresh`` of them (Detectron2's ``combine_semantic_and_instance_outputs``).

Semantic targets derive from the same panoptic ground truth (:func:`panoptic_targets_from_segments`):
stuff category ``k`` -> class ``k + 1`` in the category table's stuff order, every thing -> 0,
unlabelled -> ``ignore_index``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.data.targets import training_target
from omniseg.inference import validate_task
from omniseg.losses import semantic_cross_entropy
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.detection import (
    as_category_table,
    as_image_list,
    encode_detection_targets,
    paste_masks,
    targets_from_segments,
)
from omniseg.models.layers.fast_inference import to_fast_convs
from omniseg.models.layers.panoptic_merge import panoptic_merge
from omniseg.models.mask_rcnn import MaskRCNN
from omniseg.structures import CategoryTable, Segments

__all__ = [
    "PanopticFPN",
    "SemanticFPNHead",
    "panoptic_fpn",
    "panoptic_merge",
    "panoptic_targets_from_segments",
]


class SemanticFPNHead(nn.Module):
    """Detectron2's ``SemSegFPNHead``: per-level conv-GN-ReLU (+2x up) stacks to stride 4, summed."""

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 256,
        channels: int = 128,
        strides: Sequence[int] = (4, 8, 16, 32),
        common_stride: int = 4,
        groups: int = 32,
    ) -> None:
        super().__init__()
        self.common_stride = common_stride
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            stages: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride) - math.log2(common_stride)))):
                conv = nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                stages += [conv, nn.GroupNorm(math.gcd(groups, channels), channels), nn.ReLU(inplace=True)]
                if stride != common_stride:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*stages))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)
        to_fast_convs(self)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Logits at the input (padded batch) resolution."""
        x = self.scale_heads[0](features[0])
        for head, feature in zip(self.scale_heads[1:], features[1:], strict=True):
            x = x + head(feature)
        logits = self.predictor(x)
        return F.interpolate(logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False)


def semantic_classes(categories: CategoryTable, ignore_index: int = 255) -> Tensor:
    """Lookup from a typed target's class index (the table's order) to this model's semantic class:
    stuff ``k`` -> ``k + 1`` in the table's stuff order, every thing -> 0, ignore stays ignore."""
    stuff = {cid: k + 1 for k, cid in enumerate(categories.stuff_ids)}
    lut = torch.full((256,), ignore_index, dtype=torch.int64)
    lut[: len(categories)] = torch.tensor([stuff.get(cid, 0) for cid in categories.ids])
    return lut


def panoptic_targets_from_segments(
    segments: Segments, categories: CategoryTable | None = None, *, ignore_index: int = 255
) -> dict[str, Tensor]:
    """Mask R-CNN targets of the non-crowd things plus ``"semantic"``, from panoptic ground truth."""
    categories = categories if categories is not None else segments.categories
    if categories is None or not categories.thing_ids:
        raise ValueError("panoptic targets need a CategoryTable that marks thing and stuff categories")
    target = targets_from_segments(segments, categories)
    semantic = training_target(segments, categories, with_segments=False, ignore_index=ignore_index)["semantic"]
    target["semantic"] = semantic_classes(categories, ignore_index)[semantic.as_subclass(Tensor)]
    return target


class PanopticFPN(MaskRCNN):
    """Mask R-CNN + semantic FPN branch. One model, three tasks: :meth:`post_process` gives the
    panoptic merge, the instances alone, or the semantic view of the merge."""

    tasks: tuple[str, ...] = ("panoptic", "instance", "semantic")

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        num_stuff_classes: int,
        categories: CategoryTable | None = None,
        semantic_channels: int = 128,
        semantic_loss_weight: float = 0.5,
        ignore_index: int = 255,
        overlap_thresh: float = 0.5,
        stuff_area_thresh: int = 4096,
        instance_score_thresh: float = 0.5,
        **mask_rcnn_kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, categories=categories, **mask_rcnn_kwargs)
        # stuff classes + one class for all things (index 0)
        self.semantic_head = SemanticFPNHead(
            num_stuff_classes + 1, in_channels=mask_rcnn_kwargs.get("fpn_channels", 256), channels=semantic_channels
        )
        self.num_stuff_classes = num_stuff_classes
        self.semantic_loss_weight = semantic_loss_weight
        self.ignore_index = ignore_index
        self.overlap_thresh = overlap_thresh
        self.stuff_area_thresh = stuff_area_thresh
        self.instance_score_thresh = instance_score_thresh

    def _ids(self) -> tuple[list[int], list[int]]:
        if self.categories is not None:
            return self.categories.thing_ids, self.categories.stuff_ids
        return list(range(1, self.num_classes)), list(
            range(self.num_classes, self.num_classes + self.num_stuff_classes)
        )

    def losses(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Mask R-CNN losses plus ``loss_semantic`` (cross-entropy over stuff + "things")."""
        for i, (image, target) in enumerate(zip(as_image_list(images), targets, strict=True)):
            if "semantic" not in target:
                raise ValueError(
                    f"target {i}: Panoptic FPN needs 'semantic' (see panoptic_targets_from_segments)"
                )
            if tuple(target["semantic"].shape) != tuple(image.shape[-2:]):
                raise ValueError(
                    f"target {i}: semantic map {tuple(target['semantic'].shape)} does not match the image "
                    f"{tuple(image.shape[-2:])}"
                )
        batch, targets, features = self._training_features(images, targets)
        losses = self._detector_losses(batch, targets, features)
        logits = self.semantic_head(list(features.values())[:4])
        semantic = logits.new_full(logits.shape[:1] + logits.shape[2:], self.ignore_index, dtype=torch.int64)
        for i, target in enumerate(targets):
            sem = torch.as_tensor(target["semantic"], dtype=torch.int64)
            semantic[i, : sem.shape[0], : sem.shape[1]] = sem
        loss = semantic_cross_entropy(logits, semantic, ignore_index=self.ignore_index)
        return {**losses, "loss_semantic": self.semantic_loss_weight * loss}

    def _panoptic_inference(
        self, images: Tensor | Sequence[Tensor]
    ) -> tuple[list[dict[str, Tensor]], list[Tensor], list[tuple[int, int]]]:
        """Instance detections (boxes at original size, 28x28 mask probs) and semantic softmax."""
        detections, batch, features, original_sizes = self._detections(images)
        logits = self.semantic_head(list(features.values())[:4])
        probs = []
        for i, (size, original) in enumerate(zip(batch.image_sizes, original_sizes, strict=True)):
            crop = logits[i : i + 1, :, : size[0], : size[1]]
            if tuple(size) != tuple(original):
                crop = F.interpolate(crop, size=original, mode="bilinear", align_corners=False)
            probs.append(crop[0].softmax(0))
        return detections, probs, original_sizes

    def forward(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: losses. Evaluation: raw outputs per image -- Mask R-CNN's detections plus
        ``semantic_probs`` ``(1 + num_stuff, H, W)`` at the image's own size."""
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (see omniseg.data.targets.training_target)")
            return self.losses(images, self.encode_targets(targets))
        with torch.no_grad():
            detections, probs, _ = self._panoptic_inference(images)
        for det, prob in zip(detections, probs, strict=True):
            det["semantic_probs"] = prob
        return detections

    def encode_targets(self, targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Mask R-CNN targets of the things plus this model's semantic classes (stuff ``k`` ->
        ``k + 1``, every thing -> 0) from typed training targets; encoded targets pass through."""
        encoded = encode_detection_targets(targets, self.categories, self.num_classes)
        if self.categories is None:
            return encoded
        lut = semantic_classes(self.categories, self.ignore_index)
        for raw, target in zip(targets, encoded, strict=True):
            if "category_ids" in raw and "labels" not in raw:
                target["semantic"] = lut[raw["semantic"].long().clamp(0, 255)]
        return encoded

    def post_process(
        self,
        outputs: list[dict[str, Tensor]],
        image_sizes: Sequence[Sequence[int]],
        *,
        task: str = "panoptic",
        score_thresh: float | None = None,
    ) -> list[Segments]:
        """``panoptic``: the merge (its own thresholds apply, ``score_thresh`` does not);
        ``instance``: the detections; ``semantic``: the category of each pixel of the merge."""
        validate_task(self, task)
        if task == "instance":
            return super().post_process(outputs, image_sizes, task=task, score_thresh=score_thresh)
        thing_ids, stuff_ids = self._ids()
        merged = [
            panoptic_merge(
                det,
                det["semantic_probs"],
                (int(size[0]), int(size[1])),
                thing_ids=thing_ids,
                stuff_ids=stuff_ids,
                categories=self.categories,
                overlap_thresh=self.overlap_thresh,
                stuff_area_thresh=self.stuff_area_thresh,
                instance_score_thresh=self.instance_score_thresh,
                mask_threshold=self.mask_threshold,
            )
            for det, size in zip(outputs, image_sizes, strict=True)
        ]
        if task == "panoptic":
            return merged
        void = max([*thing_ids, *stuff_ids]) + 1
        return [
            Segments.from_semantic(seg.to_semantic(void_value=void), categories=self.categories, ignore_index=void)
            for seg in merged
        ]

    @torch.no_grad()
    def detect(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Mask R-CNN's torchvision-style dicts plus ``semantic_probs`` ``(1 + num_stuff, H, W)``."""
        was_training = self.training
        self.eval()
        try:
            detections, probs, sizes = self._panoptic_inference(images)
        finally:
            self.train(was_training)
        for det, prob, size in zip(detections, probs, sizes, strict=True):
            det["masks"] = paste_masks(det.pop("mask_probs"), det["boxes"], size)
            det["semantic_probs"] = prob
        return detections


@register_model("panoptic_fpn")
def panoptic_fpn(
    *,
    categories: CategoryTable | Sequence[Mapping] | None = None,
    num_classes: int | None = None,
    num_stuff_classes: int | None = None,
    backbone: str = "resnet50",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> PanopticFPN:
    """Panoptic FPN on ``backbone``. With ``categories`` (thing/stuff flags set) the class counts
    follow from it and results carry COCO-style category ids; otherwise give ``num_classes``
    (things + background) and ``num_stuff_classes``. ``kwargs`` go to :class:`PanopticFPN` and on to :class:`MaskRCNN`."""
    table = as_category_table(categories)
    if table is not None:
        if not table.thing_ids or not table.stuff_ids:
            raise ValueError("panoptic_fpn needs a category table with both thing and stuff categories")
        things, stuff = len(table.thing_ids) + 1, len(table.stuff_ids)
        if (num_classes not in (None, things)) or (num_stuff_classes not in (None, stuff)):
            raise ValueError(
                f"num_classes={num_classes}/num_stuff_classes={num_stuff_classes} disagree with the category "
                f"table ({things - 1} things + background, {stuff} stuff)"
            )
        num_classes, num_stuff_classes = things, stuff
    if num_classes is None or num_stuff_classes is None:
        raise ValueError("give categories, or num_classes (things + background) and num_stuff_classes")
    return PanopticFPN(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=num_classes,
        num_stuff_classes=num_stuff_classes,
        categories=table,
        **kwargs,
    )
