"""Every shipped training config builds the model it names, and asks for a task that model declares.

Configs are read by users first: a key the builder does not take, or a task the model has no
post-processing for, should fail here rather than ten minutes into a training run. The config
goes through the training path's own :func:`omniseg.engine.train.model_config_for`; the datasets
are not needed: the category tables are the readers' fixed label spaces (Cityscapes, CamVid) or
80 stand-in COCO things (the coco128 configs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniseg.data.cityscapes_polygons import cityscapes_panoptic_categories
from omniseg.data.label_folder import camvid_categories
from omniseg.engine.config import load_config
from omniseg.engine.train import model_config_for
from omniseg.models import build_model
from omniseg.structures import CategoryTable

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def coco_things() -> CategoryTable:
    return CategoryTable.from_dicts([{"id": i + 1, "name": f"class{i + 1}", "isthing": 1} for i in range(80)])


TABLES = {"cityscapes": cityscapes_panoptic_categories, "camvid": camvid_categories, "coco128": coco_things}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_model(path: Path) -> None:
    config = load_config(path)
    categories = TABLES[path.stem.split("_")[0]]()
    model_cfg, _ = model_config_for({**config["model"], "pretrained_backbone": False}, categories)
    model = build_model(model_cfg)
    task = config.get("train", {}).get("task")
    if task is not None:
        assert task in model.tasks, f"{path.name}: train.task {task!r} not among {model.tasks}"


def test_every_config_is_collected() -> None:
    assert len(CONFIGS) >= 18, "configs/ moved: the test above would check nothing"
