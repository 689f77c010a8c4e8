"""MaX-DeepLab's losses (Wang et al. 2021; deeplab2's ``max_deeplab_loss.MaXDeepLabLoss``), shared by
kMaX-DeepLab.

Per image, at the resolution of the predicted masks (stride 4), with ``P`` pixels, ``N`` slots and
``K`` ground-truth masks (non-crowd segments, things and stuff, downsampled by nearest sampling as
deeplab2's ``strided_downsample``; masks that vanish are dropped):

* mask-ID probabilities ``m_hat = softmax over the N slots of the mask logits``;
* similarity of target ``k`` and slot ``n`` (the PQ-style matching weight):
  ``p_n(c_k) * Dice(m_k, m_hat_n)``, ``Dice = sum(m m_hat) / ((sum m + sum m_hat) / 2 + 1e-5)``,
  with ``m_hat`` zeroed on void pixels; the Hungarian matching maximises its sum;
* PQ-style loss (weight 3.0), two terms:
  - class term, the mean over all ``N`` slots of ``a_n w_n CE(class_logits_n, y_n)``: matched slots
    learn their target's class with ``a = alpha = 0.75`` and ``w = sg(Dice)`` (``sg``: stop gradient),
    unmatched slots learn "no object" with ``a = 1 - alpha`` and ``w = sg(void share of m_hat_n)``
    (the share of the slot's mask probability lying on void pixels);
  - dice term, the mean over the ``K`` targets of ``sg(p_n(c_k)) * (1 - Dice(m_k, m_hat_n))``;
  (both weights bounded below by 1e-5, as deeplab2);
* mask-ID cross-entropy (0.3): per pixel of a target mask, cross-entropy over the slots with the
  slot matched to that target as the label; mean over those pixels;
* instance discrimination (1.0, temperature 0.3): each target's feature is the L2-normalised mean
  of the (L2-normalised) pixel embeddings over its mask; every pixel of a *thing* target classifies
  its own target among all ``K`` by ``softmax(g . t / 0.3)``; mean over those pixels;
* semantic cross-entropy (1.0) of the auxiliary semantic head against the semantic map.

Each term is averaged over the images of the batch. Auxiliary outputs (kMaX: every decoder layer)
reuse the matching of the final output, as deeplab2 does.

The "no object" weight follows deeplab2's code (and the kMaX authors' PyTorch port), not the
paper's wording: an unmatched slot is pushed to "no object" in proportion to how much of its mask
lies on void, so slots still spreading over labelled pixels early in training are not all told
"no object" at once. We first read the paper as ``1 - void share``: on Cityscapes, with ~120
unmatched slots per image at weight ~0.9 against matched slots at weight Dice ~0.01, kMaX
collapsed to "no object" everywhere (PQ 0 after 950 steps). Also
simplified: no ``mask_dice_term_modifier`` (a constant factor on the dice term), no top-k pixel
selection (deeplab2's default keeps all pixels), mask-ID cross-entropy averaged over the pixels of
targets rather than over all non-void pixels (crowd pixels carry no label here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.losses.cross_entropy import semantic_cross_entropy
from omniseg.models.layers.matcher import min_cost_assignment

__all__ = [
    "MaXDeepLabLoss",
    "instance_discrimination_loss",
    "mask_dice_similarity",
    "mask_id_cross_entropy",
    "match_slots",
    "pq_similarity",
    "pq_style_loss",
]

_EPS = 1e-5


def mask_dice_similarity(targets: Tensor, probs: Tensor) -> Tensor:
    """``(K, N)`` Dice of binary ``targets (K, P)`` and soft masks ``probs (N, P)`` (deeplab2's
    ``_mask_similarity(metric="dice")``)."""
    targets = targets.to(probs.dtype)
    intersection = targets @ probs.T
    denominator = (targets.sum(1)[:, None] + probs.sum(1)[None, :]) / 2
    return intersection / (denominator + _EPS)


def pq_similarity(class_probs: Tensor, mask_probs: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """``(K, N)`` PQ-style similarity ``p_n(c_k) * Dice(m_k, m_hat_n)``: ``class_probs (N, C + 1)``,
    ``mask_probs (N, P)`` (void pixels already zeroed), target ``labels (K,)``, ``targets (K, P)``."""
    return class_probs[:, labels].T * mask_dice_similarity(targets, mask_probs)


def match_slots(similarity: Tensor) -> Tensor:
    """The slot of each target ``(K,)`` in the one-to-one matching of largest total ``similarity (K, N)``;
    -1 for the targets left over when there are more targets than slots."""
    rows, cols = min_cost_assignment(-similarity)
    slots = torch.full((similarity.shape[0],), -1, dtype=torch.int64)
    slots[rows] = cols
    return slots.to(similarity.device)


def pq_style_loss(
    class_logits: Tensor,
    mask_logits: Tensor,
    labels: Tensor,
    targets: Tensor,
    slots: Tensor,
    non_void: Tensor,
    *,
    alpha: float = 0.75,
) -> tuple[Tensor, Tensor]:
    """``(class term, dice term)`` of one image (see the module docstring): ``class_logits (N, C + 1)``,
    ``mask_logits (N, P)``, ``labels (K,)``, ``targets (K, P)``, ``slots (K,)`` matched to the targets,
    ``non_void (P,)`` bool."""
    num_slots, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = mask_logits.softmax(0)
    dice = mask_dice_similarity(targets, probs * non_void)  # (K, N)
    k = torch.arange(len(slots), device=slots.device)
    class_probs = class_logits.softmax(-1)
    matched_class_prob = class_probs[slots, labels].detach()

    target_class = torch.full((num_slots,), num_classes, dtype=torch.int64, device=class_logits.device)
    target_class[slots] = labels
    positive = torch.zeros(num_slots, dtype=torch.bool, device=class_logits.device)
    positive[slots] = True
    matched_dice = torch.zeros(num_slots, dtype=probs.dtype, device=probs.device)
    matched_dice[slots] = dice[k, slots].detach()
    void_share = ((probs * ~non_void).sum(1) / (probs.sum(1) + _EPS)).detach()
    weight = torch.where(positive, matched_dice, void_share).clamp_min(_EPS)
    balance = torch.where(positive, alpha, 1 - alpha)
    class_term = (balance * weight * F.cross_entropy(class_logits, target_class, reduction="none")).mean()

    if len(slots) == 0:
        return class_term, mask_logits.sum() * 0.0
    dice_term = (matched_class_prob.clamp_min(_EPS) * (1 - dice[k, slots])).mean()
    return class_term, dice_term


def mask_id_cross_entropy(mask_logits: Tensor, targets: Tensor, slots: Tensor) -> Tensor:
    """Cross-entropy over the slots ``mask_logits (N, P)`` at the pixels of ``targets (K, P)``, each
    labelled with its target's slot ``slots (K,)``; mean over those pixels (0 without any)."""
    covered = targets.any(0)
    if not covered.any():
        return mask_logits.sum() * 0.0
    label = slots[targets.to(torch.int64).argmax(0)]  # targets do not overlap
    return F.cross_entropy(mask_logits.T[covered], label[covered])


