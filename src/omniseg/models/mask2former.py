"""Mask2Former (Cheng et al. 2022): masked-attention mask transformer for all three tasks.

    backbone C4..C32 -> MSDeformAttn pixel decoder -> mask features (1/4) + F32, F16, F8
                     -> masked-attention transformer decoder -> per query: class logits (C + 1,
                        the last "no object") and a mask (dot product with the mask features)

One prediction serves panoptic, instance and semantic segmentation
(:mod:`omniseg.models.layers.mask_classification`), at each image's own resolution.

Training (the paper's recipe): per decoder layer -- the initial queries' prediction and every
layer's (deep supervision) -- queries are matched one-to-one to the ground-truth segments by
class + sigmoid BCE + dice costs on random points; the loss is cross-entropy over classes
(no-object weight 0.1) plus BCE and dice on ``num_points`` importance-sampled points of each
matched mask, weighted 2 / 5 / 5. Segments come from :func:`omniseg.data.targets.training_target`:
every non-crowd segment, thing or stuff, is one target (stuff: one per class and image), its
class the category's index in the table.

``omniseg.models.hf_import`` loads Hugging Face ``Mask2FormerForUniversalSegmentation`` weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.inference import validate_task
from omniseg.losses import point_mask_losses
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.detection import as_category_table
from omniseg.models.layers.mask2former_decoder import MaskedAttentionDecoder, MSDeformAttnPixelDecoder
from omniseg.models.layers.mask_classification import (
    instance_inference,
    panoptic_inference,
    semantic_inference,
)
from omniseg.models.layers.matcher import HungarianMatcher
from omniseg.structures import CategoryTable, Segments

__all__ = ["Mask2Former", "encode_mask_targets", "mask2former"]


def encode_mask_targets(
    targets: Sequence[Mapping[str, Tensor]], categories: CategoryTable | None
) -> list[dict[str, Tensor]]:
    """``{"labels" (K,), "masks" (K, H, W) bool}`` per image from typed training targets: crowd
    segments dropped, labels = the category's index in ``categories`` (the category id itself
    without a table). Targets that already carry ``labels`` pass through."""
    encoded = []
    for target in targets:
        if "labels" in target:
            encoded.append({"labels": target["labels"], "masks": target["masks"].bool()})
            continue
        ids = torch.as_tensor(target["category_ids"], dtype=torch.int64)
        keep = ~torch.as_tensor(target["iscrowd"], dtype=torch.bool)
        labels = ids
        if categories is not None:
            lookup = torch.from_numpy(categories.id_lookup(fill=-1))
            known = (ids >= 0) & (ids < len(lookup))
            labels = torch.full_like(ids, -1)
            labels[known] = lookup[ids[known]]
            keep &= labels >= 0
        encoded.append({"labels": labels[keep], "masks": target["masks"][keep].bool()})
    return encoded


class Mask2Former(nn.Module):
    """Backbone + :class:`MSDeformAttnPixelDecoder` + :class:`MaskedAttentionDecoder`.

    ``num_classes`` counts the categories (no background: "no object" is the extra last class).
    Defaults are the paper's COCO settings (256 wide, 100 queries, 6 encoder and 9 decoder layers).
    """

    tasks: tuple[str, ...] = ("panoptic", "instance", "semantic")

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        categories: CategoryTable | None = None,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        decoder_layers: int = 9,
        decoder_ffn_dim: int = 2048,
        pre_norm: bool = False,
        enforce_input_projection: bool = False,
        conv_dim: int = 256,
        mask_dim: int = 256,
        encoder_layers: int = 6,
        encoder_heads: int = 8,
        encoder_points: int = 4,
        encoder_ffn_dim: int = 1024,
        norm_groups: int = 32,
        dropout: float = 0.0,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        object_mask_thresh: float = 0.8,
        overlap_thresh: float = 0.8,
        top_k: int = 100,
    ) -> None:
        super().__init__()
        if categories is not None and len(categories) != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the category table has {len(categories)} categories"
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.categories = categories
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            backbone.channels,
            conv_dim=conv_dim,
            mask_dim=mask_dim,
            num_layers=encoder_layers,
            num_heads=encoder_heads,
            num_points=encoder_points,
            ffn_dim=encoder_ffn_dim,
            dropout=dropout,
            groups=norm_groups,
        )
        self.transformer_decoder = MaskedAttentionDecoder(
            conv_dim,
            num_classes,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            ffn_dim=decoder_ffn_dim,
            num_layers=decoder_layers,
            pre_norm=pre_norm,
            mask_dim=mask_dim,
            dropout=dropout,
            enforce_input_projection=enforce_input_projection,
        )
        self.matcher = HungarianMatcher(
            class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight, num_points=num_points
        )
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.object_mask_thresh = object_mask_thresh
        self.overlap_thresh = overlap_thresh
        self.top_k = top_k

    # ------------------------------------------------------------------------------ forward
    def decode(self, features: Sequence[Tensor], *, aux: bool | None = None) -> dict[str, Any]:
        """Backbone maps ``[C4, C8, C16, C32]`` -> ``{"class_logits", "mask_logits", "aux_outputs"}``
        (see :class:`MaskedAttentionDecoder`; ``aux``, by default in training, fills ``aux_outputs``)."""
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.transformer_decoder(multi_scale, mask_features, aux=aux)

    def forward(
        self, images: Tensor | Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Any]:
        """Training: the weighted losses. Evaluation: ``{"class_logits" (B, Q, C + 1),
        "mask_logits" (B, Q, H/4, W/4)}`` of the last decoder layer."""
        if not isinstance(images, Tensor):
            images = torch.stack(list(images))  # equally sized images only: masks are per batch
        outputs = self.decode(self.backbone(images))
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (see omniseg.data.targets.training_target)")
            return self.losses(outputs, encode_mask_targets(targets, self.categories))
        return {"class_logits": outputs["class_logits"], "mask_logits": outputs["mask_logits"]}

    # ------------------------------------------------------------------------------- losses
    def _layer_losses(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        num_masks: float,
    ) -> dict[str, Tensor]:
        matches = self.matcher(class_logits, mask_logits, targets)
        target_classes = torch.full(
            class_logits.shape[:2], self.num_classes, dtype=torch.int64, device=class_logits.device
        )
        for b, (query, index) in enumerate(matches):
            target_classes[b, query.to(class_logits.device)] = targets[b]["labels"][index].to(
                class_logits.device
            )
        loss_ce = F.cross_entropy(class_logits.transpose(1, 2), target_classes, weight=self.class_weights)
        predicted = torch.cat([mask_logits[b, q.to(mask_logits.device)] for b, (q, _) in enumerate(matches)])
        if len(predicted) == 0:  # nothing to match: the mask losses are zero but keep the graph
            bce = dice = mask_logits.sum() * 0.0
        else:
            matched = torch.cat(
                [targets[b]["masks"][t.to(targets[b]["masks"].device)] for b, (_, t) in enumerate(matches)]
            )
            bce, dice = point_mask_losses(
                predicted,
                matched.to(predicted.device),
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_sample_ratio=self.importance_sample_ratio,
                num_masks=num_masks,
            )
        return {
            "loss_ce": self.class_weight * loss_ce,
            "loss_mask": self.mask_weight * bce,
            "loss_dice": self.dice_weight * dice,
        }

    def losses(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Weighted losses of the last layer (``loss_ce``, ``loss_mask``, ``loss_dice``) and, with deep
        supervision, of each earlier prediction ``i`` (``loss_ce_i`` ...); masks normalise over the batch."""
        if len(targets) != outputs["class_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['class_logits'].shape[0]}")
        num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = self._layer_losses(outputs["class_logits"], outputs["mask_logits"], targets, num_masks)
        if self.deep_supervision:
            for i, aux in enumerate(outputs["aux_outputs"]):
                aux_losses = self._layer_losses(aux["class_logits"], aux["mask_logits"], targets, num_masks)
                losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        return losses

    # ------------------------------------------------------------------------- post-process
    def post_process(
        self,
        outputs: Mapping[str, Tensor],
        image_sizes: Sequence[Sequence[int]],
        *,
        task: str = "panoptic",
        score_thresh: float | None = None,
        top_k: int | None = None,
        object_mask_thresh: float | None = None,
        overlap_thresh: float | None = None,
        **_: object,
    ) -> list[Segments]:
        """One ``Segments`` per image at ``image_sizes`` (the mask logits cover the whole input):
        ``panoptic`` (queries above ``object_mask_thresh``, ``overlap_thresh``), ``instance`` (the
        ``top_k`` best query-class pairs, thing categories only when a table is known, those below
        ``score_thresh`` dropped) or ``semantic``."""
        task = validate_task(self, task)
        class_logits, mask_logits = outputs["class_logits"], outputs["mask_logits"]
        if task == "semantic":
            return semantic_inference(class_logits, mask_logits, image_sizes, categories=self.categories)
        if task == "instance":
            return instance_inference(
                class_logits,
                mask_logits,
                image_sizes,
                categories=self.categories,
                top_k=self.top_k if top_k is None else top_k,
                things_only=self.categories is not None,
                score_thresh=0.0 if score_thresh is None else score_thresh,
            )
        return panoptic_inference(
            class_logits,
            mask_logits,
            image_sizes,
            categories=self.categories,
            object_mask_thresh=self.object_mask_thresh if object_mask_thresh is None else object_mask_thresh,
            overlap_thresh=self.overlap_thresh if overlap_thresh is None else overlap_thresh,
        )


@register_model("mask2former")
def mask2former(
    *,
    categories: CategoryTable | Sequence[Mapping] | None = None,
    num_classes: int | None = None,
    backbone: str = "efficientnet_lite0",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> Mask2Former:
    """Mask2Former on ``backbone``. With ``categories`` the class count follows from it and results
    carry its category ids; otherwise give ``num_classes`` (categories, no background).
    ``kwargs`` go to :class:`Mask2Former`."""
    table = as_category_table(categories)
    if table is not None:
        if num_classes not in (None, len(table)):
            raise ValueError(
                f"num_classes={num_classes} disagrees with the category table ({len(table)} categories)"
            )
        num_classes = len(table)
    if num_classes is None:
        raise ValueError("give categories or num_classes")
    return Mask2Former(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=num_classes,
        categories=table,
        **kwargs,
    )
