"""``omniseg show``: draw one dataset sample's ground truth over its image and save a PNG."""

from __future__ import annotations

from pathlib import Path

from omniseg.data import DataError, open_dataset
from omniseg.visualize import VIEWS, overlay, save_png

DATASET_CHOICES = """\
FORMAT:ROOT[:SPLIT], one of
  camvid:ROOT[:SPLIT]         ROOT/SPLIT.txt lists image/label pairs; SPLIT train|val|test|trainval
  ade20k:ROOT[:SPLIT]         ROOT/objectInfo150.csv + ROOT/images/SPLIT, ROOT/annotations/SPLIT
                              (SPLIT training|validation), or ROOT/sampleData/{images,annotations}
  cityscapes:ROOT[:SPLIT]     ROOT/leftImg8bit/SPLIT + ROOT/gtFine/SPLIT (SPLIT train|val, default val)
  coco:ROOT[:SPLIT]           ROOT/annotations/instances_SPLIT.json + ROOT/SPLIT/, ROOT/SPLIT.json,
                              or ROOT/annotations.json without SPLIT
  coco_panoptic:ROOT:SPLIT    ROOT/annotations/panoptic_SPLIT.json (+ panoptic_SPLIT/ PNGs, ROOT/SPLIT/
                              photos), or ROOT/SPLIT.json + ROOT/SPLIT/ PNGs; no photos = black images
  yolo:ROOT[:SPLIT]           ROOT/images/SPLIT + ROOT/labels/SPLIT (polygon .txt files, COCO-80 names)
e.g. camvid:../shared/data/camvid:val, coco_panoptic:../shared/data/coco_panoptic_sample:panoptic_examples,
yolo:../shared/data/coco128_seg:train2017. From Python, open_dataset() also takes explicit paths."""
"""Help text for the CLI's dataset argument."""


def show_sample(dataset_spec: dict, index: int, out: Path, view: str = "panoptic") -> Path:
    """Overlay sample ``index`` of the dataset ``dataset_spec`` (see :func:`omniseg.data.open_dataset`)
    in ``view`` and write it as PNG to ``out``; returns the written path.

    ``out`` may be an existing folder: the file is then named ``{image stem}_{view}.png``.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    dataset = open_dataset(dataset_spec)
    n = len(dataset)
    if not -n <= index < n:
        raise DataError(f"index {index} out of range: the dataset has {n} samples")
    sample = dataset[index]
    out = Path(out)
    if out.is_dir():
        stem = Path(sample.file_name).stem or str(sample.image_id)
        out = out / f"{stem}_{view}.png"
    image = overlay(sample.image, sample.segments, view=view, categories=dataset.categories)
    return save_png(image, out)
