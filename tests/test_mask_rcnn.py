"""Mask R-CNN: torchvision fidelity, fast inference kernels, targets, bad input, the model contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops.misc import FrozenBatchNorm2d

from omniseg.models import build_model
from omniseg.models.layers.detection import mask_rles, paste_masks, targets_from_segments
from omniseg.models.layers.fast_inference import (
    FastConv2d,
    InferenceCopy,
    MkldnnLayout,
    configure_fast_convs,
    fold_batchnorms,
    nnpack_available,
    to_fast_convs,
)
from omniseg.models.torchvision_import import load_torchvision_maskrcnn
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


# ------------------------------------------------------------------------------ fidelity
@pytest.fixture(scope="module")
def reference_pair():
    torch.manual_seed(0)
    kwargs = dict(min_size=H, max_size=1333, box_score_thresh=0.05)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    make_trained_like(tv, structured_images(2, H, W, seed=1))
    ours = build_model({"name": "mask_rcnn", "num_classes": 91, "min_size": H, "max_size": 1333}).eval()
    load_torchvision_maskrcnn(ours, tv.state_dict())
    image = structured_images(1, H, W, seed=2)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests: the thread count changes how sums are split
    try:
        with torch.no_grad():
            reference = tv([image])[0]
    finally:
        torch.set_num_threads(threads)
    return tv, ours, image, reference


def test_exact_path_is_torchvision(reference_pair):
    """As built (not optimised for inference), the same arithmetic as torchvision: identical detections."""
    _, ours, image, reference = reference_pair
    out = ours.detect([normalise(image)])[0]
    assert len(reference["boxes"]) >= 5
    assert torch.equal(out["labels"], reference["labels"])
    torch.testing.assert_close(out["boxes"], reference["boxes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["scores"], reference["scores"], rtol=0, atol=1e-6)
    # vectorised pasting vs torchvision's loop: the same bilinear weights, summed in another order
    assert (out["masks"] - reference["masks"]).abs().max() < 1e-5


@pytest.mark.parametrize("winograd", [True, False])
def test_fast_path_matches_torchvision(reference_pair, winograd):
    """The fast path (folded oneDNN-layout backbone, GEMM / Winograd convolutions, class-only mask
    logits, vectorised pasting) gives torchvision's detections within rounding."""
    _, ours, image, reference = reference_pair
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
    assert stats["min_mask_iou"] >= 0.99, stats


def test_segments_output_matches_detect(reference_pair):
    _, ours, image, _ = reference_pair
    det = ours.detect([normalise(image)])[0]
    seg = ours.post_process(ours([normalise(image)]), [(H, W)])[0]
    assert isinstance(seg, Segments) and seg.overlapping and seg.image_size == (H, W)
    assert len(seg) == len(det["boxes"])
    np.testing.assert_array_equal(seg.category_ids, det["labels"].numpy())
    dense = (det["masks"][:, 0] > 0.5).numpy()
    masks = seg.masks()
    agree = (dense == masks).mean(axis=(1, 2))
    assert agree.min() > 0.999


# ------------------------------------------------------------------- fast inference parts
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(16, 24, 1),
        nn.Conv2d(16, 24, 1, stride=2, bias=False),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
    ],
)
def test_fast_conv_same_as_conv(conv):
    fast = to_fast_convs(nn.Sequential(conv))[0]
    assert isinstance(fast, FastConv2d) and fast.weight is conv.weight
    assert configure_fast_convs(fast, gemm=True, winograd=True) == 1
    x = torch.randn(2, 16, 19, 23)
    expected = nn.functional.conv2d(
        x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    with torch.no_grad():
        got = fast(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # with autograd: the plain convolution, gradients flow
    fast(x.requires_grad_()).sum().backward()
    assert conv.weight.grad is not None


def test_nnpack_is_used_where_available():
    # documents the speed path; the fallback is exercised everywhere else
    assert isinstance(nnpack_available(), bool)


def test_fold_batchnorms_and_inference_copy():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        dense = InferenceCopy(mkldnn=False).get(net)
        assert isinstance(dense[1], nn.Identity) and isinstance(dense[3], FastConv2d) and dense[3].gemm
        torch.testing.assert_close(dense(x), net(x), rtol=1e-5, atol=1e-5)
        copy = InferenceCopy()
        fast = copy.get(net)
        if torch.backends.mkldnn.is_available():
            assert isinstance(fast, MkldnnLayout)
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
        assert copy.get(net) is fast  # cached while the weights stay the same
        net[3].weight.mul_(2)  # an in-place update (an optimiser step) is noticed
        rebuilt = copy.get(net)
        assert rebuilt is not fast
        torch.testing.assert_close(rebuilt(x), net(x), rtol=1e-5, atol=1e-5)
    assert "1.running_mean" in net.state_dict()  # the model itself is untouched
    frozen = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8))
    assert fold_batchnorms(frozen) == 1


