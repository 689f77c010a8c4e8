"""Training engine: config overrides, atomic checkpoints, exact resume, 2-process DDP, CLI round trip."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniseg.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from omniseg.cli import main
from omniseg.engine.config import apply_overrides
from omniseg.engine.train import train


def _tiny_dataset(root: Path, n: int = 4, size=(48, 64)) -> dict:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    for i in range(n):
        label = np.zeros(size, dtype=np.uint8)
        label[: size[0] // 2] = 1
        label[:, : size[1] // 3] = 2
        label[0, :5] = 255
        image = (rng.random((*size, 3)) * 60 + label[..., None] * 60).astype(np.uint8)
        Image.fromarray(image).save(root / "img" / f"{i:03d}.png")
        Image.fromarray(label).save(root / "lab" / f"{i:03d}.png")
    return {"format": "label_folder", "images": str(root / "img"), "labels": str(root / "lab"),
            "classes": ["a", "b", "c"], "ignore_index": 255}


def _config(tmp_path: Path, **train) -> dict:
    spec = _tiny_dataset(tmp_path / "data")
    return {
        "model": {"name": "deeplabv3plus", "backbone": "efficientnet_lite0", "output_stride": 16,
                  "pretrained_backbone": False, "class_weights": "auto"},
        "data": {"train": spec, "val": spec, "crop_size": [32, 48], "scale_range": [0.8, 1.2],
                 "batch_size": 2, "num_workers": 0, "cache": True},
        "train": {"epochs": 2, "lr": 1e-3, "out_dir": str(tmp_path / "run"), "progress_bar": False,
                  "seed": 3, **train},
    }


def test_overrides_parse_yaml_values():
    config = apply_overrides({"train": {"epochs": 3}}, ["train.epochs=5", "data.crop_size=[64, 64]", "train.flip=true"])
    assert config == {"train": {"epochs": 5, "flip": True}, "data": {"crop_size": [64, 64]}}
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["epochs"])


def test_train_writes_checkpoint_logs_and_curve(tmp_path):
    out = train(_config(tmp_path))
    state, meta = read_checkpoint(out / "best")
    assert meta["model"]["name"] == "deeplabv3plus" and len(meta["categories"]) == 3
    assert len(meta["val"]["per_class_iou"]) == 3
    assert meta["val"]["miou"] == pytest.approx(np.nanmean(meta["val"]["per_class_iou"]))
    # `best` holds the epoch with the highest logged validation mIoU
    import csv

    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        logged = [float(row["val/miou"]) for row in csv.DictReader(f) if row.get("val/miou")]
    assert len(logged) == 2 and meta["val"]["miou"] == pytest.approx(max(logged), abs=1e-6)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert (out / "last.ckpt").is_file() and (out / "training_curve.png").is_file()
    assert (out / "logs" / "version_0" / "metrics.csv").read_text().count("\n") > 2


def test_resume_continues_exactly(tmp_path, monkeypatch):
    from omniseg.engine.module import SegmentationTask

    straight = train(_config(tmp_path / "a", epochs=2))
    # the same run, stopped after its first epoch (2 steps) with its 2-epoch schedule unchanged
    # (train.max_steps would shorten the schedule itself), then resumed
    first = _config(tmp_path / "b", epochs=2)
    batch_end = SegmentationTask.on_train_batch_end

    def stop_after_two_steps(self, outputs, batch, batch_idx):
        batch_end(self, outputs, batch, batch_idx)
        self.trainer.should_stop = self.global_step >= 2

    with monkeypatch.context() as patch:
        patch.setattr(SegmentationTask, "on_train_batch_end", stop_after_two_steps)
        train(first)
    resumed = train(first, resume=True)
    a = torch.load(straight / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(resumed / "last.ckpt", weights_only=False)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    out = train(_config(tmp_path, epochs=1, devices=2, strategy="ddp_spawn", accelerator="cpu", threads=1))
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2
    assert ranks["identical"] and len(ranks["weights_sha256"]) == 2


def test_checkpoint_write_is_atomic_and_errors_are_clear(tmp_path):
    model = torch.nn.Conv2d(3, 2, 1)
    from omniseg.structures import CategoryTable

    cats = CategoryTable.from_names(["a", "b"])
    save_checkpoint(tmp_path / "m", model, model_config={"name": "x"}, categories=cats, half=True)
    state, _ = read_checkpoint(tmp_path / "m.safetensors")
    assert state["weight"].dtype == torch.float32
    torch.testing.assert_close(state["weight"], model.weight.detach().half().float())
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="m.json: malformed JSON"):
        read_checkpoint(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing")


def test_cli_train_then_evaluate_and_segment(tmp_path, capsys):
    config = _config(tmp_path, epochs=1, val_flip=True, val_scales=[1.25])
    config["data"]["val_batch_size"] = 1
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml"), "train.epochs=1"]) == 0
    ckpt = str(Path(config["train"]["out_dir"]) / "best")
    spec = config["data"]["val"]
    # evaluate takes FORMAT:ROOT:SPLIT; a label_folder run goes through its checkpoint API instead
    from omniseg.evaluate import evaluate_checkpoint

    result, _ = evaluate_checkpoint(ckpt, spec, progress=False)
    # one inference path: the validation figure that picked `best` is what evaluate reports,
    # with the test-time flip and scale recorded in the checkpoint
    meta = json.loads(Path(ckpt + ".json").read_text())
    # and the validation images' size, which those scales are relative to (the toy frames: 48 x 64)
    assert meta["inference"] == {"flip": True, "scales": [1.25], "reference_size": [48, 64]}
    assert result["miou"] == pytest.approx(meta["val"]["miou"], abs=1e-12)
    assert result["per_class_iou"] == pytest.approx(meta["val"]["per_class_iou"], abs=1e-12)
    from omniseg.predictor import load_predictor

    predictor = load_predictor(ckpt)
    image = np.asarray(Image.open(Path(spec["images"]) / "000.png"))
    recorded, plain = predictor.predict(image), predictor.predict(image, flip=False, scales=[1.0])
    assert not np.allclose(recorded.scores, plain.scores)  # the recorded settings do reach the model
    out = tmp_path / "seg"
    assert main(["segment", spec["images"], "--model", ckpt, "--out", str(out)]) == 0
    labels = np.asarray(Image.open(out / "000_labels.png"))
    assert labels.shape == (48, 64) and set(np.unique(labels)) <= {0, 1, 2}
    meta = json.loads((out / "000.json").read_text())
    assert {s["category_name"] for s in meta["segments"]} <= {"a", "b", "c"}
    # a second run skips what is done; a corrupt image is reported, not fatal
    (Path(spec["images"]) / "zzz.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["segment", spec["images"], "--model", ckpt, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "skipping 4 image(s) already segmented" in err and "zzz.png: not a readable image" in err


def test_test_time_views_run_at_their_scales_and_merge_as_mean_probabilities():
    from omniseg.inference import TestTimeAugmentation, run_model

    seen = []

    class Recorder(torch.nn.Module):
        tasks = ("semantic",)

        def forward(self, images):
            seen.append(tuple(images.shape[-2:]))
            return images[:, :2] * 2  # "logits" that depend on the pixels

    images = torch.randn(1, 3, 20, 30)
    merged = run_model(Recorder(), images, TestTimeAugmentation(flip=True, scales=(1.5,)))
    assert seen == [(30, 45), (30, 45)]  # both views at 1.5x
    assert merged.shape == (1, 2, 20, 30)
    # by hand: each view back at 20x30 (the flipped one un-flipped), softmax, mean, log
    up = torch.nn.functional.interpolate(images, scale_factor=1.5, mode="bilinear", align_corners=False)
    views = [Recorder()(up), Recorder()(up.flip(-1)).flip(-1)]
    back = [torch.nn.functional.interpolate(v, size=(20, 30), mode="bilinear", align_corners=False) for v in views]
    expected = torch.stack([b.softmax(1) for b in back]).mean(0)
    assert torch.allclose(merged.softmax(1), expected, atol=1e-6)
    plain = run_model(Recorder(), images, TestTimeAugmentation())
    assert seen[-1] == (20, 30) and torch.equal(plain, images[:, :2] * 2)
