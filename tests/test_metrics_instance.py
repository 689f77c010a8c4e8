"""COCO mask/box AP through InstanceAP and the file-level evaluation against COCOeval run directly."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from conftest import shared_data
from omniseg.metrics import EvaluationError, InstanceAP, evaluate_instance_files, format_table
from omniseg.structures import CategoryTable, Segments


def _gt_json() -> dict:
    data = json.loads((shared_data("voc_coco_instances_sample") / "annotations.json").read_text())
    # COCOeval records matches by annotation id with 0 meaning "unmatched", and this file
    # numbers its annotations from 0: renumber so the direct run is not skewed by that quirk
    for i, ann in enumerate(data["annotations"]):
        ann["id"] = i + 1
    return data


def _quiet_coco(data: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def _perturbed_detections(coco: COCO, seed: int = 0) -> list[dict]:
    """Eroded/dilated copies of the gt masks with random scores, a wrong-class copy, some misses."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco.getCatIds())
    results = []
    for ann in coco.dataset["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        mask = coco.annToMask(ann).astype(bool)
        steps = int(rng.integers(1, 8))
        mask = (
            ndimage.binary_dilation(mask, iterations=steps)
            if rng.random() < 0.5
            else ndimage.binary_erosion(mask, iterations=steps)
        )
        category = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(cat_ids))
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": category,
                "segmentation": rle,
                "score": float(rng.random()),
            }
        )
        if rng.random() < 0.3:  # a duplicate, shifted
            shifted = np.roll(mask, int(rng.integers(5, 30)), axis=1)
            rle = mask_utils.encode(np.asfortranarray(shifted.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": category,
                    "segmentation": rle,
                    "score": float(rng.random()),
                }
            )
    return results


def _direct(gt: dict, results: list[dict], iou_type: str, *, mask_boxes: bool = False) -> list[float]:
    if iou_type == "bbox" and mask_boxes:
        # Segments hold masks, so a gt box is its rasterised mask's box, not the polygon's
        coco = _quiet_coco(gt)
        gt = {
            **gt,
            "annotations": [
                {**a, "bbox": mask_utils.toBbox(coco.annToRLE(a)).tolist()} for a in gt["annotations"]
            ],
        }
    coco = _quiet_coco(gt)
    results = copy.deepcopy(results)  # loadRes writes into the dicts it is given
    if iou_type == "bbox":
        results = [
            {
                **{k: v for k, v in r.items() if k != "segmentation"},
                "bbox": mask_utils.toBbox(r["segmentation"]).tolist(),
            }
            for r in results
        ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:6]]


def _accumulate(gt: dict, results: list[dict], image_ids: list[int] | None = None) -> InstanceAP:
    coco = _quiet_coco(gt)
    table = CategoryTable.from_dicts(gt["categories"])
    metric = InstanceAP(table)
    for image in gt["images"]:
        if image_ids is not None and image["id"] not in image_ids:
            continue
        anns = coco.imgToAnns[image["id"]]
        size = (image["height"], image["width"])
        gt_masks = np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, *size), bool)
        gt_segs = Segments.from_masks(
            gt_masks, [a["category_id"] for a in anns], categories=table, iscrowd=[a["iscrowd"] for a in anns]
        )
        dets = [r for r in results if r["image_id"] == image["id"]]
        pred_segs = Segments(
            size,
            [d["category_id"] for d in dets],
            categories=table,
            scores=[d["score"] for d in dets],
            rles=[d["segmentation"] for d in dets],
        )
        metric.update(image["id"], gt_segs, pred_segs)
    return metric


def test_instance_ap_equals_cocoeval() -> None:
    gt = _gt_json()
    results = _perturbed_detections(_quiet_coco(gt))
    ours = _accumulate(gt, results).compute()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    # gt areas: COCOeval uses the polygon areas in the JSON, InstanceAP the mask areas; only the
    # small/medium/large split can see that, and on this data it does not change any bucket
    for iou_type in ("segm", "bbox"):
        direct = _direct(gt, results, iou_type, mask_boxes=True)
        assert [ours[iou_type][n] for n in names] == pytest.approx(direct, abs=1e-12), iou_type
    assert 0.2 < ours["segm"]["AP"] < 0.95
    assert "| segm " in format_table(ours, "instance")


