"""Every reader against the real files in ../shared/data, the writers by round trip, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from omniseg.data import (
    CITYSCAPES_LABELS,
    COCO80_NAMES,
    DATASET_FORMATS,
    FORMATS,
    ROOT_LAYOUTS,
    Cityscapes,
    CocoInstances,
    CocoPanoptic,
    CocoPanopticWriter,
    DataError,
    LabelFolderDataset,
    YoloSegmentation,
    ade20k,
    camvid,
    cityscapes_categories,
    formats_help,
    label_to_train_ids,
    load_image,
    load_label_png,
    open_dataset,
    train_to_label_ids,
    write_instance_results,
    write_results,
    write_semantic_result,
)
from omniseg.data.yolo import parse_label_file
from omniseg.structures import CategoryTable, Segments, id_to_rgb, rgb_to_id


# --------------------------------------------------------------------------- CamVid
def test_camvid_every_label_round_trips(shared_data: Path) -> None:
    root = shared_data / "camvid"
    assert len(camvid(root, "train")) == 367
    assert len(camvid(root, "val")) == 101
    ds = camvid(root, "trainval")
    assert ds.ignore_index == 11 and len(ds.categories) == 11
    for _, label_path in ds.pairs:
        label = load_label_png(label_path)
        assert label.shape == (360, 480)
        assert not np.bincount(label.ravel(), minlength=256)[12:].any(), label_path  # values within 0..11
        segments = Segments.from_semantic(label, categories=ds.categories, ignore_index=ds.ignore_index)
        np.testing.assert_array_equal(segments.to_semantic(void_value=ds.ignore_index), label)
    for i in range(0, len(ds), 10):  # photos: decoding all 468 adds seconds and tests nothing new
        image, label = ds.load_pair(i)
        assert image.shape == (*label.shape, 3)
    sample = ds[0]
    assert sample.segments.categories is ds.categories and sample.image.dtype == np.uint8


# --------------------------------------------------------------------------- YOLO / coco128
def _polygon_area_and_perimeter(points: np.ndarray) -> tuple[float, float]:
    x, y = points[:, 0], points[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    perimeter = float(np.hypot(np.diff(np.r_[x, x[0]]), np.diff(np.r_[y, y[0]])).sum())
    return area, perimeter


def test_coco128_every_image_and_polygon(shared_data: Path) -> None:
    root = shared_data / "coco128_seg"
    ds = YoloSegmentation(root / "images" / "train2017")
    assert len(ds) == 128 and len(ds.categories) == 80 and ds.categories.names == list(COCO80_NAMES)
    assert ds.labels_dir == root / "labels" / "train2017"
    assert sorted(p.stem for p in ds.orphans) == ["000000000656", "000000000659"]
    assert sorted(p.stem for p in ds.negatives) == ["000000000250", "000000000508"]
    for name in ("000000000656", "000000000659"):
        with pytest.raises(DataError, match=f"{name}.txt.*no image"):
            ds[name]
    for name in ("000000000250", "000000000508"):
        assert len(ds[name].segments) == 0
    gray = root / "images" / "train2017" / "000000000086.jpg"
    assert Image.open(gray).mode == "L"
    assert ds["000000000086"].image.shape[2] == 3

    checked = 0
    for i in range(len(ds)):
        sample = ds[i]
        h, w = sample.image.shape[:2]
        label = ds.label_path(i)
        lines = [ln.split() for ln in label.read_text().splitlines() if ln.strip()] if label.is_file() else []
        seg = sample.segments
        assert len(seg) == len(lines), label
        assert seg.category_ids.tolist() == [int(ln[0]) for ln in lines]
        areas = seg.areas()
        for k, line in enumerate(lines):
            points = np.array(line[1:], dtype=float).reshape(-1, 2) * [w, h]
            area, perimeter = _polygon_area_and_perimeter(points)
            if len(np.unique(points, axis=0)) == len(points):
                # rasterisation differs from the exact area by at most the boundary pixels
                assert abs(areas[k] - area) <= 0.5 * perimeter + 2, (label, k, areas[k], area)
            else:
                # Ultralytics joins a multi-part object into one path with zero-width bridges
                # (repeated vertices); the shoelace sum of such a path is not the area it covers,
                # so compare with an independent rasteriser instead.
                ref = Image.new("L", (w, h))
                ImageDraw.Draw(ref).polygon([tuple(p) for p in points], fill=1)
                assert abs(areas[k] - int(np.asarray(ref).sum())) <= perimeter + 2, (label, k)
            checked += 1
    assert checked > 900


def test_yolo_bad_lines_and_clipping(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    Image.new("RGB", (20, 10), (9, 9, 9)).save(images / "a.jpg")
    Image.new("RGB", (20, 10), (9, 9, 9)).save(images / "b.png")
    (labels / "a.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n1 -0.5 0.0 1.5 0.0 1.5 1.0 -0.5 1.0\n")
    (labels / "zzz.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n")
    ds = YoloSegmentation(images, labels, names=["x", "y"])
    assert len(ds) == 2 and [p.name for p in ds.orphans] == ["zzz.txt"]
    with pytest.warns(UserWarning, match=r"a\.txt:2: .*clipped"):
        sample = ds["a"]
    assert len(sample.segments) == 2 and sample.segments.areas()[1] == 200  # clipped to the whole image
    assert len(ds["b"].segments) == 0  # no label file: a negative
    with pytest.raises(DataError, match="no image named"):
        ds["nothing"]
    bad_lines = {
        "0 0.1 0.1 0.9 0.1 0.9": "at least 6",  # two points
        "0 0.1 0.1 0.9 0.1 0.9 0.9 0.5": "even number",
        "p 0.1 0.1 0.9 0.1 0.9 0.9": "class must be an integer",
        "7 0.1 0.1 0.9 0.1 0.9 0.9": "class 7 out of range",
        "0 0.1 0.1 0.9 zero 0.9 0.9": "must be numbers",
    }
    for line, message in bad_lines.items():
        (labels / "a.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n\n" + line + "\n")
        with pytest.raises(DataError, match=rf"a\.txt:3: .*{message}"):
            ds["a"]
    (labels / "a.txt").write_text("1 0.5 0.5 0.5 0.4\n")  # a box line: cx cy w h
    assert ds["a"].segments.areas().tolist() == [40]
    assert parse_label_file(labels / "a.txt", 2)[0][1].shape == (4, 2)


# --------------------------------------------------------------------------- COCO panoptic
def test_coco_panoptic_sample_matches_json(shared_data: Path) -> None:
    root = shared_data / "coco_panoptic_sample"
    ds = CocoPanoptic(
        root / "panoptic_examples.json",
        images_dir=root / "input_images",
        categories_file=root / "panoptic_coco_categories.json",
    )
    assert len(ds) == 2
    assert (
        len(ds.categories) == 133
        and len(ds.categories.thing_ids) == 80
        and len(ds.categories.stuff_ids) == 53
    )
    data = json.loads((root / "panoptic_examples.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for i, sample in enumerate(ds):
        ann = data["annotations"][i]
        assert sample.image_id == ann["image_id"] and sample.image.shape == (*sizes[ann["image_id"]], 3)
        seg = sample.segments
        info = ann["segments_info"]
        assert seg.segment_ids.tolist() == [s["id"] for s in info]
        assert seg.category_ids.tolist() == [s["category_id"] for s in info]
        assert seg.iscrowd.tolist() == [bool(s["iscrowd"]) for s in info]
        assert seg.areas().tolist() == [s["area"] for s in info]
        png = rgb_to_id(np.asarray(Image.open(root / "panoptic_examples" / ann["file_name"]).convert("RGB")))
        np.testing.assert_array_equal(seg.id_map, png)


def test_coco_panoptic_writer_round_trips(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "coco_panoptic_sample"
    ds = CocoPanoptic(root / "panoptic_examples.json")
    data = json.loads((root / "panoptic_examples.json").read_text())
    out_json = tmp_path / "out" / "panoptic_out.json"
    with CocoPanopticWriter(out_json, ds.categories) as writer:
        for sample in ds:
            writer.add(sample.image_id, sample.segments, file_name=sample.file_name)
    assert not list(out_json.parent.glob(".*tmp")), "temporary files left behind"
    again = CocoPanoptic(out_json)  # PNG folder found by the COCO naming convention
    written = json.loads(out_json.read_text())
    assert len(again) == len(ds) == 2 and again.categories == ds.categories
    for i in range(len(ds)):
        np.testing.assert_array_equal(again[i].segments.id_map, ds[i].segments.id_map)
        assert again[i].segments.id_map.dtype == np.int32
        keys = ("id", "category_id", "iscrowd", "area", "bbox")
        expected = [{k: s[k] for k in keys} for s in data["annotations"][i]["segments_info"]]
        assert written["annotations"][i]["segments_info"] == expected


def test_panoptic_pq_fixtures_without_photos(shared_data: Path) -> None:
    root = shared_data / "panoptic_pq_fixtures"
    data = json.loads((root / "coco_gt.json").read_text())
    ds = open_dataset({"format": "coco_panoptic", "annotations": str(root / "coco_gt.json")})
    assert len(ds) == 4 and len(ds.categories) == 6 and ds.categories.thing_ids == [1, 2, 4, 6]
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for sample, ann in zip(ds, data["annotations"], strict=True):
        assert sample.image.shape == (*sizes[ann["image_id"]], 3) and not sample.image.any()
        assert sample.segments.areas().tolist() == [s["area"] for s in ann["segments_info"]]
        assert sample.segments.category_ids.tolist() == [s["category_id"] for s in ann["segments_info"]]
    pred = CocoPanoptic(root / "coco_pred.json")
    team = next(i for i, a in enumerate(pred.annotations) if a["file_name"] == "team.png")
    with pytest.warns(UserWarning, match="segment id 0 is void"):
        assert len(pred[team].segments) == 8  # 9 listed, id 0 is void as in the official tool


# --------------------------------------------------------------------------- ADE20K
def test_ade20k_sample(shared_data: Path) -> None:
    root = shared_data / "ade20k_sample"
    ds = ade20k(root)
    assert len(ds) == 3 and len(ds.categories) == 150 and ds.ignore_index == 0
    assert ds.categories.ids == list(range(1, 151))
    assert ds.categories[1].name == "wall" and ds.categories[1].isthing is False
    assert ds.categories[150].name == "flag" and ds.categories[150].isthing is True
    for i in range(len(ds)):
        sample = ds[i]
        label = load_label_png(ds.pairs[i][1])
        assert 0 not in sample.segments.category_ids
        assert sorted(sample.segments.category_ids.tolist()) == sorted(set(np.unique(label).tolist()) - {0})
        np.testing.assert_array_equal(sample.segments.to_semantic(void_value=0), label)
        assert (sample.segments.id_map[label == 0] == 0).all()


# --------------------------------------------------------------------------- COCO instances
def test_coco_instances_and_results_evaluate_to_ap_1(shared_data: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = shared_data / "voc_coco_instances_sample"
    ann_file = root / "annotations.json"
    data = json.loads(ann_file.read_text())
    ds = CocoInstances(ann_file, root)
    assert len(ds) == 3 and ds.categories.ids == list(range(21))
    predictions = {}
    for i, sample in enumerate(ds):
        info = data["images"][i]
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
        seg = sample.segments
        assert sample.image_id == info["id"] and sample.image.shape == (info["height"], info["width"], 3)
        assert seg.overlapping and len(seg) == len(anns)
        assert seg.category_ids.tolist() == [a["category_id"] for a in anns]
        for area, ann in zip(seg.areas(), anns, strict=True):
            # labelme's areas come from its own rasteriser; ours is pycocotools'
            assert abs(area - ann["area"]) <= 0.05 * ann["area"] + 20
        predictions[sample.image_id] = seg
    out = tmp_path / "results.json"
    results = write_results(out, predictions)
    assert len(results) == len(data["annotations"]) and json.loads(out.read_text()) == results
    assert all(isinstance(r["segmentation"]["counts"], str) and r["score"] == 1.0 for r in results)
    # COCOeval records a match by storing the ground-truth annotation id and tests it for > 0,
    # so a ground truth with id 0 (this file has one) always counts as unmatched. Renumber.
    for ann in data["annotations"]:
        ann["id"] += 1
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        evaluator = COCOeval(gt, gt.loadRes(str(out)), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def _coco_json(path: Path, annotations: list | None, *, size=(4, 6)) -> Path:
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": size[0], "width": size[1]}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 10, "name": "dog"}],
    }
    if annotations is not None:
        data["annotations"] = annotations
    path.write_text(json.dumps(data))
    return path


def test_coco_instances_all_segmentation_encodings(tmp_path: Path) -> None:
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[1:3, 2:5] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    uncompressed = {"size": [4, 6], "counts": [int(c) for c in _runs(mask)]}
    anns = [
        {"id": 1, "image_id": 7, "category_id": 10, "segmentation": [[2, 1, 5, 1, 5, 3, 2, 3]], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 3, "segmentation": uncompressed, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 3,
         "segmentation": {"size": [4, 6], "counts": compressed["counts"].decode()}, "iscrowd": 0},
    ]  # fmt: skip
    ds = CocoInstances(_coco_json(tmp_path / "a.json", anns))  # no images folder: annotations only
    sample = ds[0]
    assert sample.image.shape == (4, 6, 3) and not sample.image.any()
    seg = sample.segments
    assert seg.category_ids.tolist() == [10, 3, 3] and seg.iscrowd.tolist() == [False, True, False]
    for i in range(3):
        np.testing.assert_array_equal(seg.mask(i), mask.astype(bool))
    results = write_results(tmp_path / "r.json", [(7, seg)])
    assert [r["category_id"] for r in results] == [10, 3]  # the crowd region is not a prediction
    assert results[0]["bbox"] == [2.0, 1.0, 3.0, 2.0]


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F")
    runs, current, count = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(count)
            current, count = v, 0
        count += 1
    return runs + [count]


# --------------------------------------------------------------------------- Cityscapes
def test_cityscapes_label_table() -> None:
    assert len(CITYSCAPES_LABELS) == 34 and [lab.id for lab in CITYSCAPES_LABELS] == list(range(34))
    train = [lab for lab in CITYSCAPES_LABELS if lab.train_id != 255]
    assert sorted(lab.train_id for lab in train) == list(range(19))
    things = [lab.name for lab in CITYSCAPES_LABELS if lab.has_instances]
    assert things == [
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "caravan",
        "trailer",
        "train",
        "motorcycle",
        "bicycle",
    ]
    cats = cityscapes_categories("train")
    assert cats.names[:3] == ["road", "sidewalk", "building"] and cats.thing_ids == list(range(11, 19))
    assert len(cityscapes_categories("label")) == 33
    label_ids = np.arange(34)
    train_ids = label_to_train_ids(label_ids)
    assert train_ids[7] == 0 and train_ids[26] == 13 and train_ids[33] == 18 and train_ids[9] == 255
    assert label_to_train_ids(np.array([200]))[0] == 255
    round_trip = train_to_label_ids(train_ids)
    evaluated = train_ids != 255
    np.testing.assert_array_equal(round_trip[evaluated], label_ids[evaluated])
    assert (round_trip[~evaluated] == 0).all()


def _cityscapes_tree(root: Path, *, label_size=(6, 8)) -> tuple[np.ndarray, np.ndarray]:
    label = np.full((6, 8), 7, dtype=np.uint8)  # road
    inst = label.astype(np.uint16)
    label[0:2, 0:3] = 26  # car 1
    inst[0:2, 0:3] = 26001
    label[0:2, 4:6] = 26  # car 2
    inst[0:2, 4:6] = 26002
    label[3:5, 0:2] = 26  # a crowd of cars
    inst[3:5, 0:2] = 26
    label[3:5, 3:5] = 24  # person
    inst[3:5, 3:5] = 24000
    label[5, 6:8] = 9  # parking: evaluated in no benchmark -> void in train ids
    inst[5, 6:8] = 9
    label[5, 0] = 0  # unlabeled
    inst[5, 0] = 0
    img_dir = root / "leftImg8bit" / "val" / "aachen"
    gt_dir = root / "gtFine" / "val" / "aachen"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    stem = "aachen_000000_000019"
    Image.new("RGB", (8, 6), (50, 60, 70)).save(img_dir / f"{stem}_leftImg8bit.png")
    Image.fromarray(label).resize(label_size[::-1], Image.NEAREST).save(
        gt_dir / f"{stem}_gtFine_labelIds.png"
    )
    Image.fromarray(inst).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    return label, inst


def test_cityscapes_reader_on_synthetic_files(tmp_path: Path) -> None:
    label, inst = _cityscapes_tree(tmp_path)
    ds = Cityscapes(tmp_path, "val")
    assert len(ds) == 1 and ds.ignore_index == 255 and len(ds.categories) == 19
    sample = ds[0]
    seg = sample.segments
    assert sample.image.shape == (6, 8, 3) and sample.image_id == "aachen_000000_000019"
    by_id = {
        int(s): (int(c), bool(k))
        for s, c, k in zip(seg.segment_ids, seg.category_ids, seg.iscrowd, strict=True)
    }
    assert by_id == {
        7: (0, False),
        26: (13, True),
        24000: (11, False),
        26001: (13, False),
        26002: (13, False),
    }
    assert seg.areas()[seg.segment_ids.tolist().index(26001)] == 6
    expected = label_to_train_ids(label).astype(np.int64)
    np.testing.assert_array_equal(seg.to_semantic(void_value=255), expected)
    assert len(seg.to_instances()) == 3  # two cars and a person; the crowd is left out

    full = Cityscapes(tmp_path, "val", label_space="label")[0].segments
    assert 9 in full.category_ids and 0 not in full.category_ids
    np.testing.assert_array_equal(full.to_semantic(void_value=0), label)

    out = write_semantic_result(seg, tmp_path / "results" / "aachen_000000_000019.png")
    written = np.asarray(Image.open(out))
    np.testing.assert_array_equal(written, np.where(expected == 255, 0, label))  # void -> 0

    txt = write_instance_results(seg, tmp_path / "inst", "aachen_000000_000019")
    lines = [ln.split() for ln in txt.read_text().splitlines()]
    assert sorted(int(ln[1]) for ln in lines) == [24, 26, 26]  # labelIds; the crowd is left out
    for rel, label_id, _ in lines:
        mask = np.asarray(Image.open(txt.parent / rel)) > 0
        assert (label[mask] == int(label_id)).all()


def test_cityscapes_bad_files(tmp_path: Path) -> None:
    _cityscapes_tree(tmp_path, label_size=(5, 8))
    with pytest.raises(DataError, match="labelIds.png: label map size 8x5 does not match"):
        Cityscapes(tmp_path, "val")[0]
    with pytest.raises(DataError, match="gtFine/test"):
        Cityscapes(tmp_path, "test")
    gt = next((tmp_path / "gtFine").rglob("*_labelIds.png"))
    Image.fromarray(np.full((6, 8), 40, dtype=np.uint8)).save(gt)
    with pytest.raises(DataError, match=r"labelIds.png: unknown label id\(s\) \[40\]"):
        Cityscapes(tmp_path, "val")[0]


# --------------------------------------------------------------------------- label_folder list files
def test_label_folder_list_file_relative_and_segnet_paths(tmp_path: Path) -> None:
    """Relative list entries are taken as written under the root; SegNet's absolute paths from
    another machine are re-rooted to ROOT/<last folder>/<name>; existing absolute paths are kept."""
    root = tmp_path / "ds"
    label = np.array([[0, 1, 2, 2, 1, 0], [2, 2, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [2, 1, 0, 2, 1, 0]], np.uint8)
    image = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)

    def write_pair(image_path: str, label_path: str) -> None:
        for rel, array in ((image_path, image), (label_path, label)):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / rel)

    write_pair("images/train/x.jpg", "semantic/train/x.png")
    write_pair("train/y.png", "trainannot/y.png")
    (root / "train.txt").write_text("images/train/x.jpg semantic/train/x.png\n\n")
    ds = open_dataset({"format": "label_folder", "list_file": str(root / "train.txt"), "classes": ["a", "b", "c"]})
    assert ds.pairs == [(root / "images/train/x.jpg", root / "semantic/train/x.png")]
    loaded_image, loaded_label = ds.load_pair(0)
    assert loaded_image.shape == (4, 6, 3)
    np.testing.assert_array_equal(loaded_label, label)

    cats = CategoryTable.from_names(["a", "b", "c"])
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("images/train/x.jpg semantic/train/x.png\n")
    ds = LabelFolderDataset.from_list_file(lists / "train.txt", root=root, categories=cats)  # root given
    assert ds.pairs == [(root / "images/train/x.jpg", root / "semantic/train/x.png")]

    (root / "segnet.txt").write_text("/SegNet/CamVid/train/y.png /SegNet/CamVid/trainannot/y.png\n")
    ds = LabelFolderDataset.from_list_file(root / "segnet.txt", categories=cats)
    assert ds.pairs == [(root / "train/y.png", root / "trainannot/y.png")]
    np.testing.assert_array_equal(ds.load_pair(0)[1], label)

    (lists / "absolute.txt").write_text(f"{root / 'images/train/x.jpg'} {root / 'semantic/train/x.png'}\n")
    ds = LabelFolderDataset.from_list_file(lists / "absolute.txt", categories=cats)  # exists: as written
    assert ds.pairs == [(root / "images/train/x.jpg", root / "semantic/train/x.png")]

    (root / "val.txt").write_text("images/val/z.jpg semantic/val/z.png\n")
    ds = LabelFolderDataset.from_list_file(root / "val.txt", categories=cats)
    with pytest.raises(DataError, match=r"images/val/z\.jpg: file not found"):  # not re-rooted to ROOT/val
        ds[0]


# --------------------------------------------------------------------------- open_dataset
def test_open_dataset_every_format(shared_data: Path, tmp_path: Path) -> None:
    d = shared_data
    specs = {
        "camvid": ({"root": d / "camvid", "split": "val"}, 101),
        "label_folder": (
            {"images": d / "ade20k_sample/sampleData/images", "labels": d / "ade20k_sample/sampleData/annotations",
             "classes": [str(i) for i in range(151)], "ignore_index": 0}, 3),
        "coco": ({"annotations": d / "voc_coco_instances_sample/annotations.json"}, 3),
        "coco_panoptic": ({"annotations": d / "panoptic_pq_fixtures/coco_gt.json"}, 4),
        "ade20k": ({"root": d / "ade20k_sample"}, 3),
        "yolo": ({"images": d / "coco128_seg/images/train2017"}, 128),
    }  # fmt: skip
    _cityscapes_tree(tmp_path)
    specs["cityscapes"] = ({"root": tmp_path, "load_images": False}, 1)
    for fmt, (spec, n) in specs.items():
        ds = open_dataset(
            {"format": fmt, **{k: str(v) if isinstance(v, Path) else v for k, v in spec.items()}}
        )
        assert len(ds) == n, fmt
        assert isinstance(ds.categories, CategoryTable) and hasattr(ds, "ignore_index")
        sample = ds[0]
        assert sample.segments.image_size == sample.image.shape[:2]
    # the CLI's FORMAT:ROOT[:SPLIT] form, resolved by each format's usual layout
    short = {
        ("coco", "voc_coco_instances_sample", None): 3,
        ("coco_panoptic", "coco_panoptic_sample", "panoptic_examples"): 2,
        ("coco_panoptic", "panoptic_pq_fixtures", "coco_gt"): 4,
        ("yolo", "coco128_seg", "train2017"): 128,
        ("yolo", "coco128_seg", None): 128,
    }
    for (fmt, folder, split), n in short.items():
        spec = {"format": fmt, "root": str(d / folder)} | ({"split": split} if split else {})
        ds = open_dataset(spec)
        assert len(ds) == n, spec
        assert ds[0].image.any() == (folder != "panoptic_pq_fixtures")  # photos found where they exist
    with pytest.raises(DataError, match="no coco_panoptic data found for split None"):
        open_dataset({"format": "coco_panoptic", "root": str(d / "coco_panoptic_sample")})
    with pytest.raises(DataError, match="unknown dataset format 'voc2'"):
        open_dataset({"format": "voc2"})
    with pytest.raises(DataError, match=r"unknown \['img'\]"):
        open_dataset({"format": "coco", "annotations": "a.json", "img": "x"})
    with pytest.raises(DataError, match=r"missing \['annotations'\]"):
        open_dataset({"format": "coco"})


def test_formats_are_declared_once(capsys: pytest.CaptureFixture[str]) -> None:
    """FORMATS, ROOT_LAYOUTS and the CLI help all come from DATASET_FORMATS."""
    from omniseg.cli import main
    from omniseg.show import DATASET_CHOICES

    assert list(FORMATS) == list(DATASET_FORMATS)
    assert all(FORMATS[name] == (f.required, f.optional) for name, f in DATASET_FORMATS.items())
    assert ROOT_LAYOUTS == {name: f.root_layout for name, f in DATASET_FORMATS.items() if f.root_layout}
    assert set(ROOT_LAYOUTS) == {"camvid", "coco", "coco_panoptic", "cityscapes", "cityscapes_polygons", "ade20k", "yolo"}
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    cli_help = capsys.readouterr().out
    assert DATASET_CHOICES == formats_help() and DATASET_CHOICES in cli_help
    for name, f in DATASET_FORMATS.items():
        if f.root_layout:
            usage = f"  {name}:ROOT{':SPLIT' if f.split_required else '[:SPLIT]'}"
            assert f"{usage}  " in DATASET_CHOICES or f"{usage}\n" in DATASET_CHOICES  # a long name gets its own line
        else:  # opened from explicit paths only: named at the end
            assert name in DATASET_CHOICES.split("one of", 1)[1].split("e.g.", 1)[1]
    assert max(len(line) for line in DATASET_CHOICES.splitlines()) <= 100
    assert "``coco_panoptic``" in open_dataset.__doc__  # the keys documentation is generated too


# --------------------------------------------------------------------------- bad input
def test_missing_and_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json: file not found"):
        CocoInstances(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2,')
    with pytest.raises(DataError, match="bad.json: malformed JSON at line 1"):
        CocoInstances(bad)
    with pytest.raises(DataError, match="bad.json: malformed JSON"):
        CocoPanoptic(bad)


def test_coco_annotation_list_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"a.json: missing key\(s\) \['annotations'\]"):
        CocoInstances(_coco_json(tmp_path / "a.json", None))
    ds = CocoInstances(_coco_json(tmp_path / "b.json", []))  # an empty list: all negatives
    assert len(ds) == 1 and len(ds[0].segments) == 0
    pan = tmp_path / "p.json"
    pan.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataError, match="p.json: missing key 'annotations'"):
        CocoPanoptic(pan)


def test_coco_unknown_category_and_size_mismatch(tmp_path: Path) -> None:
    poly = [[0, 0, 3, 0, 3, 3]]
    unknown = [{"id": 5, "image_id": 7, "category_id": 4, "segmentation": poly}]
    with pytest.raises(DataError, match=r"u.json: annotation 5: unknown category id 4"):
        CocoInstances(_coco_json(tmp_path / "u.json", unknown))
    rle = mask_utils.encode(np.asfortranarray(np.ones((5, 6), dtype=np.uint8)))
    wrong = [{"id": 6, "image_id": 7, "category_id": 3,
              "segmentation": {"size": [5, 6], "counts": rle["counts"].decode()}}]  # fmt: skip
    with pytest.raises(DataError, match=r"w.json: annotation 6: mask size 6x5 does not match its image 6x4"):
        CocoInstances(_coco_json(tmp_path / "w.json", wrong))[0]
    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (6, 5)).save(images / "a.jpg")  # the JSON says 6x4
    ok = [{"id": 1, "image_id": 7, "category_id": 3, "segmentation": poly}]
    with pytest.raises(DataError, match=r"a.jpg: image size 6x5 does not match 6x4"):
        CocoInstances(_coco_json(tmp_path / "s.json", ok), images)[0]
    (images / "a.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    with pytest.raises(DataError, match="a.jpg: not a readable image"):
        CocoInstances(_coco_json(tmp_path / "s.json", ok), images)[0]


def test_coco_panoptic_bad_files(tmp_path: Path) -> None:
    pngs = tmp_path / "pan"
    pngs.mkdir()
    id_map = np.zeros((4, 6), dtype=np.int32)
    id_map[:2] = 300
    id_map[2:, :3] = 70000
    Image.fromarray(id_to_rgb(id_map)).save(pngs / "a.png")
    info = [{"id": 300, "category_id": 1, "iscrowd": 0}, {"id": 70000, "category_id": 2, "iscrowd": 0}]
    cats = [{"id": 1, "name": "sky", "isthing": 0}, {"id": 2, "name": "car", "isthing": 1}]

    def write(segments_info, height=4) -> Path:
        path = tmp_path / "pan.json"
        path.write_text(json.dumps({
            "images": [{"id": 1, "file_name": "a.jpg", "height": height, "width": 6}],
            "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segments_info}],
            "categories": cats,
        }))  # fmt: skip
        return path

    seg = CocoPanoptic(write(info))[0].segments
    assert seg.areas().tolist() == [12, 6] and seg.categories.thing_ids == [2]
    with pytest.raises(DataError, match="pan.json: image 1: segment 70000 has unknown category id 9"):
        CocoPanoptic(write([info[0], {"id": 70000, "category_id": 9}]))
    with pytest.raises(DataError, match=r"a.png: segment id\(s\) \[70000\] are in the PNG but not"):
        CocoPanoptic(write(info[:1]))[0]
    with pytest.raises(DataError, match="a.png: size 6x4 does not match its image 6x5"):
        CocoPanoptic(write(info, height=5))[0]
    Image.new("L", (6, 4)).save(pngs / "a.png")
    with pytest.raises(DataError, match="a.png: panoptic PNG must be RGB"):
        CocoPanoptic(write(info))[0]


def test_label_folder_bad_labels(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    Image.new("RGB", (5, 4)).save(images / "a.png")
    cats = CategoryTable.from_names(["a", "b", "c"])
    label = np.zeros((4, 5), dtype=np.uint8)
    label[0, 0] = 7
    Image.fromarray(label).save(labels / "a.png")
    ds = LabelFolderDataset.from_folders(images, labels, categories=cats, ignore_index=255)
    with pytest.raises(DataError, match=r"labels/a.png: unknown category id\(s\) \[7\]"):
        ds[0]
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(labels / "a.png")
    with pytest.raises(DataError, match="labels/a.png: label map size 6x4 does not match its image 5x4"):
        ds[0]
    Image.new("RGB", (5, 4)).save(labels / "a.png")
    with pytest.raises(DataError, match="labels/a.png: label PNG must be single-channel"):
        ds[0]
    (labels / "a.png").unlink()
    with pytest.raises(DataError, match="labels/a.png: label file for image .*a.png not found"):
        LabelFolderDataset.from_folders(images, labels, categories=cats)


def test_images_exif_rgba_corrupt(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "rot.jpg")
    assert image.shape == (40, 20, 3)
    assert image[5, 10, 0] > 200 and image[5, 10, 2] < 50  # the left (red) half is now on top
    assert image[35, 10, 2] > 200 and image[35, 10, 0] < 50

    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded.shape == (3, 4, 3) and (loaded[..., 1] == 200).all()

    (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DataError, match="garbage.jpg: not a readable image"):
        load_image(tmp_path / "garbage.jpg")
    with pytest.raises(DataError, match="absent.png: file not found"):
        load_image(tmp_path / "absent.png")


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing leaves the file that was there before untouched, and no debris."""
    target = tmp_path / "results.json"
    write_results(target, {1: Segments.from_masks(np.ones((1, 2, 2)), [3])})
    before = target.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_results(target, {1: Segments.from_masks(np.ones((1, 2, 2)), [4])})
    with pytest.raises(OSError, match="disk full"):
        write_semantic_result(np.zeros((2, 2), dtype=np.uint8), tmp_path / "results.json")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
