"""Mask^X R-CNN: the weight transfer, the stop-gradient, the mask loss over masked classes only, the
box-only labels that feed it (dataset ``mask_classes``, YOLO box lines, COCO boxes without
``segmentation``), and masks for a class that was trained with boxes only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import maskrcnn_loss

from omniseg.data import open_dataset
from omniseg.data.targets import finalize_target
from omniseg.engine.data import TrainingSet
from omniseg.inference import predict_segments
from omniseg.models import build_model
from omniseg.models.layers.detection import encode_detection_targets
from omniseg.models.mask_x_rcnn import detection_weights
from omniseg.structures import CategoryTable

CATEGORIES = CategoryTable.from_dicts(
    [{"id": 1, "name": "apple", "isthing": 1}, {"id": 2, "name": "plum", "isthing": 1}]
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kwargs):
    torch.manual_seed(0)
    return build_model({
        "name": "mask_x_rcnn", "backbone": "efficientnet_lite0", "categories": CATEGORIES.to_dicts(),
        "min_size": None, "max_size": 256, "fpn_channels": 32, "mask_head_channels": 32,
        "transfer_hidden": 32, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64,
        "box_detections_per_img": 20, **kwargs,
    })  # fmt: skip


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return ((y + 0.5 - cy) / ry) ** 2 + ((x + 0.5 - cx) / rx) ** 2 <= 1.0


def _scene(rng: np.random.Generator, h: int = 96, w: int = 128):
    """A noisy image with one red apple (class 1) and one blue plum (class 2), both ellipses."""
    image = rng.integers(90, 140, size=(h, w, 3)).astype(np.float32)
    masks, labels = [], []
    for label, colour, cx in ((1, (220, 40, 40), rng.uniform(20, 44)), (2, (40, 40, 220), rng.uniform(84, 108))):
        mask = _ellipse(h, w, rng.uniform(30, 66), cx, rng.uniform(14, 26), rng.uniform(12, 18))
        image[mask] = colour
        masks.append(mask)
        labels.append(label)
    tensor = (torch.from_numpy(image).permute(2, 0, 1) / 255.0 - 0.45) / 0.25
    masks_t = torch.from_numpy(np.stack(masks))
    ys, xs = [torch.where(m.any(1))[0] for m in masks_t], [torch.where(m.any(0))[0] for m in masks_t]
    boxes = torch.tensor([[x[0], y[0], x[-1] + 1, y[-1] + 1] for x, y in zip(xs, ys, strict=True)], dtype=torch.float32)
    return tensor, {"boxes": boxes, "labels": torch.tensor(labels), "masks": masks_t}


# ------------------------------------------------------------------------------ weight transfer
def test_detection_weights_are_each_class_rows_of_the_box_head():
    head = _tiny().roi_heads.box_predictor
    both = detection_weights(head, "cls+box")
    assert both.shape == (3, 1024 + 4 * 1024)  # background + 2 classes; the box head is 1024 wide
    for c in range(3):
        expected = torch.cat([head.cls_score.weight[c], head.bbox_pred.weight[4 * c : 4 * c + 4].flatten()])
        assert torch.equal(both[c], expected)
    assert torch.equal(detection_weights(head, "cls"), head.cls_score.weight)
    assert torch.equal(detection_weights(head, "box")[1], head.bbox_pred.weight[4:8].flatten())


def test_transferred_weights_are_t_of_the_detection_weights_and_follow_them():
    model = _tiny()
    predictor = model.roi_heads.mask_predictor
    w_det = detection_weights(model.roi_heads.box_predictor, "cls+box")
    linear1, _, linear2 = predictor.transfer
    by_hand = linear2(torch.nn.functional.leaky_relu(linear1(w_det), 0.1))
    torch.testing.assert_close(predictor.class_weights(), by_hand)
    before = predictor.class_weights().detach().clone()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight[2] += 0.5
    after = predictor.class_weights().detach()
    assert not torch.allclose(after[2], before[2])  # class 2's mask weights follow its detector weights
    torch.testing.assert_close(after[:2], before[:2])  # the other classes' do not move


def _mask_loss(model, targets, seed=0):
    """The RoI heads' training losses on fixed features and proposals (the ground-truth boxes)."""
    image = _scene(np.random.default_rng(1))[0]
    features = model.features(image[None])
    torch.manual_seed(seed)  # the same RoI sampling in every call
    proposals = [targets[0]["boxes"].clone()]
    _, losses = model.roi_heads(features, proposals, [tuple(image.shape[-2:])], targets)
    return losses, features, proposals


