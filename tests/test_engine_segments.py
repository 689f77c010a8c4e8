"""The engine with instance, detection and panoptic models: dataset slices, panoptic sets from label
maps, train -> evaluate -> segment through the CLI, and a NaN loss that stops training cleanly."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from omniseg.checkpoint import read_checkpoint
from omniseg.cli import main
from omniseg.data import DataError, open_dataset
from omniseg.data.label_folder import components_as_instances
from omniseg.engine.train import train
from omniseg.structures import Category, CategoryTable

TINY_DETECTOR = {"backbone": "efficientnet_lite0", "pretrained_backbone": False, "min_size": 64, "max_size": 96,
                 "fpn_channels": 32}  # fmt: skip


def _boxes_dataset(root: Path, n: int = 4) -> dict:
    """COCO instances JSON with two rectangles of two classes on each of ``n`` 64x80 images."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    (root / "images").mkdir(parents=True)
    for i in range(n):
        image = (rng.random((64, 80, 3)) * 40).astype(np.uint8)
        for k, (cat, (x, y, w, h)) in enumerate([(3, (6 + i, 8, 24, 20)), (7, (44, 30 - i, 28, 26))]):
            image[y : y + h, x : x + w] = (200, 60, 60) if cat == 3 else (60, 200, 60)
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append({"id": 10 * i + k + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                                "segmentation": [polygon], "bbox": [x, y, w, h], "area": w * h})  # fmt: skip
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "height": 64, "width": 80})
    categories = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]
    (root / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return {"format": "coco", "annotations": str(root / "annotations.json"), "images": str(root / "images")}


def _panoptic_label_dataset(root: Path, n: int = 4) -> dict:
    """Label maps with road / sky stuff and separate "car" blobs, read as panoptic by components."""
    rng = np.random.default_rng(1)
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    for i in range(n):
        label = np.zeros((64, 80), dtype=np.uint8)  # 0 road
        label[:20] = 1  # 1 sky
        label[30:50, 5 + i : 25 + i] = 2  # 2 car, two separate blobs
        label[28:52, 45:70] = 2
        label[0, :4] = 255
        palette = np.array([[90, 90, 90], [80, 150, 230], [200, 40, 40]], dtype=np.uint8)
        image = palette[np.minimum(label, 2)] + (rng.random((64, 80, 3)) * 30).astype(np.uint8)
        Image.fromarray(image).save(root / "img" / f"{i:03d}.png")
        Image.fromarray(label).save(root / "lab" / f"{i:03d}.png")
    categories = [{"id": 0, "name": "road", "isthing": 0}, {"id": 1, "name": "sky", "isthing": 0},
                  {"id": 2, "name": "car", "isthing": 1}]  # fmt: skip
    return {"format": "label_folder", "images": str(root / "img"), "labels": str(root / "lab"),
            "categories": categories, "ignore_index": 255, "thing_instances": "components"}  # fmt: skip


def _config(spec: dict, model: dict, out_dir: Path, **train_cfg) -> dict:
    return {
        "model": model,
        "data": {"train": spec, "val": spec, "batch_size": 2, "val_batch_size": 2},
        "train": {"epochs": 1, "lr": 1e-3, "out_dir": str(out_dir), "progress_bar": False, "seed": 0, **train_cfg},
    }


def test_dataset_subset_is_a_slice_in_file_order(tmp_path):
    spec = _boxes_dataset(tmp_path / "d", n=5)
    full = open_dataset(spec)
    tail = open_dataset({**spec, "subset": "3:"})
    head = open_dataset({**spec, "subset": [0, 3]})
    assert (len(head), len(tail)) == (3, 2)
    assert tail[0].file_name == full[3].file_name and head[2].file_name == full[2].file_name
    assert tail.categories.ids == [3, 7]
    with pytest.raises(DataError, match="empty"):
        open_dataset({**spec, "subset": "9:"})
    with pytest.raises(DataError, match="START:STOP"):
        open_dataset({**spec, "subset": "1-3"})


def test_data_argument_takes_dataset_options():
    from omniseg.cli import parse_data_arg

    spec = parse_data_arg("camvid:data/camvid:val:thing_instances=components")
    assert spec == {"format": "camvid", "root": "data/camvid", "split": "val", "thing_instances": "components"}
    with pytest.raises(DataError, match="KEY=VALUE"):
        parse_data_arg("camvid:data/camvid:val:components")


def test_connected_components_become_thing_instances():
    categories = CategoryTable((Category(0, "road", False), Category(1, "car", True), Category(2, "person", True)))
    label = np.zeros((20, 30), dtype=np.int64)
    label[2:6, 2:6] = 1
    label[10:15, 20:28] = 1  # a second, separate car
    label[6, 6] = 1  # touches the first car diagonally: 8-connected, same instance
    label[15:18, 2:4] = 2
    label[0, 29] = 9  # void
    segments = components_as_instances(label, categories, ignore_index=9)
    assert sorted(segments.category_ids.tolist()) == [0, 1, 1, 2]
    areas = {int(c): [] for c in segments.category_ids}
    for cat, area in zip(segments.category_ids, segments.areas(), strict=True):
        areas[int(cat)].append(int(area))
    assert sorted(areas[1]) == [17, 40] and areas[2] == [6]
    assert segments.to_semantic(void_value=9)[0, 29] == 9
    assert (segments.to_semantic(void_value=9) == label).all()


@pytest.mark.slow
def test_instance_model_trains_evaluates_and_segments_through_the_cli(tmp_path, capsys):
    spec = _boxes_dataset(tmp_path / "data")
    config = _config(spec, {"name": "mask_rcnn", **TINY_DETECTOR}, tmp_path / "run", epochs=2)
    config["data"]["val_batch_size"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    ckpt = tmp_path / "run" / "best"
    _, meta = read_checkpoint(ckpt)
    assert [c["id"] for c in meta["categories"]] == [3, 7]
    assert {"mask_ap", "box_ap", "mask_ap50"} <= set(meta["val"])
    metrics_csv = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/mask_ap" in metrics_csv and (tmp_path / "run" / "training_curve.png").is_file()

    capsys.readouterr()
    root = Path(spec["annotations"]).parent
    # the validation figures that picked `best` are what evaluate reports on the same images
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", f"coco:{root}", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert max(full["segm"]["AP"], 0.0) == pytest.approx(meta["val"]["mask_ap"], abs=1e-12)
    assert max(full["bbox"]["AP50"], 0.0) == pytest.approx(meta["val"]["box_ap50"], abs=1e-12)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", f"coco:{root}", "--subset", "1:", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"segm", "bbox"} and set(result["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}

    out = tmp_path / "seg"
    from omniseg.predictor import load_predictor

    everything = load_predictor(str(ckpt)).predict(Path(spec["images"]) / "000.png")
    assert len(everything), "the tiny detector should detect something at score >= 0.05"
    cut = float(np.median(everything.scores))
    assert main(["segment", spec["images"], "--model", str(ckpt), "--out", str(out), "--score-thresh", str(cut)]) == 0
    labels = np.asarray(Image.open(out / "000_labels.png"))
    assert labels.shape == (64, 80) and set(np.unique(labels).tolist()) <= {3, 7, 255}
    segments = json.loads((out / "000.json").read_text())["segments"]
    # only detections scoring at least the threshold, with their scores (the JSON leaves out those
    # that higher-scoring ones cover entirely)
    kept = everything.scores[everything.scores >= cut]
    assert segments and all(s["score"] >= cut for s in segments) and len(segments) <= len(kept)
    assert all(np.isclose(kept, s["score"], rtol=1e-6).any() for s in segments)
    assert all(s["category_id"] in (3, 7) for s in segments)
    assert np.asarray(Image.open(out / "000_overlay.png")).shape[:2][1] == 80
    assert main(["segment", spec["images"], "--model", str(ckpt), "--out", str(out), "--crf", "--force"]) == 2
    assert "dense CRF refines per-pixel class scores" in capsys.readouterr().err


def test_box_detector_validates_on_box_ap(tmp_path):
    spec = _boxes_dataset(tmp_path / "data")
    out = train(_config(spec, {"name": "retinanet", **TINY_DETECTOR}, tmp_path / "run"))
    _, meta = read_checkpoint(out / "best")
    assert set(meta["val"]) == {"box_ap", "box_ap50"}


@pytest.mark.slow
def test_panoptic_model_trains_on_components_and_scores_pq(tmp_path):
    spec = _panoptic_label_dataset(tmp_path / "data")
    sample = open_dataset(spec)[0]
    assert sorted(sample.segments.category_ids.tolist()) == [0, 1, 2, 2]
    model = {"name": "panoptic_fpn", **TINY_DETECTOR, "semantic_channels": 16, "stuff_area_thresh": 16}
    config = _config(spec, model, tmp_path / "run")
    config["data"]["val_batch_size"] = 1
    out = train(config)
    _, meta = read_checkpoint(out / "best")
    assert {"pq", "pq_things", "pq_stuff"} <= set(meta["val"])

    from omniseg.evaluate import evaluate_checkpoint

    result, metric = evaluate_checkpoint(str(out / "best"), spec, progress=False)
    assert metric.monitor == "pq" and set(result["All"]) == {"pq", "sq", "rq", "n"}
    assert result["All"]["n"] == 3
    assert result["All"]["pq"] == pytest.approx(meta["val"]["pq"], abs=1e-12)  # validation == evaluate
    # the same model answers the other two tasks it declares
    semantic, _ = evaluate_checkpoint(str(out / "best"), spec, task="semantic", progress=False)
    assert len(semantic["per_class_iou"]) == 3
    with pytest.raises(ValueError, match="does not do 'detection'"):
        evaluate_checkpoint(str(out / "best"), spec, task="detection", progress=False)

    # segment writes the panoptic merge as it is: --score-thresh filters detections, not stuff
    from omniseg.predictor import load_predictor

    predicted = load_predictor(str(out / "best")).predict(Path(spec["images"]) / "000.png")
    assert len(predicted) and predicted.scores.max() < 1.0  # a score filter at 1.0 would drop them all
    seg_out = tmp_path / "seg"
    args = ["segment", str(Path(spec["images"]) / "000.png"), "--model", str(out / "best"), "--out", str(seg_out)]
    assert main([*args, "--score-thresh", "1.0"]) == 0
    written = json.loads((seg_out / "000.json").read_text())["segments"]
    assert len(written) == len(predicted)
    # the COCO-panoptic PNG: its ids are the JSON's segments, with their areas
    from omniseg.structures import rgb_to_id

    ids = rgb_to_id(np.asarray(Image.open(seg_out / "000_panoptic.png")))
    assert {s["id"]: s["area"] for s in written} == {int(i): int((ids == i).sum()) for i in np.unique(ids) if i}


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from omniseg.models.mask_rcnn import MaskRCNN

    spec = _boxes_dataset(tmp_path / "data")
    config = _config(spec, {"name": "mask_rcnn", **TINY_DETECTOR}, tmp_path / "run")
    out = train(config)
    last, best = (out / "last.ckpt").read_bytes(), (out / "best.safetensors").read_bytes()

    def nan_losses(self, images, targets):
        return {"loss_nan": sum(p.sum() for p in self.parameters()) * float("nan")}

    monkeypatch.setattr(MaskRCNN, "losses", nan_losses)
    config["train"]["epochs"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "c.yaml"), "--resume"]) == 2
    assert "non-finite training loss" in capsys.readouterr().err
    assert (out / "last.ckpt").read_bytes() == last and (out / "best.safetensors").read_bytes() == best
