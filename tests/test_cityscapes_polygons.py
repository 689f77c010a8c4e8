"""Cityscapes panoptic ground truth from the YOLO polygon export: draw order, label space, crowd
groups, city splits (cities outside them never opened), natural aspect ratio and bad input.

Synthetic frames of the export's shape; the real export (Cityscapes' terms forbid shipping it) is
checked only where it has been fetched, outside the repository (see the README)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from omniseg.data import DataError, open_dataset
from omniseg.data.cityscapes_polygons import CityscapesPolygons, cityscapes_panoptic_categories

NAMES = ["road", "car", "persongroup", "license plate", "ego vehicle", "sky", "person", "cargroup"]
REAL = Path(os.environ.get("OMNISEG_CITYSCAPES_POLYGONS", Path(__file__).resolve().parents[2] / "data" /
                           "cityscapes_yolo" / "Cityscapes-3"))  # fmt: skip


def _rect(x0: float, y0: float, x1: float, y1: float) -> str:
    return f"{x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1}"


def _export(root: Path, frames: dict[str, list[str]], folder: str = "train") -> Path:
    (root / folder / "images").mkdir(parents=True, exist_ok=True)
    (root / folder / "labels").mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"names": NAMES, "nc": len(NAMES)}))
    for frame, lines in frames.items():
        stem = f"{frame}_leftImg8bit_png.rf.0123abcd"
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / folder / "images" / f"{stem}.jpg")
        (root / folder / "labels" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


FRAME = [
    f"0 {_rect(0, 0.5, 1, 1)}",  # road: bottom half
    f"5 {_rect(0, 0, 1, 0.5)}",  # sky: top half
    f"1 {_rect(0.1, 0.4, 0.3, 0.8)}",  # car A over road and sky
    f"1 {_rect(0.6, 0.6, 0.8, 0.9)}",  # car B
    f"3 {_rect(0.15, 0.7, 0.25, 0.75)}",  # license plate on car A: not drawn
    f"2 {_rect(0.4, 0.1, 0.5, 0.3)}",  # two persongroup polygons: one crowd segment
    f"2 {_rect(0.85, 0.1, 0.95, 0.3)}",
    f"6 {_rect(0.42, 0.15, 0.45, 0.25)}",  # a person drawn over the crowd region
    f"4 {_rect(0, 0.95, 1, 1)}",  # ego vehicle: void over the road
]


def test_polygons_paint_in_draw_order_with_cityscapes_labels(tmp_path):
    root = _export(tmp_path, {"aachen_000000_000019": FRAME, "dusseldorf_000001_000019": FRAME[:2]})
    dataset = CityscapesPolygons(root, "train")
    assert len(dataset) == 1 and dataset.categories == cityscapes_panoptic_categories()
    assert dataset.categories.ids[:3] == [7, 8, 11] and dataset.categories.thing_ids == [24, 25, 26, 27, 28, 31, 32, 33]
    sample = dataset[0]
    assert sample.image.shape == (640, 1280, 3) and sample.image_id == "aachen_000000_000019"
    segments = sample.segments
    semantic = segments.to_semantic(void_value=255)
    h, w = 640, 1280
    assert semantic[int(0.9 * h), int(0.5 * w)] == 7  # road
    assert semantic[int(0.2 * h), int(0.05 * w)] == 23  # sky
    assert semantic[int(0.45 * h), int(0.2 * w)] == 26  # car A painted over the sky ...
    assert semantic[int(0.72 * h), int(0.2 * w)] == 26  # ... and the license plate left it a car
    assert semantic[int(0.97 * h), int(0.5 * w)] == 255  # ego vehicle: void over the road
    assert semantic[int(0.2 * h), int(0.435 * w)] == 24  # the person over the crowd
    by_category = {}
    for cat, crowd in zip(segments.category_ids.tolist(), segments.iscrowd.tolist(), strict=True):
        by_category.setdefault(cat, []).append(crowd)
    # stuff: one segment per class; things: one per polygon; the two group polygons: one crowd segment
    assert by_category == {7: [False], 23: [False], 26: [False, False], 24: [True, False]}
    crowd = segments.subset(segments.iscrowd)
    assert crowd.areas()[0] == pytest.approx(2 * 0.1 * 0.2 * h * w - 0.03 * 0.1 * h * w, rel=0.05)


def test_city_splits_and_the_reserved_cities(tmp_path):
    root = _export(tmp_path, {"aachen_000000_000019": FRAME, "dusseldorf_000001_000019": FRAME[:2]}, "train")
    _export(root, {"bremen_000002_000019": FRAME[:3]}, "valid")
    # frames of a city no split lists, with garbage labels: opening any split must never read them
    _export(root, {"elsewhere_000003_000019": ["not a polygon"], "nowhere_000004_000019": ["9 1 2"]}, "test")
    train, val = CityscapesPolygons(root, "train"), CityscapesPolygons(root, "val")
    assert train.frame_ids == ["aachen_000000_000019", "bremen_000002_000019"]  # across the export's folders
    assert val.frame_ids == ["dusseldorf_000001_000019"]
    for split in ("test", "elsewhere", "all"):
        with pytest.raises(DataError, match="reserved for outside evaluation"):
            CityscapesPolygons(root, split)
    spec = {"format": "cityscapes_polygons", "root": str(root), "split": "val", "size": "320x640"}
    assert open_dataset(spec)[0].image.shape == (320, 640, 3)


@pytest.mark.parametrize(
    ("line", "message"),
    [("1 0.1 0.2 0.3 0.4 0.5", "even number"), (f"8 {_rect(0, 0, 1, 1)}", "class 8 out of range 0..7")],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    root = _export(tmp_path, {"aachen_000000_000019": [FRAME[0], line]})
    with pytest.raises(DataError, match=rf"leftImg8bit_png\.rf\.0123abcd\.txt:2: .*{message}"):
        CityscapesPolygons(root, "train")[0]


def test_missing_files_and_empty_frames(tmp_path):
    root = _export(tmp_path, {"aachen_000000_000019": FRAME, "bochum_000000_000019": []})
    with pytest.warns(UserWarning, match="1 frame\\(s\\) of train have no polygons"):
        dataset = CityscapesPolygons(root, "train")
    assert len(dataset.empty_frames) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(dataset[1].segments) == 0  # all void
    label = next((root / "train" / "labels").glob("bochum*"))
    label.rename(label.with_name("bochum_000009_000019_leftImg8bit.txt"))
    with pytest.raises(DataError, match="label file missing"):
        CityscapesPolygons(root, "train")
    next((root / "train" / "images").glob("bochum*")).unlink()
    with pytest.raises(DataError, match="label file has no image"):
        CityscapesPolygons(root, "train")


def test_the_real_export_splits_by_city():
    if not (REAL / "data.yaml").is_file():
        pytest.skip(f"the Cityscapes polygon export is not at {REAL} (fetch it as the README says; never shipped)")
    train, val = CityscapesPolygons(REAL, "train"), CityscapesPolygons(REAL, "val")
    assert (len(train), len(val)) == (1949, 221)
    assert {f.split("_")[0] for f in val.frame_ids} == {"dusseldorf"}
    sample = val[0]
    assert sample.image.shape == (640, 1280, 3)
    semantic = sample.segments.to_semantic(void_value=255)
    assert set(np.unique(semantic).tolist()) <= {*val.categories.ids, 255}
    assert (semantic == 7).mean() > 0.1  # a street scene: road covers a good part of the frame