def test_mask_loss_is_zero_for_box_only_rois_and_over_masked_ones_otherwise():
    model = _tiny().train()
    _, target = _scene(np.random.default_rng(1))
    none, _, _ = _mask_loss(model, [{**target, "has_mask": torch.tensor([False, False])}])
    assert none["loss_mask"].item() == 0.0 and none["loss_mask"].requires_grad
    assert none["loss_classifier"] > 0 and none["loss_box_reg"] > 0  # boxes still train every class
    # every object masked: exactly torchvision's losses (the unchanged path without has_mask)
    every, _, _ = _mask_loss(model, [{**target, "has_mask": torch.tensor([True, True])}])
    plain, _, _ = _mask_loss(model, [dict(target)])
    for name in plain:
        torch.testing.assert_close(every[name], plain[name])
    # the apple masked, the plum box-only: the loss over the RoIs matched to the apple, by hand
    partial_target = [{**target, "has_mask": torch.tensor([True, False])}]
    partial, features, proposals = _mask_loss(model, partial_target)
    heads = model.roi_heads
    torch.manual_seed(0)
    sampled, matched, labels, _ = heads.select_training_samples(proposals, partial_target)
    keep = torch.where((labels[0] > 0) & (matched[0] == 0))[0]
    assert 0 < len(keep) < int((labels[0] > 0).sum())
    logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [sampled[0][keep]], [(96, 128)])))
    by_hand = maskrcnn_loss(logits, [sampled[0][keep]], [target["masks"]], [target["labels"]], [matched[0][keep]])
    torch.testing.assert_close(partial["loss_mask"], by_hand)
    assert partial["loss_mask"] > 0


@pytest.mark.parametrize("detach", [True, False])
def test_stop_gradient_keeps_the_mask_loss_out_of_the_detector_weights(detach):
    model = _tiny(detach_det_weights=detach).train()
    _, target = _scene(np.random.default_rng(1))
    losses, _, _ = _mask_loss(model, [{**target, "has_mask": torch.tensor([True, False])}])
    losses["loss_mask"].backward()
    box_head = model.roi_heads.box_predictor
    transfer = model.roi_heads.mask_predictor.transfer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in transfer.parameters())
    for weight in (box_head.cls_score.weight, box_head.bbox_pred.weight):
        if detach:
            assert weight.grad is None  # the paper's stop-gradient: theta learns, w_det does not
        else:
            assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_agnostic_and_class_specific_modes():
    x = torch.randn(3, 32, 14, 14)
    agnostic = _tiny(mask_mode="agnostic").roi_heads.mask_predictor
    logits = agnostic(x)
    assert logits.shape == (3, 3, 28, 28)
    assert torch.equal(logits[:, 0], logits[:, 2])  # one mask for every class
    specific = _tiny(mask_mode="class_specific").roi_heads.mask_predictor
    assert not torch.equal(specific(x)[:, 1], specific(x)[:, 2])
    with_mlp = _tiny(mlp_mask_branch=True).roi_heads.mask_predictor
    without = with_mlp.mlp
    with_mlp.mlp = None
    base = with_mlp(x)
    with_mlp.mlp = without
    added = with_mlp(x) - base  # the MLP branch: one class-agnostic 28 x 28 map added to every class
    torch.testing.assert_close(added[:, 0], added[:, 2])
    torch.testing.assert_close(added[:, 0], without(x).view(3, 28, 28))
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        _tiny(mask_mode="shared")


def test_config_round_trip_and_state_dict_holds_each_tensor_once():
    model = _tiny(mlp_mask_branch=True, transfer_input="cls")
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    assert rebuilt.roi_heads.mask_predictor.transfer_input == "cls"
    keys = list(model.state_dict())
    assert not [k for k in keys if "mask_predictor._box_predictor" in k]
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.roi_heads.mask_predictor.class_weights(), model.roi_heads.mask_predictor.class_weights())


# ------------------------------------------------------------------------------ box-only labels
def _write_yolo(root, lines: list[str]):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(root / "images" / "a.png")
    (root / "labels" / "a.txt").write_text("\n".join(lines) + "\n")


def test_yolo_box_lines_and_mask_classes_become_box_only(tmp_path):
    _write_yolo(tmp_path, ["0 0.1 0.1 0.4 0.1 0.4 0.6 0.1 0.6", "1 0.7 0.5 0.2 0.4", "0 0.5 0.5 0.9 0.5 0.7 0.9"])
    names = {"images": str(tmp_path / "images"), "labels": str(tmp_path / "labels"), "names": ["apple", "plum"]}
    sample = open_dataset({"format": "yolo", **names})[0]
    assert sample.box_only.tolist() == [False, True, False]  # the 'class cx cy w h' line
    box = sample.segments.masks()[1]
    assert box.sum() == 12 * 16 and box[12:28, 36:48].all()  # the filled box: 0.2 x 0.4 of 60 x 40
    view = open_dataset({"format": "yolo", **names, "mask_classes": ["plum"]})
    assert view[0].box_only.tolist() == [True, True, True]  # apples lose their masks; plum was a box
    view = open_dataset({"format": "yolo", **names, "mask_classes": [0]})
    assert view[0].box_only.tolist() == [False, True, False]
    with pytest.raises(Exception, match="unknown category 'pear'"):
        open_dataset({"format": "yolo", **names, "mask_classes": ["pear"]})
    # through the training set: has_mask stays with its segment, also when a crop removes one
    target = TrainingSet(view)[0][1]
    assert target["has_mask"].tolist() == [True, False, True]
    encoded = encode_detection_targets([target], view.categories, 3)[0]
    assert encoded["has_mask"].tolist() == [True, False, True] and encoded["labels"].tolist() == [1, 2, 1]
    raw = TrainingSet(view).raw(0)[1]
    raw["masks"] = raw["masks"].clone()
    raw["masks"][0] = 0  # cropped away
    cropped = finalize_target(raw)
    assert cropped["has_mask"].tolist() == [False, True] and cropped["category_ids"].tolist() == [1, 0]


