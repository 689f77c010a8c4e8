"""``omniseg segment`` at scale: shards, manifests, output formats, progress and the Ray engine."""

from __future__ import annotations

import io
import json
import random
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniseg import batch
from omniseg.cli import main
from omniseg.errors import DataError
from omniseg.io import load_image
from omniseg.structures import CategoryTable, Segments, id_to_rgb

pytestmark = pytest.mark.usefixtures("one_thread")

CAMVID_VOID = 11  # CamVid's "unlabelled" label value


@pytest.fixture(scope="module")
def camvid_small(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """The first 3 CamVid train images and labels, scaled to 160x120 (real pictures, cheap to segment)."""
    from conftest import shared_data

    root = shared_data("camvid")
    tmp = tmp_path_factory.mktemp("camvid_small")
    images, labels = tmp / "images", tmp / "labels"
    images.mkdir()
    labels.mkdir()
    names = sorted(p.name for p in (root / "train").iterdir())[:3]
    for name in names:
        Image.open(root / "train" / name).convert("RGB").resize((160, 120), Image.BILINEAR).save(images / name)
        Image.open(root / "trainannot" / name).resize((160, 120), Image.NEAREST).save(labels / name)
    return images, labels, names


# ----------------------------------------------------------------------------- shards
def test_shards_partition_the_images_exactly_whatever_the_order():
    names = [Path(f"dir/{i:06d}_{c}.jpg") for i in range(300) for c in "ab"]
    parts = [batch.select_shard(names, (i, 3)) for i in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(names)  # every image exactly once
    assert all(len(part) > 150 for part in parts)  # and roughly evenly
    shuffled = random.Random(0).sample(names, len(names))
    assert [set(batch.select_shard(shuffled, (i, 3))) for i in range(3)] == [set(p) for p in parts]
    # by file name only, with a hash that is the same on every machine and every Python run
    assert batch.shard_of("000000000139.jpg", 4) == zlib.crc32(b"000000000139.jpg") % 4
    assert batch.select_shard([Path("a/x.png")], (batch.shard_of("x.png", 5), 5)) == [Path("a/x.png")]
    assert batch.select_shard(names, None) == names


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_bad_shard_is_a_clear_error(text, capsys):
    with pytest.raises(DataError, match="expected I/N with 0 <= I < N"):
        batch.parse_shard(text)
    assert main(["segment", "nowhere.png", f"--shard={text}"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_two_shards_into_one_folder_cover_the_job_and_a_final_run_assembles_it(camvid_small, tmp_path, capsys):
    images, _, names = camvid_small
    out = tmp_path / "out"
    for i in range(2):
        args = ["segment", str(images), "--out", str(out), "--outputs", "labels,panoptic", "--shard", f"{i}/2"]
        assert main(args) == 0
    assert sorted(p.name for p in out.glob("*_labels.png")) == sorted(n.replace(".png", "_labels.png") for n in names)
    per_shard = [json.loads((out / f"panoptic.shard-{i}-of-2.json").read_text()) for i in range(2)]
    ids = [[a["image_id"] for a in part["annotations"]] for part in per_shard]
    assert sorted(ids[0] + ids[1]) == sorted(Path(n).stem for n in names) and not set(ids[0]) & set(ids[1])
    capsys.readouterr()
    assert main(["segment", str(images), "--out", str(out), "--outputs", "labels,panoptic"]) == 0  # nothing to redo
    assert "skipping 3 image(s) already segmented" in capsys.readouterr().err
    whole = json.loads((out / "panoptic.json").read_text())
    assert [a["image_id"] for a in whole["annotations"]] == [Path(n).stem for n in names]


# ----------------------------------------------------------------------------- manifests
def test_manifest_relative_paths_comments_and_a_missing_file(camvid_small, tmp_path, capsys):
    images, _, names = camvid_small
    lists = tmp_path / "lists"
    lists.mkdir()
    manifest = lists / "paths.txt"
    manifest.write_text(
        f"# a comment\n../{images.name}/{names[0]}\n\n  {images / names[1]}  \nmissing/nothing.png\n",
        encoding="utf-8",
    )
    (tmp_path / images.name).symlink_to(images)  # ../images/NAME relative to the manifest's folder
    assert batch.read_manifest(manifest) == [
        lists / ".." / images.name / names[0], images / names[1], lists / "missing" / "nothing.png"
    ]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["segment", str(manifest), "--out", str(out), "--outputs", "labels"]) == 1  # a failure, no traceback
    err = capsys.readouterr().err
    assert "missing/nothing.png: file not found" in err and "1 of 3 image(s) could not be read" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(n.replace(".png", "_labels.png") for n in names[:2])


def test_same_stem_twice_in_one_job_is_an_error(tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "frame.png")
    manifest = tmp_path / "paths.txt"
    manifest.write_text("a/frame.png\nb/frame.png\na/frame.png\n")
    assert main(["segment", str(manifest), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "a/frame.png and" in err and "b/frame.png have the same file stem 'frame'" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "a" / "frame.jpg").write_bytes(b"")  # the same stem within one folder, too
    with pytest.raises(DataError, match="same file stem"):
        batch.collect_images(tmp_path / "a")


def test_bad_outputs_and_unknown_image_ids_are_clear_errors(camvid_small, tmp_path):
    images, _, _ = camvid_small
    with pytest.raises(DataError, match="unknown format.*choose from overlay,labels,json,coco"):
        batch.parse_outputs("labels,pngs")
    with pytest.raises(DataError, match="not a number.*--coco-images"):
        batch.resolve_image_ids(batch.collect_images(images), ("coco",))
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({"images": [{"id": 7, "file_name": "other.png"}]}))
    with pytest.raises(DataError, match="not among the images of"):
        batch.resolve_image_ids(batch.collect_images(images), ("coco",), annotations)
    assert batch.resolve_image_ids([tmp_path / "000000000139.jpg"], ("panoptic",)) == {}  # missing: fails later
    (tmp_path / "000000000139.jpg").write_bytes(b"")
    assert batch.resolve_image_ids([tmp_path / "000000000139.jpg"], ("coco",)) == {
        str(tmp_path / "000000000139.jpg"): 139
    }


# ----------------------------------------------------------------------------- COCO and panoptic files
def _ground_truth(labels: Path, names: list[str], categories: CategoryTable) -> dict[str, Segments]:
    return {
        n: Segments.from_semantic(np.asarray(Image.open(labels / n)), categories=categories, ignore_index=CAMVID_VOID)
        for n in names
    }


def test_coco_and_panoptic_files_score_what_the_predictions_score_in_memory(camvid_small, tmp_path, capsys):
    from omniseg.metrics.instance import InstanceAP
    from omniseg.metrics.panoptic import PanopticQuality
    from omniseg.predictor import load_predictor

    images, labels, names = camvid_small
    predictor = load_predictor()
    categories = predictor.categories
    gt = _ground_truth(labels, names, categories)
    image_ids = {n: 100 + i for i, n in enumerate(names)}
    instance_ap, pq = InstanceAP(categories), PanopticQuality(categories)
    gt_pan_dir = tmp_path / "gt_panoptic"
    gt_pan_dir.mkdir()
    gt_pan = {"annotations": [], "categories": categories.to_dicts()}
    for n in names:
        pred = predictor.predict(load_image(images / n), score_thresh=0.5)  # as omniseg segment runs it
        instance_ap.update(image_ids[n], gt[n], pred)
        pq.update_segments(gt[n], pred)
        id_map, info = gt[n].to_panoptic()
        Image.fromarray(id_to_rgb(id_map)).save(gt_pan_dir / n)
        gt_pan["annotations"].append({"image_id": image_ids[n], "file_name": n, "segments_info": info})
    gt_instances = instance_ap.gt_dataset()
    for ann in gt_instances["annotations"]:
        ann["segmentation"] = {**ann["segmentation"], "counts": ann["segmentation"]["counts"].decode("ascii")}
    gt_instances["images"] = [{**im, "file_name": n} for im, n in zip(gt_instances["images"], names, strict=True)]
    (tmp_path / "gt_instances.json").write_text(json.dumps(gt_instances))
    (tmp_path / "gt_panoptic.json").write_text(json.dumps(gt_pan))

    out = tmp_path / "out"
    seg = ["segment", str(images), "--out", str(out), "--outputs", "coco,panoptic", "--coco-images", str(tmp_path / "gt_instances.json")]
    assert main(seg) == 0
    capsys.readouterr()
    assert main(["evaluate", "--task", "instance", "--gt-json", str(tmp_path / "gt_instances.json"),
                 "--pred-json", str(out / "coco_results.json"), "--json"]) == 0  # fmt: skip
    from_files = json.loads(capsys.readouterr().out)
    in_memory = instance_ap.compute()
    assert from_files == in_memory  # exactly: the same masks, boxes and scores
    assert in_memory["segm"]["AP"] > 0  # cars are found: the comparison is not of two empty sets
    assert main(["evaluate", "--task", "panoptic", "--gt-json", str(tmp_path / "gt_panoptic.json"),
                 "--gt-dir", str(gt_pan_dir), "--pred-json", str(out / "panoptic.json"),
                 "--pred-dir", str(out / "panoptic"), "--json", "--workers", "1"]) == 0  # fmt: skip
    pan_files = json.loads(capsys.readouterr().out)
    expected = pq.compute()
    assert pan_files["All"] == expected["All"] and pan_files["Things"] == expected["Things"]
    assert pan_files["per_class"] == {str(k): v for k, v in expected["per_class"].items()}
    assert 0 < expected["All"]["pq"] < 1

    # resumable: an interrupted job (one image's files missing) is finished and the files re-assembled
    whole = (out / "coco_results.json").read_bytes(), (out / "panoptic.json").read_bytes()
    stem = Path(names[1]).stem
    (out / "parts" / "coco" / f"{stem}.json").unlink()
    (out / "coco_results.json").unlink()
    assert main(seg) == 0
    assert "skipping 2 image(s)" in capsys.readouterr().err
    assert ((out / "coco_results.json").read_bytes(), (out / "panoptic.json").read_bytes()) == whole


def test_cityscapes_label_ids(tmp_path, capsys):
    from omniseg.data.cityscapes import CITYSCAPES_LABELS

    categories = CategoryTable.from_dicts(
        [{"id": lab.id, "name": lab.name, "isthing": lab.has_instances} for lab in CITYSCAPES_LABELS if lab.train_id != 255]
    )
    batch.check_cityscapes_ids(categories, "city")
    label = np.full((6, 8), 255, dtype=np.uint8)
    label[:3] = 7  # road
    label[3:, :4] = 26  # car; the rest predicted as nothing
    segments = Segments.from_semantic(label, categories=categories)
    spec = batch.JobSpec(tmp_path, ("cityscapes", "labels"))
    batch.write_image_outputs(spec, tmp_path / "f.png", np.zeros((6, 8, 3), np.uint8), segments, view="semantic", model="city")
    label_ids = np.asarray(Image.open(tmp_path / "f_labelIds.png"))
    assert label_ids.dtype == np.uint8
    np.testing.assert_array_equal(label_ids, np.where(label == 255, 0, label))  # 0 = unlabeled
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f_labels.png")), label)  # 255 = none, as before
    camvid = CategoryTable.from_names(["sky", "building"])
    with pytest.raises(DataError, match="not Cityscapes labelIds.*id 0 is 'sky'; labelId 0 is 'unlabeled'"):
        batch.check_cityscapes_ids(camvid, "camvid")
    assert main(["segment", str(tmp_path / "f_labels.png"), "--outputs", "cityscapes", "--out", str(tmp_path / "o")]) == 2
    assert "not Cityscapes labelIds" in capsys.readouterr().err


def test_cityscapes_model_writes_label_ids(tmp_path):
    from omniseg.predictor import load_predictor

    image = (np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "street.png")
    assert main(["segment", str(tmp_path / "street.png"), "--model", "cityscapes-deeplabv3plus-lite0",
                 "--outputs", "cityscapes", "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    expected = load_predictor("cityscapes-deeplabv3plus-lite0").predict(image).to_semantic(void_value=0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "street_labelIds.png")), expected)


# ----------------------------------------------------------------------------- progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_is_one_line_per_step_with_a_summary():
    stream = io.StringIO()
    progress = batch.Progress(25, stream=stream, every=10, seconds=1e9, skipped=4)
    for i in range(25):
        progress.update(failed=i == 3)
    progress.error("skipped: x.png: not a readable image")
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(",")[0] for line in lines[:2]] == ["segment: 10/25 images", "segment: 20/25 images"]
    assert lines[0].endswith(" img/s, 1 failed, eta " + lines[0].rsplit("eta ", 1)[1]) and ":" in lines[0].rsplit("eta ", 1)[1]
    assert lines[2] == "skipped: x.png: not a readable image"
    assert lines[3].startswith("segment: done, 25 images in 0:00 (") and lines[3].endswith("1 failed, 4 skipped (already done)")
    assert len(lines) == 4

    quiet = io.StringIO()
    progress = batch.Progress(25, stream=quiet, quiet=True, every=1)
    for _ in range(25):
        progress.update()
    progress.error("skipped: y.png: file not found")
    progress.close()
    assert quiet.getvalue() == "skipped: y.png: file not found\n"  # errors only

    terminal = _Terminal()
    progress = batch.Progress(5, stream=terminal, every=1)
    for _ in range(5):
        progress.update()
    progress.close()
    assert "\r" in terminal.getvalue() and "5/5" in terminal.getvalue()  # a live tqdm bar


def test_progress_every_few_seconds(monkeypatch):
    clock = iter(range(0, 1000, 7))
    monkeypatch.setattr(batch.time, "monotonic", lambda: float(next(clock)))
    stream = io.StringIO()
    progress = batch.Progress(100, stream=stream, every=1000, seconds=20)
    for _ in range(9):
        progress.update()
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == ["segment: 3/100 images", "segment: 6/100 images", "segment: 9/100 images"]


# ----------------------------------------------------------------------------- Ray
def test_ray_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DataError, match=r"pip install 'omniseg\[ray\]'"):
        batch.run_ray(lambda: None, [], batch.JobSpec(tmp_path), batch.Progress(0))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_engine_writes_the_same_files_as_one_process(shared_data, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray Data is optional: pip install 'omniseg[ray]'")
    from omniseg.segment import segment_paths

    train = shared_data / "camvid" / "train"
    manifest = tmp_path / "paths.txt"  # real CamVid frames at full size, and one missing file
    manifest.write_text("\n".join(str(train / n) for n in sorted(p.name for p in train.iterdir())[:3]) + "\nnope.png\n")
    outputs = "overlay,labels,json,coco,panoptic"
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"images": [{"id": i, "file_name": p.name} for i, p in enumerate(batch.read_manifest(manifest))]}))
    common = dict(outputs=outputs, coco_images=ids, quiet=True)
    assert segment_paths(manifest, tmp_path / "local", **common) == 1
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert segment_paths(manifest, tmp_path / "ray", engine="ray", workers=2, threads_per_worker=1, **common) == 1
    finally:
        ray.shutdown()
    local, distributed = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert len(local) == 3 * 6 + 2  # 3 images x (overlay, labels, json, panoptic PNG, 2 fragments) + 2 job files
    # nothing is set aside: the JSON's image path is the manifest's, and inference is deterministic
    assert local.keys() == distributed.keys()
    assert [k for k in local if local[k] != distributed[k]] == []
