"""CenterMask (Wang, Xu, Shen, Cheng, Yang -- Meituan, CVPR 2020): "CenterMask: single shot instance
segmentation with point representation". Not Lee & Park's CenterMask (FCOS + SAG-Mask); this one
has no official code and is written from the paper.

    images -> resize / pad -> backbone C4-C32 -> top-down fusion (FPN-style) -> one stride-4 map
           -> five heads (3x3 conv + ReLU + 1x1 conv each):
              heatmap (C)  offset (2)  size (2)  local shape (S*S)  global saliency (C, or 1)
           -> 3x3 max-pool peaks, top 100 (no NMS) -> boxes from offset + size
           -> per peak: its S x S shape resized to its box  x  the saliency map inside the box,
              at its class -> mask over its box -> pasted into the image, binarised at 0.4

Training (the paper's losses): CenterNet's penalty-reduced focal loss on the heatmap against
Gaussian-splatted centres, L1 on offset and size (size weight 0.1) at the ground-truth centres,
BCE on the assembled masks inside their boxes (weight 1), and a direct per-pixel BCE on the
class-specific saliency map against the union of each class's masks. The assembly uses the
ground-truth boxes in training (the paper does not say; it keeps the mask loss independent of
the size head's early errors) and the predicted ones in inference.

Ablations are configuration (``mask_mode``): ``"both"`` (the paper's method), ``"shape"`` (local
shape only: no saliency head) and ``"saliency"`` (global saliency only, cropped to the box: no
shape head), with ``class_specific_saliency`` choosing C saliency channels or one.

What is batched: targets, the mask assembly and the pasting are tensor operations over all
objects of the batch (no Python loop over objects or pixels). The shape head's last 1x1
convolution maps to S*S = 1024 channels; it is applied only at the centres that are used (the
ground-truth centres in training, the 100 peaks in inference) -- the same numbers as the dense
convolution gathered there, at a fraction of the cost. The offset and size heads likewise run
at those centres only (:func:`point_head`: each centre's 3x3 neighbourhood times the kernel).

Inference is built for speed, the method's case: only the heatmap and saliency heads run on
every stride-4 cell. Each mask is assembled over its own box at ``LOCAL_MASK_SIZE`` squared (the
shape resized, the saliency cropped by RoIAlign) and pasted into the image box by box as Mask
R-CNN's 28 x 28 masks are, so both detectors share their post-processing: assembling on the whole
stride-4 grid and up-sampling 100 full-image masks cost more than the backbone at 1280x640.
Training assembles on the grid (:func:`assemble_masks`), where the mask loss is taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from omniseg.inference import validate_task
from omniseg.losses import heatmap_focal_loss
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.center_heatmap import draw_gaussians, gaussian_radius, heatmap_peaks
from omniseg.models.layers.detection import (
    as_category_table,
    detection_segments,
    encode_detection_targets,
    postprocess_boxes,
    preprocess,
    resolve_num_classes,
)
from omniseg.models.layers.fast_inference import InferenceCopy, freeze_batchnorms, to_fast_convs
from omniseg.optimize import inference_defaults
from omniseg.structures import CategoryTable, Segments

__all__ = [
    "MASK_MODES",
    "CenterMask",
    "assemble_masks",
    "box_regions",
    "box_resize_weights",
    "centermask",
    "encode_centre_targets",
    "mask_assembly_loss",
    "point_head",
    "resize_to_boxes",
]

MASK_MODES = ("both", "shape", "saliency")
STRIDE = 4
LOCAL_MASK_SIZE = 64  # inference masks over their boxes: a 256-pixel box keeps its 64 stride-4 cells


# ------------------------------------------------------------------------------- targets
def encode_centre_targets(
    boxes: Tensor, labels: Tensor, batch_index: Tensor, batch_size: int, num_classes: int,
    size: tuple[int, int], *, stride: int = STRIDE, min_overlap: float = 0.7,
) -> dict[str, Tensor]:  # fmt: skip
    """CenterNet targets of all objects of a batch at once.

    ``boxes`` ``(N, 4)`` xyxy input pixels, ``labels`` in ``0..num_classes-1`` (heatmap channel),
    ``batch_index`` the image of each object, ``size`` the heatmap's ``(H, W)``. Returns the
    ``(B, C, H, W)`` ``heatmap``, each object's centre ``cell`` (flat index ``y * W + x``), its
    sub-cell ``offset`` (centre / stride minus its integer cell) and its ``size`` ``(w, h)`` in
    cells, and its ``boxes`` in cells -- CenterNet's ``hm``, ``ind``, ``reg`` and ``wh``.
    """
    h, w = size
    cells = boxes.float() / stride
    centre = (cells[:, :2] + cells[:, 2:]) / 2
    integer = centre.floor().long()
    integer[:, 0].clamp_(0, w - 1)
    integer[:, 1].clamp_(0, h - 1)
    wh = cells[:, 2:] - cells[:, :2]
    radii = gaussian_radius(wh[:, 1], wh[:, 0], min_overlap)
    heatmap = draw_gaussians(
        integer, radii, batch_index * num_classes + labels, batch_size * num_classes, size
    )
    return {
        "heatmap": heatmap.view(batch_size, num_classes, h, w),
        "cell": integer[:, 1] * w + integer[:, 0],
        "offset": centre - integer.float(),
        "size": wh,
        "boxes": cells,
        "radius": radii,
    }


# -------------------------------------------------------------------------- mask assembly
def box_resize_weights(lo: Tensor, hi: Tensor, extent: int, source: int) -> tuple[Tensor, Tensor]:
    """``(N, extent, source)`` bilinear weights resizing a length-``source`` axis onto the cells
    ``[lo, hi)`` of a length-``extent`` grid, and the ``(N, extent)`` cells the box touches.

    Cell ``u`` (centre ``u + 0.5``) reads the source at ``source * (u + 0.5 - lo) / (hi - lo) - 0.5``
    -- exactly ``F.interpolate(bilinear, align_corners=False)`` when the box spans whole cells.
    A cell counts as inside when it overlaps the box, so every box keeps at least its centre cell.
    """
    u = torch.arange(extent, device=lo.device, dtype=torch.float32)[None]
    length = (hi - lo).clamp_min(1e-3)[:, None]
    src = (source * (u + 0.5 - lo[:, None]) / length - 0.5).clamp(0, source - 1)
    i0 = src.floor().long()
    frac = src - i0
    i1 = (i0 + 1).clamp(max=source - 1)
    weights = (1 - frac)[..., None] * F.one_hot(i0, source) + frac[..., None] * F.one_hot(i1, source)
    inside = (u + 1 > lo[:, None]) & (u < hi[:, None])
    return weights * inside[..., None], inside


def resize_to_boxes(shape_logits: Tensor, boxes: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Each ``S x S`` shape resized to its box (cells) on an ``(H, W)`` grid (zero outside), and
    the ``(N, H, W)`` box regions: two batched matrix products, ``Ry @ shape @ Rx^T``."""
    s = shape_logits.shape[-1]
    rows, inside_y = box_resize_weights(boxes[:, 1], boxes[:, 3], size[0], s)
    cols, inside_x = box_resize_weights(boxes[:, 0], boxes[:, 2], size[1], s)
    resized = rows @ shape_logits @ cols.transpose(1, 2)
    return resized, inside_y[:, :, None] & inside_x[:, None, :]


