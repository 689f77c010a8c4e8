"""Point-sampled mask losses (PointRend, Mask2Former): the mask losses on a few thousand points per
mask instead of every pixel, most of them where the prediction is least certain.

Points are ``(x, y)`` in ``[0, 1]`` over the image extent (0 the left/top edge, 1 the right/bottom
edge), so that masks of different resolutions (predictions at 1/4 scale, targets at full size)
are sampled at the same places.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.losses.dice import dice_loss, mask_bce_loss

__all__ = ["MaskLosses", "mask_uncertainty", "point_mask_losses", "point_sample", "uncertain_points"]


def point_sample(features: Tensor, points: Tensor, **grid_sample_options: Any) -> Tensor:
    """Bilinear samples of ``(N, C, H, W)`` features at ``(N, P, 2)`` points -> ``(N, C, P)``.

    ``(N, Hp, Wp, 2)`` points give ``(N, C, Hp, Wp)``. The options go to ``F.grid_sample``
    (``align_corners=False`` unless given, so that ``((i + 0.5) / W, (j + 0.5) / H)`` is the
    centre of pixel ``(j, i)``; points outside the image read zeros by default).
    """
    flat = points.dim() == 3
    grid = 2.0 * (points.unsqueeze(2) if flat else points) - 1.0
    sampled = F.grid_sample(
        features, grid.to(features.dtype), **{"align_corners": False, **grid_sample_options}
    )
    return sampled.squeeze(3) if flat else sampled


def mask_uncertainty(logits: Tensor) -> Tensor:
    """``-|logit|``: highest where a mask prediction is least certain (logit 0, probability 0.5)."""
    return -logits.abs()


def uncertain_points(
    mask_logits: Tensor,
    num_points: int,
    *,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    uncertainty: Callable[[Tensor], Tensor] = mask_uncertainty,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(N, num_points, 2)`` training points for ``(N, H, W)`` mask logits (PointRend's rule).

    ``num_points * oversample_ratio`` uniform random candidates are scored by ``uncertainty`` of
    the interpolated logits; the ``importance_sample_ratio`` share of the points are the most
    uncertain candidates and the rest are uniform random, so that confident regions are not
    left out entirely.
    """
    n = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    options = {"device": mask_logits.device, "dtype": mask_logits.dtype, "generator": generator}
    candidates = torch.rand(n, num_candidates, 2, **options)
    scores = uncertainty(point_sample(mask_logits[:, None], candidates)[:, 0])
    index = scores.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, index[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(n, num_points - num_uncertain, 2, **options)], dim=1)


class MaskLosses(NamedTuple):
    bce: Tensor
    dice: Tensor


def point_mask_losses(
    mask_logits: Tensor,
    target_masks: Tensor,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    num_masks: float | Tensor | None = None,
    points: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MaskLosses:
    """Mask2Former's mask losses: BCE and dice of ``(N, h, w)`` logits against their ``(N, H, W)``
    matched binary targets, both read at the same points (:func:`uncertain_points`, or ``points``
    ``(N, P, 2)`` when given). Targets are sampled bilinearly too, so boundary points get soft
    labels. Per-mask losses are summed and divided by ``num_masks`` (default ``N``).
    Defaults are Mask2Former's (112 x 112 points, oversampling 3, importance 0.75).
    """
    if mask_logits.shape[0] != target_masks.shape[0]:
        raise ValueError(f"{mask_logits.shape[0]} predicted masks for {target_masks.shape[0]} targets")
    with torch.no_grad():  # where to look is not learnt
        if points is None:
            points = uncertain_points(
                mask_logits,
                num_points,
                oversample_ratio=oversample_ratio,
                importance_sample_ratio=importance_sample_ratio,
                generator=generator,
            )
        point_targets = point_sample(target_masks[:, None].to(mask_logits.dtype), points)[:, 0]
    point_logits = point_sample(mask_logits[:, None], points)[:, 0]
    return MaskLosses(
        mask_bce_loss(point_logits, point_targets, num_masks=num_masks),
        dice_loss(point_logits, point_targets, num_masks=num_masks),
    )
