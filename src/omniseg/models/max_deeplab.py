"""MaX-DeepLab (Wang et al. 2021): end-to-end panoptic segmentation with mask transformers.

No boxes, no NMS, no thing/stuff merge: ``N`` mask slots (a memory) travel with the pixel features
through dual-path transformer blocks and each predicts one class-labelled mask::

    backbone C4..C32 -> 1x1 projections to the decoder width
        stride 32: dual-path block(s)  (axial pixel-to-pixel, P2M, fused M2P/M2M, memory FFN)
        stride 16: bilinear up + C16, dual-path block(s)
        stride 8:  bilinear up + C8, conv block      stride 4: bilinear up + C4, conv block
      (with ``hourglasses`` > 1 the decoder goes back down to stride 32 with strided convs, each
       level adding the previous pass's map, and up again: the stacked hourglass)
    heads: class (2 FC, C + 1 with "no object") and mask embedding f from the memory, L2-normalised
           pixel embedding g at stride 4, mask logits BN(f . g), softmax over the slots = mask-ID;
           an auxiliary semantic head at stride 4.

This is the small CPU variant on an omniseg backbone (deeplab2's MaX-DeepLab-S puts axial blocks
inside a ResNet-50 instead). Losses: :mod:`omniseg.losses.max_deeplab` (PQ-style, mask-ID
cross-entropy, instance discrimination, semantic). Inference:
:mod:`omniseg.models.layers.mask_id_inference` (class confidence 0.7, mask-ID confidence 0.4).
Training targets come from :func:`omniseg.data.targets.training_target`: every non-crowd segment,
thing or stuff, is one target, its class the category's index in the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.inference import validate_task
from omniseg.losses.max_deeplab import MaXDeepLabLoss
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.detection import as_category_table
from omniseg.models.layers.dual_path_transformer import DualPathBlock
from omniseg.models.layers.fast_inference import InferenceCopy
from omniseg.models.layers.mask_id_heads import MaskIDHeads
from omniseg.models.layers.mask_id_inference import (
    mask_id_panoptic_inference,
    merge_mask_id_views,
    panoptic_to_task,
)
from omniseg.structures import CategoryTable, Segments

__all__ = ["BottleneckBlock", "MaXDeepLab", "conv_block", "decode_image", "encode_mask_id_targets", "max_deeplab", "semantic_head"]


def conv_block(in_channels: int, out_channels: int, stride: int = 1, *, kernel_size: int = 3) -> nn.Sequential:
    """Conv (3x3 unless told), BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class BottleneckBlock(nn.Module):
    """ResNet's bottleneck with the channel count kept: 1x1 conv to ``channels // 4``, 3x3 conv,
    1x1 conv back, each with BN, plus the residual (deeplab2's kMaX pixel decoder at strides 8 and
    4; a ninth of a plain 3x3 convolution's multiply-adds at the same width)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        width = max(1, channels // 4)
        self.reduce = conv_block(channels, width, kernel_size=1)
        self.conv = conv_block(width, width)
        self.expand = projection(width, channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.expand(self.conv(self.reduce(x))))


def projection(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv + BN: a backbone map to the decoder width."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def semantic_head(in_channels: int, num_classes: int) -> nn.Sequential:
    """The auxiliary semantic head: 3x3 conv block + 1x1 classifier (no "no object" class)."""
    return nn.Sequential(conv_block(in_channels, in_channels), nn.Conv2d(in_channels, num_classes, 1))


def resize_to(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def decode_image(
    model: nn.Module, image: Tensor | None = None, *, features: Sequence[Tensor] | None = None
) -> dict[str, Any]:
    """A mask-ID model's inference decoder: ``model.decode`` of the backbone ``features`` (of
    ``image`` if not given) in channels-last layout, where oneDNN's convolutions skip their
    reorders (the decoder a sixth faster on the 1280x640 frames); also how its copy is checked."""
    if features is None:
        features = model.backbone(image)
    return model.decode([f.contiguous(memory_format=torch.channels_last) for f in features])


def encode_mask_id_targets(
    targets: Sequence[Mapping[str, Tensor]], categories: CategoryTable | None
) -> list[dict[str, Tensor]]:
    """``{"labels" (K,), "masks" (K, H, W) bool, "is_thing" (K,), "semantic" (H, W)}`` per image from
    typed training targets: crowd segments dropped, labels = the category's index in ``categories``
    (the id itself without a table, every class a thing). Targets that carry ``labels`` pass through
    (``is_thing`` defaults to all true)."""
    lookup = torch.from_numpy(categories.id_lookup(fill=-1)) if categories is not None else None
    thing_of_index = (
        torch.tensor([c.isthing for c in categories], dtype=torch.bool) if categories is not None else None
    )
    encoded = []
    for target in targets:
        if "labels" in target:
            labels, masks = torch.as_tensor(target["labels"], dtype=torch.int64), target["masks"].bool()
            is_thing = target.get("is_thing", torch.ones(len(labels), dtype=torch.bool))
        else:
            ids = torch.as_tensor(target["category_ids"], dtype=torch.int64)
            keep = ~torch.as_tensor(target["iscrowd"], dtype=torch.bool)
            labels = ids
            if lookup is not None:
                known = (ids >= 0) & (ids < len(lookup))
                labels = torch.full_like(ids, -1)
                labels[known] = lookup.to(ids.device)[ids[known]]
                keep &= labels >= 0
            labels, masks = labels[keep], target["masks"][keep].bool()
            is_thing = (
                thing_of_index.to(labels.device)[labels]
                if thing_of_index is not None
                else torch.ones(len(labels), dtype=torch.bool)
            )
        encoded.append(
            {"labels": labels, "masks": masks, "is_thing": is_thing, "semantic": target["semantic"]}
        )
    return encoded


class MaskIDModel(nn.Module):
    """What MaX-DeepLab and kMaX-DeepLab share around their own ``decode``: the forward contract
    (losses from ``self.criterion`` in training, raw mask-ID outputs in evaluation) and the
    slot-wise test-time merge."""

    categories: CategoryTable | None
    criterion: MaXDeepLabLoss
    # a frozen copy with the decoder's batch norms folded, set by omniseg.optimize_for_inference
    # (fold_batchnorm): BN after the stride-4 convolutions costs as much as the convolutions
    inference_decoder: InferenceCopy | None = None

    def decode(self, features: Sequence[Tensor]) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Any]:
        """Training: the weighted losses (kMaX: also ``<name>_<i>`` for layer ``i``'s prediction).
        Evaluation: ``{"class_logits" (B, N, C + 1), "mask_logits" (B, N, H/4, W/4)}``: the
        auxiliary semantic head feeds a training loss only, so it does not run; every task's
        result comes from the masks."""
        if not isinstance(images, Tensor):
            images = torch.stack(list(images))
        features = self.backbone(images)
        if self.inference_decoder is not None and not self.training and not torch.is_grad_enabled():
            outputs = decode_image(self.inference_decoder.get(self), features=features)
        else:
            outputs = self.decode(features)
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (see omniseg.data.targets.training_target)")
            return self.criterion(outputs, encode_mask_id_targets(targets, self.categories))
        return {k: outputs[k] for k in ("class_logits", "mask_logits")}

    def merge_test_time_views(
        self, views: Sequence[tuple[Mapping[str, Tensor], float, bool]], size: Sequence[int]
    ) -> dict[str, Tensor]:
        """Test-time flip / scales: :func:`~omniseg.models.layers.mask_id_inference.merge_mask_id_views`."""
        return merge_mask_id_views(views, size)


class MaXDeepLab(MaskIDModel):
    """Backbone + dual-path decoder + mask-ID heads (see the module docstring).

    ``num_classes`` counts the categories (no background: "no object" is the extra last class).
    Defaults follow deeplab2's MaX-DeepLab-S where they carry over (128 slots, memory 256 wide,
    8 heads, FFN 2048, embedding 128, span 65); ``dual_path_strides`` names the decoder levels that
    carry dual-path blocks (``blocks_per_level`` each), the others a conv block.
    """

    tasks: tuple[str, ...] = ("panoptic", "instance", "semantic")

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        categories: CategoryTable | None = None,
        num_slots: int = 128,
        memory_channels: int = 256,
        decoder_channels: int = 256,
        key_channels: int = 128,
        value_channels: int = 256,
        num_heads: int = 8,
        ffn_channels: int = 2048,
        axial_span: int = 65,
        embedding_dim: int = 128,
        dual_path_strides: Sequence[int] = (32, 16),
        blocks_per_level: int = 1,
        hourglasses: int = 1,
        pq_weight: float = 3.0,
        alpha: float = 0.75,
        mask_id_weight: float = 0.3,
        instance_weight: float = 1.0,
        instance_temperature: float = 0.3,
        semantic_weight: float = 1.0,
        class_thresh: float = 0.7,
        pixel_thresh: float = 0.4,
        thing_area_limit: int = 0,
        stuff_area_limit: int = 0,
    ) -> None:
        super().__init__()
        if categories is not None and len(categories) != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the category table has {len(categories)} categories"
            )
        if hourglasses < 1:
            raise ValueError(f"hourglasses must be >= 1, got {hourglasses}")
        self.backbone = backbone
        self.num_classes, self.categories = num_classes, categories
        self.strides = (32, 16, 8, 4)
        width = decoder_channels
        self.projections = nn.ModuleList(projection(c, width) for c in reversed(backbone.channels))
        self.memory = nn.Parameter(torch.randn(num_slots, memory_channels))

        def level(stride: int) -> nn.ModuleList:
            if stride in dual_path_strides:
                return nn.ModuleList(
                    DualPathBlock(
                        width,
                        memory_channels,
                        key_channels=key_channels,
                        value_channels=value_channels,
                        num_heads=num_heads,
                        ffn_channels=ffn_channels,
                        span=axial_span,
                    )
                    for _ in range(blocks_per_level)
                )
            return nn.ModuleList([conv_block(width, width)])

        # hourglass p goes up 32 -> 4; each one after the first starts by going down 4 -> 32 again
        self.up_levels = nn.ModuleList(
            nn.ModuleList(level(s) for s in self.strides) for _ in range(hourglasses)
        )
        self.down = nn.ModuleList(
            nn.ModuleList(conv_block(width, width, stride=2) for _ in self.strides[1:])
            for _ in range(hourglasses - 1)
        )
        self.down_levels = nn.ModuleList(
            nn.ModuleList(level(s) for s in reversed(self.strides[:-1])) for _ in range(hourglasses - 1)
        )
        self.heads = MaskIDHeads(width, memory_channels, num_classes, embedding_dim=embedding_dim)
        self.semantic_head = semantic_head(width, num_classes)
        self.criterion = MaXDeepLabLoss(
            pq_weight=pq_weight,
            alpha=alpha,
            mask_id_weight=mask_id_weight,
            instance_weight=instance_weight,
            temperature=instance_temperature,
            semantic_weight=semantic_weight,
        )
        self.class_thresh, self.pixel_thresh = class_thresh, pixel_thresh
        self.thing_area_limit, self.stuff_area_limit = thing_area_limit, stuff_area_limit

    # ------------------------------------------------------------------------------ forward
    @staticmethod
    def _run_level(blocks: nn.ModuleList, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        for block in blocks:
            if isinstance(block, DualPathBlock):
                x, memory = block(x, memory)
            else:
                x = block(x)
        return x, memory

    def _up(
        self, levels: nn.ModuleList, sources: list[Tensor], memory: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """Strides 32 -> 4: each level upsamples the previous one and adds ``sources`` at its stride."""
        x, memory = self._run_level(levels[0], sources[0], memory)
        maps = [x]
        for blocks, source in zip(levels[1:], sources[1:], strict=True):
            x, memory = self._run_level(blocks, resize_to(x, source) + source, memory)
            maps.append(x)
        return maps, memory

    def _down(
        self, convs: nn.ModuleList, levels: nn.ModuleList, maps: list[Tensor], memory: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """Strides 4 -> 32 (the hourglass's way back): strided convs, adding ``maps`` at each stride."""
        x = maps[-1]
        out = [x]
        for conv, blocks, skip in zip(convs, levels, reversed(maps[:-1]), strict=True):
            x, memory = self._run_level(blocks, resize_to(conv(x), skip) + skip, memory)
            out.append(x)
        return out[::-1], memory

    def decode(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        """Backbone maps ``[C4, C8, C16, C32]`` -> ``{"class_logits", "mask_logits",
        "pixel_embeddings"}`` and, in training, ``"semantic_logits"`` (maps at stride 4)."""
        laterals = [proj(f) for proj, f in zip(self.projections, reversed(list(features)), strict=True)]
        memory = self.memory[None].expand(laterals[0].shape[0], -1, -1)
        maps, memory = self._up(self.up_levels[0], laterals, memory)
        for convs, down_levels, up_levels in zip(
            self.down, self.down_levels, self.up_levels[1:], strict=True
        ):
            maps, memory = self._down(convs, down_levels, maps, memory)
            maps, memory = self._up(up_levels, maps, memory)
        x = maps[-1]
        outputs = self.heads(x, memory)
        if self.training:  # an auxiliary loss's head: inference segments from the masks alone
            outputs["semantic_logits"] = self.semantic_head(x)
        return outputs

    # ------------------------------------------------------------------------- post-process
    def post_process(
        self,
        outputs: Mapping[str, Tensor],
        image_sizes: Sequence[Sequence[int]],
        *,
        task: str = "panoptic",
        class_thresh: float | None = None,
        pixel_thresh: float | None = None,
        thing_area_limit: int | None = None,
        stuff_area_limit: int | None = None,
        **_: object,
    ) -> list[Segments]:
        """One ``Segments`` per image at ``image_sizes``: the panoptic result (slots with class
        confidence >= ``class_thresh``, pixels of mask-ID confidence < ``pixel_thresh`` void), or
        its instance (thing segments) or semantic view."""
        task = validate_task(self, task)
        thresh = self.class_thresh if class_thresh is None else class_thresh
        panoptic = mask_id_panoptic_inference(
            outputs["class_logits"],
            outputs["mask_logits"],
            image_sizes,
            categories=self.categories,
            thing_thresh=thresh,
            stuff_thresh=thresh,
            pixel_thresh=self.pixel_thresh if pixel_thresh is None else pixel_thresh,
            thing_area_limit=self.thing_area_limit if thing_area_limit is None else thing_area_limit,
            stuff_area_limit=self.stuff_area_limit if stuff_area_limit is None else stuff_area_limit,
        )
        return panoptic_to_task(panoptic, task)


def resolve_classes(
    categories: CategoryTable | Sequence[Mapping] | None, num_classes: int | None
) -> tuple[CategoryTable | None, int]:
    """The category table (if any) and the class count a builder was given."""
    table = as_category_table(categories)
    if table is not None:
        if num_classes not in (None, len(table)):
            raise ValueError(
                f"num_classes={num_classes} disagrees with the category table ({len(table)} categories)"
            )
        num_classes = len(table)
    if num_classes is None:
        raise ValueError("give categories or num_classes")
    return table, num_classes


@register_model("max_deeplab")
def max_deeplab(
    *,
    categories: CategoryTable | Sequence[Mapping] | None = None,
    num_classes: int | None = None,
    backbone: str = "efficientnet_lite0",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> MaXDeepLab:
    """MaX-DeepLab on ``backbone``. With ``categories`` the class count follows from it and results
    carry its category ids; otherwise give ``num_classes``. ``kwargs`` go to :class:`MaXDeepLab`."""
    table, num_classes = resolve_classes(categories, num_classes)
    return MaXDeepLab(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=num_classes,
        categories=table,
        **kwargs,
    )
