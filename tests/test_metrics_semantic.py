"""mIoU and friends against a straightforward per-class computation, on random and real (CamVid) labels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_data
from omniseg.metrics import EvaluationError, SemanticMetric, evaluate_semantic_dirs, format_table

CAMVID_CLASSES = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]


def naive_metrics(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int, ignore: int) -> dict:
    """Per-class counting with boolean masks, one class at a time."""
    pred = np.concatenate([p.ravel() for p in preds]).astype(np.int64)
    gt = np.concatenate([g.ravel() for g in gts]).astype(np.int64)
    valid = gt != ignore
    pred, gt = pred[valid], gt[valid]
    ious, accs, freqs = [], [], []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (gt == c))
        fp = np.sum((pred == c) & (gt != c))
        fn = np.sum((pred != c) & (gt == c))
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        accs.append(tp / (tp + fn) if tp + fn else math.nan)
        freqs.append(np.sum(gt == c) / len(gt))
    return {
        "miou": np.nanmean(ious),
        "per_class_iou": ious,
        "pixel_accuracy": np.mean(pred == gt),
        "mean_accuracy": np.nanmean(accs),
        "fwiou": sum(f * i for f, i in zip(freqs, ious, strict=True) if f > 0),
    }


def assert_same(result: dict, expected: dict) -> None:
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "fwiou"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    np.testing.assert_allclose(
        np.array(result["per_class_iou"], dtype=float),
        np.array(expected["per_class_iou"]),
        rtol=0,
        atol=1e-12,
    )


def test_random_arrays_match_naive_computation() -> None:
    rng = np.random.default_rng(0)
    num_classes = 7
    preds, gts = [], []
    metric = SemanticMetric(num_classes, ignore_index=255)
    for _ in range(5):
        gt = rng.integers(0, num_classes, size=(31, 47))
        gt[rng.random(gt.shape) < 0.1] = 255
        gt[gt == 5] = 4  # class 5 never in gt ...
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, num_classes, size=gt.shape))
        pred[pred == 6] = 0  # ... class 6 never predicted
        pred[rng.random(gt.shape) < 0.02] = 200  # out of range: wrong for every class
        metric.update(pred, gt)
        preds.append(pred)
        gts.append(gt)
    result = metric.compute()
    assert_same(result, naive_metrics(preds, gts, num_classes, 255))


def test_absent_class_is_nan_and_left_out() -> None:
    metric = SemanticMetric(3, ignore_index=255)
    metric.update(np.array([[0, 0, 1]]), np.array([[0, 1, 1]]))
    result = metric.compute()
    assert math.isnan(result["per_class_iou"][2])
    assert result["miou"] == pytest.approx((0.5 + 0.5) / 2)
    assert result["pixel_accuracy"] == pytest.approx(2 / 3)


def test_torch_tensors_and_merge() -> None:
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, size=(2, 20, 30))
    pred = rng.integers(-1, 5, size=(2, 20, 30))
    whole = SemanticMetric(4, ignore_index=None)
    halves = [SemanticMetric(4, ignore_index=None) for _ in range(2)]
    for i in range(2):
        whole.update(torch.from_numpy(pred[i]), torch.from_numpy(gt[i]))
        halves[i].update(pred[i], gt[i])
    merged = halves[0].merge(halves[1])
    np.testing.assert_array_equal(merged.confusion, whole.confusion)
    assert_same(whole.compute(), naive_metrics(list(pred), list(gt), 4, -12345))


def test_bad_labels() -> None:
    metric = SemanticMetric(3)
    with pytest.raises(ValueError, match="ground-truth label 7 is outside"):
        metric.update(np.zeros((2, 2)), np.full((2, 2), 7))
    with pytest.raises(ValueError, match="shape"):
        metric.update(np.zeros((2, 3)), np.zeros((2, 2)))


def _perturb(gt: np.ndarray, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """A plausible prediction: shifted labels, blocks of wrong class, void predicted as a class."""
    pred = np.roll(gt, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1)).copy()
    for _ in range(20):
        y, x = rng.integers(0, gt.shape[0] - 20), rng.integers(0, gt.shape[1] - 20)
        pred[y : y + 20, x : x + 20] = rng.integers(0, num_classes)
    pred[pred >= num_classes] = 3  # the void label is not a class a model predicts
    return pred.astype(np.uint8)


def _camvid_labels(n: int) -> list[Path]:
    return sorted((shared_data("camvid") / "valannot").glob("*.png"))[:n]


def test_camvid_labels_match_naive_computation() -> None:
    rng = np.random.default_rng(2)
    metric = SemanticMetric(11, ignore_index=11, class_names=CAMVID_CLASSES)
    preds, gts = [], []
    for path in _camvid_labels(12):
        gt = np.asarray(Image.open(path))
        pred = _perturb(gt, rng, 11)
        metric.update(pred, gt)
        preds.append(pred)
        gts.append(gt)
    result = metric.compute()
    assert_same(result, naive_metrics(preds, gts, 11, 11))
    assert 0.3 < result["miou"] < 0.95
    table = format_table(result, "semantic")
    assert "| Sky " in table and "mIoU" in table


def _camvid_dirs(tmp_path: Path, n: int = 6) -> tuple[Path, Path, SemanticMetric]:
    rng = np.random.default_rng(3)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    metric = SemanticMetric(11, ignore_index=11)
    for path in _camvid_labels(n):
        gt = np.asarray(Image.open(path))
        pred = _perturb(gt, rng, 11)
        Image.fromarray(gt).save(gt_dir / path.name)
        Image.fromarray(pred).save(pred_dir / path.name)
        metric.update(pred, gt)
    return gt_dir, pred_dir, metric


def test_evaluate_semantic_dirs(tmp_path: Path) -> None:
    gt_dir, pred_dir, metric = _camvid_dirs(tmp_path)
    result = evaluate_semantic_dirs(gt_dir, pred_dir, num_classes=11, ignore_index=11)
    expected = metric.compute()
    assert result["miou"] == expected["miou"]
    assert result["per_class_iou"] == [None if math.isnan(v) else v for v in expected["per_class_iou"]]
    assert result["num_images"] == 6


def test_semantic_dir_errors(tmp_path: Path) -> None:
    gt_dir, pred_dir, _ = _camvid_dirs(tmp_path, n=3)
    first, second, third = sorted(pred_dir.iterdir())
    with pytest.raises(EvaluationError, match="nope: ground-truth label folder not found"):
        evaluate_semantic_dirs(tmp_path / "nope", pred_dir, num_classes=11, ignore_index=11)
    third.rename(third.with_suffix(".bak"))
    with pytest.raises(EvaluationError, match=f"no prediction for ground truth {third.name}"):
        evaluate_semantic_dirs(gt_dir, pred_dir, num_classes=11, ignore_index=11)
    third.with_suffix(".bak").rename(third)
    Image.open(second).crop((0, 0, 50, 40)).save(second)
    with pytest.raises(EvaluationError, match=f"{second.name}: size 50x40 does not match its ground truth"):
        evaluate_semantic_dirs(gt_dir, pred_dir, num_classes=11, ignore_index=11)
    with pytest.raises(EvaluationError, match=f"{first.name}: ground-truth label 11 is outside"):
        evaluate_semantic_dirs(gt_dir, pred_dir, num_classes=11, ignore_index=255)
    first.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(EvaluationError, match=f"{first.name}: cannot decode PNG"):
        evaluate_semantic_dirs(gt_dir, pred_dir, num_classes=11, ignore_index=11)
