"""Panoptic quality (PQ, SQ, RQ) with the rules of the official COCO panoptic evaluation.

The rules are those of ``pq_compute_single_core`` in cocodataset/panopticapi:

* pixel id 0 is void; ground-truth crowd segments are never matched;
* a ground-truth and a predicted segment of the same category match when IoU > 0.5, where
  ``union = pred_area + gt_area - intersection - (pred pixels on void)`` (crowd is *not*
  taken out of the union);
* the ground-truth area is the ``area`` of its ``segments_info`` entry when given (panopticapi
  reads it from the JSON), else its pixel count; predicted areas are always pixel counts;
* an unmatched prediction is not a false positive when more than half of it lies on void plus
  the crowd region of its category (the *last* crowd segment of that category listed, since
  panopticapi keeps one per category in a dict);
* PQ/SQ/RQ are averaged over the classes with ``tp + fp + fn > 0``.

One deliberate difference: a ``segments_info`` entry with id 0 is dropped (pixel id 0 stays
void, as the data model reserves it); panopticapi would score such an entry as a segment.

The per-image work is vectorised: the two id maps are run-length coded together in raster order
(piecewise-constant maps have few runs), only the runs' ids are looked up among the listed
segments, and one ``bincount`` gives the pixel count of every (gt segment, pred segment) pair.
Nothing is sorted per pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omniseg.metrics.semantic import as_numpy
from omniseg.structures import VOID, CategoryTable, Segments


class SegmentsInfoError(ValueError):
    """Inconsistent ids or categories in one side's id map / ``segments_info``."""

    def __init__(self, side: str, message: str) -> None:
        super().__init__(message)
        self.side = side  # "gt" or "pred": which input the file-level caller should name

    def __reduce__(self) -> tuple:  # survive pickling across worker processes
        return type(self), (self.side, str(self))


