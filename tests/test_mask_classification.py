"""Mask-classification post-processing: hand-made logits with known results, Mask2Former's own
loops transcribed as references, and (when installed) transformers' Mask2Former image processor."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omniseg.models.layers.mask_classification import (
    instance_inference,
    panoptic_inference,
    semantic_inference,
)
from omniseg.structures import CategoryTable

# class 0 = person (thing, id 1), class 1 = sky (stuff, id 100); class 2 is "no object"
PERSON_SKY = CategoryTable.from_dicts(
    [{"id": 1, "name": "person", "isthing": 1}, {"id": 100, "name": "sky", "isthing": 0}]
)


def _class_logits(*probabilities: list[float]) -> torch.Tensor:
    """``(1, Q, C + 1)`` logits whose softmax is the given rows."""
    return torch.tensor(probabilities).log()[None]


def _box_mask(size: tuple[int, int], rows: slice, cols: slice, inside: float = 4.0) -> torch.Tensor:
    mask = torch.full(size, -inside)
    mask[rows, cols] = inside
    return mask


# ----------------------------------------------------------------------------------- semantic
def test_semantic_hand_made() -> None:
    class_logits = _class_logits([0.9, 0.05, 0.05], [0.1, 0.8, 0.1])
    # query 0 (person) covers the left half of a 2 x 4 mask, query 1 (sky) the right half
    masks = torch.stack(
        [_box_mask((2, 4), slice(None), slice(0, 2)), _box_mask((2, 4), slice(None), slice(2, 4))]
    )
    (segments,) = semantic_inference(class_logits, masks[None], [(4, 8)], categories=PERSON_SKY)
    expected = np.zeros((4, 8), dtype=np.int64)
    expected[:, :4], expected[:, 4:] = 1, 100
    assert segments.image_size == (4, 8) and not segments.overlapping
    assert (segments.to_semantic() == expected).all()
    assert sorted(segments.category_ids.tolist()) == [1, 100]
    assert ((segments.scores > 0.5) & (segments.scores <= 1)).all()


def test_semantic_is_the_per_pixel_argmax_of_the_class_scores() -> None:
    torch.manual_seed(0)
    class_logits = torch.randn(2, 6, 5) * 2
    mask_logits = torch.randn(2, 6, 5, 7) * 3
    sizes = [(10, 14), (13, 9)]
    categories = CategoryTable.from_names(["a", "b", "c", "d"], start_id=3)
    results = semantic_inference(class_logits, mask_logits, sizes, categories=categories)
    for b, (segments, size) in enumerate(zip(results, sizes, strict=True)):
        masks = F.interpolate(mask_logits[b : b + 1], size=size, mode="bilinear", align_corners=False)[0]
        prob = class_logits[b].softmax(-1)
        scores = torch.stack(
            [sum(prob[q, c] * masks[q].sigmoid() for q in range(6)) for c in range(4)]
        )  # (C, H, W), query by query
        expected = np.asarray(categories.ids)[scores.argmax(0).numpy()]
        assert segments.image_size == size and (segments.to_semantic() == expected).all()


# ----------------------------------------------------------------------------------- instance
def test_instance_hand_made() -> None:
    size = (4, 4)
    class_logits = _class_logits([0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.05, 0.9, 0.05])
    masks = torch.stack(
        [
            _box_mask(size, slice(0, 2), slice(0, 2), inside=2.0),  # top-left block
            _box_mask(size, slice(None), slice(None), inside=0.0),
            _box_mask(size, slice(3, 4), slice(None), inside=1.0),  # bottom row
        ]
    )[None]
    # the three best (query, class) pairs: (2, sky) 0.9, (0, person) 0.6, (0, sky) 0.3
    (segments,) = instance_inference(class_logits, masks, [size], categories=PERSON_SKY, top_k=3)
    assert segments.overlapping
    expected_scores = [
        0.9 * (1 / (1 + math.exp(-1))),
        0.6 * (1 / (1 + math.exp(-2))),
        0.3 / (1 + math.exp(-2)),
    ]
    assert segments.category_ids.tolist() == [100, 1, 100]
    assert segments.scores.tolist() == pytest.approx(expected_scores, rel=1e-5)
    top_left, bottom_row = np.zeros(size, bool), np.zeros(size, bool)
    top_left[:2, :2], bottom_row[3] = True, True
    assert (segments.masks() == np.stack([bottom_row, top_left, top_left])).all()
    # only things (a panoptic model's instance output); a score threshold
    (things,) = instance_inference(
        class_logits, masks, [size], categories=PERSON_SKY, top_k=3, things_only=True
    )
    assert things.category_ids.tolist() == [1]
    (confident,) = instance_inference(
        class_logits, masks, [size], categories=PERSON_SKY, top_k=3, score_thresh=0.6
    )
    assert confident.category_ids.tolist() == [100]


def _mask2former_instance(class_logits: torch.Tensor, mask_logits: torch.Tensor, top_k: int):
    """Mask2Former's ``instance_inference`` for one image, transcribed (no panoptic filter)."""
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    scores = F.softmax(class_logits, dim=-1)[:, :-1]
    labels = torch.arange(num_classes).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(top_k, sorted=False)
    labels_per_image = labels[topk_indices]
    topk_indices = topk_indices // num_classes
    mask_pred = mask_logits[topk_indices]
    pred_masks = (mask_pred > 0).float()
    mask_scores = (mask_pred.sigmoid().flatten(1) * pred_masks.flatten(1)).sum(1) / (
        pred_masks.flatten(1).sum(1) + 1e-6
    )
    return pred_masks.bool(), scores_per_image * mask_scores, labels_per_image


