"""Bipartite matching of mask-transformer queries to ground-truth segments (Mask2Former's
``HungarianMatcher``): a cost for every (query, target) pair, then the assignment of least total
cost, per image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from omniseg.losses import pairwise_dice_loss, pairwise_mask_bce_loss, point_sample

__all__ = ["HungarianMatcher", "min_cost_assignment"]


def min_cost_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices (``int64``, rows ascending) of the one-to-one assignment of least
    total cost in a ``(rows, columns)`` matrix; ``min(rows, columns)`` pairs."""
    from scipy.optimize import linear_sum_assignment  # lazily: ~0.5 s of import, training only

    rows, cols = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher:
    """Matches each image's queries to its targets by class, mask BCE and dice costs.

    Cost of query ``q`` for target ``t`` (Mask2Former's, with its default weights 2 / 5 / 5):
    ``class_weight * -softmax(class_logits[q])[label_t]
    + mask_weight * BCE(mask_q, mask_t) + dice_weight * dice(mask_q, mask_t)``,
    the mask terms over ``num_points`` uniform random points shared by all queries and targets of
    the image (so the cost never needs the masks at a common resolution).
    """

    def __init__(
        self,
        *,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    def cost_matrix(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        labels: Tensor,
        target_masks: Tensor,
        *,
        points: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(Q, K)`` costs of one image: ``class_logits (Q, C + 1)``, ``mask_logits (Q, h, w)``,
        target ``labels (K,)`` (class indices) and ``target_masks (K, H, W)``; ``points (P, 2)``
        in ``[0, 1]`` replace the random ones when given."""
        if points is None:
            points = torch.rand(
                self.num_points, 2, device=mask_logits.device, dtype=torch.float32, generator=generator
            )
        # float32 throughout: the costs feed an exact combinatorial solver
        class_cost = -class_logits.float().softmax(-1)[:, labels]
        pred = point_sample(mask_logits[None].float(), points[None])[0]
        target = point_sample(target_masks[None].float(), points[None])[0]
        return (
            self.class_weight * class_cost
            + self.mask_weight * pairwise_mask_bce_loss(pred, target)
            + self.dice_weight * pairwise_dice_loss(pred, target)
        )

    @torch.no_grad()
    def __call__(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        *,
        generator: torch.Generator | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image, ``(query indices, target indices)`` of the matched pairs (``int64``, on CPU).

        ``class_logits (B, Q, C + 1)`` (last = no object), ``mask_logits (B, Q, h, w)``; each target
        holds ``labels (K,)`` class indices and ``masks (K, H, W)``. An image without targets
        matches nothing: two empty index tensors.
        """
        if len(targets) != class_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {class_logits.shape[0]}")
        matches = []
        for image_class_logits, image_mask_logits, target in zip(
            class_logits, mask_logits, targets, strict=True
        ):
            if len(target["labels"]) == 0:
                matches.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
                continue
            cost = self.cost_matrix(
                image_class_logits, image_mask_logits, target["labels"], target["masks"], generator=generator
            )
            matches.append(min_cost_assignment(cost))
        return matches