def runs(gt_map: np.ndarray, pred_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run-length code two id maps together in raster order: ``(gt ids, pred ids, lengths)``.

    A run is a stretch of pixels where neither id changes.
    """
    gt = np.ascontiguousarray(gt_map).reshape(-1)
    pred = np.ascontiguousarray(pred_map).reshape(-1)
    n = gt.size
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    change = gt[1:] != gt[:-1]
    change |= pred[1:] != pred[:-1]
    starts = np.flatnonzero(change)
    starts += 1
    starts = np.concatenate((np.zeros(1, dtype=starts.dtype), starts))
    lengths = np.diff(starts, append=n)
    return gt[starts].astype(np.int64), pred[starts].astype(np.int64), lengths


@dataclass
class _SegmentTable:
    ids: np.ndarray  # (K,) int64, in segments_info order
    category_index: np.ndarray  # (K,) int64 into the CategoryTable
    crowd: np.ndarray  # (K,) bool
    area: np.ndarray | None  # (K,) float64 from segments_info, or None when any entry lacks it

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in this table, -1 where absent."""
        if not len(self.ids):
            return np.full(len(ids), -1, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == ids, order[pos], -1)


class PanopticQuality:
    """Streaming PQ/SQ/RQ over the categories of ``categories`` (see the module docstring).

    Accumulators are per-category ``tp``, ``fp``, ``fn`` counts and ``iou_sum``; workers can
    each keep one and :meth:`merge` them.
    """

    def __init__(self, categories: CategoryTable) -> None:
        self.categories = categories
        self._index = {c.id: i for i, c in enumerate(categories)}
        k = len(categories)
        self.tp = np.zeros(k, dtype=np.int64)
        self.fp = np.zeros(k, dtype=np.int64)
        self.fn = np.zeros(k, dtype=np.int64)
        self.iou_sum = np.zeros(k, dtype=np.float64)

    def reset(self) -> None:
        for acc in (self.tp, self.fp, self.fn, self.iou_sum):
            acc[:] = 0

    # ------------------------------------------------------------------ updates
    def update_segments(self, gt: Segments, pred: Segments) -> None:
        """One image from two :class:`Segments` (their :meth:`~Segments.to_panoptic` views)."""
        gt_map, gt_info = gt.to_panoptic()
        pred_map, pred_info = pred.to_panoptic()
        self.update(gt_map, gt_info, pred_map, pred_info)

    def update(
        self,
        gt_id_map: Any,
        gt_segments_info: Sequence[dict],
        pred_id_map: Any,
        pred_segments_info: Sequence[dict],
    ) -> None:
        """One image: two ``(H, W)`` segment-id maps and their COCO ``segments_info`` lists."""
        gt_map = as_numpy(gt_id_map)
        pred_map = as_numpy(pred_id_map)
        if gt_map.ndim != 2 or pred_map.ndim != 2:
            raise ValueError(f"id maps must be 2-D, got {gt_map.shape} (gt) and {pred_map.shape} (pred)")
        if gt_map.shape != pred_map.shape:
            raise ValueError(
                f"prediction id map is {pred_map.shape[1]}x{pred_map.shape[0]} (WxH) but its ground "
                f"truth is {gt_map.shape[1]}x{gt_map.shape[0]}"
            )
        gt = self._segment_table(gt_segments_info, "gt")
        pred = self._segment_table(pred_segments_info, "pred")
        kg, kp = len(gt.ids), len(pred.ids)

        # Pixel counts of every (gt row, pred row) pair, with extra gt rows for void (kg) and for
        # ids missing from the gt segments_info (kg + 1; panopticapi ignores those) and an extra
        # pred column for void (kp). Only the runs are looked up, never every pixel.
        gt_run, pred_run, lengths = runs(gt_map, pred_map)
        gi = gt.lookup(gt_run)
        pi = pred.lookup(pred_run)
        unlisted = (pi < 0) & (pred_run != VOID)
        if unlisted.any():
            ids = np.unique(pred_run[unlisted]).tolist()
            raise SegmentsInfoError(
                "pred", f"prediction id map has segment id(s) {ids[:10]} that are not in its segments_info"
            )
        gi = np.where(gi >= 0, gi, np.where(gt_run == VOID, kg, kg + 1))
        pi = np.where(pi >= 0, pi, kp)
        table = np.bincount(gi * (kp + 1) + pi, weights=lengths, minlength=(kg + 2) * (kp + 1))
        table = table.astype(np.int64).reshape(kg + 2, kp + 1)

        pred_area = table[:, :kp].sum(axis=0)
        if (pred_area == 0).any():
            ids = pred.ids[pred_area == 0].tolist()
            raise SegmentsInfoError(
                "pred",
                f"prediction segments_info lists segment id(s) {ids[:10]} with no pixels in the id map",
            )
        pred_void = table[kg, :kp]
        gt_area = gt.area if gt.area is not None else table[:kg].sum(axis=1)
        inter = table[:kg, :kp]

        # matching: same category, gt not crowd, IoU > 0.5 with void taken out of the union
        candidate = (
            (inter > 0) & ~gt.crowd[:, None] & (gt.category_index[:, None] == pred.category_index[None, :])
        )
        rows, cols = np.nonzero(candidate)
        inter_c = inter[rows, cols]
        union = pred_area[cols] + gt_area[rows] - inter_c - pred_void[cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter_c / union
        match = iou > 0.5
        rows, cols, iou = rows[match], cols[match], iou[match]
        # a gt segment matches at most one prediction, so ordering by gt id reproduces
        # panopticapi's pair order, hence its floating-point summation order
        order = np.argsort(gt.ids[rows], kind="stable")
        rows, cols, iou = rows[order], cols[order], iou[order]
        matched_cats = gt.category_index[rows]
        np.add.at(self.iou_sum, matched_cats, iou)  # unbuffered: adds in this order
        np.add.at(self.tp, matched_cats, 1)

        gt_unmatched = np.ones(kg, dtype=bool)
        gt_unmatched[rows] = False
        np.add.at(self.fn, gt.category_index[gt_unmatched & ~gt.crowd], 1)

        # the crowd region of a category is its last listed crowd segment (a dict in panopticapi)
        crowd_of_cat = {}
        for row in np.flatnonzero(gt.crowd).tolist():
            crowd_of_cat[int(gt.category_index[row])] = row
        pred_crowd = np.zeros(kp, dtype=np.int64)
        for col in range(kp) if crowd_of_cat else ():
            row = crowd_of_cat.get(int(pred.category_index[col]))
            if row is not None:
                pred_crowd[col] = inter[row, col]
        pred_unmatched = np.ones(kp, dtype=bool)
        pred_unmatched[cols] = False
        ignored = (pred_void + pred_crowd) / pred_area > 0.5
        np.add.at(self.fp, pred.category_index[pred_unmatched & ~ignored], 1)

    def _segment_table(self, segments_info: Sequence[dict], side: str) -> _SegmentTable:
        who = "ground-truth" if side == "gt" else "prediction"
        infos = [s for s in segments_info if int(s["id"]) != VOID]
        ids = np.array([int(s["id"]) for s in infos], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            uniq, counts = np.unique(ids, return_counts=True)
            raise SegmentsInfoError(
                side, f"{who} segments_info lists segment id(s) {uniq[counts > 1].tolist()} twice"
            )
        cat_index = np.empty(len(infos), dtype=np.int64)
        for row, info in enumerate(infos):
            try:
                cat_index[row] = self._index[int(info["category_id"])]
            except KeyError:
                raise SegmentsInfoError(
                    side,
                    f"{who} segment id {info['id']} has unknown category id {info['category_id']} "
                    f"(known: {self.categories.ids[:30]})",
                ) from None
        crowd = np.array([bool(s.get("iscrowd", 0)) for s in infos], dtype=bool)
        area = None
        if side == "gt" and all("area" in s for s in infos):
            area = np.array([s["area"] for s in infos], dtype=np.float64)
        return _SegmentTable(ids, cat_index, crowd, area)

    # ------------------------------------------------------------------ results
    def merge(self, other: PanopticQuality) -> PanopticQuality:
        if other.categories.ids != self.categories.ids:
            raise ValueError("cannot merge PanopticQuality accumulators over different categories")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        return self

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The accumulators ``(tp, fp, fn, iou_sum)``, e.g. to send from a worker process."""
        return self.tp, self.fp, self.fn, self.iou_sum

    def load_state(self, state: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> PanopticQuality:
        self.tp, self.fp, self.fn, self.iou_sum = (np.array(a) for a in state)
        return self

    def compute(self) -> dict[str, Any]:
        """``{"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class": {cat_id: {"pq","sq","rq"}}}``.

        Classes with no tp, fp or fn are left out of the averages and reported as zeros (as
        panopticapi does); a group with no such class reports zeros and ``n = 0``.
        """
        results: dict[str, Any] = {}
        per_class: dict[int, dict[str, float]] = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            pq = sq = rq = 0.0
            n = 0
            for i, cat in enumerate(self.categories):
                if isthing is not None and cat.isthing != isthing:
                    continue
                tp, fp, fn = int(self.tp[i]), int(self.fp[i]), int(self.fn[i])
                iou = float(self.iou_sum[i])
                if tp + fp + fn == 0:
                    per_class[cat.id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                    continue
                n += 1
                denominator = tp + 0.5 * fp + 0.5 * fn
                per_class[cat.id] = {
                    "pq": iou / denominator,
                    "sq": iou / tp if tp else 0.0,
                    "rq": tp / denominator,
                }
                pq += per_class[cat.id]["pq"]
                sq += per_class[cat.id]["sq"]
                rq += per_class[cat.id]["rq"]
            results[name] = {
                "pq": pq / n if n else 0.0,
                "sq": sq / n if n else 0.0,
                "rq": rq / n if n else 0.0,
                "n": n,
            }
        results["per_class"] = per_class
        return results
