"""Panoptic FPN: the merge, targets from panoptic ground truth, training and the model contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from omniseg.models import build_model
from omniseg.models.panoptic_fpn import panoptic_merge, panoptic_targets_from_segments
from omniseg.models.torchvision_import import load_torchvision_maskrcnn_into_panoptic
from omniseg.structures import CategoryTable, Segments
from tv_reference import make_trained_like, match_detections, normalise, structured_images

CATEGORIES = CategoryTable.from_dicts(
    [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 3, "name": "car", "isthing": 1},
        {"id": 100, "name": "road", "isthing": 0},
        {"id": 101, "name": "sky", "isthing": 0},
    ]
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _full_mask_detection(boxes, labels, scores):
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels),
        "scores": torch.tensor(scores),
        "mask_probs": torch.ones(n, 1, 28, 28),  # each mask fills its box
    }


def test_merge_rules():
    h, w = 100, 120
    detection = _full_mask_detection(
        [[10, 10, 50, 50], [20, 20, 52, 52], [60, 10, 80, 30], [0, 60, 30, 90]],
        [1, 2, 2, 1],
        [0.9, 0.8, 0.7, 0.3],
    )
    # semantic: road (class 1) on the bottom half, sky (class 2) on the top, "things" (0) in a corner
    probs = torch.zeros(3, h, w)
    probs[2, :50] = 1.0
    probs[1, 50:] = 1.0
    probs[:, 90:, 100:] = 0
    probs[0, 90:, 100:] = 1.0
    seg = panoptic_merge(
        detection,
        probs,
        (h, w),
        thing_ids=[1, 3],
        stuff_ids=[100, 101],
        categories=CATEGORIES,
        stuff_area_thresh=1000,
        instance_score_thresh=0.5,
    )
    assert isinstance(seg, Segments) and not seg.overlapping
    id_map, info = seg.to_panoptic()
    cats = [s["category_id"] for s in info]
    # instance 2 overlaps instance 1 by more than half: dropped; instance 4 is below the score threshold
    assert cats == [1, 3, 100, 101]  # things by score, then stuff by class
    person, car, road, sky = (s["id"] for s in info)
    assert (id_map[11:50, 11:50] == person).all()
    assert (id_map[11:29, 61:79] == car).all()
    # stuff only where no instance; the "things" corner stays void
    assert (id_map[:50][(id_map[:50] != person) & (id_map[:50] != car)] == sky).all()
    assert (id_map[90:, 100:] == 0).all()
    assert info[2]["area"] == int((id_map == road).sum())
    # stuff regions under the area threshold are dropped
    small = panoptic_merge(
        detection, probs, (h, w), thing_ids=[1, 3], stuff_ids=[100, 101], stuff_area_thresh=6000
    )
    assert [s["category_id"] for s in small.to_panoptic()[1]] == [1, 3]


def test_targets_from_panoptic_ground_truth():
    id_map = np.zeros((40, 50), dtype=np.int32)
    id_map[:20] = 5  # sky
    id_map[20:] = 6  # road
    id_map[5:15, 5:15] = 7  # person
    id_map[25:35, 30:45] = 8  # crowd of cars
    id_map[38:, :2] = 0  # void
    info = [
        {"id": 5, "category_id": 101},
        {"id": 6, "category_id": 100},
        {"id": 7, "category_id": 1},
        {"id": 8, "category_id": 3, "iscrowd": 1},
    ]
    segments = Segments.from_panoptic(id_map, info, categories=CATEGORIES)
    target = panoptic_targets_from_segments(segments)
    assert target["labels"].tolist() == [1]  # the crowd is not an instance target
    semantic = target["semantic"]
    assert semantic[0, 0] == 2 and semantic[30, 10] == 1  # sky -> 2, road -> 1 (stuff order + 1)
    assert semantic[10, 10] == 0 and semantic[30, 40] == 0  # things (crowd included) -> 0
    assert semantic[39, 0] == 255


def _tiny_model(**kwargs):
    return build_model(
        {
            "name": "panoptic_fpn",
            "backbone": "efficientnet_lite0",
            "categories": CATEGORIES.to_dicts(),
            "min_size": 96,
            "max_size": 128,
            "rpn_pre_nms_top_n_train": 200,
            "rpn_post_nms_top_n_train": 100,
            "rpn_pre_nms_top_n_test": 200,
            "rpn_post_nms_top_n_test": 100,
            "box_batch_size_per_image": 64,
            "box_detections_per_img": 20,
            **kwargs,
        }
    )


def test_train_step_and_eval_contract():
    torch.manual_seed(0)
    model = _tiny_model().train()
    h, w = 90, 120
    id_map = np.zeros((h, w), dtype=np.int32)
    id_map[:45] = 1
    id_map[45:] = 2
    id_map[50:60, 10:40] = 3
    id_map[70, 70] = 4  # a 1-pixel person
    info = [
        {"id": 1, "category_id": 101},
        {"id": 2, "category_id": 100},
        {"id": 3, "category_id": 3},
        {"id": 4, "category_id": 1},
    ]
    gt = panoptic_targets_from_segments(Segments.from_panoptic(id_map, info, categories=CATEGORIES))
    empty = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, h, w), dtype=torch.bool),
        "semantic": torch.full((h, w), 255, dtype=torch.int64),  # nothing labelled
    }
    losses = model(torch.randn(2, 3, h, w), [gt, empty])
    assert "loss_semantic" in losses and "loss_mask" in losses
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()

    model.eval()
    model.instance_score_thresh = 0.0
    model.stuff_area_thresh = 16
    raw = model([torch.randn(3, h, w), torch.randn(3, 64, 100)])
    sizes = [(h, w), (64, 100)]
    results = model.post_process(raw, sizes)  # its first task: panoptic
    assert [r.image_size for r in results] == sizes
    for r in results:
        assert isinstance(r, Segments) and not r.overlapping
        assert set(r.category_ids.tolist()) <= set(CATEGORIES.ids)
    # one model, three tasks: the semantic view is the merge's category map, the instances are the detections
    semantic = model.post_process(raw, sizes, task="semantic")
    for sem, pan in zip(semantic, results, strict=True):
        void = max(CATEGORIES.ids) + 1
        assert np.array_equal(sem.to_semantic(void_value=void), pan.to_semantic(void_value=void))
    instances = model.post_process(raw, sizes, task="instance")
    assert [len(i) for i in instances] == [len(d["scores"]) for d in raw]
    det = model.detect([torch.randn(3, h, w)])[0]
    assert det["semantic_probs"].shape == (3, h, w) and det["masks"].shape[-2:] == (h, w)
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_instances_match_torchvision_maskrcnn():
    """The Mask R-CNN inside Panoptic FPN is torchvision's: same detections from the same weights."""
    H, W = 256, 320
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=H, max_size=1333, num_classes=3)
    make_trained_like(tv, structured_images(2, H, W, seed=1))
    ours = build_model(
        {"name": "panoptic_fpn", "categories": CATEGORIES.to_dicts(), "min_size": H, "max_size": 1333}
    ).eval()
    load_torchvision_maskrcnn_into_panoptic(ours, tv.state_dict())
    image = structured_images(1, H, W, seed=2)[0]
    with torch.no_grad():
        reference = tv([image])[0]
    out = ours.detect([normalise(image)])[0]
    stats = match_detections(reference, out, score_thresh=0.05)
    assert stats["matched"] >= 5 and stats["unmatched"] == 0, stats
    assert stats["max_box_diff"] <= 1e-3 and stats["max_score_diff"] <= 1e-4, stats
    assert out["semantic_probs"].shape == (3, H, W)