def test_instance_equals_mask2former_transcribed() -> None:
    torch.manual_seed(0)
    class_logits = torch.randn(2, 8, 6) * 2
    mask_logits = torch.randn(2, 8, 6, 6) * 2
    sizes = [(12, 12), (9, 15)]
    results = instance_inference(class_logits, mask_logits, sizes, top_k=10)
    for b, (segments, size) in enumerate(zip(results, sizes, strict=True)):
        upsampled = F.interpolate(mask_logits[b : b + 1], size=size, mode="bilinear", align_corners=False)[0]
        masks, scores, labels = _mask2former_instance(class_logits[b], upsampled, 10)
        order = torch.argsort(scores, descending=True)
        assert len(segments) == 10
        assert np.allclose(segments.scores, scores[order].numpy(), atol=1e-6)
        assert segments.category_ids.tolist() == labels[order].tolist()
        assert (segments.masks() == masks[order].numpy()).all()


# ----------------------------------------------------------------------------------- panoptic
def _panoptic_case() -> tuple[torch.Tensor, torch.Tensor]:
    size = (6, 6)
    class_logits = _class_logits(
        [0.95, 0.03, 0.02],  # q0 person
        [0.05, 0.9, 0.05],  # q1 sky
        [0.05, 0.9, 0.05],  # q2 sky again: merges with q1
        [0.85, 0.1, 0.05],  # q3 person, mostly under q0: too little of it left, dropped
        [0.1, 0.1, 0.8],  # q4 no object
        [0.5, 0.3, 0.2],  # q5 person, below the 0.8 object threshold
    )
    masks = torch.stack(
        [
            _box_mask(size, slice(0, 3), slice(0, 3)),
            _box_mask(size, slice(0, 3), slice(3, 6)),
            _box_mask(size, slice(3, 6), slice(3, 6)),
            _box_mask(size, slice(0, 4), slice(0, 3)),  # 12 pixels, 9 of them won by q0
            _box_mask(size, slice(3, 6), slice(0, 3)),
            _box_mask(size, slice(3, 6), slice(0, 3)),
        ]
    )[None]
    return class_logits, masks


def test_panoptic_hand_made() -> None:
    class_logits, masks = _panoptic_case()
    (segments,) = panoptic_inference(class_logits, masks, [(6, 6)], categories=PERSON_SKY)
    assert not segments.overlapping
    id_map, info = segments.to_panoptic()
    expected = np.zeros((6, 6), dtype=np.int32)
    expected[:3, :3] = 1  # q0's person
    expected[:, 3:] = 2  # q1 and q2: one sky
    # rows 3-5, cols 0-2 stay void: q3 was dropped, q4 is no object, q5 not confident
    assert (id_map == expected).all()
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 1, 9), (2, 100, 18)]
    assert [s["score"] for s in info] == pytest.approx([0.95, 0.9], rel=1e-5)


