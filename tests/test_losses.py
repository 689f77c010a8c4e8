"""Shared losses against independent computations: hand-written formulas, PyTorch and torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops

from omniseg.losses import (
    dice_loss,
    heatmap_focal_loss,
    mask_bce_loss,
    pairwise_dice_loss,
    pairwise_mask_bce_loss,
    point_mask_losses,
    point_sample,
    semantic_cross_entropy,
    sigmoid_focal_loss,
    uncertain_points,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _pixel_centres(height: int, width: int) -> torch.Tensor:
    """``(height * width, 2)`` points ``(x, y)`` in [0, 1] at the pixel centres, row by row."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], dim=1)


# ------------------------------------------------------------------------------ cross-entropy
def test_cross_entropy_is_shared_and_matches_pytorch() -> None:
    from omniseg.models import deeplab

    assert deeplab.semantic_cross_entropy is semantic_cross_entropy
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 7)
    target = torch.randint(0, 4, (2, 6, 7))
    target[0, :3] = 255
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=255, label_smoothing=0.1)
    actual = semantic_cross_entropy(logits, target, class_weights=weights, label_smoothing=0.1)
    assert torch.allclose(actual, expected, atol=1e-6)


def test_cross_entropy_with_nothing_labelled_is_zero_with_a_graph() -> None:
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    target = torch.full((2, 5, 5), 255)
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=255))  # what is avoided
    for options in ({}, {"ohem_thresh": 0.7}, {"class_weights": torch.ones(3)}):
        loss = semantic_cross_entropy(logits, target, **options)
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, logits)
        assert (grad == 0).all()


# ---------------------------------------------------------------------------------- focal
def test_sigmoid_focal_loss_hand_computed() -> None:
    logits, targets = [2.0, -1.0, 0.5, -3.0], [1.0, 0.0, 0.0, 1.0]
    alpha, gamma = 0.25, 2.0
    expected = 0.0
    for x, t in zip(logits, targets, strict=True):
        p = _sigmoid(x)
        if t == 1:
            expected += -alpha * (1 - p) ** gamma * math.log(p)
        else:
            expected += -(1 - alpha) * p**gamma * math.log(1 - p)
    loss = sigmoid_focal_loss(torch.tensor(logits), torch.tensor(targets), normalizer=2)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    mean = sigmoid_focal_loss(torch.tensor(logits), torch.tensor(targets))
    assert mean.item() == pytest.approx(expected / 4, rel=1e-6)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 1.5), (0.5, 0.0)])
def test_sigmoid_focal_loss_matches_torchvision(alpha: float, gamma: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 7) * 3
    targets = (torch.rand(50, 7) > 0.8).float()
    expected = (
        torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum") / 9
    )
    actual = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, normalizer=9)
    assert torch.allclose(actual, expected, rtol=1e-6)


def _centernet_reference(logits: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
    """CenterNet's ``_neg_loss`` (clamped sigmoid), transcribed."""
    pred = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos, neg = heatmap.eq(1).float(), heatmap.lt(1).float()
    pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred**2 * (1 - heatmap) ** 4 * neg).sum()
    num_pos = pos.sum()
    return -neg_loss if num_pos == 0 else -(pos_loss + neg_loss) / num_pos


def test_heatmap_focal_loss_hand_computed() -> None:
    # one centre (logit 1), a neighbour with target 0.5 (logit 0) and a background pixel (logit -2)
    logits = torch.tensor([[1.0, 0.0, -2.0]])
    heatmap = torch.tensor([[1.0, 0.5, 0.0]])
    p1, p2, p3 = _sigmoid(1.0), 0.5, _sigmoid(-2.0)
    expected = -(
        (1 - p1) ** 2 * math.log(p1) + p2**2 * (1 - 0.5) ** 4 * math.log(1 - p2) + p3**2 * math.log(1 - p3)
    )  # divided by one centre
    assert heatmap_focal_loss(logits, heatmap).item() == pytest.approx(expected, rel=1e-6)


def test_heatmap_focal_loss_matches_centernet() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16) * 2  # moderate: CenterNet's clamp at 1e-4 never bites
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    heatmap = torch.zeros(2, 3, 16, 16)
    for b, c, y, x in [(0, 0, 4, 5), (0, 2, 10, 10), (1, 1, 3, 12), (1, 1, 12, 2)]:
        gaussian = torch.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5**2))
        heatmap[b, c] = torch.maximum(heatmap[b, c], gaussian)
    assert int(heatmap.eq(1).sum()) == 4
    expected = _centernet_reference(logits, heatmap)
    assert torch.allclose(heatmap_focal_loss(logits, heatmap), expected, rtol=1e-5)
    # no centre at all: the negative part alone, as CenterNet
    empty = heatmap * 0.9
    assert torch.allclose(heatmap_focal_loss(logits, empty), _centernet_reference(logits, empty), rtol=1e-5)


# ------------------------------------------------------------------------------- mask losses
def _two_hand_made_masks() -> tuple[torch.Tensor, torch.Tensor]:
    # mask 0: probability 0.5 everywhere, one target pixel; mask 1: probability 0.75, all target
    logits = torch.stack([torch.zeros(2, 2), torch.full((2, 2), math.log(3.0))])
    targets = torch.stack([torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(2, 2)])
    return logits, targets


