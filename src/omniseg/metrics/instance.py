"""COCO mask and box AP: hotcoco's COCOeval, proven identical to pycocotools' (the referee).

hotcoco (Rust) gives all 12 ``COCOeval.stats`` of pycocotools to the last bit on our tests
(tests/test_eval_speed_paths.py: generated sets with crowd, all area ranges, missing categories)
and is ~10x faster; pycocotools stays the fallback where hotcoco is absent or fails on an input.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from omniseg.structures import CategoryTable, Segments

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""The first six ``COCOeval.stats``, in order (fractions in [0, 1]; -1 where there is nothing to score)."""


def coco_evaluate(
    gt_dataset: dict, results: list[dict] | np.ndarray, iou_type: str, *, engine: str = "auto"
) -> dict[str, float]:
    """Run COCOeval (``iou_type`` ``"segm"`` or ``"bbox"``) quietly on in-memory data.

    ``gt_dataset`` is a COCO instances dict (``images``, ``annotations``, ``categories``);
    ``results`` is a COCO results list (or, for boxes, the array form below). Neither is
    modified. ``engine``: ``"hotcoco"``, ``"pycocotools"`` or ``"auto"`` (hotcoco, else pycocotools).

    The box array form is what both engines' ``loadRes`` take: ``(N, 7)`` rows ``[image_id, x, y,
    w, h, score, category_id]``, scored as box results (area w x h), with no dict per detection.
    """
    stats = coco_stats(gt_dataset, results, iou_type, engine=engine)
    return {name: float(v) for name, v in zip(STAT_NAMES, stats[:6], strict=True)}


def coco_stats(
    gt_dataset: dict, results: list[dict] | np.ndarray, iou_type: str, *, engine: str = "auto"
) -> list[float]:
    """All 12 ``COCOeval.stats`` (see :func:`coco_evaluate`)."""
    return coco_stats_by_type(gt_dataset, {iou_type: results}, engine=engine)[iou_type]


def coco_stats_by_type(
    gt_dataset: dict, results_by_type: dict[str, list[dict] | np.ndarray], *, engine: str = "auto"
) -> dict[str, list[float]]:
    """All 12 ``COCOeval.stats`` per IoU type, e.g. ``{"segm": masks, "bbox": boxes}``: one ground
    truth read by the engine serves every type."""
    if engine not in ("auto", "hotcoco", "pycocotools"):
        raise ValueError(f"unknown COCOeval engine {engine!r}")
    if engine != "pycocotools" and all(len(r) for r in results_by_type.values()):
        try:
            return _hotcoco_stats(gt_dataset, results_by_type)
        except ImportError:
            if engine == "hotcoco":
                raise
        except Exception:
            # hotcoco rejects some inputs pycocotools takes (or fails unexpectedly): the
            # referee itself then decides, so the numbers never depend on which library ran
            if engine == "hotcoco":
                raise
    return {t: _pycocotools_stats(gt_dataset, r, t) for t, r in results_by_type.items()}


