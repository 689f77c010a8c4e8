"""``omniseg evaluate --save`` records a figure; ``omniseg export`` packages a checkpoint with it as a
zoo entry (float16 weights + JSON), which then loads and segments by path."""

import json

import pytest
import torch
from safetensors import safe_open

from omniseg.checkpoint import read_checkpoint, save_checkpoint
from omniseg.cli import main
from omniseg.data.cityscapes_polygons import cityscapes_panoptic_categories
from omniseg.models import build_model
from omniseg.predictor import load_predictor
from test_cityscapes_polygons import FRAME, _export


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    root = _export(tmp / "cityscapes", {"dusseldorf_000001_000019": FRAME, "dusseldorf_000002_000019": FRAME[:3]})
    categories = cityscapes_panoptic_categories()
    torch.manual_seed(0)
    config = {"name": "deeplabv3plus", "backbone": "efficientnet_lite0", "num_classes": len(categories),
              "pretrained_backbone": False, "decoder_channels": 16, "aspp_channels": 16}  # fmt: skip
    model = build_model(config).eval()
    ckpt = tmp / "run" / "best"
    # a quarter-scale test-time setting keeps the 1280x640 frames cheap
    save_checkpoint(ckpt, model, model_config=config, categories=categories,
                    extra={"task": "semantic", "inference": {"flip": False, "scales": [0.25]}, "val": {"miou": 0.1}})  # fmt: skip
    return ckpt, f"cityscapes_polygons:{root}:val", tmp


def test_evaluate_save_records_what_was_measured(checkpoint_and_data, capsys):
    ckpt, data, tmp = checkpoint_and_data
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", data, "--json", "--save", str(tmp / "sem.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((tmp / "sem.json").read_text())
    assert record["task"] == record["metric"] == "semantic"
    assert record["inference"] == {"flip": False, "scales": [0.25]}  # the checkpoint's recorded setting
    assert record["data"] == {"format": "cityscapes_polygons", "root": data.split(":")[1], "split": "val"}
    assert record["metrics"]["miou"] == pytest.approx(printed["miou"], abs=1e-12)
    # cross-task: the semantic output scored as panoptic (one segment per class); flip overridden
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", data, "--metric", "panoptic", "--flip",
                 "--json", "--save", str(tmp / "pq.json")]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((tmp / "pq.json").read_text())
    assert record["task"] == "semantic" and record["metric"] == "panoptic" and record["inference"]["flip"] is True
    assert record["metrics"]["pq"] == pytest.approx(printed["All"]["pq"], abs=1e-12)
    assert set(record["metrics"]) == {"pq", "pq_things", "pq_stuff"}


def test_export_writes_a_loadable_float16_zoo_entry(checkpoint_and_data, capsys):
    ckpt, data, tmp = checkpoint_and_data
    figure = tmp / "figure.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", data, "--save", str(figure)]) == 0
    zoo = tmp / "zoo"
    assert main(["export", "--model", str(ckpt), "--out", str(zoo), "--name", "tiny-city", "--figures", str(figure)]) == 0
    with safe_open(str(zoo / "tiny-city.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    meta = json.loads((zoo / "tiny-city.json").read_text())
    assert meta["name"] == "tiny-city" and meta["task"] == "semantic"
    assert meta["inference"] == {"flip": False, "scales": [0.25]}
    assert meta["figures"] == [json.loads(figure.read_text())]
    assert meta["categories"] == cityscapes_panoptic_categories().to_dicts()
    # the weights are the checkpoint's, rounded to float16, and nothing else
    original, _ = read_checkpoint(ckpt)
    exported, _ = read_checkpoint(zoo / "tiny-city")
    assert original.keys() == exported.keys()
    for key, value in original.items():
        expected = value.half().float() if value.is_floating_point() else value
        torch.testing.assert_close(exported[key], expected, rtol=0, atol=0, msg=key)
    # loadable by path, and it segments with the recorded setting
    predictor = load_predictor(zoo / "tiny-city")
    assert predictor.name == "tiny-city" and predictor.test_time_augmentation().scales == (0.25,)
    out = tmp / "seg"
    images = data.split(":")[1] + "/train/images"
    assert main(["segment", images, "--model", str(zoo / "tiny-city"), "--out", str(out)]) == 0
    assert len(list(out.glob("*_labels.png"))) == 2 and len(list(out.glob("*.json"))) == 2


def test_export_bad_input_is_a_clear_error(checkpoint_and_data, capsys):
    ckpt, _, tmp = checkpoint_and_data
    capsys.readouterr()
    assert main(["export", "--model", str(ckpt), "--out", str(tmp / "z"), "--name", "Bad Name"]) == 2
    assert "--name 'Bad Name'" in capsys.readouterr().err
    (tmp / "not_a_figure.json").write_text('{"miou": 1}')
    assert main(["export", "--model", str(ckpt), "--out", str(tmp / "z"), "--figures", str(tmp / "not_a_figure.json")]) == 2
    assert "not_a_figure.json: not a figures file" in capsys.readouterr().err
    assert main(["export", "--model", str(ckpt), "--out", str(ckpt.parent)]) == 2
    assert "overwrite its own source" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp / "missing"), "--out", str(tmp / "z")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp / "z").exists() or not list((tmp / "z").iterdir())  # nothing half-written


def test_one_pass_scores_every_metric_as_separate_evaluations_do(checkpoint_and_data):
    from omniseg.cli import parse_data_arg
    from omniseg.evaluate import evaluate_checkpoint, score_predictions

    ckpt, data, _ = checkpoint_and_data
    spec = parse_data_arg(data)
    predictor = load_predictor(ckpt)
    scored = score_predictions(predictor, spec, task="semantic", metrics=["semantic", "instance", "panoptic"], progress=False)
    assert scored.images == 2 and scored.seconds_per_image > 0
    for metric in ("semantic", "panoptic"):
        alone, _ = evaluate_checkpoint(predictor, spec, metric=metric, progress=False)
        assert json.dumps(alone, default=float) == json.dumps(scored.results[metric], default=float)


def test_evaluation_progress_in_a_log_is_lines_not_redraws(checkpoint_and_data, capsys):
    """Off a terminal (pytest's captured stderr is not one) evaluation reports as segment does:
    whole lines, no carriage-return redraws, and a summary without a 'skipped' count."""
    from omniseg.cli import parse_data_arg
    from omniseg.evaluate import score_predictions

    ckpt, data, _ = checkpoint_and_data
    capsys.readouterr()
    score_predictions(load_predictor(ckpt), parse_data_arg(data), task="semantic", metrics=["semantic"])
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "evaluate: done, 2 images in" in err and "skipped" not in err
