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
inference path with the same outputs:

* the backbone runs as a batch-norm-folded copy kept in oneDNN's blocked layout with pre-packed
  weights (:mod:`omniseg.models.layers.fast_inference`): no per-convolution reorders, the same
  kernels, so the same numbers as the folded network;
* the 3x3 convolutions of the FPN, RPN head and mask head run as Winograd (NNPACK) convolutions,
  the 1x1 ones as GEMMs; results move by float rounding only (~1e-5 relative in the features; on
  the test and benchmark weights boxes agree with torchvision to 1-2 ulp, scores to 5e-7).
  ``winograd=False`` runs every convolution directly (only the summation order differs);
* the mask predictor computes the 28x28 logits of the detected class only, not of all classes;
* RoIAlign spreads the RoIs over the intra-op threads (torchvision's CPU kernel uses one);
* masks are resized straight into their box regions of one zeroed output
  (:func:`~omniseg.models.layers.detection.paste_masks`), or encoded to RLE box by box.

``fast_inference=False`` computes exactly as torchvision does (bit for bit, tested).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.detection import (
    ImageList,
    as_category_table,
    builder_config,
    detections_to_segments,
    model_options,
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
    set_fast_inference,
    to_fast_convs,
)
from omniseg.models.layers.fpn import FPN
from omniseg.structures import CategoryTable, Segments

__all__ = ["MaskRCNN", "MaskRoIHeads", "mask_rcnn", "targets_from_segments"]

LEVEL_NAMES = ("0", "1", "2", "3", "pool")


class ParallelMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` whose CPU inference splits the RoIs over the intra-op threads.

    torchvision's CPU RoIAlign kernel is single-threaded; it releases the GIL, so running RoI
    chunks in a thread pool uses the cores PyTorch was given. Same kernel, same outputs.
    """

    _pool: ThreadPoolExecutor | None = None
    fast: bool = True

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        threads = torch.get_num_threads()
        features = [v for k, v in x.items() if k in self.featmap_names]
        if (
            not self.fast
            or threads < 2
            or not fast_path_enabled(features[0])
            or sum(len(b) for b in boxes) < 64
        ):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        result = rois.new_zeros((len(rois), features[0].shape[1], *self.output_size))
        if ParallelMultiScaleRoIAlign._pool is None:
            ParallelMultiScaleRoIAlign._pool = ThreadPoolExecutor(max_workers=max(threads, 2))
        jobs = []
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            index = torch.where(levels == level)[0]
            if not len(index):
                continue
            for chunk in index.tensor_split(threads):
                if len(chunk):
                    jobs.append(
                        (
                            chunk,
                            self._pool.submit(
                                tv_roi_align,
                                feature,
                                rois[chunk],
                                self.output_size,
                                scale,
                                self.sampling_ratio,
                                False,
                            ),
                        )
                    )
        for chunk, job in jobs:
            result[chunk] = job.result()
        return result


class MaskRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (training unchanged) with a leaner inference for masks:
    only the detected class's 28x28 logits are computed."""

    fast: bool = True

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return super().forward(features, proposals, image_shapes, targets)
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


def mask_probabilities(
    predictor: MaskRCNNPredictor, x: Tensor, labels: list[Tensor], *, fast: bool = True
) -> list[Tensor]:
    """``(N, 1, 28, 28)`` sigmoid mask probabilities of each detection's own class, per image.

    torchvision computes the logits of every class (a 1x1 conv to ``num_classes`` channels on
    28x28 maps) and keeps one; here the deconvolution is one GEMM and the classifier a dot
    product with the detected class's weights only.
    """
    if not fast or not fast_path_enabled(x) or len(x) == 0:
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

    task = "instance"

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        categories: CategoryTable | None = None,
        min_size: int | Sequence[int] = 800,
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
        frozen_bn: bool = True,
        fast_inference: bool = True,
        winograd: bool = True,
    ) -> None:
        super().__init__()
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level P2-P6 (5), got {list(anchor_sizes)}")
        self.backbone = freeze_batchnorms(backbone) if frozen_bn else backbone
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
            mask_head=to_fast_convs(MaskRCNNHeads(fpn_channels, [256, 256, 256, 256], 1)),
            mask_predictor=MaskRCNNPredictor(256, 256, num_classes),
        )
        self.num_classes = num_classes
        self.categories = categories
        self.min_size = min_size
        self.max_size = max_size
        self.mask_threshold = mask_threshold
        self._inference_backbone = InferenceCopy()
        self._winograd = winograd
        self.fast_inference = fast_inference
        self.config: dict[str, Any] = {}

    @property
    def fast_inference(self) -> bool:
        """Faster CPU inference (see the module docstring); ``False`` computes exactly as torchvision."""
        return self._fast_inference

    @fast_inference.setter
    def fast_inference(self, enabled: bool) -> None:
        self._fast_inference = bool(enabled)
        self._configure_fast_paths()

    @property
    def winograd(self) -> bool:
        """Winograd for the 3x3 convolutions of the FPN, RPN and mask heads (and of the backbone
        where its oneDNN-layout copy does not apply): ~2.5x faster, ~1e-5 relative differences in
        the features. ``False``: every convolution direct, only summation order differs."""
        return self._winograd

    @winograd.setter
    def winograd(self, enabled: bool) -> None:
        self._winograd = bool(enabled)
        self._configure_fast_paths()

    def _configure_fast_paths(self) -> None:
        set_fast_inference(self, self._fast_inference, winograd=self._winograd)
        self._inference_backbone.winograd = self._winograd
        self._inference_backbone.invalidate()

    # -------------------------------------------------------------------------- internals
    def _use_fast_path(self) -> bool:
        return self._fast_inference and not self.training and not torch.is_grad_enabled()

    def features(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """FPN levels ``"0"``..``"3"`` (P2-P5) and ``"pool"`` (P6) of a padded batch."""
        backbone = self._inference_backbone.get(self.backbone) if self._use_fast_path() else self.backbone
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
    ) -> dict[str, Tensor] | list[Segments]:
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (see targets_from_segments)")
            return self.losses(images, targets)
        with torch.no_grad():
            detections, sizes = self._inference(images)
            return [
                detections_to_segments(d, s, categories=self.categories, mask_threshold=self.mask_threshold)
                for d, s in zip(detections, sizes, strict=True)
            ]

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
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_score_thresh: float = 0.0,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_batch_size_per_image: int = 512,
    mask_threshold: float = 0.5,
    frozen_bn: bool = True,
    fast_inference: bool = True,
    winograd: bool = True,
) -> MaskRCNN:
    """Mask R-CNN with an FPN on ``backbone`` (any :func:`build_backbone` name).

    ``num_classes`` counts the background (COCO: 91 as torchvision); with ``categories`` (a
    ``CategoryTable`` or its ``to_dicts()``) it is derived: label ``k`` is the ``k``-th thing
    category and results carry the table. Defaults are torchvision's ``maskrcnn_resnet50_fpn``.
    """
    arguments = dict(locals())
    table = as_category_table(categories)
    model = MaskRCNN(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=resolve_num_classes(num_classes, table),
        categories=table,
        **model_options(arguments),
    )
    model.config = builder_config("mask_rcnn", arguments)
    return model