def _hotcoco_stats(gt_dataset: dict, results_by_type: dict[str, list[dict] | np.ndarray]) -> dict[str, list[float]]:
    import hotcoco  # lazily: only evaluation needs it

    coco_gt = hotcoco.COCO(gt_dataset)  # copies into Rust: the caller's dicts stay untouched
    out = {}
    for iou_type, results in results_by_type.items():
        evaluator = hotcoco.COCOeval(coco_gt, coco_gt.load_res(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.summarize()
        out[iou_type] = [float(v) for v in evaluator.stats]
    return out


def _pycocotools_stats(gt_dataset: dict, results: list[dict] | np.ndarray, iou_type: str) -> list[float]:
    from pycocotools.coco import COCO  # lazily: the fallback; its import costs ~10 ms of CLI start-up
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt_dataset)
        coco_gt.createIndex()
        if len(results):
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:
            # loadRes cannot take an empty list; no detections still scores 0 wherever gt exists
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": gt_dataset["images"],
                "categories": gt_dataset["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def results_for(iou_type: str, results: list[dict]) -> list[dict]:
    """The results as COCOeval should see them for one IoU type.

    For ``segm`` the ``bbox`` is dropped so that loadRes takes the mask area as the detection
    area (with a box present it would use the box area for the small/medium/large split, as
    detectron2 notes); for ``bbox`` the mask is dropped and the box kept.
    """
    key = "bbox" if iou_type == "segm" else "segmentation"
    return [{k: v for k, v in r.items() if k != key} for r in results]


class InstanceAP:
    """Streaming COCO mask AP and box AP over per-image ground truth and scored predictions.

    Only thing categories are scored when ``categories`` marks any category as a thing (stuff
    segments in either input are skipped); otherwise every category is scored.
    """

    def __init__(self, categories: CategoryTable) -> None:
        self.categories = categories
        things = categories.thing_ids
        self.scored_ids = set(things) if things else set(categories.ids)
        self.images: list[dict] = []
        self.gt_annotations: list[dict] = []
        self.results: list[dict] = []

    def reset(self) -> None:
        self.images, self.gt_annotations, self.results = [], [], []

    def update(self, image_id: int | str, gt: Segments, pred: Segments) -> None:
        """Add one image: ground-truth segments and predicted segments (with ``scores``)."""
        if gt.image_size != pred.image_size:
            raise ValueError(
                f"prediction image size {pred.image_size} does not match ground truth {gt.image_size}"
            )
        if any(im["id"] == image_id for im in self.images):
            raise ValueError(f"image_id {image_id!r} was already added")
        for side, segs in (("ground-truth", gt), ("prediction", pred)):
            unknown = sorted({int(c) for c in segs.category_ids} - set(self.categories.ids))
            if unknown:
                raise ValueError(f"{side} has unknown category id(s) {unknown}")
        h, w = gt.image_size
        self.images.append({"id": image_id, "height": h, "width": w})
        if len(gt):
            rles = gt.rles()
            areas = mask_utils.area(rles)
            boxes = mask_utils.toBbox(rles)
            for i, rle in enumerate(rles):
                if int(gt.category_ids[i]) not in self.scored_ids or areas[i] == 0:
                    continue
                self.gt_annotations.append(
                    {
                        "id": len(self.gt_annotations) + 1,  # COCOeval treats annotation id 0 as "unmatched"
                        "image_id": image_id,
                        "category_id": int(gt.category_ids[i]),
                        "segmentation": rle,
                        "area": float(areas[i]),
                        "bbox": [float(v) for v in boxes[i]],
                        "iscrowd": int(gt.iscrowd[i]),
                    }
                )
        if len(pred):
            rles = pred.rles()
            boxes = mask_utils.toBbox(rles)
            for i, rle in enumerate(rles):
                if int(pred.category_ids[i]) not in self.scored_ids:
                    continue
                self.results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(pred.category_ids[i]),
                        "segmentation": rle,
                        "bbox": [float(v) for v in boxes[i]],
                        "score": float(pred.scores[i]),
                    }
                )

    def merge(self, other: InstanceAP) -> InstanceAP:
        if other.categories.ids != self.categories.ids:
            raise ValueError("cannot merge InstanceAP accumulators over different categories")
        clash = {im["id"] for im in self.images} & {im["id"] for im in other.images}
        if clash:
            raise ValueError(f"both accumulators hold image_id(s) {sorted(clash, key=str)[:10]}")
        offset = len(self.gt_annotations)
        self.images += other.images
        self.gt_annotations += [{**a, "id": a["id"] + offset} for a in other.gt_annotations]
        self.results += other.results
        return self

    def gt_dataset(self) -> dict:
        """The accumulated ground truth as a COCO instances dict."""
        cats = [{"id": c.id, "name": c.name} for c in self.categories if c.id in self.scored_ids]
        return {"images": list(self.images), "annotations": list(self.gt_annotations), "categories": cats}

    def compute(self, category_ids: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
        """``{"segm": {AP, AP50, AP75, APs, APm, APl}, "bbox": {...}}`` from COCOeval; with
        ``category_ids``, averaged over those categories only (their ground truth and predictions;
        e.g. Mask^X R-CNN's box-only classes apart from the masked ones)."""
        gt, results = self.gt_dataset(), self.results
        if category_ids is not None:
            keep = {int(c) for c in category_ids}
            gt = {
                "images": gt["images"],
                "annotations": [a for a in gt["annotations"] if a["category_id"] in keep],
                "categories": [c for c in gt["categories"] if c["id"] in keep],
            }
            results = [r for r in results if r["category_id"] in keep]
        stats = coco_stats_by_type(gt, {t: results_for(t, results) for t in ("segm", "bbox")})
        return {t: dict(zip(STAT_NAMES, stats[t][:6], strict=True)) for t in ("segm", "bbox")}