def box_regions(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``(N, H, W)`` cells each box (in cells) overlaps."""
    u_y = torch.arange(size[0], device=boxes.device)[None]
    u_x = torch.arange(size[1], device=boxes.device)[None]
    inside_y = (u_y + 1 > boxes[:, 1:2]) & (u_y < boxes[:, 3:4])
    inside_x = (u_x + 1 > boxes[:, 0:1]) & (u_x < boxes[:, 2:3])
    return inside_y[:, :, None] & inside_x[:, None, :]


def assemble_masks(
    shape_logits: Tensor | None, saliency_logits: Tensor | None, boxes: Tensor, size: tuple[int, int]
) -> Tensor:
    """The paper's mask assembly, for all objects at once: ``(N, H, W)`` probabilities
    ``sigmoid(shape resized to the box) * sigmoid(saliency inside the box)``, zero outside the box.

    ``shape_logits`` ``(N, S, S)``; ``saliency_logits`` ``(N, H, W)``: each object's saliency
    channel (its class, or the class-agnostic one) -- the crop of the paper is the box region of
    that map, so it needs no resampling. Either factor may be ``None`` (the ablations).
    """
    if shape_logits is not None:
        resized, region = resize_to_boxes(shape_logits, boxes, size)
        probs = resized.sigmoid()
    else:
        region = box_regions(boxes, size)
        probs = torch.ones_like(region, dtype=saliency_logits.dtype)
    if saliency_logits is not None:
        probs = probs * saliency_logits.sigmoid()
    return probs * region


def mask_assembly_loss(
    shape_logits: Tensor | None, saliency_logits: Tensor | None, region: Tensor, target: Tensor
) -> Tensor:
    """BCE of the assembled masks inside their boxes, averaged per object then over objects.

    ``shape_logits`` are the resized ``(N, H, W)`` shape logits. The log-probabilities of the
    product ``p = sigmoid(a) sigmoid(b)`` are computed without forming ``p``:
    ``log p = logsig(a) + logsig(b)``, ``log(1 - p) = log(sigmoid(-a) + sigmoid(a) sigmoid(-b))``,
    so the loss stays finite (and its gradient too) where either factor saturates.
    """
    logits = [x for x in (shape_logits, saliency_logits) if x is not None]
    if len(logits) == 1:
        bce = F.binary_cross_entropy_with_logits(logits[0], target, reduction="none")
    else:
        a, b = logits
        log_p = F.logsigmoid(a) + F.logsigmoid(b)
        log_not_p = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(a) + F.logsigmoid(-b))
        bce = -(target * log_p + (1 - target) * log_not_p)
    region = region.to(bce.dtype)
    per_object = (bce * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)
    return per_object.mean()


# ----------------------------------------------------------------------------- modules
class TopDownFusion(nn.Module):
    """One stride-4 map from the backbone's C4-C32: FPN's lateral 1x1 convolutions and top-down
    sums (bilinear up-sampling: the map feeds dense masks), then one 3x3 convolution + ReLU."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.smooth = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = self.lateral[-1](features[-1])
        for feature, lateral in zip(features[-2::-1], list(self.lateral)[-2::-1], strict=True):
            x = lateral(feature) + F.interpolate(
                x, size=feature.shape[-2:], mode="bilinear", align_corners=False
            )
        return self.smooth(x)


def head(
    in_channels: int, hidden: int, out_channels: int, *, std: float = 0.001, bias: float = 0.0
) -> nn.Sequential:
    """CenterNet's head: 3x3 conv + ReLU + 1x1 conv, the last one started near zero (CenterNet's
    ``fill_fc_weights``): large initial outputs on every cell would flood the few centres."""
    layers = nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 1),
    )
    nn.init.normal_(layers[-1].weight, std=std)
    nn.init.constant_(layers[-1].bias, bias)
    return layers


