"""Every shipped training config builds the model it names, and asks for a task that model declares.

Configs are read by users first: a key the builder does not take, or a task the model has no
post-processing for, should fail here rather than ten minutes into a training run. The datasets
are not needed: the category tables come from the readers' fixed label spaces (Cityscapes,
CamVid) or COCO's class count, and ``class_weights: auto`` (derived from the training labels) is left
out."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniseg.data.cityscapes_polygons import cityscapes_panoptic_categories
from omniseg.data.label_folder import camvid_categories
from omniseg.engine.config import load_config
from omniseg.models import build_model, model_arguments

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_model(path: Path) -> None:
    config = load_config(path)
    model_cfg = dict(config["model"], pretrained_backbone=False)
    if model_cfg.get("class_weights") == "auto":
        model_cfg["class_weights"] = None
    if "categories" not in model_cfg and "num_classes" not in model_cfg:
        tables = {"cityscapes": cityscapes_panoptic_categories, "camvid": camvid_categories}
        table = tables.get(path.stem.split("_")[0])
        if table is not None and "categories" in model_arguments(model_cfg["name"]):
            model_cfg["categories"] = table().to_dicts()
        else:
            model_cfg["num_classes"] = 81  # COCO's 80 classes + background (coco128 configs)
    model = build_model(model_cfg)
    task = config.get("train", {}).get("task")
    if task is not None:
        assert task in model.tasks, f"{path.name}: train.task {task!r} not among {model.tasks}"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_every_config_is_collected() -> None:
    assert len(CONFIGS) >= 18, "configs/ moved: the test above would check nothing"
