"""kMaX-DeepLab (Yu et al. 2022): k-means mask transformer, MaX-DeepLab's faster-converging successor.

The cross-attention from queries to pixels becomes a k-means step: each pixel is assigned to one
cluster centre (argmax over the ``N`` centres of the current mask logits, one-hot) and each centre
adds its pixels' values (:mod:`omniseg.models.layers.kmeans_attention`)::

    backbone C4..C32 -> pixel decoder (1x1 projections; axial blocks at strides 32 and 16,
                        bottleneck blocks at 8 and 4; bilinear up + sum)  -> F32, F16, F8, F4
    transformer decoder: ``layers_per_stage`` k-means layers on each of F32, F16, F8 (deeplab2: 2
                         each, 6 in all), every layer predicting on its own map (deeplab2's kMaX
                         predictor; deep supervision: the predictions resized to stride 4, scored
                         with the final output's matching)
    heads on F4 with the final centres: class (C + 1), mask-ID logits, pixel embedding (the same
    depthwise predictor); semantic head.

Shares the losses (:class:`omniseg.losses.max_deeplab.MaXDeepLabLoss`), heads and inference with
:mod:`omniseg.models.max_deeplab`; post-processing is kMaX's mask-wise merge (class thresholds 0.7
thing / 0.5 stuff, overlap 0.8, score = class confidence x mean mask-ID probability).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from omniseg.inference import validate_task
from omniseg.losses.max_deeplab import MaXDeepLabLoss
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.axial_attention import AxialBlock
from omniseg.models.layers.kmeans_attention import KMeansCrossAttentionLayer
from omniseg.models.layers.mask_id_heads import MaskIDHeads
from omniseg.models.layers.mask_id_inference import (
    mask_id_panoptic_inference,
    panoptic_to_task,
)
from omniseg.models.max_deeplab import (
    BottleneckBlock,
    MaskIDModel,
    projection,
    resize_to,
    resolve_classes,
    semantic_head,
)
from omniseg.structures import CategoryTable, Segments

__all__ = ["KMaXDeepLab", "kmax_deeplab"]


class KMaXDeepLab(MaskIDModel):
    """Backbone + pixel decoder + k-means transformer decoder + mask-ID heads (module docstring).

    Defaults follow deeplab2's kMaX-DeepLab where they carry over (128 queries, 256 wide, 8 heads,
    FFN 2048, 2 layers per stage at strides 32/16/8); ``decoder_channels`` is one width for all
    pixel-decoder levels (deeplab2 uses 2048/1024/512/256 on a ResNet-50).
    """

    tasks: tuple[str, ...] = ("panoptic", "instance", "semantic")

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        categories: CategoryTable | None = None,
        num_queries: int = 128,
        memory_channels: int = 256,
        decoder_channels: int = 256,
        value_channels: int = 256,
        num_heads: int = 8,
        ffn_channels: int = 2048,
        axial_span: int = 65,
        embedding_dim: int = 128,
        layers_per_stage: int = 2,
        deep_supervision: bool = True,
        pq_weight: float = 3.0,
        alpha: float = 0.75,
        mask_id_weight: float = 0.3,
        instance_weight: float = 1.0,
        instance_temperature: float = 0.3,
        semantic_weight: float = 1.0,
        thing_thresh: float = 0.7,
        stuff_thresh: float = 0.5,
        overlap_thresh: float = 0.8,
        pixel_thresh: float = 0.0,
        thing_area_limit: int = 0,
        stuff_area_limit: int = 0,
    ) -> None:
        super().__init__()
        if categories is not None and len(categories) != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the category table has {len(categories)} categories"
            )
        self.backbone = backbone
        self.num_classes, self.categories = num_classes, categories
        width = decoder_channels
        self.projections = nn.ModuleList(projection(c, width) for c in reversed(backbone.channels))
        axial = dict(width=width // 2, num_heads=num_heads, span=axial_span)
        # pixel decoder levels at strides 32, 16 (axial attention), 8, 4 (bottlenecks), as deeplab2
        self.pixel_levels = nn.ModuleList(
            [AxialBlock(width, **axial), AxialBlock(width, **axial), BottleneckBlock(width), BottleneckBlock(width)]
        )
        self.centres = nn.Parameter(torch.randn(num_queries, memory_channels))
        self.layers = nn.ModuleList(
            KMeansCrossAttentionLayer(
                width,
                memory_channels,
                num_classes,
                value_channels=value_channels,
                num_heads=num_heads,
                ffn_channels=ffn_channels,
                embedding_dim=embedding_dim,
            )
            for _ in range(3 * layers_per_stage)
        )
        self.layers_per_stage = layers_per_stage
        self.deep_supervision = deep_supervision
        self.heads = MaskIDHeads(
            width, memory_channels, num_classes, embedding_dim=embedding_dim, pixel_head="depthwise"
        )
        self.semantic_head = semantic_head(width, num_classes)
        self.criterion = MaXDeepLabLoss(
            pq_weight=pq_weight,
            alpha=alpha,
            mask_id_weight=mask_id_weight,
            instance_weight=instance_weight,
            temperature=instance_temperature,
            semantic_weight=semantic_weight,
        )
        self.thing_thresh, self.stuff_thresh = thing_thresh, stuff_thresh
        self.overlap_thresh, self.pixel_thresh = overlap_thresh, pixel_thresh
        self.thing_area_limit, self.stuff_area_limit = thing_area_limit, stuff_area_limit

    # ------------------------------------------------------------------------------ forward
    def decode(self, features: Sequence[Tensor]) -> dict[str, Any]:
        """Backbone maps ``[C4, C8, C16, C32]`` -> ``{"class_logits", "mask_logits", "pixel_embeddings",
        "aux_outputs"}`` and, in training, ``"semantic_logits"`` (maps at stride 4; one auxiliary output
        per k-means layer)."""
        laterals = [proj(f) for proj, f in zip(self.projections, reversed(list(features)), strict=True)]
        x = self.pixel_levels[0](laterals[0])
        maps = [x]
        for level, lateral in zip(self.pixel_levels[1:], laterals[1:], strict=True):
            x = level(resize_to(x, lateral) + lateral)
            maps.append(x)
        pixel_space = maps[-1]
        centres = self.centres[None].expand(pixel_space.shape[0], -1, -1)
        aux_outputs = []
        for i, layer in enumerate(self.layers):
            centres, prediction = layer(maps[i // self.layers_per_stage], centres)
            aux_outputs.append(prediction)
        outputs: dict[str, Any] = self.heads(pixel_space, centres)
        if self.training:  # an auxiliary loss's head: inference segments from the masks alone
            outputs["semantic_logits"] = self.semantic_head(pixel_space)
        outputs["aux_outputs"] = aux_outputs if self.deep_supervision else []
        return outputs

    # ------------------------------------------------------------------------- post-process
    def post_process(
        self,
        outputs: Mapping[str, Tensor],
        image_sizes: Sequence[Sequence[int]],
        *,
        task: str = "panoptic",
        thing_thresh: float | None = None,
        stuff_thresh: float | None = None,
        overlap_thresh: float | None = None,
        pixel_thresh: float | None = None,
        thing_area_limit: int | None = None,
        stuff_area_limit: int | None = None,
        **_: object,
    ) -> list[Segments]:
        """One ``Segments`` per image at ``image_sizes``: kMaX's mask-wise panoptic result, or its
        instance (thing segments) or semantic view."""
        task = validate_task(self, task)
        panoptic = mask_id_panoptic_inference(
            outputs["class_logits"],
            outputs["mask_logits"],
            image_sizes,
            categories=self.categories,
            thing_thresh=self.thing_thresh if thing_thresh is None else thing_thresh,
            stuff_thresh=self.stuff_thresh if stuff_thresh is None else stuff_thresh,
            pixel_thresh=self.pixel_thresh if pixel_thresh is None else pixel_thresh,
            overlap_thresh=self.overlap_thresh if overlap_thresh is None else overlap_thresh,
            thing_area_limit=self.thing_area_limit if thing_area_limit is None else thing_area_limit,
            stuff_area_limit=self.stuff_area_limit if stuff_area_limit is None else stuff_area_limit,
            mask_score=True,
        )
        return panoptic_to_task(panoptic, task)


@register_model("kmax_deeplab")
def kmax_deeplab(
    *,
    categories: CategoryTable | Sequence[Mapping] | None = None,
    num_classes: int | None = None,
    backbone: str = "efficientnet_lite0",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> KMaXDeepLab:
    """kMaX-DeepLab on ``backbone``. With ``categories`` the class count follows from it and results
    carry its category ids; otherwise give ``num_classes``. ``kwargs`` go to :class:`KMaXDeepLab`."""
    table, num_classes = resolve_classes(categories, num_classes)
    return KMaXDeepLab(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=num_classes,
        categories=table,
        **kwargs,
    )
