"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection") on any omniseg backbone.

    images -> resize / pad -> backbone C3-C5 -> FPN P3-P5 + P6/P7 (3x3 stride-2 convs)
           -> per level: classification subnet (4 convs + 3x3 conv to A*K sigmoid logits)
                         box subnet (4 convs + 3x3 conv to A*4 deltas), A = 3 scales x 3 ratios
           -> per level: score threshold, top-k, decode -> per-class NMS (``batched_nms``)

Training: anchors with IoU >= 0.5 to a ground-truth box are positives, < 0.4 negatives, the rest
ignored (plus each box's best anchors, so no box goes unmatched); the sigmoid focal loss (alpha 0.25,
gamma 2) over all non-ignored anchors and the box loss (L1, smooth L1 or GIoU) over the positives are
both normalised by the number of positives.

The heads are torchvision's ``RetinaNetHead`` modules, so ``torchvision_import.load_torchvision_retinanet``
loads a ``retinanet_resnet50_fpn`` checkpoint by renaming the backbone keys only. ``num_classes``
follows torchvision: it is the number of logit channels and label 0 is never a detection class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import (
    batched_nms,
    box_iou,
    clip_boxes_to_image,
    generalized_box_iou_loss,
)

from omniseg.inference import validate_task
from omniseg.losses import sigmoid_focal_loss
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.detection import (
    as_category_table,
    detection_segments,
    encode_detection_targets,
    postprocess_boxes,
    preprocess,
    resolve_num_classes,
)
from omniseg.models.layers.fast_inference import (
    InferenceCopy,
    freeze_batchnorms,
    to_fast_convs,
)
from omniseg.models.layers.fpn import FPN
from omniseg.optimize import inference_defaults
from omniseg.structures import CategoryTable, Segments

__all__ = ["BOX_LOSSES", "RetinaNet", "retinanet"]

BOX_LOSSES = ("l1", "smooth_l1", "giou")


def anchor_generator(
    sizes: Sequence[int], aspect_ratios: Sequence[float], scales_per_octave: int
) -> AnchorGenerator:
    """``scales_per_octave`` sizes per level (x 2^(i/n)), truncated to int as torchvision does."""
    per_level = tuple(
        tuple(int(s * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave)) for s in sizes
    )
    return AnchorGenerator(per_level, (tuple(aspect_ratios),) * len(sizes))


