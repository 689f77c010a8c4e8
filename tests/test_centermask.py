"""CenterMask (Wang et al. 2020): CenterNet targets, the mask assembly, peak extraction, the model
contract, every ablation training, and a real-image overfit to mask AP >= 0.9."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from omniseg.models import build_model
from omniseg.models.centermask import (
    MASK_MODES,
    assemble_masks,
    encode_centre_targets,
    mask_assembly_loss,
    point_head,
    resize_to_boxes,
)
from omniseg.models.layers.center_heatmap import draw_gaussians, gaussian_radius, heatmap_peaks
from omniseg.structures import CategoryTable, Segments

CATEGORIES = CategoryTable.from_dicts(
    [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1}]
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(**kwargs):
    config = {
        "name": "centermask", "categories": CATEGORIES.to_dicts(), "min_size": None,
        "neck_channels": 16, "head_channels": 16, "shape_size": 8, **kwargs,
    }  # fmt: skip
    return build_model(config)


def _target(h=64, w=96):
    """Two objects (a person and a car) as omniseg's typed training target."""
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 10:30, 20:50] = True
    masks[1, 40:60, 5:25] = True
    masks[1, 40:45, 5:10] = False  # not a box: the mask head has something to learn
    return {
        "masks": masks,
        "boxes": torch.tensor([[20.0, 10, 50, 30], [5, 40, 25, 60]]),
        "category_ids": torch.tensor([1, 3]),
        "iscrowd": torch.tensor([False, False]),
    }


# ------------------------------------------------------------------------------ targets
def test_gaussian_radius_matches_hand_computation():
    # h=6, w=10 cells, overlap 0.7 (CenterNet's three quadratics):
    #   r1 = (16 + sqrt(16^2 - 4 * 60*0.3/1.7)) / 2            = 15.31
    #   r2 = (32 + sqrt(32^2 - 16 * 0.3*60)) / 2                = 29.56
    #   r3 = (-1.4*16 + sqrt((1.4*16)^2 + 4*2.8*0.3*60)) / 2    = 2.06   -> radius 2
    # h=w=40: r3 = (-112 + sqrt(112^2 + 4*2.8*480)) / 2 = 10.93 -> 10; h=w=1: r3 = 0.27 -> 0;
    # h=5.2, w=9.1 are rounded up to 6 x 10 first (CenterNet's ceil) -> 2
    radii = gaussian_radius(torch.tensor([6.0, 40.0, 1.0, 5.2]), torch.tensor([10.0, 40.0, 1.0, 9.1]))
    assert radii.tolist() == [2, 10, 0, 2]


def test_centre_targets_match_hand_computation():
    # box (10, 20)-(50, 44) px at stride 4 = cells (2.5, 5)-(12.5, 11): centre (7.5, 8), integer
    # cell (7, 8), offset (0.5, 0), size (10, 6), radius 2 (above); a second box of class 1
    boxes = torch.tensor([[10.0, 20, 50, 44], [0, 0, 8, 8]])
    encoded = encode_centre_targets(
        boxes, torch.tensor([0, 1]), torch.tensor([0, 0]), 1, 2, (16, 20), stride=4
    )
    assert encoded["cell"].tolist() == [8 * 20 + 7, 1 * 20 + 1]
    torch.testing.assert_close(encoded["offset"], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(encoded["size"], torch.tensor([[10.0, 6.0], [2.0, 2.0]]))
    assert encoded["radius"].tolist() == [2, 0]
    heat = encoded["heatmap"][0]
    sigma = 5 / 6  # (2 r + 1) / 6
    assert heat[0, 8, 7] == 1.0 and heat[1, 1, 1] == 1.0
    assert heat[0, 8, 8].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-6)  # exp(-0.72)
    assert heat[0, 10, 9].item() == pytest.approx(math.exp(-8 / (2 * sigma**2)), rel=1e-5)  # corner
    assert heat[0, 8, 10] == 0.0 and heat[0, 11, 7] == 0.0  # outside the radius-2 window
    assert heat[1].count_nonzero() == 1  # radius 0: the centre only, in class 1's channel
    assert heat[0, 1, 1] == 0.0


def test_overlapping_gaussians_keep_the_maximum():
    centres = torch.tensor([[3, 3], [5, 3]])
    heat = draw_gaussians(centres, torch.tensor([2, 2]), torch.tensor([0, 0]), 1, (8, 8))[0]
    one = draw_gaussians(centres[:1], torch.tensor([2]), torch.tensor([0]), 1, (8, 8))[0]
    two = draw_gaussians(centres[1:], torch.tensor([2]), torch.tensor([0]), 1, (8, 8))[0]
    torch.testing.assert_close(heat, torch.maximum(one, two))
    assert heat[3, 3] == 1.0 and heat[3, 5] == 1.0