def test_panoptic_thresholds_and_numbering() -> None:
    class_logits, masks = _panoptic_case()
    # q3 keeps 3 of its 12 pixels: 0.25 passes an overlap threshold of 0.2; ids follow query order
    (lenient,) = panoptic_inference(class_logits, masks, [(6, 6)], categories=PERSON_SKY, overlap_thresh=0.2)
    id_map, info = lenient.to_panoptic()
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 1), (2, 100), (3, 1)]
    assert (id_map[3, :3] == 3).all() and (id_map[4:, :3] == 0).all()
    # without a category table every class is a thing: the two sky queries stay apart
    (unmerged,) = panoptic_inference(class_logits, masks, [(6, 6)])
    assert [(s["id"], s["category_id"], s["area"]) for s in unmerged.to_panoptic()[1]] == [
        (1, 0, 9),
        (2, 1, 9),
        (3, 1, 9),
    ]
    # nothing confident enough: an empty, all-void result
    (empty,) = panoptic_inference(class_logits, masks, [(6, 6)], object_mask_thresh=0.99)
    assert len(empty) == 0 and (empty.id_map == 0).all()
    # confident queries whose masks cover nothing: no segment either
    (maskless,) = panoptic_inference(class_logits, torch.full_like(masks, -5.0), [(6, 6)])
    assert len(maskless) == 0 and (maskless.id_map == 0).all()


def _mask2former_panoptic(
    class_logits, mask_logits, is_thing, object_mask_threshold=0.8, overlap_threshold=0.8
):
    """Mask2Former's ``panoptic_inference`` for one image, transcribed."""
    num_classes = class_logits.shape[-1] - 1
    scores, labels = F.softmax(class_logits, dim=-1).max(-1)
    mask_pred = mask_logits.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
    panoptic_seg = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32)
    segments_info = []
    current_segment_id = 0
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    cur_mask_ids = cur_prob_masks.argmax(0)
    stuff_memory_list = {}
    for k in range(cur_classes.shape[0]):
        pred_class = cur_classes[k].item()
        isthing = bool(is_thing[pred_class])
        mask_area = (cur_mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if int(pred_class) in stuff_memory_list:
                    panoptic_seg[mask] = stuff_memory_list[int(pred_class)]
                    continue
                stuff_memory_list[int(pred_class)] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "category_id": int(pred_class)})
    return panoptic_seg, segments_info


