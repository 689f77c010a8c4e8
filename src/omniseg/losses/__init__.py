"""Losses shared by the methods: cross-entropy for semantic maps, focal losses, mask losses
(dice, per-mask BCE) and their point-sampled form for mask transformers."""

from omniseg.losses.cross_entropy import semantic_cross_entropy
from omniseg.losses.dice import dice_loss, mask_bce_loss, pairwise_dice_loss, pairwise_mask_bce_loss
from omniseg.losses.focal import heatmap_focal_loss, sigmoid_focal_loss
from omniseg.losses.point_sampling import (
    MaskLosses,
    mask_uncertainty,
    point_mask_losses,
    point_sample,
    uncertain_points,
)

__all__ = [
    "MaskLosses",
    "dice_loss",
    "heatmap_focal_loss",
    "mask_bce_loss",
    "mask_uncertainty",
    "pairwise_dice_loss",
    "pairwise_mask_bce_loss",
    "point_mask_losses",
    "point_sample",
    "semantic_cross_entropy",
    "sigmoid_focal_loss",
    "uncertain_points",
]