def test_ap_over_a_category_subset_equals_cocoeval_with_those_cat_ids() -> None:
    """``compute(category_ids)`` (Mask^X R-CNN's A / B split) is COCOeval with ``params.catIds``."""
    gt = _gt_json()
    results = _perturbed_detections(_quiet_coco(gt), seed=2)
    present = sorted({a["category_id"] for a in gt["annotations"]})
    subset = present[: max(1, len(present) // 2)]
    ours = _accumulate(gt, results).compute(category_ids=subset)["segm"]
    coco = _quiet_coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "segm")
        evaluator.params.catIds = subset
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert [ours[n] for n in ("AP", "AP50", "AP75")] == pytest.approx(list(evaluator.stats[:3]), abs=1e-12)
    assert ours["AP"] != _accumulate(gt, results).compute()["segm"]["AP"]


def test_merge_of_halves_equals_whole() -> None:
    gt = _gt_json()
    results = _perturbed_detections(_quiet_coco(gt), seed=1)
    ids = [im["id"] for im in gt["images"]]
    whole = _accumulate(gt, results).compute()
    merged = _accumulate(gt, results, ids[:1]).merge(_accumulate(gt, results, ids[1:])).compute()
    assert merged == whole


def test_no_detections_scores_zero() -> None:
    gt = _gt_json()
    result = _accumulate(gt, []).compute()
    assert result["segm"]["AP"] == 0.0 and result["bbox"]["AP50"] == 0.0


def test_evaluate_instance_files(tmp_path: Path) -> None:
    gt_path = shared_data("voc_coco_instances_sample") / "annotations.json"
    gt = _gt_json()
    results = _perturbed_detections(_quiet_coco(gt), seed=2)
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = evaluate_instance_files(gt_path, tmp_path / "results.json")  # the raw file, ids from 0
    for iou_type in ("segm", "bbox"):
        assert list(out[iou_type].values()) == pytest.approx(_direct(gt, results, iou_type), abs=1e-12)


def test_instance_file_errors(tmp_path: Path) -> None:
    gt_path = shared_data("voc_coco_instances_sample") / "annotations.json"
    results = _perturbed_detections(_quiet_coco(_gt_json()), seed=3)
    pred = tmp_path / "results.json"
    with pytest.raises(EvaluationError, match=r"results\.json: results JSON file not found"):
        evaluate_instance_files(gt_path, pred)
    pred.write_text("[\n" + json.dumps(results[0]) + ",\n]")
    with pytest.raises(EvaluationError, match=r"results\.json: malformed JSON at line 3"):
        evaluate_instance_files(gt_path, pred)
    pred.write_text(json.dumps([{**results[0], "category_id": 77}]))
    with pytest.raises(EvaluationError, match=r"results\.json: detection #0 has unknown category id 77"):
        evaluate_instance_files(gt_path, pred)
    pred.write_text(json.dumps([{**results[0], "image_id": 1234}]))
    with pytest.raises(EvaluationError, match=r"results\.json: detection #0 refers to image_id 1234"):
        evaluate_instance_files(gt_path, pred)
    with pytest.raises(EvaluationError, match=r"missing\.json: ground-truth JSON file not found"):
        evaluate_instance_files(tmp_path / "missing.json", pred)


def test_update_checks() -> None:
    table = CategoryTable.from_dicts([{"id": 1, "name": "a"}])
    metric = InstanceAP(table)
    gt = Segments.from_masks(np.ones((1, 4, 4), bool), [1], categories=table)
    with pytest.raises(ValueError, match="does not match"):
        metric.update(0, gt, Segments.from_masks(np.ones((1, 4, 5), bool), [1]))
    with pytest.raises(ValueError, match="unknown category"):
        metric.update(0, gt, Segments.from_masks(np.ones((1, 4, 4), bool), [5]))
    metric.update(0, gt, gt)
    with pytest.raises(ValueError, match="already added"):
        metric.update(0, gt, gt)


def _polygon_of(rle: dict) -> list[list[float]]:
    """A polygon (the mask's bounding rectangle, a little inset) standing in for an RLE mask."""
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return [[x + 1, y + 1, x + w - 1, y + 1, x + w - 1, y + h - 1, x + 1, y + h - 1]]


def test_instance_files_take_polygons_explicit_boxes_and_string_ids(tmp_path: Path) -> None:
    """The column paths (RLE as given, polygons converted, a given bbox kept for box AP only, ids
    that are not integers through the dict path) score as COCOeval run on the same detections."""
    gt = _gt_json()
    results = _perturbed_detections(_quiet_coco(gt), seed=4)
    for r in results[1::4]:  # a detector's own box, wider than its mask: box AP must use it
        x, y, w, h = mask_utils.toBbox(r["segmentation"]).tolist()
        r["bbox"] = [x, y, w + 7.0, h + 3.0]
    for r in results[::3]:
        r["segmentation"] = _polygon_of(r["segmentation"])
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(results))
    ours = evaluate_instance_files(gt_path, pred_path)

    coco = _quiet_coco(copy.deepcopy(gt))
    rles = []
    for r in results:
        im = coco.imgs[r["image_id"]]
        segm = r["segmentation"]
        rles.append(mask_utils.merge(mask_utils.frPyObjects(segm, im["height"], im["width"])) if isinstance(segm, list) else segm)
    segm_results = [{**{k: v for k, v in r.items() if k != "bbox"}, "segmentation": m} for r, m in zip(results, rles, strict=True)]
    box_results = [
        {"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
         "bbox": r.get("bbox") or mask_utils.toBbox(m).tolist()}
        for r, m in zip(results, rles, strict=True)
    ]  # fmt: skip
    for iou_type, res in (("segm", segm_results), ("bbox", box_results)):
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(res)), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert list(ours[iou_type].values()) == pytest.approx(evaluator.stats[:6], abs=1e-12, rel=0), iou_type
    assert ours["bbox"]["AP"] != pytest.approx(ours["segm"]["AP"], abs=1e-3)  # the boxes did differ

    # string image ids: the box results go as dicts rather than the numeric array, same numbers
    as_text = {im["id"]: f"img-{im['id']}" for im in gt["images"]}
    gt_text = {**gt, "images": [{**im, "id": as_text[im["id"]]} for im in gt["images"]],
               "annotations": [{**a, "image_id": as_text[a["image_id"]]} for a in gt["annotations"]]}  # fmt: skip
    gt_path.write_text(json.dumps(gt_text))
    pred_path.write_text(json.dumps([{**r, "image_id": as_text[r["image_id"]]} for r in results]))
    text_ids = evaluate_instance_files(gt_path, pred_path)
    for iou_type in ("segm", "bbox"):
        assert list(text_ids[iou_type].values()) == pytest.approx(list(ours[iou_type].values()), abs=1e-12, rel=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rs: rs.__setitem__(1, [1, 2, 3]), r"detection #1 lacks 'image_id', 'category_id' or 'score'"),
        (lambda rs: rs[2].pop("score"), r"detection #2 lacks 'image_id', 'category_id' or 'score'"),
        (lambda rs: rs[3].pop("segmentation"), r"detection #3 has neither 'segmentation' nor 'bbox'"),
        (lambda rs: rs[4].update(segmentation=7), r"detection #4 has a malformed segmentation"),
        (lambda rs: rs[5].update(bbox=[1, 2, 3]), r"detection #5 has a malformed 'bbox'"),
        (lambda rs: rs[6].update(score="high"), r"detection #6 has a malformed 'bbox' or 'score'"),
        (lambda rs: rs[7].update(image_id=[1]), r"detection #7 refers to image_id \[1\]"),
    ],
)
def test_instance_file_errors_name_the_detection(tmp_path: Path, change, message: str) -> None:
    gt_path = shared_data("voc_coco_instances_sample") / "annotations.json"
    results = _perturbed_detections(_quiet_coco(_gt_json()), seed=3)
    change(results)
    pred = tmp_path / "results.json"
    pred.write_text(json.dumps(results))
    with pytest.raises(EvaluationError, match=r"results\.json: " + message):
        evaluate_instance_files(gt_path, pred)


def test_ground_truth_errors_name_the_annotation(tmp_path: Path) -> None:
    gt = _gt_json()
    results = _perturbed_detections(_quiet_coco(copy.deepcopy(gt)), seed=3)
    pred = tmp_path / "results.json"
    pred.write_text(json.dumps(results))
    gt_path = tmp_path / "gt.json"
    for change, message in [
        (lambda g: g["annotations"][2].pop("category_id"), "annotation #2 lacks 'image_id' or 'category_id'"),
        (lambda g: g["annotations"][3].update(image_id=424242), "annotation #3 refers to unknown image_id 424242"),
        (lambda g: g["annotations"][4].update(category_id=99), "annotation #4 has unknown category id 99"),
        (lambda g: (g["annotations"][5].pop("bbox"), g["annotations"][5].pop("segmentation")),
         "annotation #5 has neither 'segmentation' nor 'bbox'"),
    ]:  # fmt: skip
        broken = copy.deepcopy(gt)
        change(broken)
        gt_path.write_text(json.dumps(broken))
        with pytest.raises(EvaluationError, match=r"gt\.json: " + message):
            evaluate_instance_files(gt_path, pred)
