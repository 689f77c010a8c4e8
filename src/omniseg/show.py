"""``omniseg show``: draw one dataset sample's ground truth over its image and save a PNG."""

from __future__ import annotations

from pathlib import Path

from omniseg.data import DataError, formats_help, open_dataset
from omniseg.visualize import VIEWS, overlay, save_png

DATASET_CHOICES = formats_help()
"""Help text for the CLI's dataset argument (generated from :data:`omniseg.data.DATASET_FORMATS`)."""


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