def test_dice_loss_hand_computed() -> None:
    logits, targets = _two_hand_made_masks()
    # mask 0: sum(p t) = 0.5, sum p = 2, sum t = 1 -> 1 - 2 / 4; mask 1: 3, 3, 4 -> 1 - 7 / 8
    per_mask = [0.5, 0.125]
    assert dice_loss(logits, targets).item() == pytest.approx(sum(per_mask) / 2, rel=1e-6)
    assert dice_loss(logits, targets, num_masks=5).item() == pytest.approx(sum(per_mask) / 5, rel=1e-6)
    # a perfect, confident mask costs (almost) nothing; its complement almost 1
    confident = torch.where(targets[1:] > 0, 20.0, -20.0)
    assert dice_loss(confident, targets[1:]).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-confident, targets[1:]).item() == pytest.approx(1 - 1 / 5, abs=1e-6)


def test_mask_bce_loss_hand_computed() -> None:
    logits, targets = _two_hand_made_masks()
    # mask 0: every pixel costs log 2; mask 1: every pixel costs -log 0.75
    per_mask = [math.log(2.0), -math.log(0.75)]
    assert mask_bce_loss(logits, targets).item() == pytest.approx(sum(per_mask) / 2, rel=1e-6)
    assert mask_bce_loss(logits, targets, num_masks=4).item() == pytest.approx(sum(per_mask) / 4, rel=1e-6)


def test_pairwise_losses_are_the_losses_of_every_pair() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 2
    targets = (torch.rand(3, 40) > 0.6).float()
    dice, bce = pairwise_dice_loss(logits, targets), pairwise_mask_bce_loss(logits, targets)
    assert dice.shape == bce.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            assert torch.allclose(dice[i, j], dice_loss(logits[i : i + 1], targets[j : j + 1]), atol=1e-6)
            assert torch.allclose(bce[i, j], mask_bce_loss(logits[i : i + 1], targets[j : j + 1]), atol=1e-6)


# ---------------------------------------------------------------------------- point sampling
def test_point_sample_at_pixel_centres_is_indexing() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 3, 5, 7)
    centres = _pixel_centres(5, 7)
    pick = torch.randperm(len(centres))[:12]
    points = centres[pick][None].expand(2, -1, -1)
    sampled = point_sample(features, points)
    rows, cols = pick // 7, pick % 7
    assert sampled.shape == (2, 3, 12)
    assert torch.allclose(sampled, features[:, :, rows, cols], atol=1e-6)
    # a grid of points gives a grid: all the centres reproduce the map
    grid = centres.reshape(5, 7, 2)[None].expand(2, -1, -1, -1)
    assert torch.allclose(point_sample(features, grid), features, atol=1e-6)


def test_point_sample_interpolates_between_centres() -> None:
    features = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # the image centre is midway between all four pixel centres
    assert point_sample(features, torch.tensor([[[0.5, 0.5]]])).item() == pytest.approx(1.5)
    assert point_sample(features, torch.tensor([[[0.5, 0.25]]])).item() == pytest.approx(0.5)


def test_uncertain_points_favour_uncertain_regions() -> None:
    # confident (|logit| = 10) everywhere but the middle half of the columns (logit 0)
    logits = torch.full((3, 32, 32), 10.0)
    logits[:, :, 8:24] = 0.0
    generator = torch.Generator().manual_seed(0)
    points = uncertain_points(
        logits, 400, oversample_ratio=3.0, importance_sample_ratio=0.75, generator=generator
    )
    assert points.shape == (3, 400, 2) and points.min() >= 0 and points.max() <= 1
    uncertain = points[:, :300, 0]
    assert ((uncertain > 7.5 / 32) & (uncertain < 24.5 / 32)).all()
    # the rest are uniform: some land in the confident columns
    rest = points[:, 300:, 0]
    assert ((rest < 7 / 32) | (rest > 25 / 32)).any()
    again = uncertain_points(logits, 400, generator=torch.Generator().manual_seed(0))
    assert torch.equal(points, again)


def test_point_mask_losses_at_all_pixel_centres_equal_the_dense_losses() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(4, 9, 11) * 3).requires_grad_()
    targets = torch.rand(4, 9, 11) > 0.5
    points = _pixel_centres(9, 11)[None].expand(4, -1, -1)
    losses = point_mask_losses(logits, targets, points=points, num_masks=3)
    assert torch.allclose(losses.bce, mask_bce_loss(logits, targets.float(), num_masks=3), atol=1e-6)
    assert torch.allclose(losses.dice, dice_loss(logits, targets.float(), num_masks=3), atol=1e-6)
    (losses.bce + losses.dice).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_point_mask_losses_sample_low_resolution_predictions_and_no_masks() -> None:
    torch.manual_seed(0)
    # predictions at 1/4 of the target size, as a mask transformer's
    target = torch.zeros(2, 64, 64)
    target[:, 16:48, 16:48] = 1
    good = torch.where(F.avg_pool2d(target[:, None], 4)[:, 0] > 0.5, 8.0, -8.0)
    uniform = point_mask_losses(good, target, num_points=500, importance_sample_ratio=0.0)
    worse = point_mask_losses(-good, target, num_points=500, importance_sample_ratio=0.0)
    assert uniform.dice < 0.05 and worse.dice > 0.9 and uniform.bce < worse.bce
    # the uncertain points sit on the boundary, where the coarse prediction is least right
    focused = point_mask_losses(good, target, num_points=500)
    assert focused.bce > uniform.bce and focused.dice > uniform.dice
    none = point_mask_losses(
        torch.zeros(0, 16, 16, requires_grad=True), torch.zeros(0, 64, 64), num_points=50
    )
    assert none.bce.item() == 0.0 and none.dice.item() == 0.0 and none.bce.requires_grad