# ------------------------------------------------------------------------ mask assembly
def test_assembled_mask_equals_direct_computation():
    torch.manual_seed(0)
    s, h, w = 4, 12, 16
    shape = torch.randn(2, s, s) * 3
    saliency = torch.randn(2, h, w) * 3  # each object's saliency channel (its class)
    boxes = torch.tensor([[2.0, 3, 10, 9], [0, 0, 5, 7]])  # cells, whole-cell boxes
    masks = assemble_masks(shape, saliency, boxes, (h, w))
    for n, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):  # the paper's per-object recipe
        resized = F.interpolate(
            shape[n][None, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False
        )
        expected = torch.zeros(h, w)
        expected[y0:y1, x0:x1] = resized[0, 0].sigmoid() * saliency[n, y0:y1, x0:x1].sigmoid()
        torch.testing.assert_close(masks[n], expected, rtol=0, atol=1e-6)
    # all-zero logits: 0.5 * 0.5 = 0.25 inside the 8 x 6 box, 0 outside
    flat = assemble_masks(torch.zeros(1, s, s), torch.zeros(1, h, w), boxes[:1], (h, w))[0]
    assert flat.sum().item() == pytest.approx(0.25 * 48) and flat[3:9, 2:10].eq(0.25).all()
    # the ablations: one factor alone
    torch.testing.assert_close(
        assemble_masks(None, saliency, boxes, (h, w))[0, 3:9, 2:10], saliency[0, 3:9, 2:10].sigmoid()
    )
    only_shape = assemble_masks(shape, None, boxes, (h, w))[0]
    resized = F.interpolate(shape[:1, None], size=(6, 8), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(only_shape[3:9, 2:10], resized.sigmoid(), rtol=0, atol=1e-6)
    assert only_shape.count_nonzero() == 48


def test_mask_loss_is_bce_of_the_product():
    torch.manual_seed(0)
    shape, saliency = torch.randn(3, 6, 6), torch.randn(3, 6, 6)
    region = torch.zeros(3, 6, 6, dtype=torch.bool)
    region[:, 1:5, 2:6] = True
    target = torch.rand(3, 6, 6)
    prob = shape.sigmoid() * saliency.sigmoid()
    bce = F.binary_cross_entropy(prob, target, reduction="none")
    expected = ((bce * region).flatten(1).sum(1) / region.flatten(1).sum(1)).mean()
    torch.testing.assert_close(mask_assembly_loss(shape, saliency, region, target), expected)
    # saturated logits stay finite, gradient included (p -> 1 where log(1 - p) would be -inf)
    big = torch.full((1, 6, 6), 40.0, requires_grad=True)
    loss = mask_assembly_loss(big, big, region[:1], torch.zeros(1, 6, 6))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()


def test_fractional_boxes_keep_their_centre_cell():
    # a box smaller than a cell still covers the cell it lies in
    _, region = resize_to_boxes(torch.zeros(1, 4, 4), torch.tensor([[3.2, 2.1, 3.6, 2.5]]), (6, 6))
    assert region[0].nonzero().tolist() == [[2, 3]]


# --------------------------------------------------------------------------- inference
def test_peaks_match_reference():
    torch.manual_seed(0)
    heat = torch.rand(2, 3, 5, 6)  # distinct values: no plateaus
    scores, channels, ys, xs = heatmap_peaks(heat, 7)
    padded = F.pad(heat, (1, 1, 1, 1), value=-1.0)
    for b in range(2):
        reference = []
        for c in range(3):
            for y in range(5):
                for x in range(6):
                    if heat[b, c, y, x] >= padded[b, c, y : y + 3, x : x + 3].max():
                        reference.append((heat[b, c, y, x].item(), c, y, x))
        reference = sorted(reference, reverse=True)[:7]
        assert len(reference) == 7
        found = list(
            zip(scores[b].tolist(), channels[b].tolist(), ys[b].tolist(), xs[b].tolist(), strict=True)
        )
        assert found == reference


def test_heads_at_points_equal_the_dense_heads():
    torch.manual_seed(0)
    model = _tiny_model().eval()
    features = torch.randn(2, 16, 6, 7)
    batch_index, cell = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 13, 41, 6])  # corners and edges
    for head in (model.offset_head, model.size_head, model.shape_head):
        dense = head(features).flatten(2)[batch_index, :, cell]
        torch.testing.assert_close(point_head(head, features, batch_index, cell), dense, rtol=1e-5, atol=1e-6)


