"""The shipped Cityscapes baselines: float16 zoo entries that document themselves and follow the
per-image output contract of ``omniseg segment`` on a 1280x640 street frame.

CI has no Cityscapes data (its terms forbid shipping it), so the frame is the repository's own
CamVid example resized to Cityscapes' 2:1 — a street scene, which is what the contract is about."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors import safe_open

from omniseg.cli import main
from omniseg.data.cityscapes_polygons import cityscapes_panoptic_categories
from omniseg.predictor import ZOO_DIR

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = {
    "cityscapes-deeplabv3plus-lite0": "semantic",
    "cityscapes-mask-rcnn-lite0": "instance",
    "cityscapes-panoptic-fpn-lite0": "panoptic",
}
LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@pytest.fixture(scope="module")
def street_frame(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("frames")
    image = Image.open(ROOT / "assets" / "camvid_0016E5_07959.png").convert("RGB").resize((1280, 640))
    image.save(folder / "street.jpg", quality=95)
    return folder


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_entry_is_float16_and_documents_itself(name):
    meta = json.loads((ZOO_DIR / f"{name}.json").read_text())
    assert meta["name"] == name and meta["task"] == ENTRIES[name]
    assert [c["id"] for c in meta["categories"]] == LABEL_IDS
    assert meta["categories"] == cityscapes_panoptic_categories().to_dicts()
    assert set(meta["inference"]) == {"flip", "scales", "reference_size"}
    assert meta["inference"]["reference_size"] == [640, 1280]  # the frames the figures are measured on
    assert meta["val"], "the validation figure the entry was selected on"
    assert meta["recipe"]["data"]["val"]["split"] == "val"
    with safe_open(str(ZOO_DIR / f"{name}.safetensors"), "pt") as f:
        floats = {str(f.get_tensor(k).dtype) for k in f.keys()} - {"torch.int64", "torch.int32", "torch.bool"}
    assert floats == {"torch.float16"}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_segment_follows_the_output_contract(name, street_frame, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(street_frame), "--model", name, "--out", str(out)]) == 0
    labels = np.asarray(Image.open(out / "street_labels.png"))
    assert labels.shape == (640, 1280) and set(np.unique(labels)) <= set(LABEL_IDS) | {255}
    record = json.loads((out / "street.json").read_text())
    assert (record["height"], record["width"]) == (640, 1280) and record["model"] == name
    ids = [s["id"] for s in record["segments"]]
    assert len(ids) == len(set(ids))
    painted = np.full((640, 1280), 255, np.int64)
    for s in record["segments"]:
        assert {"id", "category_id", "iscrowd", "score", "bbox", "area", "segmentation"} <= set(s)
        assert s["category_id"] in LABEL_IDS
        m = mask_utils.decode({"size": s["segmentation"]["size"], "counts": s["segmentation"]["counts"].encode()})
        assert int(m.sum()) == s["area"]
        painted[m.astype(bool)] = s["category_id"]
    if ENTRIES[name] != "instance":  # non-overlapping: the label PNG is the segments painted in
        np.testing.assert_array_equal(painted, labels)
    assert (out / "street_panoptic.png").is_file() == (ENTRIES[name] == "panoptic")
    assert (out / "street_overlay.png").is_file()


def test_json_describes_each_overlapping_instance_whole():
    """Instances overlap: each JSON entry's area, bbox and RLE are its own whole mask (a panoptic
    paint-over would shrink the lower one and could drop it), and the three agree."""
    from omniseg.predictor import segments_json
    from omniseg.structures import Segments

    masks = np.zeros((3, 20, 30), dtype=bool)
    masks[0, 2:12, 3:13] = True  # 100 px, lower score
    masks[1, 5:15, 8:18] = True  # overlaps it
    masks[2, 4:8, 4:8] = True  # inside mask 0 entirely, lowest score: hidden in a panoptic view
    segments = Segments.from_masks(masks, [26, 24, 26], scores=[0.6, 0.9, 0.3])
    entries = segments_json(segments, image_path="x.jpg", model="m")["segments"]
    assert [e["area"] for e in entries] == [100, 100, 16]
    assert [e["bbox"] for e in entries] == [[3.0, 2.0, 10.0, 10.0], [8.0, 5.0, 10.0, 10.0], [4.0, 4.0, 4.0, 4.0]]
    for entry, mask in zip(entries, masks, strict=True):
        decoded = mask_utils.decode({"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