def _random_panoptic_logits(
    seed: int, queries: int = 12, classes: int = 5, size: int = 8, confidence: float = 8.0
):
    """Confident queries (some of them no-object) and unconfident ones; noisy masks over a random
    partition of the image into cells, so that some queries keep their segment and some do not."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(1, queries, classes + 1, generator=generator)
    chosen = torch.randint(0, classes + 1, (queries,), generator=generator)
    confident = torch.rand(queries, generator=generator) < 0.8
    class_logits[0, confident, chosen[confident]] += confidence
    cell_owner = torch.randint(0, queries, (size // 2, size // 2), generator=generator)
    cell_owner = cell_owner.repeat_interleave(2, 0).repeat_interleave(2, 1)
    own = cell_owner[None] == torch.arange(queries)[:, None, None]
    noise = torch.randn(queries, size, size, generator=generator) * 2
    return class_logits, (torch.where(own, 3.0, -3.0) + noise)[None]


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_equals_mask2former_transcribed(seed: int) -> None:
    categories = CategoryTable.from_names(list("abcde"), isthing=[True, False, True, False, False])
    is_thing = [c.isthing for c in categories]
    class_logits, mask_logits = _random_panoptic_logits(seed)
    size = (20, 18)
    (segments,) = panoptic_inference(class_logits, mask_logits, [size], categories=categories)
    upsampled = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)[0]
    expected_map, expected_info = _mask2former_panoptic(class_logits[0], upsampled, is_thing)
    assert (segments.id_map == expected_map.numpy()).all()
    assert segments.segment_ids.tolist() == [s["id"] for s in expected_info]
    assert segments.category_ids.tolist() == [s["category_id"] for s in expected_info]


# ------------------------------------------------------------------------------- transformers
def _hf_processor():
    transformers = pytest.importorskip("transformers")
    return transformers.Mask2FormerImageProcessor()


def _hf_outputs(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


# transformers resizes mask logits to 384 x 384 first, then resizes results (semantic: the class
# scores; instance: the binary masks) to the target size; at 384 x 384 both steps are identities.
HF_SIZE = (384, 384)


def test_semantic_matches_transformers() -> None:
    processor = _hf_processor()
    torch.manual_seed(0)
    class_logits, mask_logits = torch.randn(2, 10, 6) * 2, torch.randn(2, 10, *HF_SIZE) * 2
    theirs = processor.post_process_semantic_segmentation(
        _hf_outputs(class_logits, mask_logits), target_sizes=[HF_SIZE, HF_SIZE]
    )
    ours = semantic_inference(class_logits, mask_logits, [HF_SIZE, HF_SIZE])
    for segments, expected in zip(ours, theirs, strict=True):
        assert (segments.to_semantic() == expected.numpy()).all()


def test_instance_matches_transformers() -> None:
    processor = _hf_processor()
    torch.manual_seed(0)
    class_logits, mask_logits = torch.randn(1, 10, 6) * 2, torch.randn(1, 10, *HF_SIZE) * 2
    (theirs,) = processor.post_process_instance_segmentation(
        _hf_outputs(class_logits, mask_logits), threshold=0.0, target_sizes=[HF_SIZE], return_binary_maps=True
    )
    # transformers takes the top Q pairs and leaves out empty masks
    (ours,) = instance_inference(class_logits, mask_logits, [HF_SIZE], top_k=10)
    ours = ours.subset(ours.areas() > 0)
    order = np.argsort([-s["score"] for s in theirs["segments_info"]], kind="stable")
    assert ours.category_ids.tolist() == [theirs["segments_info"][i]["label_id"] for i in order]
    assert ours.scores.tolist() == pytest.approx(
        [theirs["segments_info"][i]["score"] for i in order], abs=2e-6
    )
    assert (ours.masks() == theirs["segmentation"][order].bool().numpy()).all()


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_matches_transformers_up_to_its_known_differences(seed: int) -> None:
    """transformers departs from Mask2Former in ways this comparison neutralises or allows for:

    * it measures a query's own mask on score-weighted probabilities: no difference here, where
      every kept query's class probability is 1.0 in float32;
    * it keeps ``area ratio > threshold`` rather than ``>=`` (ties: measure zero here);
    * it gives a segment every pixel its query wins, also where that query's mask probability is
      below 0.5 (Mask2Former leaves those void);
    * when fusing it restarts numbering from the fused segment's id, so later segments reuse
      ids (huggingface/transformers#23461): the comparison fuses nothing (every class a thing),
      stuff merging being checked against Mask2Former's own code above.
    """
    processor = _hf_processor()
    # confident queries with class probability 1.0 in float32
    class_logits, mask_logits = _random_panoptic_logits(seed, size=96, confidence=40.0)
    mask_logits = F.interpolate(mask_logits, size=HF_SIZE, mode="bilinear", align_corners=False)
    (theirs,) = processor.post_process_panoptic_segmentation(
        _hf_outputs(class_logits, mask_logits), threshold=0.8, label_ids_to_fuse=set(), target_sizes=[HF_SIZE]
    )
    (ours,) = panoptic_inference(class_logits, mask_logits, [HF_SIZE])
    their_map = theirs["segmentation"].numpy()
    assert len(ours) > 1
    assert list(zip(ours.segment_ids.tolist(), ours.category_ids.tolist(), strict=True)) == [
        (s["id"], s["label_id"]) for s in theirs["segments_info"]
    ]
    assert ours.scores.tolist() == pytest.approx([s["score"] for s in theirs["segments_info"]], abs=1e-6)
    labelled = ours.id_map > 0
    assert (ours.id_map[labelled] == their_map[labelled]).all()
    # where only transformers labels a pixel, the mask of the query that wins it does not cover it
    scores, labels = class_logits[0].softmax(-1).max(-1)
    kept = (labels < class_logits.shape[-1] - 1) & (scores > 0.8)
    assert (scores[kept] == 1).all()
    winner_prob = mask_logits[0, kept].sigmoid().max(0).values.numpy()
    extra = ~labelled & (their_map > 0)
    assert extra.any() and (winner_prob[extra] < 0.5).all()
