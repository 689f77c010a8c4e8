"""PQ against the official COCO panoptic evaluation: its published numbers, its literal algorithm, bad input."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from omniseg import io as omniseg_io
from omniseg.metrics import EvaluationError, PanopticQuality, evaluate_panoptic_files, format_table
from omniseg.metrics import files as metric_files
from omniseg.metrics.files import read_panoptic_png
from omniseg.structures import CategoryTable, Segments, id_to_rgb


def _fixture() -> tuple[Path, Path, Path, Path]:
    d = shared_data("panoptic_pq_fixtures")
    return d / "coco_gt.json", d / "coco_gt", d / "coco_pred.json", d / "coco_pred"


def _check_expected(result: dict, expected: dict) -> None:
    for group in ("All", "Things", "Stuff"):
        assert result[group]["n"] == expected[group]["n"]
        for key in ("pq", "sq", "rq"):
            assert result[group][key] == pytest.approx(expected[group][key], abs=1e-9), (group, key)
    for cat, pq in expected["per_class_pq"].items():
        assert result["per_class"][cat]["pq"] == pytest.approx(pq, abs=1e-9), cat
    for cat, (sq, rq) in expected["per_class_sq_rq"].items():
        assert result["per_class"][cat]["sq"] == pytest.approx(sq, abs=1e-9)
        assert result["per_class"][cat]["rq"] == pytest.approx(rq, abs=1e-9)


@pytest.mark.parametrize("workers", [1, 2])
def test_fixture_equals_official_numbers(workers: int) -> None:
    gt_json, gt_dir, pred_json, pred_dir = _fixture()
    expected = json.loads((gt_json.parent / "EXPECTED.json").read_text())
    _check_expected(
        evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir, workers=workers, engine="omniseg"),
        expected,
    )


def test_workers_are_spawn_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    gt_json, gt_dir, pred_json, pred_dir = _fixture()
    expected = json.loads((gt_json.parent / "EXPECTED.json").read_text())
    monkeypatch.setattr(metric_files, "START_METHOD", "spawn")
    _check_expected(
        evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir, workers=2, engine="omniseg"), expected
    )


def _fixture_images() -> tuple[CategoryTable, list[tuple[np.ndarray, list, np.ndarray, list]]]:
    gt_json, gt_dir, pred_json, pred_dir = _fixture()
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    preds = {a["image_id"]: a for a in pred["annotations"]}
    images = []
    for ann in gt["annotations"]:
        p = preds[ann["image_id"]]
        images.append(
            (
                read_panoptic_png(gt_dir / ann["file_name"]),
                ann["segments_info"],
                read_panoptic_png(pred_dir / p["file_name"]),
                p["segments_info"],
            )
        )
    return CategoryTable.from_dicts(gt["categories"]), images


def test_in_memory_updates_and_merge_equal_files() -> None:
    categories, images = _fixture_images()
    whole = PanopticQuality(categories)
    first, second = PanopticQuality(categories), PanopticQuality(categories)
    for i, image in enumerate(images):
        whole.update(*image)
        (first if i < 2 else second).update(*image)
    merged = first.merge(second)
    np.testing.assert_array_equal(merged.tp, whole.tp)
    np.testing.assert_array_equal(merged.fp, whole.fp)
    np.testing.assert_array_equal(merged.fn, whole.fn)
    np.testing.assert_allclose(merged.iou_sum, whole.iou_sum, rtol=0, atol=1e-12)
    from_files = evaluate_panoptic_files(*_fixture(), workers=1)
    result = whole.compute()
    assert result["All"] == from_files["All"]
    assert {str(k): v for k, v in result["per_class"].items()} == from_files["per_class"]


def test_update_segments_uses_the_panoptic_view() -> None:
    categories, images = _fixture_images()
    by_maps, by_segments = PanopticQuality(categories), PanopticQuality(categories)
    for gt_map, gt_info, pred_map, pred_info in images:
        by_maps.update(gt_map, gt_info, pred_map, pred_info)
        pred_info = [s for s in pred_info if s["id"] != 0]  # the data model reserves id 0 for void
        pred_map = np.where(np.isin(pred_map, [s["id"] for s in pred_info]), pred_map, 0)
        by_segments.update_segments(
            Segments.from_panoptic(gt_map, gt_info, categories=categories),
            Segments.from_panoptic(pred_map, pred_info, categories=categories),
        )
    assert by_segments.compute() == by_maps.compute()


def test_ground_truth_against_itself_is_perfect() -> None:
    d = shared_data("coco_panoptic_sample")
    gt_json, gt_dir = d / "panoptic_examples.json", d / "panoptic_examples"
    result = evaluate_panoptic_files(gt_json, gt_dir, gt_json, gt_dir)
    assert result["All"]["pq"] == 1.0 and result["All"]["sq"] == 1.0 and result["All"]["rq"] == 1.0
    present = {
        s["category_id"]
        for a in json.loads(gt_json.read_text())["annotations"]
        for s in a["segments_info"]
        if not s["iscrowd"]
    }
    assert result["All"]["n"] == len(present)
    names = CategoryTable.from_dicts(json.loads((d / "panoptic_coco_categories.json").read_text()))
    table = format_table(result, "panoptic", names)
    assert "| All " in table and "person (1)" in table


# ------------------------------------------------------------------ against the literal official algorithm
def _official_counts(images: list, categories: dict) -> dict:
    """panopticapi's pq_compute_single_core counting, transcribed (per-pixel np.unique and dict loops)."""
    offset, void = 256**3, 0
    stat = defaultdict(lambda: [0, 0, 0, 0.0])  # tp, fp, fn, iou
    for gt_map, gt_info, pred_map, pred_info in images:
        gt_segms = {el["id"]: dict(el) for el in gt_info}
        pred_segms = {el["id"]: dict(el) for el in pred_info}
        labels, counts = np.unique(pred_map, return_counts=True)
        for label, count in zip(labels, counts, strict=True):
            if label in pred_segms:
                pred_segms[label]["area"] = count
        gt_pred = {}
        labels, counts = np.unique(
            gt_map.astype(np.uint64) * offset + pred_map.astype(np.uint64), return_counts=True
        )
        for label, inter in zip(labels, counts, strict=True):
            gt_pred[(label // offset, label % offset)] = inter
        gt_matched, pred_matched = set(), set()
        for (gl, pl), inter in gt_pred.items():
            if gl not in gt_segms or pl not in pred_segms or gt_segms[gl]["iscrowd"] == 1:
                continue
            if gt_segms[gl]["category_id"] != pred_segms[pl]["category_id"]:
                continue
            union = pred_segms[pl]["area"] + gt_segms[gl]["area"] - inter - gt_pred.get((void, pl), 0)
            iou = inter / union
            if iou > 0.5:
                s = stat[gt_segms[gl]["category_id"]]
                s[0] += 1
                s[3] += iou
                gt_matched.add(gl)
                pred_matched.add(pl)
        crowd = {}
        for gl, info in gt_segms.items():
            if gl in gt_matched:
                continue
            if info["iscrowd"] == 1:
                crowd[info["category_id"]] = gl
                continue
            stat[info["category_id"]][2] += 1
        for pl, info in pred_segms.items():
            if pl in pred_matched:
                continue
            inter = gt_pred.get((void, pl), 0)
            if info["category_id"] in crowd:
                inter += gt_pred.get((crowd[info["category_id"]], pl), 0)
            if inter / info["area"] > 0.5:
                continue
            stat[info["category_id"]][1] += 1
    return stat


def _random_image(rng: np.random.Generator, cats: list[int]) -> tuple:
    """Blocky random gt/pred id maps with void, crowd (several per category), unlisted gt ids."""
    h, w = 48, 64
    gt_cells = rng.integers(0, 9, size=(6, 8))
    gt_map = np.kron(gt_cells, np.ones((8, 8), dtype=np.int64))
    pred_map = gt_map.copy()
    noise = rng.random((h, w)) < 0.15
    pred_map[noise] = rng.integers(0, 12, size=int(noise.sum()))
    shift = rng.integers(-3, 4, size=2)
    pred_map = np.roll(pred_map, tuple(shift), axis=(0, 1))
    gt_ids = rng.choice(np.arange(1, 5000), size=9, replace=False)
    pred_ids = rng.choice(np.arange(1, 5000), size=12, replace=False)
    gt_ids[0] = 0  # cell value 0 is void
    pred_ids[0] = 0
    gt_map, pred_map = gt_ids[gt_map], pred_ids[pred_map]
    gt_info = []
    for k, seg_id in enumerate(gt_ids[1:].tolist()):
        if k == 7:
            continue  # present in the map but not listed: ignored, as panopticapi does
        area = int((gt_map == seg_id).sum())
        gt_info.append(
            {
                "id": seg_id,
                "category_id": int(rng.choice(cats[:3])),
                "iscrowd": int(rng.random() < 0.3),
                "area": area + int(k == 2),
            }
        )  # JSON area wins over the pixel count
    pred_info = [
        {"id": seg_id, "category_id": int(rng.choice(cats[:3])), "iscrowd": 0}
        for seg_id in np.unique(pred_map).tolist()
        if seg_id != 0
    ]
    return gt_map.astype(np.int32), gt_info, pred_map.astype(np.int32), pred_info


def test_random_images_match_literal_official_algorithm() -> None:
    rng = np.random.default_rng(0)
    table = CategoryTable.from_dicts(
        [{"id": 3, "isthing": 1}, {"id": 7, "isthing": 0}, {"id": 11, "isthing": 1}, {"id": 12, "isthing": 0}]
    )
    images = [_random_image(rng, table.ids) for _ in range(40)]
    metric = PanopticQuality(table)
    for image in images:
        metric.update(*image)
    official = _official_counts(images, {c.id: c for c in table})
    assert sum(metric.tp) > 10 and sum(metric.fp) > 10  # the data exercises matching and crowd/void rules
    for i, cat in enumerate(table.ids):
        tp, fp, fn, iou = official[cat]
        assert (metric.tp[i], metric.fp[i], metric.fn[i]) == (tp, fp, fn), cat
        assert metric.iou_sum[i] == pytest.approx(iou, abs=1e-12)


def test_listed_segment_id_zero_stays_void() -> None:
    # pred pixels 0 cover the gt segment exactly; listing id 0 must not turn them into a match
    # (panopticapi would score the entry as a segment; the data model reserves id 0 for void)
    table = CategoryTable.from_dicts([{"id": 1, "isthing": 1}])
    gt = np.zeros((4, 4), dtype=np.int32)
    gt[:, :2] = 5
    pred = np.zeros((4, 4), dtype=np.int32)
    pred[:, 2:] = 9  # entirely on gt void: ignored, not a false positive
    info_gt = [{"id": 5, "category_id": 1, "iscrowd": 0}]
    plain, with_zero = PanopticQuality(table), PanopticQuality(table)
    plain.update(gt, info_gt, pred, [{"id": 9, "category_id": 1}])
    with_zero.update(gt, info_gt, pred, [{"id": 9, "category_id": 1}, {"id": 0, "category_id": 1}])
    assert with_zero.compute() == plain.compute()
    assert (plain.tp[0], plain.fp[0], plain.fn[0]) == (0, 0, 1)


# ------------------------------------------------------------------ bad input
def test_in_memory_errors() -> None:
    table = CategoryTable.from_dicts([{"id": 1, "isthing": 1}])
    metric = PanopticQuality(table)
    a = np.ones((4, 4), dtype=np.int32)
    info = [{"id": 1, "category_id": 1}]
    with pytest.raises(ValueError, match="4x4"):
        metric.update(a, info, np.ones((4, 5), dtype=np.int32), info)
    with pytest.raises(ValueError, match="not in its segments_info"):
        metric.update(a, info, a * 2, info)
    with pytest.raises(ValueError, match="unknown category id 9"):
        metric.update(a, info, a, [{"id": 1, "category_id": 9}])
    with pytest.raises(ValueError, match="twice"):
        metric.update(a, info, a, info + info)
    with pytest.raises(ValueError, match="no pixels"):
        metric.update(a, info, a, info + [{"id": 2, "category_id": 1}])


@pytest.fixture
def fixture_copy(tmp_path: Path) -> Path:
    gt_json, *_ = _fixture()
    dest = tmp_path / "fx"
    shutil.copytree(gt_json.parent, dest, ignore=shutil.ignore_patterns("*_input*"))
    for p in dest.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dest


def _evaluate(d: Path) -> dict:
    return evaluate_panoptic_files(
        d / "coco_gt.json", d / "coco_gt", d / "coco_pred.json", d / "coco_pred", workers=1
    )


def _edit_pred(d: Path, edit) -> None:
    data = json.loads((d / "coco_pred.json").read_text())
    edit(data)
    (d / "coco_pred.json").write_text(json.dumps(data))


def test_missing_file(fixture_copy: Path) -> None:
    (fixture_copy / "coco_gt.json").unlink()
    with pytest.raises(EvaluationError, match=r"coco_gt\.json: ground-truth JSON file not found"):
        _evaluate(fixture_copy)


def test_missing_png(fixture_copy: Path) -> None:
    (fixture_copy / "coco_pred" / "cat.png").unlink()
    with pytest.raises(EvaluationError, match=r"cat\.png: file not found"):
        _evaluate(fixture_copy)


def test_malformed_json(fixture_copy: Path) -> None:
    (fixture_copy / "coco_pred.json").write_text('{\n  "annotations": [\n    {"image_id": 1,,}\n  ]\n}\n')
    with pytest.raises(
        EvaluationError,
        match=r"coco_pred\.json: malformed JSON at line 3, column 20: Expecting property name",
    ):
        _evaluate(fixture_copy)


def test_png_size_mismatch(fixture_copy: Path) -> None:
    path = fixture_copy / "coco_pred" / "bird.png"
    Image.open(path).crop((0, 0, 100, 100)).save(path)
    with pytest.raises(
        EvaluationError,
        match=r"bird\.png: size 100x100 does not match its ground truth .*bird\.png \(240x159\)",
    ):
        _evaluate(fixture_copy)


def test_unknown_category(fixture_copy: Path) -> None:
    _edit_pred(fixture_copy, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=99))
    with pytest.raises(
        EvaluationError, match=r"coco_pred\.json \(image_id 2, .*cat\.png\): .*unknown category id 99"
    ):
        _evaluate(fixture_copy)


def test_missing_prediction(fixture_copy: Path) -> None:
    _edit_pred(fixture_copy, lambda d: d["annotations"].pop(2))
    with pytest.raises(
        EvaluationError, match=r"coco_pred\.json: no prediction for ground-truth image_id 3 \(team\.png\)"
    ):
        _evaluate(fixture_copy)


def test_corrupt_png(fixture_copy: Path) -> None:
    path = fixture_copy / "coco_pred" / "congress.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EvaluationError, match=r"congress\.png: cannot decode PNG"):
        _evaluate(fixture_copy)
    path.write_bytes(b"not a png at all")
    with pytest.raises(EvaluationError, match=r"congress\.png: cannot decode PNG"):
        _evaluate(fixture_copy)


def test_pixel_id_not_in_segments_info(fixture_copy: Path) -> None:
    _edit_pred(fixture_copy, lambda d: d["annotations"][0]["segments_info"].pop(0))
    with pytest.raises(
        EvaluationError,
        match=r"coco_pred\.json \(image_id 1, .*bird\.png\): .*55551.* not in its segments_info",
    ):
        _evaluate(fixture_copy)


def test_segment_listed_twice(fixture_copy: Path) -> None:
    _edit_pred(
        fixture_copy,
        lambda d: d["annotations"][0]["segments_info"].append(d["annotations"][0]["segments_info"][0]),
    )
    with pytest.raises(EvaluationError, match=r"coco_pred\.json \(image_id 1, .*\): .*55551.* twice"):
        _evaluate(fixture_copy)


def test_errors_from_worker_processes_name_the_file(fixture_copy: Path) -> None:
    path = fixture_copy / "coco_pred" / "congress.png"
    path.write_bytes(b"garbage")
    with pytest.raises(EvaluationError, match=r"congress\.png: cannot decode PNG"):
        evaluate_panoptic_files(
            fixture_copy / "coco_gt.json",
            fixture_copy / "coco_gt",
            fixture_copy / "coco_pred.json",
            fixture_copy / "coco_pred",
            workers=2,
            engine="omniseg",  # the worker pool itself, not the hotcoco path
        )


def test_grayscale_png_is_rejected(fixture_copy: Path) -> None:
    path = fixture_copy / "coco_pred" / "cat.png"
    Image.fromarray(np.zeros((330, 317), dtype=np.uint8)).save(path)
    with pytest.raises(EvaluationError, match=r"cat\.png: panoptic PNG must be RGB"):
        _evaluate(fixture_copy)


def test_read_panoptic_png_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for shape, mode in (((7, 9), "RGB"), ((1, 1), "RGB"), ((5, 3), "RGBA")):
        ids = rng.integers(0, 256**3, size=shape)
        rgb = id_to_rgb(ids)
        if mode == "RGBA":
            rgb = np.concatenate([rgb, np.full((*shape, 1), 7, np.uint8)], axis=-1)
        Image.fromarray(rgb).save(tmp_path / "x.png")
        out = read_panoptic_png(tmp_path / "x.png")
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, ids)


@pytest.mark.parametrize("folder", ["coco_gt", "coco_pred"])
def test_pyspng_and_pil_decode_identical_ids(folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyspng")
    paths = sorted(shared_data("panoptic_pq_fixtures").joinpath(folder).glob("*.png"))
    assert paths
    for path in paths:
        assert omniseg_io._spng_rgb(path) is not None, f"{path} did not take the pyspng path"
    fast = [read_panoptic_png(p) for p in paths]
    monkeypatch.setattr(omniseg_io, "pyspng", None)
    for path, ids in zip(paths, fast, strict=True):
        assert omniseg_io._spng_rgb(path) is None
        slow = read_panoptic_png(path)
        assert ids.dtype == slow.dtype == np.int32
        np.testing.assert_array_equal(ids, slow, err_msg=str(path))
