"""Evaluation of prediction files against ground-truth files (what ``omniseg evaluate`` runs).

* panoptic: COCO panoptic JSON + PNG folders, PQ/SQ/RQ as the official panopticapi computes it;
* semantic: folders of single-channel label PNGs paired by file stem, mIoU and friends;
* instance: a COCO instances JSON and a COCO results JSON, mask and box AP via pycocotools.

Bad input raises :class:`EvaluationError` (a :class:`~omniseg.errors.DataError`) naming the file
and the problem. Files are read by :mod:`omniseg.io`. Nothing here imports torch, so that
``omniseg evaluate`` on files starts fast.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from omniseg.errors import DataError
from omniseg.io import load_json, load_label_png, load_panoptic_png
from omniseg.metrics.instance import STAT_NAMES, coco_stats_by_type
from omniseg.metrics.panoptic import PanopticQuality, SegmentsInfoError
from omniseg.metrics.semantic import SemanticMetric
from omniseg.structures import CategoryTable

PathLike = str | os.PathLike

# Below this many images per process, starting worker processes costs more than it saves.
_MIN_IMAGES_PER_WORKER = 32

# Workers only decode PNGs and count with numpy, so forking is safe and starts in milliseconds
# (spawn re-imports the caller's __main__, ~0.7 s per worker); the worker code is spawn-safe,
# and spawn is used off Linux (macOS system libraries are not fork-safe).
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


class EvaluationError(DataError):
    """Bad evaluation input; the message names the file and the problem."""


# ----------------------------------------------------------------------------- readers
@contextmanager
def _as_evaluation_error() -> Iterator[None]:
    """Report the :mod:`omniseg.io` readers' :class:`DataError` as an :class:`EvaluationError`."""
    try:
        yield
    except EvaluationError:
        raise
    except DataError as e:
        raise EvaluationError(str(e)) from None


def _load_json(path: PathLike, what: str) -> Any:
    with _as_evaluation_error():
        return load_json(path, what)


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """``(H, W) int32`` segment ids ``R + 256 G + 256^2 B`` of a COCO panoptic PNG
    (:func:`omniseg.io.load_panoptic_png`; errors as :class:`EvaluationError`)."""
    with _as_evaluation_error():
        return load_panoptic_png(path)


def read_label_png(path: PathLike) -> np.ndarray:
    """``(H, W)`` class indices of a single-channel label PNG (:func:`omniseg.io.load_label_png`,
    modes ``L``, ``P``, ``I;16``, ``I``; errors as :class:`EvaluationError`)."""
    with _as_evaluation_error():
        return load_label_png(path)


# ----------------------------------------------------------------------------- panoptic
def _annotations(data: Any, path: Path) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise EvaluationError(f"{path}: expected a COCO panoptic JSON object with an 'annotations' list")
    for i, ann in enumerate(data["annotations"]):
        for key in ("image_id", "file_name", "segments_info"):
            if not isinstance(ann, dict) or key not in ann:
                raise EvaluationError(f"{path}: annotation #{i} has no '{key}'")
        for seg in ann["segments_info"]:
            if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
                raise EvaluationError(
                    f"{path}: a segments_info entry of image_id {ann['image_id']} lacks 'id' or 'category_id'"
                )
    return data["annotations"]