def instance_discrimination_loss(
    embeddings: Tensor, targets: Tensor, is_thing: Tensor, *, temperature: float = 0.3
) -> Tensor:
    """MaX-DeepLab's instance discrimination of one image: ``embeddings (E, P)`` (L2-normalised),
    ``targets (K, P)``, ``is_thing (K,)``; mean over the pixels of thing targets (0 without any)."""
    targets = targets.to(embeddings.dtype)
    thing_pixels = (targets * is_thing[:, None]).sum(0) > 0
    if not thing_pixels.any():
        return embeddings.sum() * 0.0
    mean = targets @ embeddings.T / targets.sum(1, keepdim=True).clamp_min(1.0)  # (K, E)
    features = F.normalize(mean, dim=-1)
    logits = features @ embeddings / temperature  # (K, P)
    label = targets.argmax(0)
    return F.cross_entropy(logits.T[thing_pixels], label[thing_pixels])


def _downsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest sampling of ``(K, H, W)`` integer/bool maps to ``size`` (deeplab2: strided downsampling)."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    if len(maps) == 0:  # an image without targets
        return maps.new_zeros((0, *size))
    return F.interpolate(maps[None].float(), size=size, mode="nearest")[0].to(maps.dtype)


def _at_size(output: Mapping[str, Tensor], size: tuple[int, int]) -> Mapping[str, Tensor]:
    """An auxiliary prediction made at another resolution (kMaX's layers at strides 32..8), its mask
    logits and pixel embeddings resized bilinearly to ``size`` (the embeddings re-normalised)."""
    if tuple(output["mask_logits"].shape[-2:]) == size:
        return output
    mask_logits = F.interpolate(output["mask_logits"], size=size, mode="bilinear", align_corners=False)
    embeddings = F.interpolate(output["pixel_embeddings"], size=size, mode="bilinear", align_corners=False)
    return {**output, "mask_logits": mask_logits, "pixel_embeddings": F.normalize(embeddings, dim=1)}


