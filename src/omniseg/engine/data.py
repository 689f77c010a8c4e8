"""Training and validation data of every task: dataset samples -> model inputs and typed targets.

Every dataset yields :class:`~omniseg.structures.Sample` (image + ground-truth segments).
:class:`TrainingSet` gives normalised image tensors and the typed target of
:mod:`omniseg.data.targets` after the shared augmentation; :class:`EvaluationSet` gives normalised
images with their ground-truth ``Segments`` and image id, which the metrics take. Nothing here
depends on the method: what a model makes of a target happens in the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from omniseg.data.normalize import to_model_input
from omniseg.data.targets import finalize_target, training_target
from omniseg.structures import CategoryTable

__all__ = ["EvaluationSet", "TrainingSet", "collate"]


class TrainingSet(Dataset):
    """``(image, target)`` pairs for training.

    ``with_segments=False`` builds only the semantic map (semantic models), which keeps decoding
    and augmentation cheap. ``cache=True`` decodes every sample once up front: on a small CPU box
    decoding otherwise costs as much as a training step.
    """

    def __init__(
        self,
        dataset,
        transform: Callable | None = None,
        *,
        with_segments: bool = True,
        cache: bool = False,
        ignore_index: int = 255,
    ) -> None:
        self.dataset = dataset
        self.categories: CategoryTable = dataset.categories
        self.transform = transform
        self.with_segments = with_segments
        self.ignore_index = ignore_index
        self._cache = [self._load(i) for i in range(len(dataset))] if cache else None

    def _load(self, index: int) -> tuple[np.ndarray, dict[str, Tensor]]:
        sample = self.dataset[index]
        target = training_target(
            sample.segments, self.categories, with_segments=self.with_segments, ignore_index=self.ignore_index,
            box_only=sample.box_only,
        )  # fmt: skip
        if self.ignore_index < 256:  # a quarter of the memory in the cache; widened after the transforms
            target["semantic"] = target["semantic"].to(torch.uint8)
        return sample.image, target

    def raw(self, index: int) -> tuple[np.ndarray, dict[str, Tensor]]:
        """The decoded image and its target before augmentation."""
        return self._cache[index] if self._cache is not None else self._load(index)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = self.raw(index)
        image_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        if self.transform is not None:
            image_t, target = self.transform(image_t, dict(target))
        target = finalize_target(target)
        target["semantic"] = target["semantic"].long()
        return to_model_input(image_t.as_subclass(Tensor)), target


class EvaluationSet(Dataset):
    """``(image, ground-truth Segments, image id)`` for validation and evaluation."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.categories: CategoryTable = dataset.categories

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return to_model_input(sample.image), sample.segments, sample.image_id


def collate(batch: Sequence[tuple]) -> tuple:
    """Images of one size become a ``(B, 3, H, W)`` batch, of different sizes a list (the detectors
    resize and pad them); targets and ground truth stay lists."""
    columns = [list(column) for column in zip(*batch, strict=True)]
    images = columns[0]
    if len({tuple(image.shape) for image in images}) == 1:
        columns[0] = torch.stack(images)
    return tuple(columns)
