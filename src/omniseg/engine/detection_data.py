"""Training data for the segment-based methods (instance, detection, panoptic): samples -> targets.

Every dataset yields :class:`~omniseg.structures.Sample` (image + ground-truth segments); this
wraps one so that a loader gives normalised image tensors of their own size (the model resizes
and pads) and the method's targets:

* ``instance`` / ``detection``: ``boxes``, ``labels`` (1..K), ``masks`` of the non-crowd things;
* ``panoptic``: the same plus ``semantic`` (stuff classes, things as one class, void ignored).

Validation items also carry the ground-truth :class:`Segments` and the image id, which the
metrics need. Scale jitter is the model's (``min_size`` as a list); this adds flip and colour.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from omniseg.data.images import DataError
from omniseg.data.transforms import to_model_input
from omniseg.structures import CategoryTable, Segments

TARGET_TASKS = ("instance", "detection", "panoptic")


def segments_target(segments: Segments, categories: CategoryTable, task: str) -> dict[str, Tensor]:
    """The training target of one image for ``task`` (see the module docstring)."""
    from omniseg.models.layers.detection import targets_from_segments
    from omniseg.models.panoptic_fpn import panoptic_targets_from_segments

    if task == "panoptic":
        return panoptic_targets_from_segments(segments, categories)
    if task in ("instance", "detection"):
        return targets_from_segments(segments, categories)
    raise ValueError(f"no segment targets for task {task!r}; expected one of {TARGET_TASKS}")


def hflip_target(target: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    flipped = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    flipped["boxes"] = boxes
    for key in ("masks", "semantic"):
        if key in target:
            flipped[key] = target[key].flip(-1)
    return flipped


class SegmentsTrainSet(Dataset):
    """``(image, target)`` for training, ``(image, target, gt_segments, image_id)`` with ``evaluation``."""

    def __init__(
        self,
        dataset,
        task: str,
        *,
        hflip: bool = False,
        color_jitter: float = 0.0,
        evaluation: bool = False,
    ) -> None:
        if task not in TARGET_TASKS:
            raise ValueError(f"task {task!r}: expected one of {TARGET_TASKS}")
        if task == "panoptic" and not (dataset.categories.thing_ids and dataset.categories.stuff_ids):
            raise DataError(
                "a panoptic model needs a dataset whose categories mark things and stuff "
                f"(this one has {len(dataset.categories.thing_ids)} things, {len(dataset.categories.stuff_ids)} stuff)"
            )
        self.dataset = dataset
        self.task = task
        self.categories: CategoryTable = dataset.categories
        self.hflip = hflip
        self.jitter = (
            v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
            if color_jitter
            else None
        )
        self.evaluation = evaluation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        target = segments_target(sample.segments, self.categories, self.task)
        image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)
        if self.jitter is not None:
            image = self.jitter(image)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            target = hflip_target(target, image.shape[-1])
        x = to_model_input(image)
        if self.evaluation:
            return x, target, sample.segments, sample.image_id
        return x, target


def collate_lists(batch: list[tuple]) -> tuple[list, ...]:
    """Images of different sizes stay a list; the model pads them."""
    return tuple(list(column) for column in zip(*batch, strict=True))
