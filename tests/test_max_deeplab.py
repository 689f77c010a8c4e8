"""MaX-DeepLab and kMaX-DeepLab: attention against naive references, losses against their formulas,
matching against brute force, training gradients, post-processing, and a short overfit."""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omniseg.data.targets import finalize_target, training_target
from omniseg.inference import TestTimeAugmentation, predict_segments
from omniseg.losses.max_deeplab import (
    MaXDeepLabLoss,
    instance_discrimination_loss,
    mask_dice_similarity,
    mask_id_cross_entropy,
    match_slots,
    pq_similarity,
    pq_style_loss,
)
from omniseg.metrics.panoptic import PanopticQuality
from omniseg.models import build_model
from omniseg.models.layers.axial_attention import AxialAttention, relative_index
from omniseg.models.layers.dual_path_transformer import DualPathTransformerLayer
from omniseg.models.layers.kmeans_attention import kmeans_assignment
from omniseg.models.layers.mask_id_inference import (
    mask_id_panoptic_inference,
    max_over_slots,
    merge_mask_id_views,
    upsampled_mask_id,
)
from omniseg.optimize import optimize_for_inference
from omniseg.structures import CategoryTable, Segments

CATEGORIES = CategoryTable.from_dicts(
    [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 3, "name": "car", "isthing": 1},
        {"id": 100, "name": "road", "isthing": 0},
        {"id": 101, "name": "sky", "isthing": 0},
    ]
)
COMMON = dict(
    memory_channels=32, decoder_channels=32, value_channels=32, num_heads=2, ffn_channels=64, embedding_dim=16
)
TINY = {
    "max_deeplab": dict(COMMON, num_slots=8, key_channels=16, axial_span=9),
    "kmax_deeplab": dict(COMMON, num_queries=8, axial_span=9, layers_per_stage=1),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ axial attention
def _naive_axis_attention(layer: AxialAttention, x: torch.Tensor) -> torch.Tensor:
    """Full 2-D attention over all pixel pairs, with only the pairs in the same column (height) or
    row (width) allowed, written pixel by pixel in float64."""
    b, _, h, w = x.shape
    qkv = layer.qkv(x).double()  # the 1x1 conv + BN is per pixel: shared with the module
    heads, dk, dv = layer.num_heads, layer.key_dim, layer.value_dim
    q, k, v = qkv.split([heads * dk, heads * dk, heads * dv], dim=1)
    out = torch.zeros(b, heads * dv, h, w, dtype=torch.float64)
    clip = layer.span - 1
    for n in range(b):
        for head in range(heads):
            kq, vq = slice(head * dk, (head + 1) * dk), slice(head * dv, (head + 1) * dv)
            for i, j in itertools.product(range(h), range(w)):
                logits, values = [], []
                for i2, j2 in itertools.product(range(h), range(w)):
                    same_line = j2 == j if layer.axis == 2 else i2 == i
                    if not same_line:
                        continue
                    offset = (i2 - i) if layer.axis == 2 else (j2 - j)
                    r = max(-clip, min(clip, offset)) + clip
                    qo, kp = q[n, kq, i, j], k[n, kq, i2, j2]
                    logit = qo @ kp + qo @ layer.query_rel[r].double() + kp @ layer.key_rel[r].double()
                    logits.append(logit / math.sqrt(dk))
                    values.append(v[n, vq, i2, j2] + layer.value_rel[r].double())
                weights = torch.stack(logits).softmax(0)
                out[n, vq, i, j] = (weights[:, None] * torch.stack(values)).sum(0)
    return layer.out_norm(out.float())


@pytest.mark.parametrize("axis", [2, 3])
@pytest.mark.parametrize("span", [9, 3])  # 3 < the map's length: distant offsets share an embedding
def test_axial_attention_equals_naive_attention_restricted_to_lines(axis, span):
    torch.manual_seed(0)
    layer = AxialAttention(6, axis=axis, key_channels=4, value_channels=6, num_heads=2, span=span).eval()
    with torch.no_grad():
        for bn in (layer.qkv[1], layer.out_norm):  # non-trivial batch-norm statistics
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 6, 5, 6)
        got = layer(x)
        expected = _naive_axis_attention(layer, x)
    assert got.shape == (2, 6, 5, 6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_relative_index_clips_offsets():
    index = relative_index(5, 3)
    assert index[0].tolist() == [2, 3, 4, 4, 4]  # offsets 0, 1, 2, 3, 4 -> clipped at span - 1 = 2
    assert index[4].tolist() == [0, 0, 0, 1, 2]


# ------------------------------------------------------------------------ dual-path layer
def test_dual_path_attention_equals_plain_reference():
    """P2M: softmax over the N slots per pixel; fused M2P + M2M: one softmax over the HW pixels and
    the N slots together, per slot and head; both written out in float64."""
    torch.manual_seed(0)
    c, d, heads, dk, dv = 6, 8, 2, 4, 6
    layer = DualPathTransformerLayer(
        c, d, key_channels=dk, value_channels=dv, num_heads=heads, ffn_channels=16
    )
    layer.eval()
    pixel, memory = torch.randn(2, c, 3, 4), torch.randn(2, 5, d)
    with torch.no_grad():
        new_pixel, new_memory = layer(pixel, memory)
        pq, pk, pv = layer.pixel_qkv(pixel).double().flatten(2).transpose(1, 2).split([dk, dk, dv], -1)
        mq, mk, mv = layer.memory_qkv_norm(layer.memory_qkv(memory)).double().split([dk, dk, dv], -1)
        hk, hv = dk // heads, dv // heads
        p2m = torch.zeros(2, 12, dv, dtype=torch.float64)
        fused = torch.zeros(2, 5, dv, dtype=torch.float64)
        for n, head in itertools.product(range(2), range(heads)):
            ks, vs = slice(head * hk, (head + 1) * hk), slice(head * hv, (head + 1) * hv)
            for p in range(12):
                e = torch.stack([torch.exp(pq[n, p, ks] @ mk[n, s, ks] / math.sqrt(hk)) for s in range(5)])
                p2m[n, p, vs] = sum(e[s] / e.sum() * mv[n, s, vs] for s in range(5))
            keys = torch.cat([pk[n, :, ks], mk[n, :, ks]])  # 12 pixels then 5 slots
            values = torch.cat([pv[n, :, vs], mv[n, :, vs]])
            for s in range(5):
                e = torch.exp(keys @ mq[n, s, ks] / math.sqrt(hk))
                fused[n, s, vs] = (e / e.sum()) @ values
        expected_pixel = F.relu(pixel + layer.pixel_out(p2m.float().transpose(1, 2).reshape(2, dv, 3, 4)))
        expected_memory = F.relu(memory + layer.memory_out_norm(layer.memory_out(fused.float())))
        expected_memory = F.relu(expected_memory + layer.ffn_norm(layer.ffn(expected_memory)))
    torch.testing.assert_close(new_pixel, expected_pixel, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(new_memory, expected_memory, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------ k-means assignment
def test_kmeans_assignment_is_the_argmax_one_hot():
    logits = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assignment = kmeans_assignment(logits)
    assert assignment.shape == (2, 5, 12) and not assignment.requires_grad
    for b, p in itertools.product(range(2), range(12)):
        column = logits[b, :, p // 4, p % 4]
        expected = [1.0 if n == int(column.argmax()) else 0.0 for n in range(5)]
        assert assignment[b, :, p].tolist() == expected
    # the update step: each centre sums exactly the values of its pixels
    values = torch.randn(2, 12, 3)
    update = assignment @ values
    best = logits.detach().flatten(2).argmax(1)
    for b, n in itertools.product(range(2), range(5)):
        torch.testing.assert_close(update[b, n], values[b][best[b] == n].sum(0))


# ------------------------------------------------------------------------------- matching
def test_matching_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        class_probs = torch.rand(5, 4, generator=generator).softmax(-1)
        mask_probs = torch.rand(5, 12, generator=generator).softmax(0)
        targets = torch.zeros(3, 12, dtype=torch.bool)
        owner = torch.randint(0, 3, (12,), generator=generator)
        targets[owner, torch.arange(12)] = True
        labels = torch.randint(0, 3, (3,), generator=generator)
        similarity = pq_similarity(class_probs, mask_probs, labels, targets)
        slots = match_slots(similarity)
        best = max(
            itertools.permutations(range(5), 3), key=lambda s: sum(similarity[k, s[k]] for k in range(3))
        )
        assert slots.tolist() == list(best)
    # more targets than slots: the left-over target gets -1
    assert sorted(match_slots(torch.rand(3, 2, generator=generator)).tolist())[0] == -1


# --------------------------------------------------------------------------------- losses
def _dice(t, p):
    return sum(a * b for a, b in zip(t, p, strict=True)) / ((sum(t) + sum(p)) / 2 + 1e-5)


def test_dice_and_pq_similarity_formula():
    targets = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    probs = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.7, 0.5], [0.0, 0.0, 0.2, 0.5]])
    dice = mask_dice_similarity(targets, probs)
    for k, n in itertools.product(range(2), range(3)):
        assert dice[k, n].item() == pytest.approx(
            _dice(targets[k].float().tolist(), probs[n].tolist()), rel=1e-6
        )
    class_probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1])
    sim = pq_similarity(class_probs, probs, labels, targets)
    assert sim[1, 2].item() == pytest.approx(0.1 * _dice([0, 0, 1, 1], [0.0, 0.0, 0.2, 0.5]), rel=1e-6)