def point_head(layers: nn.Sequential, features: Tensor, batch_index: Tensor, cell: Tensor) -> Tensor:
    """``(N, out)``: a :func:`head` (3x3 conv + ReLU + 1x1 conv) evaluated at the given cells only --
    each cell's zero-padded 3x3 neighbourhood times the flattened kernel, one GEMM -- equal to the
    dense head gathered there, for a few hundred cells instead of every cell of the map."""
    conv, _, last = layers
    w = features.shape[-1]
    padded = F.pad(features, (1, 1, 1, 1))
    taps = torch.arange(3, device=features.device)
    rows = (cell // w)[:, None] + taps  # padded coordinates of the 3 rows / columns around each cell
    cols = (cell % w)[:, None] + taps
    patches = padded[batch_index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, 3, 3, C)
    patches = patches.permute(0, 3, 1, 2).flatten(1)  # (N, C * 9) in the kernel's (c, ky, kx) order
    hidden = F.relu(F.linear(patches, conv.weight.flatten(1), conv.bias))
    return F.linear(hidden, last.weight.flatten(1), last.bias)


class CenterMask(nn.Module):
    """CenterMask. ``forward(images, targets)`` -> losses; ``forward(images)`` -> raw detections
    per image (``boxes`` at the image's size, ``labels`` 1..K, ``scores``, ``(N, 1, M, M)``
    ``mask_probs`` over each box) for :meth:`post_process`."""

    tasks: tuple[str, ...] = ("instance",)

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        categories: CategoryTable | None = None,
        min_size: int | Sequence[int] | None = 512,
        max_size: int = 853,
        neck_channels: int = 128,
        head_channels: int = 64,
        shape_size: int = 32,
        mask_mode: str = "both",
        class_specific_saliency: bool = True,
        heatmap_weight: float = 1.0,
        offset_weight: float = 1.0,
        size_weight: float = 0.1,
        mask_weight: float = 1.0,
        saliency_weight: float = 1.0,
        min_overlap: float = 0.7,
        detections_per_img: int = 100,
        mask_threshold: float = 0.4,
        frozen_bn: bool = True,
        freeze_stem: bool = False,
        fast_inference: bool = True,
        winograd: bool = True,
    ) -> None:
        super().__init__()
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.backbone = freeze_batchnorms(backbone) if frozen_bn else backbone
        if freeze_stem:  # as Mask R-CNN's option: the stride-2/4 layers stay at their ImageNet weights
            for module in backbone.stem_modules():
                module.requires_grad_(False)
        self.neck = TopDownFusion(backbone.channels, neck_channels)
        k = num_classes - 1  # heatmap channels: torchvision's label 0 (background) has none
        # -2.19: CenterNet's prior of 0.1 per cell, so the focal loss starts near its optimum
        self.heatmap_head = head(neck_channels, head_channels, k, std=0.01, bias=-2.19)
        self.offset_head = head(neck_channels, head_channels, 2)
        self.size_head = head(neck_channels, head_channels, 2)
        self.shape_head = (
            head(neck_channels, head_channels, shape_size**2) if mask_mode != "saliency" else None
        )
        saliency_channels = k if class_specific_saliency else 1
        self.saliency_head = (
            head(neck_channels, head_channels, saliency_channels) if mask_mode != "shape" else None
        )
        to_fast_convs(self.neck)
        for module in (
            self.heatmap_head,
            self.offset_head,
            self.size_head,
            self.shape_head,
            self.saliency_head,
        ):
            if module is not None:
                to_fast_convs(module)
        self.num_classes = num_classes
        self.categories = categories
        self.min_size = min_size
        self.max_size = max_size
        self.shape_size = shape_size
        self.mask_mode = mask_mode
        self.class_specific_saliency = class_specific_saliency
        self.weights = {
            "heatmap": heatmap_weight, "offset": offset_weight, "size": size_weight,
            "mask": mask_weight, "saliency": saliency_weight,
        }  # fmt: skip
        self.min_overlap = min_overlap
        self.detections_per_img = detections_per_img
        self.mask_threshold = mask_threshold
        # fast paths are off until omniseg.optimize_for_inference, whose defaults these keys set
        self.inference_defaults = inference_defaults(fast_inference=fast_inference, winograd=winograd)
        self.inference_backbone: InferenceCopy | None = None  # set by optimize_for_inference
        self.config: dict[str, Any] = {}

    # -------------------------------------------------------------------------- internals
    def features(self, x: Tensor) -> Tensor:
        """The stride-4 map of a padded batch."""
        fast = self.inference_backbone is not None and not self.training and not torch.is_grad_enabled()
        backbone = self.inference_backbone.get(self.backbone) if fast else self.backbone
        return self.neck(backbone(x))

    def shape_logits(self, features: Tensor, batch_index: Tensor, cell: Tensor) -> Tensor:
        """``(N, S, S)`` local shape logits at the given centres (:func:`point_head`: equal to the
        dense S*S-channel map gathered there)."""
        out = point_head(self.shape_head, features, batch_index, cell)
        return out.view(-1, self.shape_size, self.shape_size)

    def saliency_crops(self, features: Tensor, batch_index: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The saliency logits ``(B, C or 1, H, W)`` and each object's channel ``(N, H, W)``."""
        saliency = self.saliency_head(features)
        channel = labels if self.class_specific_saliency else torch.zeros_like(labels)
        return saliency, saliency[batch_index, channel]

    def compute_loss(self, targets: list[dict[str, Tensor]], features: Tensor) -> dict[str, Tensor]:
        b, _, h, w = features.shape
        k = self.num_classes - 1
        device = features.device
        counts = [len(t["boxes"]) for t in targets]
        batch_index = torch.repeat_interleave(
            torch.arange(b, device=device), torch.tensor(counts, device=device)
        )
        labels = torch.cat([t["labels"] for t in targets]).to(device) - 1
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        encoded = encode_centre_targets(
            boxes, labels, batch_index, b, k, (h, w), stride=STRIDE, min_overlap=self.min_overlap
        )
        losses = {"loss_heatmap": heatmap_focal_loss(self.heatmap_head(features), encoded["heatmap"])}
        cell = encoded["cell"]
        offset = point_head(self.offset_head, features, batch_index, cell)
        size = point_head(self.size_head, features, batch_index, cell)
        # mean L1 over objects and coordinates (CenterNet's RegL1Loss); 0 with a graph if none
        losses["loss_offset"] = F.l1_loss(offset, encoded["offset"], reduction="sum") / max(offset.numel(), 1)
        losses["loss_size"] = F.l1_loss(size, encoded["size"], reduction="sum") / max(size.numel(), 1)

        # ground-truth masks as the fraction of each stride-4 cell they cover (soft targets)
        masks = torch.cat(
            [F.pad(t["masks"].float(), (0, w * STRIDE - t["masks"].shape[-1], 0, h * STRIDE - t["masks"].shape[-2]))
             for t in targets]
        )  # fmt: skip
        cell_masks = F.avg_pool2d(masks[:, None], STRIDE)[:, 0] if len(masks) else masks.new_zeros((0, h, w))
        shape = saliency_crop = None
        if self.shape_head is not None:
            shape, region = resize_to_boxes(
                self.shape_logits(features, batch_index, cell), encoded["boxes"], (h, w)
            )
        else:
            region = box_regions(encoded["boxes"], (h, w))
        if self.saliency_head is not None:
            saliency, saliency_crop = self.saliency_crops(features, batch_index, labels)
        mask_loss = mask_assembly_loss(shape, saliency_crop, region, cell_masks) if len(boxes) else None
        if mask_loss is None:  # no object: a zero that still reaches the mask heads
            heads = [m for m in (self.shape_head, self.saliency_head) if m is not None]
            mask_loss = sum(p.sum() * 0.0 for m in heads for p in m.parameters())
        losses["loss_mask"] = mask_loss
        if self.saliency_head is not None and self.class_specific_saliency:
            # each class's channel against the union of its objects' masks, over every pixel
            union = torch.zeros((b * k, h * w), device=device)
            if len(boxes):
                index = (batch_index * k + labels)[:, None].expand(-1, h * w)
                union.scatter_reduce_(0, index, cell_masks.flatten(1), reduce="amax")
            losses["loss_saliency"] = F.binary_cross_entropy_with_logits(saliency, union.view(b, k, h, w))
        names = {"loss_heatmap": "heatmap", "loss_offset": "offset", "loss_size": "size",
                 "loss_mask": "mask", "loss_saliency": "saliency"}  # fmt: skip
        return {name: loss * self.weights[names[name]] for name, loss in losses.items()}

    @torch.no_grad()
    def _detect(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        batch, _, original_sizes = preprocess(images, None, min_size=self.min_size, max_size=self.max_size)
        features = self.features(batch.tensors)
        b, _, h, w = features.shape
        heat = self.heatmap_head(features).sigmoid()
        # no peaks in the padding: cells beyond each image's own extent score 0
        valid = [(-(-ih // STRIDE), -(-iw // STRIDE)) for ih, iw in batch.image_sizes]
        extent = torch.tensor(valid, device=heat.device)
        rows = torch.arange(h, device=heat.device)[None, :, None] < extent[:, 0, None, None]
        cols = torch.arange(w, device=heat.device)[None, None, :] < extent[:, 1, None, None]
        heat = heat * (rows & cols)[:, None]
        scores, channels, ys, xs = heatmap_peaks(heat, self.detections_per_img)
        k = scores.shape[1]
        batch_index = torch.arange(b, device=heat.device).repeat_interleave(k)
        cell = (ys * w + xs).flatten()
        channels = channels.flatten()
        # offset, size and shape only matter at the peaks: their heads run there alone
        offset = point_head(self.offset_head, features, batch_index, cell)
        size = point_head(self.size_head, features, batch_index, cell).clamp_min(1.0)  # >= one cell
        centre = torch.stack([xs.flatten(), ys.flatten()], 1).float() + offset
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1) * STRIDE  # input pixels
        limits = torch.tensor([[iw, ih, iw, ih] for ih, iw in batch.image_sizes], dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp_min(0), limits.to(boxes.device).repeat_interleave(k, 0))
        masks = self.local_masks(features, batch_index, cell, channels, boxes / STRIDE)
        results = []
        for i, ((ih, iw), original) in enumerate(zip(batch.image_sizes, original_sizes, strict=True)):
            part = slice(i * k, (i + 1) * k)
            results.append({
                "boxes": postprocess_boxes(boxes[part], (ih, iw), original),
                "labels": channels[part] + 1,
                "scores": scores[i],
                "mask_probs": masks[part, None],
            })  # fmt: skip
        return results

    def local_masks(
        self, features: Tensor, batch_index: Tensor, cell: Tensor, channels: Tensor, boxes: Tensor
    ) -> Tensor:
        """``(N, M, M)`` mask probabilities over each box (in cells), M = ``LOCAL_MASK_SIZE``: the
        paper's assembly in box coordinates -- sigmoid(shape resized to M x M) x sigmoid(saliency
        of the object's class, cropped to the box by RoIAlign)."""
        m = LOCAL_MASK_SIZE
        probs = features.new_ones((len(cell), m, m))
        if self.shape_head is not None:
            shape = self.shape_logits(features, batch_index, cell)[:, None]
            probs = probs * F.interpolate(shape, size=(m, m), mode="bilinear", align_corners=False)[:, 0].sigmoid()
        if self.saliency_head is not None:
            saliency = self.saliency_head(features)
            channel = channels if self.class_specific_saliency else torch.zeros_like(channels)
            # each box cropped from its own class's channel alone: the channels as images of one
            # channel, the RoI's image index = image x C + class (8x less RoIAlign than all of them)
            b, c = saliency.shape[:2]
            planes = saliency.reshape(b * c, 1, *saliency.shape[2:])
            rois = torch.cat([(batch_index * c + channel)[:, None].to(boxes.dtype), boxes], 1)
            crops = roi_align(planes, rois, (m, m), spatial_scale=1.0, sampling_ratio=2, aligned=True)
            probs = probs * crops[:, 0].sigmoid()
        return probs

    # ---------------------------------------------------------------------------- public
    def forward(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: the weighted losses. Evaluation: raw detections for :meth:`post_process`."""
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (see omniseg.data.targets.training_target)")
            return self.losses(images, encode_detection_targets(targets, self.categories, self.num_classes))
        return self._detect(images)

    def losses(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        batch, targets, _ = preprocess(
            images, targets, min_size=self.min_size, max_size=self.max_size, training=True,
            need_masks=True, num_classes=self.num_classes,
        )  # fmt: skip
        return self.compute_loss(targets, self.features(batch.tensors))

    def post_process(
        self,
        outputs: list[dict[str, Tensor]],
        image_sizes: Sequence[Sequence[int]],
        *,
        task: str = "instance",
        score_thresh: float | None = None,
        mask_threshold: float | None = None,
    ) -> list[Segments]:
        """Instance ``Segments`` per image at ``image_sizes``: each box-local mask pasted into its box
        (Mask R-CNN's post-processing) and binarised at ``mask_threshold`` (the paper's 0.4),
        detections below ``score_thresh`` left out."""
        validate_task(self, task)
        threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        return detection_segments(
            outputs, image_sizes, categories=self.categories, mask_threshold=threshold, score_thresh=score_thresh
        )


@register_model("centermask")
def centermask(
    *,
    num_classes: int | None = None,
    categories: CategoryTable | Sequence[Mapping] | None = None,
    backbone: str = "efficientnet_lite0",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> CenterMask:
    """CenterMask (Wang et al. 2020) on ``backbone`` (any :func:`build_backbone` name); ``kwargs``
    go to :class:`CenterMask` (``mask_mode``, ``class_specific_saliency``, ``shape_size``, ...).

    ``num_classes`` counts the background as in the other detectors (the heatmap has
    ``num_classes - 1`` channels); with ``categories`` it is derived.
    """
    table = as_category_table(categories)
    return CenterMask(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=resolve_num_classes(num_classes, table),
        categories=table,
        **kwargs,
    )