def test_coco_annotation_with_only_a_bbox_is_box_only(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "x.png")
    data = {
        "images": [{"id": 7, "file_name": "x.png", "height": 20, "width": 30}],
        "categories": [{"id": 1, "name": "apple"}, {"id": 2, "name": "plum"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [12, 4, 6, 8], "iscrowd": 0},
        ],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    sample = open_dataset({"format": "coco", "annotations": str(tmp_path / "a.json"), "images": str(tmp_path)})[0]
    assert sample.box_only.tolist() == [False, True]
    assert sample.segments.boxes()[1].tolist() == [12, 4, 18, 12] and sample.segments.masks()[1].sum() == 48
    data["annotations"][1]["bbox"] = [1, 2]
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match=r"annotation 2: bbox must be \[x, y, width, height\]"):
        open_dataset({"format": "coco", "annotations": str(tmp_path / "a.json"), "images": str(tmp_path)})


# ------------------------------------------------------------------------------ learning
FRUIT = CategoryTable.from_dicts(
    [{"id": i + 1, "name": n, "isthing": 1} for i, n in enumerate(("apple", "plum", "lime", "grape"))]
)
COLOURS = ((220, 40, 40), (40, 40, 220), (40, 200, 40), (200, 40, 200))


def _fruit_scene(rng: np.random.Generator, h: int = 96, w: int = 128):
    """Two ellipses of two of the four fruit classes (told apart by colour); grapes are box-only."""
    image = rng.integers(90, 140, size=(h, w, 3)).astype(np.float32)
    labels = rng.choice(4, 2, replace=False)
    masks = []
    for label, cx in zip(labels, (rng.uniform(22, 42), rng.uniform(86, 106)), strict=True):
        mask = _ellipse(h, w, rng.uniform(30, 66), cx, rng.uniform(14, 26), rng.uniform(12, 18))
        image[mask] = COLOURS[label]
        masks.append(mask)
    masks_t = torch.from_numpy(np.stack(masks))
    boxes = [[x[0], y[0], x[-1] + 1, y[-1] + 1] for x, y in ((torch.where(m.any(0))[0], torch.where(m.any(1))[0]) for m in masks_t)]
    labels_t = torch.from_numpy(labels + 1)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels_t, "masks": masks_t, "has_mask": labels_t != 4}
    return (torch.from_numpy(image).permute(2, 0, 1) / 255.0 - 0.45) / 0.25, target


@pytest.mark.slow
def test_trained_with_grape_boxes_only_it_segments_grapes():
    """Apples, plums and limes come with masks, grapes with boxes only (the partial supervision,
    end to end through has_mask); after training, each grape is detected as a grape with a mask
    of its elliptic outline (IoU >= 0.7), not just its box."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = build_model({
        "name": "mask_x_rcnn", "mask_mode": "agnostic", "backbone": "efficientnet_lite0",
        "pretrained_backbone": True, "categories": FRUIT.to_dicts(), "min_size": None, "max_size": 256,
        "fpn_channels": 32, "mask_head_channels": 32, "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100,
        "box_batch_size_per_image": 64, "box_detections_per_img": 20,
    }).train()  # fmt: skip
    scenes = [_fruit_scene(rng) for _ in range(12)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(320):
        image, target = scenes[step % len(scenes)]
        optimizer.zero_grad()
        sum(model([image], [target]).values()).backward()
        optimizer.step()
    model.eval()
    rng = np.random.default_rng(99)
    grape_ious = []
    for _ in range(6):
        image, target = _fruit_scene(rng)
        segments = predict_segments(model, image[None], task="instance")[0]
        masks = segments.masks()
        for truth, label in zip(target["masks"].numpy(), target["labels"].tolist(), strict=True):
            if label != 4:
                continue
            grapes = np.where(segments.category_ids == 4)[0]
            assert len(grapes), f"a grape was not detected as a grape: {segments.category_ids}"
            best = grapes[np.argmax(segments.scores[grapes])]
            grape_ious.append((masks[best] & truth).sum() / (masks[best] | truth).sum())
    assert grape_ious and min(grape_ious) >= 0.7, grape_ious