def test_pq_style_loss_formula_weights_and_stop_gradients():
    class_logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.0, 0.2, 1.0]], requires_grad=True)
    mask_logits = torch.tensor(
        [[3.0, 2.0, -1.0, 0.0, 1.0], [-1.0, 0.0, 2.0, 2.5, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]],
        requires_grad=True,
    )
    targets = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)  # pixel 4: void
    non_void = torch.tensor([True, True, True, True, False])
    labels, slots = torch.tensor([0, 1]), torch.tensor([0, 1])  # slot 2 unmatched
    alpha = 0.75
    class_term, dice_term = pq_style_loss(
        class_logits, mask_logits, labels, targets, slots, non_void, alpha=alpha
    )

    probs = mask_logits.detach().softmax(0).tolist()
    cls = class_logits.detach().softmax(-1).tolist()
    masked = [[p * v for p, v in zip(row, non_void.tolist(), strict=True)] for row in probs]
    dice = [_dice(targets[k].float().tolist(), masked[slots[k]]) for k in range(2)]
    void_share = probs[2][4] / sum(probs[2])
    expected_class = (
        alpha * dice[0] * -math.log(cls[0][0])
        + alpha * dice[1] * -math.log(cls[1][1])
        + (1 - alpha) * void_share * -math.log(cls[2][2])  # "no object" is the last class, weighted by void
    ) / 3  # mean over the N = 3 slots
    expected_dice = (cls[0][0] * (1 - dice[0]) + cls[1][1] * (1 - dice[1])) / 2  # mean over K = 2
    assert class_term.item() == pytest.approx(expected_class, rel=1e-5)
    assert dice_term.item() == pytest.approx(expected_dice, rel=1e-5)
    # stop-gradients: the class term's weights (Dice) and the dice term's weights (p) are constants
    (grad_masks,) = torch.autograd.grad(class_term, mask_logits, allow_unused=True, retain_graph=True)
    (grad_classes,) = torch.autograd.grad(dice_term, class_logits, allow_unused=True)
    assert (grad_masks is None or not grad_masks.any()) and (grad_classes is None or not grad_classes.any())