class MaXDeepLabLoss:
    """All MaX-DeepLab losses of a batch (deeplab2's defaults; see the module docstring).

    ``outputs``: ``class_logits (B, N, C + 1)``, ``mask_logits (B, N, h, w)``, ``pixel_embeddings
    (B, E, h, w)``, ``semantic_logits (B, C, h', w')`` and optionally ``aux_outputs`` (a list of dicts
    with the first three, resized to the final prediction's size where they are smaller). ``targets``: per image ``labels (K,)`` class indices, ``masks (K, H, W)``
    bool, ``is_thing (K,)`` bool and ``semantic (H, W)`` class indices (``ignore_index`` = void).
    Returns ``loss_pq_class``, ``loss_pq_dice``, ``loss_mask_id``, ``loss_instance``,
    ``loss_semantic`` (already weighted) and ``<name>_<i>`` for auxiliary output ``i``.
    """

    def __init__(
        self,
        *,
        pq_weight: float = 3.0,
        alpha: float = 0.75,
        mask_id_weight: float = 0.3,
        instance_weight: float = 1.0,
        temperature: float = 0.3,
        semantic_weight: float = 1.0,
        ignore_index: int = 255,
    ) -> None:
        self.pq_weight, self.alpha = pq_weight, alpha
        self.mask_id_weight = mask_id_weight
        self.instance_weight, self.temperature = instance_weight, temperature
        self.semantic_weight = semantic_weight
        self.ignore_index = ignore_index

    def _output_losses(
        self,
        output: Mapping[str, Tensor],
        b: int,
        labels: Tensor,
        masks: Tensor,
        is_thing: Tensor,
        non_void: Tensor,
        slots: Tensor,
    ) -> dict[str, Tensor]:
        mask_logits = output["mask_logits"][b].flatten(1)
        class_term, dice_term = pq_style_loss(
            output["class_logits"][b], mask_logits, labels, masks, slots, non_void, alpha=self.alpha
        )
        embeddings = output["pixel_embeddings"][b].flatten(1)
        return {
            "loss_pq_class": self.pq_weight * class_term,
            "loss_pq_dice": self.pq_weight * dice_term,
            "loss_mask_id": self.mask_id_weight * mask_id_cross_entropy(mask_logits, masks, slots),
            "loss_instance": self.instance_weight
            * instance_discrimination_loss(embeddings, masks, is_thing, temperature=self.temperature),
        }

    def __call__(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        class_logits, mask_logits = outputs["class_logits"], outputs["mask_logits"]
        if len(targets) != class_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {class_logits.shape[0]}")
        size = (int(mask_logits.shape[-2]), int(mask_logits.shape[-1]))
        aux = [_at_size(output, size) for output in outputs.get("aux_outputs", ())]
        totals: dict[str, Tensor] = {}
        for b, target in enumerate(targets):
            device = mask_logits.device
            masks = _downsample(target["masks"].bool(), size).to(device)
            keep = masks.flatten(1).any(1)  # masks lost to the downsampling are not targets
            masks = masks[keep].flatten(1)
            labels = target["labels"].to(device)[keep]
            is_thing = target["is_thing"].to(device)[keep]
            non_void = (
                _downsample(target["semantic"][None], size)[0].to(device).flatten() != self.ignore_index
            )
            with torch.no_grad():
                probs = mask_logits[b].flatten(1).float().softmax(0) * non_void
                similarity = pq_similarity(class_logits[b].float().softmax(-1), probs, labels, masks)
                slots = match_slots(similarity)
            matched = slots >= 0  # all of them unless the image has more segments than slots
            masks, labels, is_thing, slots = (
                masks[matched],
                labels[matched],
                is_thing[matched],
                slots[matched],
            )
            image = self._output_losses(outputs, b, labels, masks, is_thing, non_void, slots)
            for i, aux_output in enumerate(aux):
                aux_losses = self._output_losses(aux_output, b, labels, masks, is_thing, non_void, slots)
                image.update({f"{name}_{i}": value for name, value in aux_losses.items()})
            for name, value in image.items():
                totals[name] = totals.get(name, 0.0) + value / len(targets)
        if self.semantic_weight > 0 and "semantic_logits" in outputs:
            semantic = torch.stack([t["semantic"] for t in targets]).to(mask_logits.device)
            logits = F.interpolate(
                outputs["semantic_logits"], size=semantic.shape[-2:], mode="bilinear", align_corners=False
            )
            totals["loss_semantic"] = self.semantic_weight * semantic_cross_entropy(
                logits, semantic, ignore_index=self.ignore_index
            )
        return totals