def _panoptic_chunk(
    pairs: list[tuple[dict, dict]],
    gt_dir: str,
    pred_dir: str,
    gt_json: str,
    pred_json: str,
    categories: list[dict],
) -> tuple[np.ndarray, ...]:
    """Accumulate PQ statistics over ``pairs`` of (gt, pred) annotations; worker entry point."""
    metric = PanopticQuality(CategoryTable.from_dicts(categories))
    for gt_ann, pred_ann in pairs:
        gt_path = Path(gt_dir) / gt_ann["file_name"]
        pred_path = Path(pred_dir) / pred_ann["file_name"]
        gt_map = read_panoptic_png(gt_path)
        pred_map = read_panoptic_png(pred_path)
        if gt_map.shape != pred_map.shape:
            raise EvaluationError(
                f"{pred_path}: size {pred_map.shape[1]}x{pred_map.shape[0]} does not match its ground truth "
                f"{gt_path} ({gt_map.shape[1]}x{gt_map.shape[0]})"
            )
        try:
            metric.update(gt_map, gt_ann["segments_info"], pred_map, pred_ann["segments_info"])
        except SegmentsInfoError as e:
            json_path, png = (gt_json, gt_path) if e.side == "gt" else (pred_json, pred_path)
            raise EvaluationError(f"{json_path} (image_id {gt_ann['image_id']}, {png}): {e}") from None
        except ValueError as e:
            raise EvaluationError(f"{pred_path} (image_id {gt_ann['image_id']}): {e}") from None
    return metric.state()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_pool(jobs: list[tuple], workers: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield each job's accumulator state, in job order, from a pool of worker processes."""
    # lazily, as the pool below: ~20 ms of `omniseg evaluate` start-up that only the fallback needs
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context(START_METHOD)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_panoptic_chunk, *job) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def evaluate_panoptic_files(
    gt_json: PathLike,
    gt_dir: PathLike,
    pred_json: PathLike,
    pred_dir: PathLike,
    *,
    workers: int | None = None,
    engine: str = "auto",
) -> dict[str, Any]:
    """PQ/SQ/RQ of COCO panoptic predictions against ground truth, as panopticapi ``pq_compute``.

    Annotations are paired by ``image_id``; every ground-truth image needs a prediction.
    ``engine``: ``"hotcoco"`` (hotcoco's ``PanopticEval``, Rust, multi-threaded), ``"omniseg"``
    (:class:`PanopticQuality` over ``workers`` processes) or ``"auto"``: hotcoco, else omniseg.
    ``workers`` (omniseg engine): processes to use (default: all cores, but one process for
    small sets); images are split into chunks whose accumulators are merged.

    Returns ``{"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class": {"<cat id>": {"pq","sq","rq"}}}``.
    """
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    gt_data = _load_json(gt_json, "ground-truth JSON")
    pred_data = _load_json(pred_json, "prediction JSON")
    gt_anns = _annotations(gt_data, gt_json)
    pred_anns = _annotations(pred_data, pred_json)
    if not isinstance(gt_data.get("categories"), list) or not gt_data["categories"]:
        raise EvaluationError(f"{gt_json}: ground-truth JSON has no 'categories' list")
    try:
        categories = CategoryTable.from_dicts(gt_data["categories"])
    except (KeyError, TypeError, ValueError) as e:
        raise EvaluationError(f"{gt_json}: bad 'categories' ({e})") from None
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: {what} PNG folder not found")

    by_image: dict[Any, dict] = {}
    for ann in pred_anns:
        if ann["image_id"] in by_image:
            raise EvaluationError(f"{pred_json}: image_id {ann['image_id']} has two annotations")
        by_image[ann["image_id"]] = ann
    missing = [a for a in gt_anns if a["image_id"] not in by_image]
    if missing:
        first = missing[0]
        raise EvaluationError(
            f"{pred_json}: no prediction for ground-truth image_id {first['image_id']} ({first['file_name']})"
            + (f" and {len(missing) - 1} more image(s)" if len(missing) > 1 else "")
        )
    pairs = [(a, by_image[a["image_id"]]) for a in gt_anns]

    if engine not in ("auto", "hotcoco", "omniseg"):
        raise ValueError(f"unknown panoptic engine {engine!r}")
    if engine == "auto" and _duplicate_segment_ids(pairs):
        engine = "omniseg"  # hotcoco would silently keep one entry; ours names the file and id
    if engine != "omniseg":
        try:
            # the files, not our parsed copies, which nothing above changed: hotcoco parses a path
            # in Rust in ~2 ms, where taking 200 images' dicts over from Python costs ~15 ms
            return _hotcoco_panoptic(gt_json, pred_json, gt_dir, pred_dir, categories)
        except ImportError:
            if engine == "hotcoco":
                raise
        except Exception:
            # hotcoco is the fast path, proven identical to panopticapi (tests/test_eval_speed_paths.py),
            # but it is optional and its errors name no file: on any failure our own implementation
            # re-runs the images, and either gives the same numbers or raises an EvaluationError
            # naming the file and the problem
            if engine == "hotcoco":
                raise
    return _omniseg_panoptic(pairs, gt_json, gt_dir, pred_json, pred_dir, categories, workers)


def _duplicate_segment_ids(pairs: list[tuple[dict, dict]]) -> bool:
    for gt_ann, pred_ann in pairs:
        for ann in (gt_ann, pred_ann):
            ids = [s["id"] for s in ann["segments_info"]]
            if len(set(ids)) != len(ids):
                return True
    return False