def test_mask_id_cross_entropy_formula():
    mask_logits = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.5, 3.0], [1.0, 1.0, 1.0, -1.0]])
    targets = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)  # pixel 3 in no target
    slots = torch.tensor([2, 0])
    loss = mask_id_cross_entropy(mask_logits, targets, slots)
    log_p = mask_logits.log_softmax(0)
    expected = -(log_p[2, 0] + log_p[2, 1] + log_p[0, 2]) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_instance_discrimination_formula():
    embeddings = F.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)), dim=0)
    targets = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    is_thing = torch.tensor([True, True, False])  # stuff: in the softmax, but its pixels not scored
    loss = instance_discrimination_loss(embeddings, targets, is_thing, temperature=0.3)
    feats = [F.normalize(embeddings[:, t].mean(1), dim=0) for t in targets]
    total = 0.0
    for p, k in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        logits = torch.stack([f @ embeddings[:, p] / 0.3 for f in feats])
        total += -logits.log_softmax(0)[k].item()
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)


def test_loss_weights_and_names():
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "class_logits": torch.randn(1, 4, 3, generator=generator),
        "mask_logits": torch.randn(1, 4, 4, 4, generator=generator),
        "pixel_embeddings": F.normalize(torch.randn(1, 5, 4, 4, generator=generator), dim=1),
        "semantic_logits": torch.randn(1, 2, 4, 4, generator=generator),
    }
    semantic = torch.zeros(4, 4, dtype=torch.int64)
    semantic[2:] = 1
    semantic[0, 0] = 255
    masks = torch.stack([semantic == 0, semantic == 1])
    target = {
        "labels": torch.tensor([0, 1]),
        "masks": masks,
        "is_thing": torch.tensor([True, False]),
        "semantic": semantic,
    }
    losses = MaXDeepLabLoss()(outputs, [target])
    assert set(losses) == {"loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_instance", "loss_semantic"}
    probs = outputs["mask_logits"][0].flatten(1).softmax(0) * (semantic.flatten() != 255)
    sim = pq_similarity(outputs["class_logits"][0].softmax(-1), probs, target["labels"], masks.flatten(1))
    slots = match_slots(sim)
    c, d = pq_style_loss(
        outputs["class_logits"][0],
        outputs["mask_logits"][0].flatten(1),
        target["labels"],
        masks.flatten(1),
        slots,
        semantic.flatten() != 255,
    )
    assert losses["loss_pq_class"].item() == pytest.approx(3.0 * c.item(), rel=1e-6)
    assert losses["loss_pq_dice"].item() == pytest.approx(3.0 * d.item(), rel=1e-6)
    mask_id = mask_id_cross_entropy(outputs["mask_logits"][0].flatten(1), masks.flatten(1), slots)
    assert losses["loss_mask_id"].item() == pytest.approx(0.3 * mask_id.item(), rel=1e-6)
    ce = F.cross_entropy(outputs["semantic_logits"], semantic[None], ignore_index=255)
    assert losses["loss_semantic"].item() == pytest.approx(ce.item(), rel=1e-6)


