"""The shipped CamVid model: loads offline from the package and segments the example street scene."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import omniseg
from omniseg.cli import main
from omniseg.predictor import ZOO_DIR

ASSET = Path(__file__).resolve().parents[1] / "assets" / "camvid_0016E5_07959.png"


@pytest.fixture(scope="module")
def model():
    return omniseg.load("camvid-deeplabv3plus-lite0")


def test_zoo_checkpoint_is_small_and_documents_itself():
    weights = ZOO_DIR / "camvid-deeplabv3plus-lite0.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["metrics"]["miou_shipped_default"] >= 74
    assert meta["inference"] == {"flip": True, "scales": [1.5], "reference_size": [360, 480]}  # CamVid frames
    assert meta["training"]["command"].startswith("omniseg train")


def test_segments_the_example_street_scene(model):
    image = np.asarray(Image.open(ASSET).convert("RGB"))
    segments = model.predict(image, flip=False, scales=[1.0])
    labels = segments.to_semantic()
    assert labels.shape == image.shape[:2]
    names = model.categories.names
    # the frame's top rows are sky and its bottom centre is road (checked by eye against the ground truth)
    assert names[int(np.bincount(labels[:20, 200:280].ravel()).argmax())] == "sky"
    assert names[int(np.bincount(labels[-30:, 200:280].ravel()).argmax())] == "road"
    assert {"car", "building", "pavement"} <= {names[c] for c in np.unique(labels)}


def test_agrees_with_ground_truth_on_the_example(model, shared_data):
    label = np.asarray(Image.open(shared_data / "camvid" / "valannot" / ASSET.name.removeprefix("camvid_")))
    pred = model.predict(np.asarray(Image.open(ASSET).convert("RGB")), flip=False, scales=[1.0]).to_semantic()
    valid = label != 11
    assert (pred[valid] == label[valid]).mean() > 0.85


def test_main_command_writes_the_three_outputs(tmp_path):
    assert main(["segment", str(ASSET), "--out", str(tmp_path)]) == 0
    stem = ASSET.stem
    labels = np.asarray(Image.open(tmp_path / f"{stem}_labels.png"))
    assert labels.ndim == 2 and labels.max() <= 10
    meta = json.loads((tmp_path / f"{stem}.json").read_text())
    assert meta["model"] == "camvid-deeplabv3plus-lite0"
    assert sum(s["area"] for s in meta["segments"]) == labels.size
    assert (tmp_path / f"{stem}_overlay.png").is_file()


def test_evaluate_defaults_to_the_recorded_inference_settings(shared_data):
    from omniseg.evaluate import evaluate_checkpoint

    spec = {"format": "camvid", "root": str(shared_data / "camvid"), "split": "val"}

    def run(**tta):
        return evaluate_checkpoint("camvid-deeplabv3plus-lite0", spec, limit=2, progress=False, **tta)[0]

    recorded = run()
    assert recorded["miou"] == run(flip=True, scales=[1.5])["miou"]
    assert recorded["miou"] != run(flip=False, scales=[1.0])["miou"]