def test_paste_masks_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(7, 1, 28, 28, generator=g)
    boxes = torch.tensor(
        [
            [10.0, 12.0, 60.0, 40.0],
            [-15.0, -5.0, 30.0, 25.0],  # partly outside
            [280.0, 200.0, 340.0, 270.0],  # past the bottom-right corner
            [100.0, 100.0, 100.5, 100.5],  # sub-pixel
            [0.0, 0.0, 320.0, 256.0],  # whole image
            [400.0, 300.0, 420.0, 320.0],  # fully outside
            [50.3, 70.7, 51.2, 71.9],
        ]
    )
    expected = paste_masks_in_image(masks, boxes, (H, W))
    got = paste_masks(masks, boxes, (H, W))
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5
    rles = mask_rles(masks, boxes, (H, W))
    decoded = np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)
    np.testing.assert_array_equal(decoded, (got[:, 0] > 0.5).numpy())


# ------------------------------------------------------------------------------ targets
def _segments_with_edge_cases() -> Segments:
    h, w = 40, 50
    masks = np.zeros((5, h, w), dtype=bool)
    masks[0, 5:20, 5:25] = True  # a person
    masks[1, 10:30, 30:45] = True  # a crowd
    masks[2, 0:40, 0:50] = True  # stuff (sky)
    masks[3, 17, 33] = True  # a 1-pixel car
    # masks[4]: empty (the object lies outside the image)
    categories = CategoryTable.from_dicts(
        [
            {"id": 1, "name": "person", "isthing": 1},
            {"id": 3, "name": "car", "isthing": 1},
            {"id": 90, "name": "sky", "isthing": 0},
        ]
    )
    return Segments.from_masks(masks, [1, 1, 90, 3, 3], iscrowd=[0, 1, 0, 0, 0], categories=categories)


def test_targets_from_segments():
    segments = _segments_with_edge_cases()
    target = targets_from_segments(segments)
    assert target["labels"].tolist() == [1, 2]  # person -> 1, car -> 2; crowd, stuff and empty skipped
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[5.0, 5.0, 25.0, 20.0], [33.0, 17.0, 34.0, 18.0]])
    )
    assert target["masks"].dtype == torch.bool and target["masks"].shape == (2, 40, 50)
    assert target["masks"][1].sum() == 1


# ------------------------------------------------------------------------- bad input
def _tiny_model(**kwargs) -> nn.Module:
    categories = CategoryTable.from_dicts(
        [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1}]
    )
    return build_model(
        {
            "name": "mask_rcnn",
            "backbone": "efficientnet_lite0",
            "categories": categories.to_dicts(),
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


def _bad_targets(h: int, w: int) -> list[dict[str, torch.Tensor]]:
    empty = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, h, w), dtype=torch.bool),
    }
    masks = torch.zeros((4, h, w), dtype=torch.bool)
    masks[0, :30, :20] = True  # partly outside: box starts at negative coordinates
    masks[2, 50, 60] = True  # 1 px
    boxes = torch.tensor(
        [
            [-20.0, -10.0, 20.0, 30.0],  # clipped to the image
            [10.0, 10.0, 10.0, 40.0],  # zero width: dropped
            [60.0, 50.0, 61.0, 51.0],  # 1 px instance
            [300.0, 200.0, 360.0, 260.0],  # outside the image (empty mask): dropped
        ]
    )
    messy = {"boxes": boxes, "labels": torch.tensor([1, 2, 2, 1]), "masks": masks}
    return [empty, messy]


def test_train_step_survives_bad_input():
    torch.manual_seed(0)
    model = _tiny_model().train()
    h, w = 90, 120
    images = torch.randn(2, 3, h, w)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = model(images, _bad_targets(h, w))
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    optimizer.step()
    # only empty images: still a finite loss
    losses = model([images[0]], _bad_targets(h, w)[:1])
    assert all(torch.isfinite(v) for v in losses.values())


def test_targets_must_fit_the_image():
    model = _tiny_model().train()
    target = _bad_targets(90, 120)[1]
    with pytest.raises(ValueError, match="masks must be"):
        model([torch.randn(3, 80, 120)], [target])