def test_box_local_masks_pasted_equal_the_grid_assembly_upsampled():
    """Inference assembles each mask over its box (shape resized, saliency cropped by RoIAlign) and
    pastes it as Mask R-CNN does; that is the paper's grid assembly, up-sampled, up to resampling."""
    from omniseg.models.layers.detection import paste_masks

    torch.manual_seed(0)
    model = _tiny_model().eval()
    with torch.no_grad():  # trained-like heads: masks well above and below the 0.4 threshold
        for head in (model.shape_head, model.saliency_head):
            head[-1].weight.normal_(0, 0.5)
            head[-1].bias.fill_(1.0)
    # smooth features, as a trained network's are (white noise per cell is all resampling error)
    features = F.interpolate(torch.randn(1, 16, 4, 6), size=(16, 24), mode="bilinear", align_corners=False)
    batch_index, cell, channels = torch.tensor([0, 0]), torch.tensor([5 * 24 + 6, 10 * 24 + 15]), torch.tensor([0, 1])
    boxes = torch.tensor([[2.0, 1, 11, 9], [9, 4, 22, 15]])  # cells
    with torch.no_grad():
        local = model.local_masks(features, batch_index, cell, channels, boxes)
        pasted = paste_masks(local[:, None], boxes * 4, (64, 96))[:, 0]
        saliency = model.saliency_head(features)[0, channels]
        grid = assemble_masks(model.shape_logits(features, batch_index, cell), saliency, boxes, (16, 24))
        reference = F.interpolate(grid[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0]
    for ours, ref, (x0, y0, x1, y1) in zip(pasted, reference, (boxes * 4).long().tolist(), strict=True):
        inner = (slice(y0 + 4, y1 - 4), slice(x0 + 4, x1 - 4))  # a cell in from the box border, where
        assert ref[inner].min() > 0.2  # the grid version's up-sampling blurs into the zeros outside
        # two discretisations of one product (shape -> 64 x 64 -> box pixels vs shape -> cells -> x4)
        difference = (ours[inner] - ref[inner]).abs()
        assert difference.mean() < 0.03 and difference.max() < 0.15, (difference.mean(), difference.max())
        outside = torch.ones_like(ours, dtype=torch.bool)
        outside[y0 - 2 : y1 + 2, x0 - 2 : x1 + 2] = False  # Mask R-CNN's paste pads the box by a mask cell
        assert ours[outside].abs().max() < 1e-6  # nothing leaks out of the box


def test_saliency_crops_of_each_box_own_class_equal_cropping_every_class():
    """RoIAlign over each box's own class channel alone (channels as one-channel images) gives
    exactly the crop of all channels at that channel, across images of a batch."""
    from torchvision.ops import roi_align

    torch.manual_seed(1)
    model = _tiny_model(mask_mode="saliency").eval()
    features = torch.randn(2, 16, 12, 18)
    batch_index, channels = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 1, 1])
    cell = torch.tensor([5, 40, 100, 7])
    boxes = torch.tensor([[1.0, 1, 7, 6], [3.5, 2, 16, 11], [0, 0, 5.5, 4], [8, 3, 17.2, 11.9]])
    with torch.no_grad():
        ours = model.local_masks(features, batch_index, cell, channels, boxes)
        saliency = model.saliency_head(features)
        rois = torch.cat([batch_index[:, None].float(), boxes], 1)
        every = roi_align(saliency, rois, ours.shape[-2:], spatial_scale=1.0, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(ours, every[torch.arange(4), channels].sigmoid(), rtol=0, atol=1e-6)


def test_post_process_gives_segments_at_the_input_size():
    torch.manual_seed(0)
    model = _tiny_model().eval()
    images = [torch.randn(3, 70, 90), torch.randn(3, 50, 64)]
    outputs = model(images)
    assert len(outputs[0]["scores"]) == 100  # top 100 peaks, no NMS
    segments = model.post_process(outputs, [(70, 90), (50, 64)], task="instance")
    assert [s.image_size for s in segments] == [(70, 90), (50, 64)]
    assert all(isinstance(s, Segments) and len(s) == 100 for s in segments)
    assert set(segments[0].category_ids.tolist()) <= {1, 3}
    assert segments[0].masks().shape == (100, 70, 90)
    kept = model.post_process(outputs, [(70, 90), (50, 64)], score_thresh=float(outputs[0]["scores"][9]))
    assert len(kept[0]) >= 10 and len(kept[0]) < 100
    # resized inputs come back at their own size too
    resized = _tiny_model(min_size=32, max_size=64).eval()
    assert resized.post_process(resized(images[:1]), [(70, 90)])[0].image_size == (70, 90)
    with pytest.raises(ValueError, match="instance"):
        model.post_process(outputs, [(70, 90), (50, 64)], task="semantic")


def test_shape_vectors_at_centres_equal_the_dense_head():
    torch.manual_seed(0)
    model = _tiny_model().eval()
    features = torch.randn(2, 16, 6, 7)
    batch_index, cell = torch.tensor([0, 1, 1]), torch.tensor([0, 13, 41])
    dense = model.shape_head(features).flatten(2)[batch_index, :, cell].view(3, 8, 8)
    torch.testing.assert_close(model.shape_logits(features, batch_index, cell), dense)


def test_optimized_inference_matches_the_plain_model():
    from omniseg.optimize import optimize_for_inference

    torch.manual_seed(0)
    model = _tiny_model().eval()
    image = torch.randn(1, 3, 64, 96)
    plain = model(image)[0]
    optimize_for_inference(model)
    fast = model(image)[0]
    assert torch.equal(plain["labels"], fast["labels"])
    torch.testing.assert_close(fast["scores"], plain["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(fast["boxes"], plain["boxes"], rtol=0, atol=1e-3)
    torch.testing.assert_close(fast["mask_probs"], plain["mask_probs"], rtol=0, atol=1e-4)


def test_config_rebuilds_the_model():
    model = _tiny_model(mask_mode="shape")
    json.dumps(model.config)
    again = build_model(model.config)
    assert again.saliency_head is None and again.shape_head is not None
    assert again.state_dict().keys() == model.state_dict().keys()


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    ("mask_mode", "class_specific"),
    [("both", True), ("both", False), ("shape", True), ("saliency", True), ("saliency", False)],
)
def test_gradients_reach_every_head(mask_mode, class_specific):
    assert mask_mode in MASK_MODES
    torch.manual_seed(0)
    model = _tiny_model(mask_mode=mask_mode, class_specific_saliency=class_specific).train()
    empty = {k: v[:0] for k, v in _target().items()}
    losses = model(torch.randn(2, 3, 64, 96), [_target(), empty])  # an image without objects too
    expected = {"loss_heatmap", "loss_offset", "loss_size", "loss_mask"}
    if mask_mode != "shape" and class_specific:
        expected.add("loss_saliency")
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    heads = ["neck", "heatmap_head", "offset_head", "size_head"]
    heads += ["shape_head"] if mask_mode != "saliency" else []
    heads += ["saliency_head"] if mask_mode != "shape" else []
    for name in heads:
        for pname, p in getattr(model, name).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    assert (mask_mode == "saliency") == (model.shape_head is None)
    assert (mask_mode == "shape") == (model.saliency_head is None)
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert backbone_grads and all(g is not None for g in backbone_grads)


@pytest.mark.slow
def test_overfits_a_real_image_to_mask_ap_09(shared_data):
    from omniseg.data import open_dataset
    from omniseg.engine.data import EvaluationSet, TrainingSet
    from omniseg.inference import predict_segments
    from omniseg.metrics.task_metrics import metric_for_task

    root = shared_data / "coco128_seg"
    if not root.is_dir():
        pytest.skip(f"{root} is absent (the shared coco128_seg sample)")
    torch.manual_seed(0)
    # an umbrella over a person: two large, overlapping objects of two classes
    dataset = open_dataset({"format": "yolo", "root": str(root), "subset": "4:5"})
    image, target = TrainingSet(dataset)[0]
    model = build_model({
        "name": "centermask", "categories": dataset.categories.to_dicts(), "backbone": "efficientnet_lite0",
        "pretrained_backbone": True, "min_size": 256, "max_size": 512, "neck_channels": 64, "head_channels": 64,
    })  # fmt: skip
    steps = 100
    # the size head regresses tens of cells from a zero start; Adam moves it by ~lr per step, so it
    # gets 10x the rate to arrive within the budget (CenterNet instead trains for 140 epochs)
    size_head = list(model.size_head.parameters())
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("size_head.")]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": size_head, "lr": 1e-2}], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(step / steps * math.pi))
    )
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        loss = sum(model([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    metric = metric_for_task("instance", dataset.categories)
    eval_image, gt, image_id = EvaluationSet(dataset)[0]
    metric.update(image_id, gt, predict_segments(model, eval_image[None], task="instance")[0])
    result = metric.compute()
    seconds = time.perf_counter() - start
    print(f"centermask overfit: {seconds:.0f} s, segm {result['segm']}, bbox AP {result['bbox']['AP']}")
    assert result["segm"]["AP"] >= 0.9, result
    assert result["bbox"]["AP"] >= 0.9, result
