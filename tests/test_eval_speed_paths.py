"""The fast evaluation paths (hotcoco) give the referees' numbers, and the fallbacks work.

Panoptic: hotcoco's PanopticEval against the official numbers in the fixtures and against the
in-script copy of panopticapi (benchmarks/pq_eval.py) on generated sets with crowd and void
regions, unmatched segments, categories missing from the predictions, things and stuff.
Instance: hotcoco's COCOeval against pycocotools' COCOeval, all 12 stats of segm and bbox.
"""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import pytest

from conftest import shared_data
from omniseg.metrics import evaluate_instance_files, evaluate_panoptic_files
from omniseg.metrics import files as metric_files
from omniseg.metrics.instance import _pycocotools_stats, coco_stats, results_for

pytest.importorskip("hotcoco")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ap_eval  # noqa: E402
import pq_eval  # noqa: E402


def _no_hotcoco(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import hotcoco`` (and its submodules) fail, as where it is not installed."""
    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):
        if name.split(".")[0] == "hotcoco":
            raise ImportError("no hotcoco here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def _assert_same_pq(ours: dict, official: dict, tol: float = 1e-9) -> None:
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == official[group]["n"], group
        for k in ("pq", "sq", "rq"):
            assert ours[group][k] == pytest.approx(official[group][k], abs=tol), (group, k)
    assert set(ours["per_class"]) == {str(c) for c in official["per_class"]}
    for cat, vals in official["per_class"].items():
        for k in ("pq", "sq", "rq"):
            assert ours["per_class"][str(cat)][k] == pytest.approx(vals[k], abs=tol), (cat, k)


# ----------------------------------------------------------------------------- panoptic
@pytest.mark.parametrize("engine", ["hotcoco", "omniseg", "auto"])
def test_panoptic_engines_give_the_fixture_official_numbers(engine: str) -> None:
    d = shared_data("panoptic_pq_fixtures")
    expected = json.loads((d / "EXPECTED.json").read_text())
    result = evaluate_panoptic_files(
        d / "coco_gt.json", d / "coco_gt", d / "coco_pred.json", d / "coco_pred", workers=1, engine=engine
    )
    for group in ("All", "Things", "Stuff"):
        assert result[group]["n"] == expected[group]["n"]
        for k in ("pq", "sq", "rq"):
            assert result[group][k] == pytest.approx(expected[group][k], abs=1e-12), (group, k)
    for cat, pq in expected["per_class_pq"].items():
        assert result["per_class"][cat]["pq"] == pytest.approx(pq, abs=1e-12), cat


@pytest.fixture(scope="module")
def generated_pq(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 generated 640x480 images; one thing category is then never predicted, and one category
    is listed in the ground truth but used nowhere."""
    root = tmp_path_factory.mktemp("pq")
    data = pq_eval.generate(root, 12, seed=3)
    pred = json.loads(data["pred_json"].read_text())
    for ann in pred["annotations"]:
        for seg in ann["segments_info"]:
            if seg["category_id"] == 1:
                seg["category_id"] = 2
    data["pred_json"].write_text(json.dumps(pred))
    gt = json.loads(data["gt_json"].read_text())
    gt["categories"].append({"id": 250, "name": "unused", "isthing": 1})
    data["gt_json"].write_text(json.dumps(gt))
    return data


def _paths(data: dict[str, Path]) -> tuple[Path, Path, Path, Path]:
    return data["gt_json"], data["gt_dir"], data["pred_json"], data["pred_dir"]


def test_generated_set_exercises_the_rules(generated_pq: dict[str, Path]) -> None:
    gt = json.loads(generated_pq["gt_json"].read_text())
    segs = [s for a in gt["annotations"] for s in a["segments_info"]]
    assert any(s["iscrowd"] for s in segs), "no crowd segment"
    official = pq_eval.official_pq(*_paths(generated_pq))
    assert (
        any(s["category_id"] == 1 for s in segs) and official["per_class"][1]["rq"] == 0.0
    )  # never predicted
    assert official["per_class"][250] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # used nowhere
    assert official["All"]["pq"] > 0.3  # matches happen
    assert official["Things"]["n"] > 0 and official["Stuff"]["n"] > 0


@pytest.mark.parametrize("engine", ["hotcoco", "omniseg"])
def test_panoptic_engines_equal_the_official_procedure_on_generated_sets(
    generated_pq: dict[str, Path], engine: str
) -> None:
    official = pq_eval.official_pq(*_paths(generated_pq))
    ours = evaluate_panoptic_files(*_paths(generated_pq), workers=1, engine=engine)
    _assert_same_pq(ours, official)


def test_panoptic_auto_uses_hotcoco(generated_pq: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the omniseg engine ran although hotcoco is installed")

    monkeypatch.setattr(metric_files, "_omniseg_panoptic", fail)
    _assert_same_pq(
        evaluate_panoptic_files(*_paths(generated_pq)), pq_eval.official_pq(*_paths(generated_pq))
    )


def test_panoptic_falls_back_without_hotcoco(
    generated_pq: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    official = pq_eval.official_pq(*_paths(generated_pq))
    _no_hotcoco(monkeypatch)
    with pytest.raises(ImportError):
        evaluate_panoptic_files(*_paths(generated_pq), engine="hotcoco")
    _assert_same_pq(evaluate_panoptic_files(*_paths(generated_pq), workers=1), official)


def test_panoptic_falls_back_when_hotcoco_fails(
    generated_pq: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("hotcoco failed")

    monkeypatch.setattr(metric_files, "_hotcoco_panoptic", broken)
    result = evaluate_panoptic_files(*_paths(generated_pq), workers=1)
    assert calls == [1]
    _assert_same_pq(result, pq_eval.official_pq(*_paths(generated_pq)))


# ----------------------------------------------------------------------------- instance
@pytest.fixture(scope="module")
def generated_ap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """30 generated 640x480 images, 10 gt masks and 20 detections each (crowd, all COCO area
    ranges); one category is never detected and one has no ground truth."""
    root = tmp_path_factory.mktemp("ap")
    gt_json, res_json = ap_eval.generate(root, 30, 10, 20, seed=5)
    results = [r for r in json.loads(res_json.read_text()) if r["category_id"] != 1]
    res_json.write_text(json.dumps(results))
    gt = json.loads(gt_json.read_text())
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] != 2]
    gt_json.write_text(json.dumps(gt))
    return gt_json, res_json


def _referee(gt_json: Path, res_json: Path) -> dict[str, list[float]]:
    return ap_eval.pycocotools_eval(gt_json, res_json)


def test_hotcoco_equals_pycocotools_all_12_stats(generated_ap: tuple[Path, Path]) -> None:
    gt_json, res_json = generated_ap
    gt = metric_files._coco_gt_dataset(json.loads(gt_json.read_text()), gt_json)
    assert any(a["iscrowd"] for a in gt["annotations"])
    results = ap_eval._with_boxes(json.loads(res_json.read_text()))
    for r, full in zip(results, json.loads(res_json.read_text()), strict=True):
        r["segmentation"] = full["segmentation"]
    before = json.dumps(gt, sort_keys=True)
    for iou_type in ("segm", "bbox"):
        res = results_for(iou_type, results)
        fast = coco_stats(gt, res, iou_type, engine="hotcoco")
        slow = _pycocotools_stats(gt, res, iou_type)
        assert len(fast) == len(slow) == 12
        assert slow[0] > 0.05 and slow[1] > 0.2  # the data is not degenerate: detections match
        assert fast == pytest.approx(slow, abs=1e-12, rel=0), iou_type
    assert json.dumps(gt, sort_keys=True) == before, "the evaluation modified its input"


def test_instance_files_equal_pycocotools(generated_ap: tuple[Path, Path]) -> None:
    referee = _referee(*generated_ap)
    ours = evaluate_instance_files(*generated_ap)
    for t in ("segm", "bbox"):
        assert list(ours[t].values()) == pytest.approx(referee[t][:6], abs=1e-12, rel=0), t


def test_instance_files_fall_back_without_hotcoco(
    generated_ap: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    referee = _referee(*generated_ap)
    _no_hotcoco(monkeypatch)
    gt_json, _ = generated_ap
    gt = metric_files._coco_gt_dataset(json.loads(gt_json.read_text()), gt_json)
    with pytest.raises(ImportError):
        coco_stats(
            gt,
            [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}],
            "bbox",
            engine="hotcoco",
        )
    ours = evaluate_instance_files(*generated_ap)
    for t in ("segm", "bbox"):
        assert list(ours[t].values()) == pytest.approx(referee[t][:6], abs=1e-12, rel=0), t


def test_instance_falls_back_when_hotcoco_fails(
    generated_ap: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniseg.metrics import instance

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("hotcoco failed")

    monkeypatch.setattr(instance, "_hotcoco_stats", broken)
    referee = _referee(*generated_ap)
    ours = evaluate_instance_files(*generated_ap)
    assert calls == [1]  # one attempt for segm and bbox together
    for t in ("segm", "bbox"):
        assert list(ours[t].values()) == pytest.approx(referee[t][:6], abs=1e-12, rel=0), t