def _hotcoco_panoptic(
    gt: dict | Path, pred: dict | Path, gt_dir: Path, pred_dir: Path, categories: CategoryTable
) -> dict[str, Any]:
    """PQ by hotcoco's PanopticEval (of COCO panoptic dicts or JSON files), in our result layout."""
    from hotcoco import panoptic  # lazily: only panoptic file evaluation needs it

    gt, pred = (str(x) if isinstance(x, Path) else x for x in (gt, pred))
    evaluator = panoptic.PanopticEval(gt, pred, gt_folder=str(gt_dir), pred_folder=str(pred_dir))
    evaluator.evaluate()
    raw = evaluator.results()
    result: dict[str, Any] = {}
    for group in ("All", "Things", "Stuff"):
        r = raw[group]
        n = int(r["n"])
        # an empty group reports zeros, as PanopticQuality.compute does (panopticapi divides by 0)
        result[group] = {k: float(r[k]) if n else 0.0 for k in ("pq", "sq", "rq")} | {"n": n}
    per_class = {str(k): v for k, v in raw.get("per_class", {}).items()}  # keys are ints
    # hotcoco reports -1 for a category with no segment on either side; panopticapi reports 0
    result["per_class"] = {
        str(c.id): {k: max(0.0, float(per_class.get(str(c.id), {}).get(k, 0.0))) for k in ("pq", "sq", "rq")}
        for c in categories
    }
    return result


