"""Mask R-CNN (He et al. 2017) on any omniseg backbone, with a ResNet-50-FPN that matches torchvision.

    images -> resize / pad -> backbone -> FPN (P2-P5 + P6 max-pool)
           -> RPN (3 anchors per location and level, top-n, NMS) -> proposals
           -> MultiScaleRoIAlign 7x7 -> TwoMLPHead -> class scores + class-specific boxes -> NMS
           -> MultiScaleRoIAlign 14x14 -> 4 convs -> 2x deconv -> 28x28 mask of the detected class
           -> boxes and masks pasted back at each input image's own resolution

The RPN, the box / mask RoI heads and their losses are torchvision's modules (same parameter
names, so ``torchvision_import.load_torchvision_maskrcnn`` only renames the backbone). What is
ours: taking any :func:`~omniseg.models.backbones.build_backbone` backbone, the model contract
(normalised images in, losses or :class:`~omniseg.structures.Segments` out), and a faster CPU
inference path with the same outputs, switched on by :func:`omniseg.optimize_for_inference`:

* the backbone runs as a batch-norm-folded copy kept in oneDNN's blocked layout with pre-packed
  weights (:mod:`omniseg.models.layers.fast_inference`): no per-convolution reorders, the same
  kernels, so the same numbers as the folded network;
* the 3x3 convolutions of the FPN, RPN head and mask head run as Winograd (NNPACK) convolutions,
  the 1x1 ones as GEMMs; results move by float rounding only (~1e-5 relative in the features; on
  the test and benchmark weights boxes agree with torchvision to 1-2 ulp, scores to 5e-7);
* the mask predictor computes the 28x28 logits of the detected class only, not of all classes;
* RoIAlign spreads the RoIs over the intra-op threads (torchvision's CPU kernel uses one;
  :class:`~omniseg.models.layers.roi_align.ParallelMultiScaleRoIAlign`);
* masks are resized straight into their box regions of one zeroed output
  (:func:`~omniseg.models.layers.detection.paste_masks`), or encoded to RLE box by box.

A model as built (or loaded) computes exactly as torchvision does (bit for bit, tested). The
config keys ``fast_inference`` / ``winograd`` only set the defaults of ``optimize_for_inference``
(``model.inference_defaults``): ``fast_inference=False`` keeps the exact path,
``winograd=False`` runs every convolution directly (only the summation order differs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from omniseg.inference import validate_task
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.detection import (
    ImageList,
    as_category_table,
    detection_segments,
    encode_detection_targets,
    paste_masks,
    postprocess_boxes,
    preprocess,
    resolve_num_classes,
    targets_from_segments,
)
from omniseg.models.layers.fast_inference import (
    InferenceCopy,
    fast_path_enabled,
    freeze_batchnorms,
    to_fast_convs,
)
from omniseg.models.layers.fpn import FPN
from omniseg.models.layers.roi_align import ParallelMultiScaleRoIAlign
from omniseg.optimize import inference_defaults
from omniseg.structures import CategoryTable, Segments

__all__ = ["MaskRCNN", "MaskRoIHeads", "mask_rcnn", "targets_from_segments"]

LEVEL_NAMES = ("0", "1", "2", "3", "pool")


class MaskRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with a leaner inference for masks once ``fast`` (set by
    :func:`omniseg.optimize_for_inference`): only the detected class's 28x28 logits are computed.

    Training is torchvision's, unless a target carries ``has_mask`` (box-only segments,
    :attr:`omniseg.structures.Sample.box_only`): then the mask loss is taken over the positive
    RoIs whose matched ground truth has a mask only -- Mask^X R-CNN's partial supervision, and
    what any mask head should do with box labels."""

    inference_option = "class_only_masks"  # the optimize_for_inference option that sets ``fast``
    fast: bool = False

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None or not any("has_mask" in t for t in targets):
                return super().forward(features, proposals, image_shapes, targets)
            return [], self._partially_supervised_losses(features, proposals, image_shapes, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels = self.postprocess_detections(
            class_logits, box_regression, proposals, image_shapes
        )
        results = [
            {"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, labels, strict=True)
        ]
        if self.has_mask():
            mask_features = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
            probs = mask_probabilities(self.mask_predictor, mask_features, labels, fast=self.fast)
            for result, prob in zip(results, probs, strict=True):
                result["mask_probs"] = prob
        return results, {}


    def _partially_supervised_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """torchvision's training losses, the mask loss over RoIs matched to masked ground truth."""
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if not self.has_mask():
            return losses
        positives = []
        for image_labels, image_matched, target in zip(labels, matched, targets, strict=True):
            has_mask = target.get("has_mask")
            keep = image_labels > 0  # an image without ground truth has no positive RoI
            if has_mask is not None and len(has_mask):
                keep &= has_mask[image_matched]
            positives.append(torch.where(keep)[0])
        mask_proposals = [p[i] for p, i in zip(proposals, positives, strict=True)]
        matched_idxs = [m[i] for m, i in zip(matched, positives, strict=True)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        losses["loss_mask"] = maskrcnn_loss(
            mask_logits, mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets],
            matched_idxs,
        )  # fmt: skip
        return losses


def mask_probabilities(
    predictor: MaskRCNNPredictor, x: Tensor, labels: list[Tensor], *, fast: bool = True
) -> list[Tensor]:
    """``(N, 1, 28, 28)`` sigmoid mask probabilities of each detection's own class, per image.

    torchvision computes the logits of every class (a 1x1 conv to ``num_classes`` channels on
    28x28 maps) and keeps one; here the deconvolution is one GEMM and the classifier a dot
    product with the detected class's weights only.
    """
    if not fast or not fast_path_enabled(x) or len(x) == 0 or not isinstance(predictor, MaskRCNNPredictor):
        return list(maskrcnn_inference(predictor(x), labels))
    deconv, classifier = predictor.conv5_mask, predictor.mask_fcn_logits
    n, c, h, w = x.shape
    kh, kw = deconv.kernel_size
    if (
        deconv.stride != (kh, kw)
        or deconv.padding != (0, 0)
        or deconv.groups != 1
        or deconv.dilation != (1, 1)
    ):
        return list(maskrcnn_inference(predictor(x), labels))
    dim = deconv.out_channels
    # stride == kernel: every input pixel writes its own kh x kw output patch -> a plain GEMM
    pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
    weight = deconv.weight.permute(0, 2, 3, 1).reshape(c, kh * kw * dim)  # (c, (a, b, out))
    bias = deconv.bias.repeat(kh * kw) if deconv.bias is not None else None
    hidden = torch.addmm(bias, pixels, weight) if bias is not None else pixels @ weight
    hidden = F.relu_(hidden).view(n, h * w * kh * kw, dim)
    label = torch.cat(labels)
    cls_weight = classifier.weight.view(classifier.out_channels, dim)[label]  # (n, dim)
    logits = torch.bmm(hidden, cls_weight[:, :, None])[:, :, 0]
    if classifier.bias is not None:
        logits = logits + classifier.bias[label][:, None]
    # (n, h, w, a, b) -> (n, h, a, w, b) = (n, h * kh, w * kw)
    logits = logits.view(n, h, w, kh, kw).permute(0, 1, 3, 2, 4).reshape(n, 1, h * kh, w * kw)
    return list(logits.sigmoid().split([len(lab) for lab in labels]))


class MaskRCNN(nn.Module):
    """Mask R-CNN. ``forward(images, targets)`` -> losses; ``forward(images)`` -> ``list[Segments]``.

    ``images``: normalised ``(3, H, W)`` tensors (any sizes) or a ``(B, 3, H, W)`` batch. Targets:
    ``{"boxes": (N, 4) xyxy, "labels": (N,) in 1..K, "masks": (N, H, W) bool}`` per image
    (:func:`targets_from_segments` builds them). :meth:`detect` returns torchvision-style dicts.
    """

    tasks: tuple[str, ...] = ("instance",)

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        categories: CategoryTable | None = None,
        min_size: int | Sequence[int] | None = 800,
        max_size: int = 1333,
        fpn_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        mask_threshold: float = 0.5,
        mask_head_channels: int = 256,
        frozen_bn: bool = True,
        freeze_stem: bool = False,
        fast_inference: bool = True,
        winograd: bool = True,
    ) -> None:
        super().__init__()
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level P2-P6 (5), got {list(anchor_sizes)}")
        self.backbone = freeze_batchnorms(backbone) if frozen_bn else backbone
        if freeze_stem:
            # Detectron2's FREEZE_AT=2: the stride-2/4 layers are the costliest to back-propagate
            # through at detection resolutions and gain least from fine-tuning
            for module in backbone.stem_modules():
                module.requires_grad_(False)
        self.fpn = FPN(backbone.channels, fpn_channels, extra="maxpool")
        anchors = AnchorGenerator(
            tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes)
        )
        self.rpn = RegionProposalNetwork(
            anchors,
            to_fast_convs(RPNHead(fpn_channels, anchors.num_anchors_per_location()[0])),
            rpn_fg_iou_thresh,
            rpn_bg_iou_thresh,
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
        )
        self.roi_heads = MaskRoIHeads(
            ParallelMultiScaleRoIAlign(list(LEVEL_NAMES[:4]), 7, 2),
            TwoMLPHead(fpn_channels * 7 * 7, 1024),
            FastRCNNPredictor(1024, num_classes),
            box_fg_iou_thresh,
            box_bg_iou_thresh,
            box_batch_size_per_image,
            box_positive_fraction,
            None,  # bbox_reg_weights: torchvision's (10, 10, 5, 5)
            box_score_thresh,
            box_nms_thresh,
            box_detections_per_img,
            mask_roi_pool=ParallelMultiScaleRoIAlign(list(LEVEL_NAMES[:4]), 14, 2),
            # 4 convs on every positive RoI: at 256 channels they cost more than the whole backbone on a CPU
            mask_head=to_fast_convs(MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1)),
            mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
        )
        self.num_classes = num_classes
        self.categories = categories
        self.min_size = min_size
        self.max_size = max_size
        self.mask_threshold = mask_threshold
        # fast paths are off until omniseg.optimize_for_inference, whose defaults these keys set
        self.inference_defaults = inference_defaults(fast_inference=fast_inference, winograd=winograd)
        self.inference_backbone: InferenceCopy | None = None  # set by optimize_for_inference
        self.config: dict[str, Any] = {}

    # -------------------------------------------------------------------------- internals
    def _use_fast_path(self) -> bool:
        return self.inference_backbone is not None and not self.training and not torch.is_grad_enabled()

    def features(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """FPN levels ``"0"``..``"3"`` (P2-P5) and ``"pool"`` (P6) of a padded batch."""
        backbone = self.inference_backbone.get(self.backbone) if self._use_fast_path() else self.backbone
        return OrderedDict(zip(LEVEL_NAMES, self.fpn(backbone(x)), strict=True))

    def _detections(
        self, images: Tensor | Sequence[Tensor]
    ) -> tuple[list[dict[str, Tensor]], ImageList, OrderedDict[str, Tensor], list[tuple[int, int]]]:
        """Detections (boxes at the original image sizes, 28x28 ``mask_probs``), the padded batch,
        its FPN features and the original sizes."""
        batch, _, original_sizes = preprocess(images, None, min_size=self.min_size, max_size=self.max_size)
        features = self.features(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        for det, size, original in zip(detections, batch.image_sizes, original_sizes, strict=True):
            det["boxes"] = postprocess_boxes(det["boxes"], size, original)
        return detections, batch, features, original_sizes

    def _inference(
        self, images: Tensor | Sequence[Tensor]
    ) -> tuple[list[dict[str, Tensor]], list[tuple[int, int]]]:
        detections, _, _, original_sizes = self._detections(images)
        return detections, original_sizes

    def _training_features(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> tuple[ImageList, list[dict[str, Tensor]], OrderedDict[str, Tensor]]:
        """The resized, padded batch, its checked targets and its FPN features."""
        batch, targets, _ = preprocess(
            images,
            targets,
            min_size=self.min_size,
            max_size=self.max_size,
            training=True,
            need_masks=True,
            num_classes=self.num_classes,
        )
        return batch, targets, self.features(batch.tensors)

    def _detector_losses(
        self, batch: ImageList, targets: list[dict[str, Tensor]], features: OrderedDict[str, Tensor]
    ) -> dict[str, Tensor]:
        proposals, rpn_losses = self.rpn(batch, features, targets)
        _, head_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        return {**rpn_losses, **head_losses}

    # ---------------------------------------------------------------------------- public
    def forward(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: losses. Evaluation: raw detections per image (``boxes`` at the image's own
        size, ``labels``, ``scores``, 28x28 ``mask_probs``) for :meth:`post_process`."""
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (see omniseg.data.targets.training_target)")
            return self.losses(images, encode_detection_targets(targets, self.categories, self.num_classes))
        with torch.no_grad():
            return self._inference(images)[0]

    def post_process(
        self,
        outputs: list[dict[str, Tensor]],
        image_sizes: Sequence[Sequence[int]],
        *,
        task: str = "instance",
        score_thresh: float | None = None,
    ) -> list[Segments]:
        """Instance ``Segments`` per image, detections scoring below ``score_thresh`` left out."""
        validate_task(self, task)
        return detection_segments(
            outputs, image_sizes, categories=self.categories, mask_threshold=self.mask_threshold,
            score_thresh=score_thresh,
        )  # fmt: skip

    def losses(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """RPN (objectness, box) and RoI head (classifier, box, mask) losses, torchvision's."""
        return self._detector_losses(*self._training_features(images, targets))

    @torch.no_grad()
    def detect(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """torchvision-style results: ``boxes`` (N, 4), ``labels``, ``scores``, ``masks`` (N, 1, H, W)
        probabilities at each input image's resolution (threshold at 0.5 for binary masks)."""
        was_training = self.training
        self.eval()
        try:
            detections, sizes = self._inference(images)
        finally:
            self.train(was_training)
        for det, size in zip(detections, sizes, strict=True):
            det["masks"] = paste_masks(det.pop("mask_probs"), det["boxes"], size)
        return detections


@register_model("mask_rcnn")
def mask_rcnn(
    *,
    num_classes: int | None = None,
    categories: CategoryTable | Sequence[Mapping] | None = None,
    backbone: str = "resnet50",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with an FPN on ``backbone`` (any :func:`build_backbone` name); ``kwargs`` go to
    :class:`MaskRCNN` (``min_size``, ``rpn_*``, ``box_*``, ``mask_threshold``, ...).

    ``num_classes`` counts the background (COCO: 91 as torchvision); with ``categories`` (a
    ``CategoryTable`` or its ``to_dicts()``) it is derived: label ``k`` is the ``k``-th thing
    category and results carry the table. Defaults are torchvision's ``maskrcnn_resnet50_fpn``.
    """
    table = as_category_table(categories)
    return MaskRCNN(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=resolve_num_classes(num_classes, table),
        categories=table,
        **kwargs,
    )