def test_auxiliary_predictions_at_a_coarser_resolution_are_scored_resized():
    """kMaX's layers predict at strides 32..8: the loss scores each such prediction as its mask logits
    and (re-normalised) pixel embeddings bilinearly resized to the final prediction's size."""
    generator = torch.Generator().manual_seed(3)
    semantic = torch.zeros(8, 8, dtype=torch.int64)
    semantic[4:] = 1
    target = {
        "labels": torch.tensor([0, 1]),
        "masks": torch.stack([semantic == 0, semantic == 1]),
        "is_thing": torch.tensor([True, False]),
        "semantic": semantic,
    }
    final = {
        "class_logits": torch.randn(1, 4, 3, generator=generator),
        "mask_logits": torch.randn(1, 4, 8, 8, generator=generator),
        "pixel_embeddings": F.normalize(torch.randn(1, 5, 8, 8, generator=generator), dim=1),
    }
    coarse = {
        "class_logits": torch.randn(1, 4, 3, generator=generator),
        "mask_logits": torch.randn(1, 4, 2, 2, generator=generator),
        "pixel_embeddings": F.normalize(torch.randn(1, 5, 2, 2, generator=generator), dim=1),
    }
    resized = {
        "class_logits": coarse["class_logits"],
        "mask_logits": F.interpolate(coarse["mask_logits"], size=(8, 8), mode="bilinear", align_corners=False),
        "pixel_embeddings": F.normalize(
            F.interpolate(coarse["pixel_embeddings"], size=(8, 8), mode="bilinear", align_corners=False), dim=1
        ),
    }
    loss = MaXDeepLabLoss(semantic_weight=0.0)
    ours = loss({**final, "aux_outputs": [coarse]}, [target])
    expected = loss({**final, "aux_outputs": [resized]}, [target])
    assert set(ours) == set(expected) and "loss_pq_dice_0" in ours
    for name in ours:
        assert ours[name].item() == pytest.approx(expected[name].item(), rel=1e-6)
    # and the resized prediction is not the final one: the auxiliary terms are its own
    assert ours["loss_pq_dice_0"].item() != pytest.approx(ours["loss_pq_dice"].item(), rel=1e-3)