def test_eval_contract_and_config():
    model = _tiny_model(box_score_thresh=0.0).eval()
    images = [torch.randn(3, 90, 120), torch.randn(3, 64, 100)]
    raw = model(images)
    results = model.post_process(raw, [(90, 120), (64, 100)])
    assert [r.image_size for r in results] == [(90, 120), (64, 100)]
    for r in results:
        assert isinstance(r, Segments) and r.overlapping
        assert r.categories == model.categories
        assert set(r.category_ids.tolist()) <= {1, 3}
    batch = model(torch.stack([images[0], images[0]]))
    assert len(batch) == 2 and torch.equal(batch[0]["boxes"], batch[1]["boxes"])
    # the score threshold leaves out exactly the detections scoring below it
    cut = float(raw[0]["scores"].median()) if len(raw[0]["scores"]) else 0.5
    kept = model.post_process(raw, [(90, 120), (64, 100)], score_thresh=cut)[0]
    assert len(kept) == int((raw[0]["scores"] >= cut).sum()) and (kept.scores >= cut).all()
    with pytest.raises(ValueError, match="panoptic"):
        model.post_process(raw, [(90, 120), (64, 100)], task="panoptic")
    config = json.loads(json.dumps(model.config))
    rebuilt = build_model(config)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert rebuilt.categories == model.categories


def test_parallel_roi_align_is_exact():
    from torchvision.ops import MultiScaleRoIAlign

    from omniseg.models.mask_rcnn import ParallelMultiScaleRoIAlign

    g = torch.Generator().manual_seed(0)
    features = {str(i): torch.randn(1, 8, 64 // 2**i, 80 // 2**i, generator=g) for i in range(4)}
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = [torch.cat([xy, xy + 4 + torch.rand(300, 2, generator=g) * 120], 1)]
    expected = MultiScaleRoIAlign(list(features), 7, 2)(features, boxes, [(256, 320)])
    torch.set_num_threads(2)
    pooler = ParallelMultiScaleRoIAlign(list(features), 7, 2)
    pooler.fast = True  # what optimize_for_inference(threaded_roi_align=True) sets
    with torch.no_grad():
        got = pooler(features, boxes, [(256, 320)])
    assert torch.equal(got, expected)


def test_checkpoint_round_trip(tmp_path):
    from omniseg.checkpoint import load_model, save_checkpoint

    model = _tiny_model(box_score_thresh=0.0).eval()
    save_checkpoint(tmp_path / "mrcnn", model, model_config=model.config, categories=model.categories)
    loaded, meta = load_model(tmp_path / "mrcnn")
    image = torch.randn(3, 90, 120)
    a, b = model.detect([image])[0], loaded.detect([image])[0]
    assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["boxes"], b["boxes"])
    assert loaded.categories == model.categories


def test_out_of_range_labels_are_a_clear_error():
    model = _tiny_model().train()
    target = {
        "boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]),
        "labels": torch.tensor([3]),  # two thing classes: labels 1..2
        "masks": torch.ones((1, 90, 120), dtype=torch.bool),
    }
    with pytest.raises(ValueError, match=r"target 0: labels must be in 1\.\.2"):
        model([torch.randn(3, 90, 120)], [target])


def test_every_constructor_option_is_reachable_from_a_config():
    """Builders forward **kwargs: options the builder does not name still reach the model, and the
    recorded config rebuilds it with them (they once drifted: seven could not be set)."""
    from omniseg.structures import Category, CategoryTable

    options = {"box_fg_iou_thresh": 0.6, "box_bg_iou_thresh": 0.4, "rpn_fg_iou_thresh": 0.8,
               "rpn_bg_iou_thresh": 0.2, "box_positive_fraction": 0.5, "rpn_score_thresh": 0.1}  # fmt: skip
    categories = CategoryTable((Category(1, "road", False), Category(2, "car", True)))
    for name, extra in (("mask_rcnn", {}), ("panoptic_fpn", {"categories": categories.to_dicts()})):
        config = {"name": name, "num_classes": 2, "backbone": "efficientnet_lite0", "min_size": 64, "max_size": 96, **options}
        if extra:
            config = {k: v for k, v in config.items() if k != "num_classes"} | extra
        model = build_model(config)
        for built in (model, build_model(json.loads(json.dumps(model.config)))):
            heads = built.roi_heads
            assert heads.proposal_matcher.high_threshold == 0.6 and heads.proposal_matcher.low_threshold == 0.4
            assert built.rpn.proposal_matcher.high_threshold == 0.8 and built.rpn.proposal_matcher.low_threshold == 0.2
            assert heads.fg_bg_sampler.positive_fraction == 0.5 and built.rpn.score_thresh == 0.1
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_model({"name": "mask_rcnn", "num_classes": 2, "backbone": "efficientnet_lite0", "box_fg_iou": 0.6})
