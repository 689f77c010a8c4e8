"""Per-pixel cross-entropy for semantic maps (DeepLab, Panoptic FPN's semantic branch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["semantic_cross_entropy"]


def semantic_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    ohem_thresh: float | None = None,
    ohem_min_kept: int = 100_000,
) -> Tensor:
    """Per-pixel cross-entropy averaged over labelled pixels, optionally over hard pixels only (OHEM).

    The mean is PyTorch's weighted mean (``sum(loss) / sum(weight[target])``), but a batch with no
    labelled pixel gives 0 (with a gradient graph) instead of NaN.
    OHEM (as mmsegmentation's ``OHEMPixelSampler``): keep pixels whose predicted probability of the
    true class is below ``max(ohem_thresh, p_k)``, where ``p_k`` is the ``ohem_min_kept * B``-th
    smallest such probability, so that at least that many pixels are kept.
    """
    if logits.shape[-2:] != target.shape[-2:] or logits.shape[0] != target.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    target = target.long()
    pixel_loss = F.cross_entropy(
        logits,
        target,
        weight=class_weights,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if class_weights is not None:
        pixel_weight = class_weights.to(logits.dtype)[safe_target] * valid
    else:
        pixel_weight = valid.to(logits.dtype)
    if ohem_thresh is not None:
        with torch.no_grad():
            prob = logits.softmax(dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
            valid_prob = prob[valid]
            if valid_prob.numel() > 0:
                k = min(ohem_min_kept * logits.shape[0], valid_prob.numel() - 1)
                kth = valid_prob.kthvalue(k + 1).values
                threshold = torch.clamp(kth, min=ohem_thresh)
                keep = valid & (prob < threshold)
            else:
                keep = valid
        pixel_loss = pixel_loss * keep
        pixel_weight = pixel_weight * keep
    return pixel_loss.sum() / pixel_weight.sum().clamp_min(torch.finfo(logits.dtype).tiny)