def test_kmax_layers_cluster_by_their_own_predictions_on_their_own_maps(monkeypatch):
    """deeplab2's kMaX: each k-means layer assigns pixels by the very prediction it returns, made on
    that layer's map (strides 32, 16, 8); the final prediction is on the stride-4 map."""
    import omniseg.models.layers.kmeans_attention as kmeans_attention

    clustered = []

    def recording_assignment(mask_logits):
        clustered.append(mask_logits)
        return kmeans_assignment(mask_logits)

    monkeypatch.setattr(kmeans_attention, "kmeans_assignment", recording_assignment)
    model = _tiny_model("kmax_deeplab").eval()
    with torch.no_grad():
        outputs = model.decode(model.backbone(torch.randn(1, 3, 64, 96)))
    aux = outputs["aux_outputs"]
    assert len(clustered) == len(aux) == 3
    assert all(c is a["mask_logits"] for c, a in zip(clustered, aux, strict=True))
    assert [tuple(a["mask_logits"].shape[-2:]) for a in aux] == [(2, 3), (4, 6), (8, 12)]
    assert tuple(outputs["mask_logits"].shape[-2:]) == (16, 24)


def test_loss_handles_an_empty_image_and_more_segments_than_slots():
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "class_logits": torch.randn(2, 4, 3, generator=generator, requires_grad=True),
        "mask_logits": torch.randn(2, 4, 4, 4, generator=generator, requires_grad=True),
        "pixel_embeddings": F.normalize(torch.randn(2, 5, 4, 4, generator=generator), dim=1),
        "semantic_logits": torch.randn(2, 2, 4, 4, generator=generator),
    }
    empty = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 16, 16, dtype=torch.bool),
        "is_thing": torch.zeros(0, dtype=torch.bool),
        "semantic": torch.full((16, 16), 255),
    }
    semantic = torch.zeros(16, 16, dtype=torch.int64)
    semantic[8:] = 1
    stripes = [semantic == 0, semantic == 1] * 2 + [semantic == 0]  # 5 segments for 4 slots
    crowded = {
        "labels": torch.tensor([0, 1, 0, 1, 0]),
        "masks": torch.stack(stripes),
        "is_thing": torch.ones(5, dtype=torch.bool),
        "semantic": semantic,
    }
    losses = MaXDeepLabLoss()(outputs, [empty, crowded])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["mask_logits"].grad).all()


