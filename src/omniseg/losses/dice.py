"""Mask losses on sigmoid logits (Mask2Former's ``dice_loss`` and ``sigmoid_ce_loss``), per mask and
as pairwise cost matrices for matching every prediction against every target."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["dice_loss", "mask_bce_loss", "pairwise_dice_loss", "pairwise_mask_bce_loss"]


def _normalise(per_mask: Tensor, num_masks: float | Tensor | None) -> Tensor:
    # Mask2Former divides by the number of matched masks over the whole (distributed) batch
    return per_mask.sum() / (max(per_mask.numel(), 1) if num_masks is None else num_masks)


def dice_loss(logits: Tensor, targets: Tensor, *, num_masks: float | Tensor | None = None) -> Tensor:
    """``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` per mask, ``p = sigmoid(logits)``.

    ``logits`` and ``targets`` are ``(N, ...)``, one mask per row; the per-mask losses are summed
    and divided by ``num_masks`` (default ``N``, i.e. averaged).
    """
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1).to(prob.dtype)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return _normalise(1 - (numerator + 1) / (denominator + 1), num_masks)


def mask_bce_loss(logits: Tensor, targets: Tensor, *, num_masks: float | Tensor | None = None) -> Tensor:
    """Sigmoid binary cross-entropy averaged over each mask's pixels, then over masks (``num_masks``)."""
    loss = F.binary_cross_entropy_with_logits(
        logits.flatten(1), targets.flatten(1).to(logits.dtype), reduction="none"
    )
    return _normalise(loss.mean(1), num_masks)


def pairwise_dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``(N, M)``: :func:`dice_loss` of every prediction ``(N, P)`` against every target ``(M, P)``."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1).to(prob.dtype)
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_mask_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``(N, M)``: :func:`mask_bce_loss` of every prediction ``(N, P)`` against every target ``(M, P)``.

    BCE is linear in the target, so the matrix is two products: each pixel's loss as foreground
    (``softplus(-x)``, the BCE of logit ``x`` against 1) times the targets, plus its loss as
    background (``softplus(x)``) times their complements.
    """
    logits = logits.flatten(1)
    targets = targets.flatten(1).to(logits.dtype)
    as_foreground, as_background = F.softplus(-logits), F.softplus(logits)
    return (as_foreground @ targets.T + as_background @ (1 - targets).T) / logits.shape[1]
