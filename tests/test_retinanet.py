"""RetinaNet: torchvision fidelity, losses on bad input, the model contract."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from omniseg.models import build_model
from omniseg.models.torchvision_import import load_torchvision_retinanet
from omniseg.optimize import optimize_for_inference
from omniseg.structures import CategoryTable, Segments
from tv_reference import make_trained_like, match_detections, normalise, structured_images

H, W = 256, 320


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_pair():
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=H, max_size=1333)
    make_trained_like(tv, structured_images(2, H, W, seed=1))
    ours = build_model({"name": "retinanet", "num_classes": 91, "min_size": H, "max_size": 1333}).eval()
    load_torchvision_retinanet(ours, tv.state_dict())
    image = structured_images(1, H, W, seed=2)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests: the thread count changes how sums are split
    try:
        with torch.no_grad():
            reference = tv([image])[0]
    finally:
        torch.set_num_threads(threads)
    return ours, image, reference


def test_exact_path_is_torchvision(reference_pair):
    ours, image, reference = reference_pair  # as built: not optimised for inference
    out = ours.detect([normalise(image)])[0]
    assert len(reference["boxes"]) >= 5
    assert torch.equal(out["labels"], reference["labels"])
    torch.testing.assert_close(out["boxes"], reference["boxes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["scores"], reference["scores"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("winograd", [True, False])
def test_fast_path_matches_torchvision(reference_pair, winograd):
    ours, image, reference = reference_pair
    optimize_for_inference(ours, winograd=winograd)
    try:
        out = ours.detect([normalise(image)])[0]
    finally:
        optimize_for_inference(ours, **dict.fromkeys(ours.inference_options, False))  # back to plain
    stats = match_detections(reference, out, score_thresh=0.05)
    assert stats["matched"] >= 5
    assert stats["unmatched"] == 0, stats
    assert stats["max_box_diff"] <= 1e-3, stats
    assert stats["max_score_diff"] <= 1e-4, stats


def _tiny_model(**kwargs):
    categories = CategoryTable.from_dicts(
        [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1}]
    )
    return build_model(
        {
            "name": "retinanet",
            "backbone": "efficientnet_lite0",
            "categories": categories.to_dicts(),
            "min_size": 96,
            "max_size": 128,
            "topk_candidates": 100,
            **kwargs,
        }
    )


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "giou"])
def test_train_step_survives_bad_input(box_loss):
    torch.manual_seed(0)
    model = _tiny_model(box_loss=box_loss).train()
    h, w = 90, 120
    targets = [
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
        {
            "boxes": torch.tensor(
                [
                    [-20.0, -10.0, 20.0, 30.0],
                    [10.0, 10.0, 10.0, 40.0],
                    [60.0, 50.0, 61.0, 51.0],
                    [300.0, 200.0, 360.0, 260.0],
                ]
            ),
            "labels": torch.tensor([1, 2, 2, 1]),
        },
    ]
    losses = model(torch.randn(2, 3, h, w), targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_eval_contract_and_config():
    model = _tiny_model(score_thresh=0.0, detections_per_img=20).eval()
    raw = model([torch.randn(3, 90, 120), torch.randn(3, 64, 100)])
    results = model.post_process(raw, [(90, 120), (64, 100)])
    assert [r.image_size for r in results] == [(90, 120), (64, 100)]
    for r in results:
        assert isinstance(r, Segments) and r.overlapping and len(r) <= 20
        assert set(r.category_ids.tolist()) <= {1, 3}
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_v2_options_build():
    model = _tiny_model(p6p7_from="c5", head_norm="gn", box_loss="giou")
    assert model.fpn.extra_blocks.p6.in_channels == model.backbone.channels[-1]
    with pytest.raises(ValueError, match="box_loss"):
        _tiny_model(box_loss="mse")
