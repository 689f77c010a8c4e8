"""Hungarian matcher: the assignment against brute force, the costs against direct formulas."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from omniseg.models.layers.matcher import HungarianMatcher, min_cost_assignment


def _brute_force(cost: torch.Tensor) -> tuple[float, set[tuple[int, int]]]:
    """Least total cost, and its (row, column) pairs, over every one-to-one assignment."""
    rows, cols = cost.shape
    if rows >= cols:  # each column picks a distinct row
        candidates = [
            set(zip(p, range(cols), strict=True)) for p in itertools.permutations(range(rows), cols)
        ]
    else:
        candidates = [
            set(zip(range(rows), p, strict=True)) for p in itertools.permutations(range(cols), rows)
        ]
    best = min(candidates, key=lambda pairs: sum(cost[r, c].item() for r, c in pairs))
    return sum(cost[r, c].item() for r, c in best), best


@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (2, 5), (1, 1), (5, 1)])
def test_assignment_is_the_brute_force_optimum(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    for _ in range(10):
        cost = torch.randn(shape, generator=generator, dtype=torch.float64)
        rows, cols = min_cost_assignment(cost)
        assert rows.dtype == cols.dtype == torch.int64
        assert rows.tolist() == sorted(rows.tolist())
        assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == _brute_force(cost)[1]


def _pixel_centres(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], dim=1)


def test_cost_matrix_is_the_weighted_sum_of_the_three_costs() -> None:
    torch.manual_seed(0)
    queries, classes, targets, h, w = 5, 4, 3, 6, 8
    class_logits = torch.randn(queries, classes + 1)
    mask_logits = torch.randn(queries, h, w) * 2
    labels = torch.tensor([2, 0, 2])
    masks = torch.rand(targets, h, w) > 0.5
    matcher = HungarianMatcher(class_weight=2.0, mask_weight=5.0, dice_weight=5.0)
    # at the pixel centres the sampled masks are the masks themselves
    cost = matcher.cost_matrix(class_logits, mask_logits, labels, masks, points=_pixel_centres(h, w))
    assert cost.shape == (queries, targets)
    prob = class_logits.softmax(-1)
    for q in range(queries):
        for t in range(targets):
            target = masks[t].float()
            bce = F.binary_cross_entropy_with_logits(mask_logits[q], target)
            p = mask_logits[q].sigmoid()
            dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
            expected = -2.0 * prob[q, labels[t]] + 5.0 * bce + 5.0 * dice
            assert cost[q, t].item() == pytest.approx(expected.item(), abs=1e-5)


def test_matcher_recovers_a_planted_assignment() -> None:
    torch.manual_seed(0)
    classes, h, w = 6, 16, 16
    target_masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    for i, (y, x) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
        target_masks[i, y : y + 16, x : x + 16] = True
    labels = torch.tensor([1, 3, 3, 5])
    # 7 queries; queries 5, 0, 6, 2 predict targets 0..3 (class and a half-resolution mask), the rest noise
    planted = [5, 0, 6, 2]
    class_logits = torch.randn(1, 7, classes + 1)
    mask_logits = torch.randn(1, 7, h, w)
    for t, q in enumerate(planted):
        class_logits[0, q, labels[t]] = 8.0
        mask_logits[0, q] = torch.where(F.avg_pool2d(target_masks[t][None].float(), 2)[0] > 0.5, 6.0, -6.0)
    ((queries, targets),) = HungarianMatcher(num_points=400)(
        class_logits, mask_logits, [{"labels": labels, "masks": target_masks}]
    )
    assert dict(zip(targets.tolist(), queries.tolist(), strict=True)) == dict(enumerate(planted))


def test_matcher_is_the_assignment_of_its_cost_and_handles_empty_images() -> None:
    torch.manual_seed(0)
    class_logits = torch.randn(3, 4, 3)
    mask_logits = torch.randn(3, 4, 8, 8)
    targets = [
        {"labels": torch.tensor([0, 2, 1]), "masks": torch.rand(3, 16, 16) > 0.5},
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)},
        {"labels": torch.tensor([1, 1, 0, 2, 2, 0]), "masks": torch.rand(6, 16, 16) > 0.5},  # more than Q
    ]
    matcher = HungarianMatcher(num_points=64)
    matches = matcher(class_logits, mask_logits, targets, generator=torch.Generator().manual_seed(1))
    assert len(matches) == 3
    empty_queries, empty_targets = matches[1]
    assert empty_queries.numel() == 0 and empty_targets.numel() == 0 and empty_queries.dtype == torch.int64
    assert len(matches[2][0]) == 4  # every query matched, two targets left over
    # the same random points (the same generator; the empty image draws none) give the same
    # costs, and the matches are their optimal assignment
    generator = torch.Generator().manual_seed(1)
    for b in (0, 2):
        cost = matcher.cost_matrix(
            class_logits[b], mask_logits[b], targets[b]["labels"], targets[b]["masks"], generator=generator
        )
        queries, target_index = matches[b]
        assert set(zip(queries.tolist(), target_index.tolist(), strict=True)) == _brute_force(cost)[1]


def test_class_cost_alone_matches_by_class_probability() -> None:
    torch.manual_seed(0)
    class_logits = torch.randn(1, 5, 4)
    labels = torch.tensor([0, 2, 1])
    matcher = HungarianMatcher(class_weight=1.0, mask_weight=0.0, dice_weight=0.0, num_points=16)
    ((queries, targets),) = matcher(
        class_logits, torch.randn(1, 5, 4, 4), [{"labels": labels, "masks": torch.ones(3, 4, 4)}]
    )
    cost = -class_logits[0].softmax(-1)[:, labels]
    assert set(zip(queries.tolist(), targets.tolist(), strict=True)) == _brute_force(cost)[1]