class RetinaNet(nn.Module):
    """RetinaNet. ``forward(images, targets)`` -> losses; ``forward(images)`` -> ``list[Segments]``
    (each detection a box-shaped segment); :meth:`detect` -> torchvision-style dicts."""

    tasks: tuple[str, ...] = ("detection",)

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        categories: CategoryTable | None = None,
        min_size: int | Sequence[int] | None = 800,
        max_size: int = 1333,
        fpn_channels: int = 256,
        p6p7_from: str = "p5",
        head_norm: str | None = None,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        scales_per_octave: int = 3,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "l1",
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 300,
        topk_candidates: int = 1000,
        frozen_bn: bool = True,
        fast_inference: bool = True,
        winograd: bool = True,
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        if head_norm not in (None, "gn"):
            raise ValueError(f"head_norm must be None or 'gn', got {head_norm!r}")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level P3-P7 (5), got {list(anchor_sizes)}")
        self.backbone = freeze_batchnorms(backbone) if frozen_bn else backbone
        # P2 is left out: at stride 4 it would hold most of the anchors for little gain (the paper)
        self.fpn = FPN(backbone.channels[1:], fpn_channels, extra="p6p7", p6p7_from=p6p7_from)
        self.anchor_generator = anchor_generator(anchor_sizes, aspect_ratios, scales_per_octave)
        norm_layer = partial(nn.GroupNorm, 32) if head_norm == "gn" else None
        self.head = to_fast_convs(
            RetinaNetHead(
                fpn_channels, self.anchor_generator.num_anchors_per_location()[0], num_classes, norm_layer
            )
        )
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.num_classes = num_classes
        self.categories = categories
        self.min_size = min_size
        self.max_size = max_size
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.box_loss = box_loss
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        # CPU fast paths (a batch-norm-folded oneDNN-layout backbone copy, GEMM 1x1 / Winograd 3x3
        # neck and head convolutions) are off until omniseg.optimize_for_inference, whose defaults
        # these keys set; as built the model computes exactly torchvision's arithmetic
        self.inference_defaults = inference_defaults(fast_inference=fast_inference, winograd=winograd)
        self.inference_backbone: InferenceCopy | None = None  # set by optimize_for_inference
        self.config: dict[str, Any] = {}

    # -------------------------------------------------------------------------- internals
    def _head_outputs(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        fast = self.inference_backbone is not None and not self.training and not torch.is_grad_enabled()
        backbone = self.inference_backbone.get(self.backbone) if fast else self.backbone
        features = self.fpn(backbone(x)[1:])
        return features, self.head(features)

    def compute_loss(
        self, targets: list[dict[str, Tensor]], outputs: dict[str, Tensor], anchors: list[Tensor]
    ) -> dict[str, Tensor]:
        """Focal loss over non-ignored anchors, box loss over positives, each / number of positives."""
        cls_losses, box_losses = [], []
        for target, logits, deltas, anchors_i in zip(
            targets, outputs["cls_logits"], outputs["bbox_regression"], anchors, strict=True
        ):
            if target["boxes"].numel() == 0:
                matched = torch.full((len(anchors_i),), -1, dtype=torch.int64, device=anchors_i.device)
            else:
                matched = self.matcher(box_iou(target["boxes"], anchors_i))
            foreground = matched >= 0
            num_foreground = max(1, int(foreground.sum()))
            gt_classes = torch.zeros_like(logits)
            gt_classes[foreground, target["labels"][matched[foreground]]] = 1.0
            valid = matched != self.matcher.BETWEEN_THRESHOLDS
            cls_losses.append(
                sigmoid_focal_loss(
                    logits[valid],
                    gt_classes[valid],
                    alpha=self.focal_alpha,
                    gamma=self.focal_gamma,
                    normalizer=num_foreground,
                )
            )
            gt_boxes = target["boxes"][matched[foreground]]
            pred, anchors_fg = deltas[foreground], anchors_i[foreground]
            if self.box_loss == "giou":
                box = generalized_box_iou_loss(
                    self.box_coder.decode_single(pred, anchors_fg), gt_boxes, reduction="sum"
                )
            else:
                encoded = self.box_coder.encode_single(gt_boxes, anchors_fg)
                # beta 0.1: Detectron2's RetinaNet setting
                loss_fn = F.l1_loss if self.box_loss == "l1" else partial(F.smooth_l1_loss, beta=0.1)
                box = loss_fn(pred, encoded, reduction="sum")
            box_losses.append(box / num_foreground)
        return {
            "loss_classifier": torch.stack(cls_losses).mean(),
            "loss_box_reg": torch.stack(box_losses).mean(),
        }

    def postprocess(
        self,
        outputs: dict[str, Tensor],
        anchors: list[Tensor],
        features: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Per level: threshold, top-k, decode, clip; then per-class NMS (torchvision's order)."""
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        num_anchors = outputs["cls_logits"].shape[1] // sum(per_level)
        split = [n * num_anchors for n in per_level]
        results = []
        for i, image_size in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            for logits, deltas, anchors_l in zip(
                outputs["cls_logits"][i].split(split),
                outputs["bbox_regression"][i].split(split),
                anchors[i].split(split),
                strict=True,
            ):
                num_classes = logits.shape[-1]
                scores = torch.sigmoid(logits)
                scores[:, 0] = 0.0  # label 0 is the background: never a detection (torchvision keeps it)
                scores = scores.flatten()
                keep = scores > self.score_thresh
                scores = scores[keep]
                index = torch.where(keep)[0]
                scores, order = scores.topk(min(self.topk_candidates, index.numel()))
                index = index[order]
                anchor_index = torch.div(index, num_classes, rounding_mode="floor")
                boxes = self.box_coder.decode_single(deltas[anchor_index], anchors_l[anchor_index])
                boxes_all.append(clip_boxes_to_image(boxes, image_size))
                scores_all.append(scores)
                labels_all.append(index % num_classes)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    # ------------------------------------------------------------------------ graph export
    def dense_network(self) -> nn.Module:
        """What ``omniseg export --format onnx`` holds: a padded, normalised batch ``(B, 3, H, W)``
        (H, W multiples of 32) -> ``cls_logits (B, A, K)``, ``bbox_regression (B, A, 4)``.
        Anchors, decoding, top-k and NMS stay outside the graph: :meth:`detect_from_dense`."""
        return _DenseRetinaNet(self).train(self.training)

    @torch.no_grad()
    def detect_from_dense(
        self, images: Tensor | Sequence[Tensor], dense: Callable[[Tensor], Sequence[Tensor]]
    ) -> list[dict[str, Tensor]]:
        """:meth:`detect` with the network replaced by ``dense`` (an exported graph's session):
        the same resize / pad, anchors, decoding and NMS."""
        batch, _, original_sizes = preprocess(images, None, min_size=self.min_size, max_size=self.max_size)
        cls_logits, bbox_regression = dense(batch.tensors)[:2]
        # only the levels' shapes matter to the anchors and the per-level split: P3-P5 at strides
        # 8-32 of the 32-padded batch, P6 and P7 each a stride-2 3x3 conv (padding 1) further
        h, w = (int(v) // 8 for v in batch.tensors.shape[-2:])
        shapes = [(h, w), (h // 2, w // 2), (h // 4, w // 4)]
        for _ in range(2):
            shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
        levels = [cls_logits.new_empty((1, 0, *shape)) for shape in shapes]
        anchors = self.anchor_generator(batch, levels)
        outputs = {"cls_logits": cls_logits, "bbox_regression": bbox_regression}
        detections = self.postprocess(outputs, anchors, levels, batch.image_sizes)
        for det, size, original in zip(detections, batch.image_sizes, original_sizes, strict=True):
            det["boxes"] = postprocess_boxes(det["boxes"], size, original)
        return detections

    # ---------------------------------------------------------------------------- public
    def forward(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: losses. Evaluation: raw detections per image (``boxes`` at the image's own
        size, ``labels``, ``scores``) for :meth:`post_process`."""
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (see omniseg.data.targets.training_target)")
            return self.losses(images, encode_detection_targets(targets, self.categories, self.num_classes))
        return self._detect(images)[0]

    def post_process(
        self,
        outputs: list[dict[str, Tensor]],
        image_sizes: Sequence[Sequence[int]],
        *,
        task: str = "detection",
        score_thresh: float | None = None,
    ) -> list[Segments]:
        """Box-shaped ``Segments`` per image (each detection its filled box), detections scoring
        below ``score_thresh`` left out."""
        validate_task(self, task)
        return detection_segments(outputs, image_sizes, categories=self.categories, score_thresh=score_thresh)

    def losses(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        batch, targets, _ = preprocess(
            images,
            targets,
            min_size=self.min_size,
            max_size=self.max_size,
            training=True,
            num_classes=self.num_classes,
        )
        features, outputs = self._head_outputs(batch.tensors)
        anchors = self.anchor_generator(batch, features)
        return self.compute_loss(targets, outputs, anchors)

    def detect(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """torchvision-style ``boxes`` / ``labels`` / ``scores`` at each input image's resolution."""
        return self._detect(images)[0]

    @torch.no_grad()
    def _detect(
        self, images: Tensor | Sequence[Tensor]
    ) -> tuple[list[dict[str, Tensor]], list[tuple[int, int]]]:
        was_training = self.training
        self.eval()
        try:
            batch, _, original_sizes = preprocess(
                images, None, min_size=self.min_size, max_size=self.max_size
            )
            features, outputs = self._head_outputs(batch.tensors)
            anchors = self.anchor_generator(batch, features)
            detections = self.postprocess(outputs, anchors, features, batch.image_sizes)
        finally:
            self.train(was_training)
        for det, size, original in zip(detections, batch.image_sizes, original_sizes, strict=True):
            det["boxes"] = postprocess_boxes(det["boxes"], size, original)
        return detections, original_sizes


class _DenseRetinaNet(nn.Module):
    """RetinaNet's network alone (backbone, FPN, heads), for graph export."""

    def __init__(self, model: RetinaNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        model = self.model
        features = model.fpn(model.backbone(images)[1:])
        cls_head, box_head = model.head.classification_head, model.head.regression_head
        anchors = model.anchor_generator.num_anchors_per_location()[0]
        cls = [_per_anchor(cls_head.cls_logits(cls_head.conv(f)), anchors) for f in features]
        box = [_per_anchor(box_head.bbox_reg(box_head.conv(f)), anchors) for f in features]
        return torch.cat(cls, 1), torch.cat(box, 1)


def _per_anchor(x: Tensor, anchors: int) -> Tensor:
    """``(N, A * K, H, W)`` -> ``(N, H * W * A, K)``, torchvision's head layout. Written out because
    torchvision's ``view(N, -1, K, H, W)`` makes torch.export divide the five levels' symbolic sizes,
    which its sympy simplification takes many minutes over; explicit sizes need no division."""
    n, channels, h, w = x.shape
    k = channels // anchors  # plain ints: the channel count is static
    return x.view(n, anchors, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * anchors, k)


@register_model("retinanet")
def retinanet(
    *,
    num_classes: int | None = None,
    categories: CategoryTable | Sequence[Mapping] | None = None,
    backbone: str = "resnet50",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet with an FPN (P3-P7) on ``backbone`` (any :func:`build_backbone` name).

    Defaults are torchvision's ``retinanet_resnet50_fpn`` (P6/P7 from P5, no head norm, L1 box
    loss); the v2 recipe is ``p6p7_from="c5", head_norm="gn", box_loss="giou"``. ``num_classes``
    counts the background as in torchvision (91 for COCO); with ``categories`` it is derived.
    """
    table = as_category_table(categories)
    return RetinaNet(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=resolve_num_classes(num_classes, table),
        categories=table,
        **kwargs,
    )