def _omniseg_panoptic(
    pairs: list[tuple[dict, dict]],
    gt_json: Path,
    gt_dir: Path,
    pred_json: Path,
    pred_dir: Path,
    categories: CategoryTable,
    workers: int | None,
) -> dict[str, Any]:
    """PQ by :class:`PanopticQuality`, over ``workers`` processes."""
    if workers is None:
        workers = min(_cpu_count(), len(pairs) // _MIN_IMAGES_PER_WORKER)
    workers = max(1, min(int(workers), len(pairs)))
    common = (str(gt_dir), str(pred_dir), str(gt_json), str(pred_json), categories.to_dicts())
    metric = PanopticQuality(categories)
    if workers > 1:
        from concurrent.futures.process import BrokenProcessPool

        # a few chunks per worker evens out slow images; contiguous chunks merged in order keep
        # the result deterministic for a given worker count
        n_chunks = min(len(pairs), 4 * workers)
        bounds = np.linspace(0, len(pairs), n_chunks + 1).astype(int)
        jobs = [(pairs[a:b], *common) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        try:
            for state in _run_pool(jobs, workers):
                metric.merge(PanopticQuality(categories).load_state(state))
        except BrokenProcessPool as e:
            # e.g. spawn cannot re-import a __main__ read from stdin: do the work here instead
            warnings.warn(f"worker processes failed to start ({e}); evaluating in one process", stacklevel=2)
            metric.reset()
            workers = 1
    if workers == 1:
        metric.load_state(_panoptic_chunk(pairs, *common))
    result = metric.compute()
    result["per_class"] = {str(k): v for k, v in result["per_class"].items()}
    return result


# ----------------------------------------------------------------------------- semantic
def evaluate_semantic_dirs(
    gt_dir: PathLike,
    pred_dir: PathLike,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """mIoU and friends of label PNGs in ``pred_dir`` against those in ``gt_dir``, paired by stem.

    Returns :meth:`SemanticMetric.compute` with NaN per-class IoUs as ``None`` (JSON-safe),
    plus ``num_images``.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: {what} label folder not found")
    gt_files = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() == ".png")
    if not gt_files:
        raise EvaluationError(f"{gt_dir}: no .png label files")
    preds = {p.stem: p for p in pred_dir.iterdir() if p.suffix.lower() == ".png"}
    missing = [p.name for p in gt_files if p.stem not in preds]
    if missing:
        raise EvaluationError(
            f"{pred_dir}: no prediction for ground truth {missing[0]}"
            + (f" and {len(missing) - 1} more file(s)" if len(missing) > 1 else "")
        )
    metric = SemanticMetric(num_classes, ignore_index, class_names)
    for gt_path in gt_files:
        pred_path = preds[gt_path.stem]
        gt = read_label_png(gt_path)
        pred = read_label_png(pred_path)
        if gt.shape != pred.shape:
            raise EvaluationError(
                f"{pred_path}: size {pred.shape[1]}x{pred.shape[0]} does not match its ground truth "
                f"{gt_path} ({gt.shape[1]}x{gt.shape[0]})"
            )
        try:
            metric.update(pred, gt)
        except ValueError as e:
            raise EvaluationError(f"{gt_path}: {e}") from None
    result = metric.compute()
    result["per_class_iou"] = [None if v != v else v for v in result["per_class_iou"]]
    result["num_images"] = len(gt_files)
    return result


# ----------------------------------------------------------------------------- instance
def _coco_gt_dataset(data: Any, path: Path) -> dict:
    """A validated COCO instances ground truth, filled in where pycocotools needs it.

    Annotations that need nothing are shared with ``data``, not copied (the evaluation engines
    copy what they read); the checks run over whole columns, and only a failing column is walked
    again to name the first annotation at fault.
    """
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a COCO instances JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise EvaluationError(f"{path}: COCO instances JSON has no '{key}' list")
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not {"id", "height", "width"} <= im.keys():
            raise EvaluationError(f"{path}: image #{i} lacks 'id', 'height' or 'width'")
        images[im["id"]] = im
    cat_ids = {c["id"] for c in data["categories"] if isinstance(c, dict) and "id" in c}
    annotations = data["annotations"]
    try:
        image_ids = [a["image_id"] for a in annotations]
        category_ids = [a["category_id"] for a in annotations]
    except (KeyError, TypeError):
        i = next(i for i, a in enumerate(annotations) if not isinstance(a, dict) or not {"image_id", "category_id"} <= a.keys())
        raise EvaluationError(f"{path}: annotation #{i} lacks 'image_id' or 'category_id'") from None
    if (i := _first_outside(image_ids, images)) is not None:
        raise EvaluationError(f"{path}: annotation #{i} refers to unknown image_id {image_ids[i]}")
    if (i := _first_outside(category_ids, cat_ids)) is not None:
        raise EvaluationError(f"{path}: annotation #{i} has unknown category id {category_ids[i]}")
    ids = [a.get("id") for a in annotations]
    # COCOeval stores matched annotation ids with 0 meaning "unmatched", so an annotation id 0
    # would silently turn a true positive into a false positive: renumber such files.
    renumber = any(type(i) is not int or i <= 0 for i in ids) or len(set(ids)) != len(ids)
    anns = []
    for i, ann in enumerate(annotations):
        if renumber or "iscrowd" not in ann or "area" not in ann or "bbox" not in ann:
            ann = _completed_annotation(ann, i, images, renumber, path)
        anns.append(ann)
    return {"images": list(images.values()), "annotations": anns, "categories": data["categories"]}


def _completed_annotation(ann: dict, i: int, images: dict, renumber: bool, path: Path) -> dict:
    ann = dict(ann)
    if renumber:
        ann["id"] = i + 1
    ann.setdefault("iscrowd", 0)
    if "segmentation" in ann and ("area" not in ann or "bbox" not in ann):
        im = images[ann["image_id"]]
        rle = _to_rle(ann["segmentation"], im["height"], im["width"], path, f"annotation #{i}")
        ann.setdefault("area", float(mask_utils.area(rle)))
        ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
    if "bbox" not in ann:
        raise EvaluationError(f"{path}: annotation #{i} has neither 'segmentation' nor 'bbox'")
    ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    return ann


def _first_outside(values: list, allowed: Any) -> int | None:
    """The index of the first value not in ``allowed`` (a set or dict), or None."""
    try:
        if set(values).issubset(allowed):
            return None
    except TypeError:  # an unhashable value: found below
        pass
    for i, v in enumerate(values):
        try:
            if v not in allowed:
                return i
        except TypeError:
            return i
    return None


def _to_rle(segm: Any, h: int, w: int, path: Path, where: str) -> dict:
    try:
        if isinstance(segm, list):  # polygons
            return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        if isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
            return mask_utils.frPyObjects(segm, h, w)
        if isinstance(segm, dict) and "counts" in segm and "size" in segm:
            return segm
    except Exception as e:  # pycocotools raises bare Exceptions / TypeErrors on malformed input
        raise EvaluationError(f"{path}: {where} has a malformed segmentation ({e})") from None
    raise EvaluationError(f"{path}: {where} has a malformed segmentation")


def evaluate_instance_files(gt_json: PathLike, pred_json: PathLike) -> dict[str, dict[str, float]]:
    """COCO mask AP and box AP of a COCO results JSON against a COCO instances JSON.

    Returns ``{"segm": {AP, AP50, AP75, APs, APm, APl}, "bbox": {...}}`` (fractions; -1 where
    COCOeval has nothing to score); ``segm`` is left out unless every detection has a mask.
    Polygon and uncompressed-RLE masks are accepted; ground-truth annotation ids below 1 are
    renumbered (COCOeval takes id 0 to mean "unmatched"). A detection's box is its ``bbox``, else
    its mask's bounding box; for ``segm`` its area is the mask's.
    """
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    gt = _coco_gt_dataset(_load_json(gt_json, "ground-truth JSON"), gt_json)
    results = _load_json(pred_json, "results JSON")
    if isinstance(results, dict) and isinstance(results.get("annotations"), list):
        results = results["annotations"]
    if not isinstance(results, list):
        raise EvaluationError(f"{pred_json}: expected a COCO results list of detections")
    images = {im["id"]: im for im in gt["images"]}
    # whole columns at a time (a Python loop with a dict copy per detection was a third of the
    # evaluation); a failing column is walked again to name the first detection at fault
    try:
        image_ids = [r["image_id"] for r in results]
        category_ids = [r["category_id"] for r in results]
        scores = [r["score"] for r in results]
    except (KeyError, TypeError):
        keys = {"image_id", "category_id", "score"}
        i = next(i for i, r in enumerate(results) if not isinstance(r, dict) or not keys <= r.keys())
        raise EvaluationError(f"{pred_json}: detection #{i} lacks 'image_id', 'category_id' or 'score'") from None
    if (i := _first_outside(image_ids, images)) is not None:
        raise EvaluationError(f"{pred_json}: detection #{i} refers to image_id {image_ids[i]}, not in {gt_json}")
    if (i := _first_outside(category_ids, {c["id"] for c in gt["categories"]})) is not None:
        raise EvaluationError(
            f"{pred_json}: detection #{i} has unknown category id {category_ids[i]} (not in {gt_json})"
        )
    segm_results: list[dict] = []  # as COCOeval "segm" takes them: RLE masks, no box
    boxes: list[Any] = []  # each detection's box, or None where it comes from the mask
    masked: list[tuple[int, int]] = []  # (detection, its place in segm_results) of masks with no box
    for i, r in enumerate(results):
        segm = r.get("segmentation", _ABSENT)
        if segm is _ABSENT:
            if "bbox" not in r:
                raise EvaluationError(f"{pred_json}: detection #{i} has neither 'segmentation' nor 'bbox'")
            boxes.append(r["bbox"])
            continue
        if not (type(segm) is dict and type(segm.get("counts")) is str and "size" in segm):
            im = images[r["image_id"]]  # polygons or uncompressed RLE: to compressed RLE
            segm = _to_rle(segm, im["height"], im["width"], pred_json, f"detection #{i}")
        if "bbox" in r:
            boxes.append(r["bbox"])
            r = {k: v for k, v in r.items() if k != "bbox"}  # for segm, the area must be the mask's
        else:
            boxes.append(None)
            masked.append((i, len(segm_results)))
        if segm is not r["segmentation"]:
            r = {**r, "segmentation": segm}
        segm_results.append(r)
    if masked:  # one call for all masks: toBbox per detection costs more than the conversion
        try:
            mask_boxes = mask_utils.toBbox([segm_results[j]["segmentation"] for _, j in masked])
        except Exception as e:  # malformed RLE counts / size
            raise EvaluationError(f"{pred_json}: a detection has a malformed segmentation ({e})") from None
        for (i, _), box in zip(masked, mask_boxes.tolist(), strict=True):
            boxes[i] = box
    by_type: dict[str, Any] = {}
    if len(segm_results) == len(results):
        by_type["segm"] = segm_results
    by_type["bbox"] = _box_results(image_ids, category_ids, scores, boxes, pred_json)
    stats = coco_stats_by_type(gt, by_type)
    return {t: dict(zip(STAT_NAMES, v[:6], strict=True)) for t, v in stats.items()}


_ABSENT = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)


def _box_results(
    image_ids: list, category_ids: list, scores: list, boxes: list, path: Path
) -> np.ndarray | list[dict]:
    """The detections as box results: the ``(N, 7)`` array form both engines take (no dict per
    detection) where every id is an integer a float64 holds exactly, else a list of dicts."""
    try:
        columns = np.asarray(boxes, dtype=np.float64)
        score_column = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        i = next(i for i, (b, sc) in enumerate(zip(boxes, scores, strict=True)) if not _is_box(b) or not _is_number(sc))
        raise EvaluationError(f"{path}: detection #{i} has a malformed 'bbox' or 'score'") from None
    if columns.shape != (len(boxes), 4) or not len(boxes):
        if len(boxes):
            i = next(i for i, b in enumerate(boxes) if not _is_box(b))
            raise EvaluationError(f"{path}: detection #{i} has a malformed 'bbox'")
        return []
    exact = all(type(v) is int and abs(v) < 2**53 for v in image_ids) and all(
        type(v) is int and abs(v) < 2**53 for v in category_ids
    )
    if not exact:
        return [
            {"image_id": im, "category_id": c, "score": sc, "bbox": list(b)}
            for im, c, sc, b in zip(image_ids, category_ids, scores, columns.tolist(), strict=True)
        ]
    return np.column_stack([np.asarray(image_ids, np.float64), columns, score_column, np.asarray(category_ids, np.float64)])
