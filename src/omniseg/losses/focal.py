"""Focal losses: RetinaNet's sigmoid focal loss and CenterNet's penalty-reduced heatmap focal loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["heatmap_focal_loss", "sigmoid_focal_loss"]


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Lin et al.'s focal loss on independent sigmoid logits, summed and divided by ``normalizer``.

    ``targets`` are 0/1 (or soft) labels of ``logits``' shape; ``alpha = -1`` turns off the
    positive/negative weighting. ``normalizer`` is what the method divides by (RetinaNet: the number
    of positive anchors); ``None`` averages over all elements. The arithmetic is torchvision's.
    """
    import torchvision.ops  # lazily: its import pulls in torch._dynamo (1-2 s); detection training only

    loss = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
    if normalizer is None:
        return loss / max(logits.numel(), 1)
    return loss / normalizer


def heatmap_focal_loss(logits: Tensor, heatmap: Tensor, *, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CenterNet's penalty-reduced focal loss (Zhou et al. 2019, eq. 1) on centre heatmaps.

    ``logits`` and the Gaussian-splatted target ``heatmap`` (values in [0, 1], exactly 1 at object
    centres) share one shape. Centres weigh ``(1 - p)^alpha``; every other pixel weighs
    ``p^alpha (1 - y)^beta``, so pixels near a centre are penalised less. The sum is divided by the
    number of centres (at least 1). Log-probabilities come from ``logsigmoid`` rather than
    CenterNet's clamped sigmoid, which only differs where CenterNet's clamp at 1e-4 would bite.
    """
    if logits.shape != heatmap.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and heatmap {tuple(heatmap.shape)} do not match")
    prob = logits.sigmoid()
    centre = heatmap.eq(1).to(logits.dtype)
    positive = F.logsigmoid(logits) * (1 - prob).pow(alpha) * centre
    negative = F.logsigmoid(-logits) * prob.pow(alpha) * (1 - heatmap).pow(beta) * (1 - centre)
    return -(positive.sum() + negative.sum()) / centre.sum().clamp_min(1)