# ------------------------------------------------------------------------------- training
def _panoptic_segments(h: int, w: int, shift: int) -> Segments:
    id_map = np.zeros((h, w), dtype=np.int32)
    id_map[: h // 2] = 1  # sky
    id_map[h // 2 :] = 2  # road
    id_map[8 + shift : 24 + shift, 8:30] = 3  # car
    id_map[30:56, 40 + shift : 52 + shift] = 4  # person
    id_map[4:10, 50:60] = 5  # a crowd of people: not a target
    return Segments(
        (h, w),
        [101, 100, 3, 1, 1],
        categories=CATEGORIES,
        iscrowd=[False, False, False, False, True],
        segment_ids=[1, 2, 3, 4, 5],
        id_map=id_map,
    )


def _tiny_model(name: str, **options):
    torch.manual_seed(0)
    return build_model({"name": name, "categories": CATEGORIES.to_dicts(), **TINY[name], **options})


@pytest.mark.parametrize("name", ["max_deeplab", "kmax_deeplab"])
def test_one_training_step_reaches_every_parameter(name):
    model = _tiny_model(name).train()
    assert json.loads(json.dumps(model.config))["name"] == name
    h, w = 64, 64
    targets = [finalize_target(training_target(_panoptic_segments(h, w, s), CATEGORIES)) for s in (0, 4)]
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    losses = model(images, targets)
    names = {"loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_instance"}
    expected = names | {"loss_semantic"}
    if name == "kmax_deeplab":  # deep supervision: each of the 3 k-means layers' predictions
        expected |= {f"{n}_{i}" for n in names for i in range(3)}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert not [n for n, p in trainable.items() if p.grad is None], "parameters outside the graph"
    assert not [n for n, p in trainable.items() if not p.grad.abs().sum() > 0], "zero gradients"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())


@pytest.mark.parametrize("name", ["max_deeplab", "kmax_deeplab"])
def test_the_auxiliary_semantic_head_runs_in_training_only(name):
    model = _tiny_model(name)
    calls = []
    model.semantic_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    targets = [finalize_target(training_target(_panoptic_segments(64, 64, 0), CATEGORIES))]
    assert "loss_semantic" in model.train()(torch.randn(1, 3, 64, 64), targets)
    assert len(calls) == 1
    with torch.no_grad():
        outputs = model.eval()(torch.randn(1, 3, 64, 64))
    assert len(calls) == 1 and set(outputs) == {"class_logits", "mask_logits"}


def test_stacked_hourglass_decoder_trains():
    model = _tiny_model("max_deeplab", hourglasses=2).train()
    targets = [finalize_target(training_target(_panoptic_segments(64, 64, 0), CATEGORIES))]
    sum(model(torch.randn(1, 3, 64, 64), targets).values()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


# ----------------------------------------------------------------------------- post-process
@pytest.mark.parametrize("name", ["max_deeplab", "kmax_deeplab"])
@pytest.mark.parametrize("size", [(64, 80), (60, 76)])
def test_post_process_gives_segments_of_the_input_size(name, size):
    model = _tiny_model(name).eval()
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(images)
    assert outputs["class_logits"].shape == (2, 8, len(CATEGORIES) + 1)
    assert outputs["mask_logits"].shape[:2] == (2, 8)
    loose = {"class_thresh": 0.0} if name == "max_deeplab" else {"thing_thresh": 0.0, "stuff_thresh": 0.0}
    for task in model.tasks:
        segments = model.post_process(outputs, [size, size], task=task, pixel_thresh=0.0, **loose)
        assert len(segments) == 2
        assert all(isinstance(s, Segments) and s.image_size == size for s in segments)
        assert all(len(s) > 0 for s in segments) or task == "instance"
        if task == "instance":
            assert all(set(s.category_ids.tolist()) <= set(CATEGORIES.thing_ids) for s in segments)
        if task == "semantic":
            assert segments[0].to_semantic().shape == size
    with pytest.raises(ValueError, match="does not do"):
        model.post_process(outputs, [size, size], task="detection")


def test_mask_id_inference_rules():
    """Slots below the class threshold are dropped, pixels below the mask-ID threshold are void,
    stuff slots of one class are one segment."""
    big = 10.0
    # 4 slots over a 1 x 4 image; classes: 0 person (thing), 2 road (stuff), last = no object
    class_logits = torch.full((1, 4, 5), -big)
    class_logits[0, 0, 0] = big  # person, confident
    class_logits[0, 1, 2] = big  # road, confident
    class_logits[0, 2, 2] = big  # road again: merged with slot 1
    class_logits[0, 3, 0], class_logits[0, 3, 4] = 0.0, 0.0  # person at 0.5: dropped
    mask_logits = torch.full((1, 4, 1, 4), -big)
    mask_logits[0, 0, 0, 0] = big
    mask_logits[0, 1, 0, 1] = big
    mask_logits[0, 2, 0, 2] = big
    mask_logits[0, 3, 0, 3] = big  # its pixel: ~0 mask-ID probability for every kept slot -> void
    (seg,) = mask_id_panoptic_inference(class_logits, mask_logits, [(1, 4)], categories=CATEGORIES)
    id_map, info = seg.to_panoptic()
    assert id_map.tolist() == [[1, 2, 2, 0]]
    assert [s["category_id"] for s in info] == [1, 100]


@pytest.mark.parametrize("source, size", [((20, 30), (80, 120)), ((7, 9), (25, 37)), ((8, 8), (5, 3))])
@pytest.mark.parametrize("spread", [3.0, 300.0])  # 300: most exps underflow (the clamp at -80)
def test_banded_mask_id_reductions_equal_the_full_size_computation(source, size, spread):
    """The banded resize-and-reduce equals resizing all N maps to the image and reducing them:
    the best slot overall, the best kept slot (by logit: where the kept slots' probabilities all
    underflow to 0 it is still the most likely one) and its softmax probability."""
    logits = torch.randn(12, *source, generator=torch.Generator().manual_seed(0)) * spread
    full = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    prob = full.softmax(0)
    top_slot = full.argmax(0)
    top_prob = prob.amax(0)
    kept = torch.tensor([1, 4, 5, 11])
    best = full[kept].argmax(0)
    kept_prob = prob[kept].amax(0)
    tolerance = 1e-6 * spread  # the logits' own float32 rounding (the two resize passes round apart)
    got_top, got_owner, got_prob = upsampled_mask_id(logits, size, kept, band_rows=4)
    assert torch.equal(got_top, top_slot) and torch.equal(got_owner, kept[best])
    torch.testing.assert_close(got_prob, kept_prob, rtol=tolerance, atol=tolerance)
    got_top, got_owner, got_prob = upsampled_mask_id(logits, size, band_rows=3)
    assert torch.equal(got_top, top_slot) and torch.equal(got_owner, top_slot)
    torch.testing.assert_close(got_prob, top_prob, rtol=tolerance, atol=tolerance)


def test_max_over_slots_is_torch_max_with_the_first_of_tied_slots():
    x = torch.randint(0, 3, (3, 9, 7), generator=torch.Generator().manual_seed(0)).float()  # many ties
    values, slots = max_over_slots(x)
    expected_values, expected_slots = x.max(1)
    assert torch.equal(values, expected_values) and torch.equal(slots, expected_slots)
    assert (slots == torch.argmax((x == x.amax(1, keepdim=True)).int(), 1)).all()  # the first maximum
    x[0, :, 0] = float("nan")
    assert 0 <= int(max_over_slots(x)[1][0, 0]) < 9  # no index out of range


@pytest.mark.parametrize("name", ["max_deeplab", "kmax_deeplab"])
def test_the_folded_decoder_copy_computes_the_plain_outputs(name):
    """optimize_for_inference runs the decoder as a copy with its batch norms folded (channels-last
    features): the same outputs as the model as built, rebuilt when a weight changes."""
    model = _tiny_model(name).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # statistics away from the identity, so that folding has work to do
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    images = torch.randn(1, 3, 64, 80, generator=generator)
    with torch.no_grad():
        plain = model(images)
        optimize_for_inference(model)
        fast = model(images)
    copy = model.inference_decoder.get(model)
    batchnorms = [m for m in copy.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert copy is not model and len(batchnorms) < sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in copy.heads.pixel_head.modules())
    for key in ("class_logits", "mask_logits"):
        torch.testing.assert_close(fast[key], plain[key], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.heads.class_head[0].bias.add_(1.0)
        changed = model(images)
        optimize_for_inference(model, fold_batchnorm=False)
        assert model.inference_decoder is None
        expected = model(images)
    torch.testing.assert_close(changed["class_logits"], expected["class_logits"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(changed["class_logits"], plain["class_logits"])


def test_test_time_views_merge_per_slot():
    generator = torch.Generator().manual_seed(0)
    out = {
        "class_logits": torch.randn(1, 4, 3, generator=generator),
        "mask_logits": torch.randn(1, 4, 5, 6, generator=generator),
    }
    mirrored = {"class_logits": out["class_logits"], "mask_logits": out["mask_logits"].flip(-1)}
    merged = merge_mask_id_views([(out, 1.0, False), (mirrored, 1.0, True)], (20, 24))
    torch.testing.assert_close(merged["class_logits"], out["class_logits"].log_softmax(-1))
    torch.testing.assert_close(merged["mask_logits"], out["mask_logits"].log_softmax(1))
    model = _tiny_model("kmax_deeplab").eval()
    tta = TestTimeAugmentation(flip=True, scales=(0.75, 1.0))
    segments = predict_segments(model, torch.randn(1, 3, 64, 80), task="panoptic", tta=tta)
    assert segments[0].image_size == (64, 80)


# -------------------------------------------------------------------------------- overfit
def _synthetic_scene(h: int = 64, w: int = 64):
    """One image whose segments have distinct colours (plus noise), its panoptic truth and targets."""
    segments = _panoptic_segments(h, w, 0)
    segments = segments.subset(~segments.iscrowd)  # no crowd: every segment is scored
    colours = torch.tensor(
        [[0.0, 0.0, 0.0], [0.2, 0.4, 1.0], [0.5, 0.5, 0.5], [1.0, 0.1, 0.1], [0.1, 1.0, 0.2]]
    )
    id_map = torch.from_numpy(segments.id_map.astype(np.int64))
    image = colours[id_map].permute(2, 0, 1) * 2 - 1
    image = image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    target = finalize_target(training_target(segments, CATEGORIES))
    return image, segments, target


def _precise_batch_norm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Set every batch norm's running statistics to the batch statistics training normalises with
    (biased variance). A tiny model on 64x64 images normalises 8 values per channel at stride 32, where
    the running (unbiased, lagging) estimates differ enough from them to change a sharply fitted
    prediction; with them the evaluation-mode output is the training-mode one."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    counts: dict[torch.nn.Module, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, x: counts.__setitem__(m, x[0].numel() // x[0].shape[1]))
        for m in norms
    ]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model.decode(model.backbone(images))
    for m, momentum in zip(norms, momenta, strict=True):
        m.running_var.mul_((counts[m] - 1) / counts[m])
        m.momentum = momentum
    for hook in hooks:
        hook.remove()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kmax_deeplab", "max_deeplab"])
def test_tiny_model_overfits_one_image(name):
    image, truth, target = _synthetic_scene()
    model = _tiny_model(name)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    images = torch.stack([image, image])  # two copies: batch-norm statistics of one image
    start, curve, pq = time.monotonic(), [], 0.0
    for step in range(1, 201):
        model.train()
        losses = model(images, [target, target])
        optimiser.zero_grad()
        sum(losses.values()).backward()
        optimiser.step()
        if step % 25 == 0:
            _precise_batch_norm(model, images)
            model.eval()
            with torch.no_grad():
                (prediction,) = model.post_process(model(image[None]), [image.shape[-2:]], task="panoptic")
            metric = PanopticQuality(CATEGORIES)
            metric.update_segments(truth, prediction)
            pq = metric.compute()["All"]["pq"]
            curve.append((step, round(float(sum(losses.values()).detach()), 3), round(pq, 3)))
            if pq >= 0.9 or time.monotonic() - start > 90:
                break
    print(f"{name}: (step, loss, PQ) {curve} in {time.monotonic() - start:.0f} s")
    assert pq >= 0.9, curve
