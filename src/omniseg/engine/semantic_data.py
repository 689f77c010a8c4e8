"""Semantic-segmentation training data: samples -> (normalised image, contiguous label) tensors."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from omniseg.data.transforms import to_model_input

IGNORE = 255
"""Ignore value of the contiguous training labels, whatever the dataset's own void id."""


class SemanticTrainSet(Dataset):
    """Wraps a label dataset (``load_pair``, ``categories``, ``ignore_index``) for training.

    Category ids map to contiguous indices ``0..C-1`` and the dataset's void id to :data:`IGNORE`.
    ``cache=True`` decodes every image once up front: on a small CPU box PNG decoding otherwise
    costs as much as a training step.
    """

    def __init__(self, dataset, transform=None, *, cache: bool = False) -> None:
        self.dataset = dataset
        self.transform = transform
        lookup = np.full(max(max(dataset.categories.ids), dataset.ignore_index) + 1, IGNORE, dtype=np.uint8)
        for index, cat_id in enumerate(dataset.categories.ids):
            lookup[cat_id] = index
        self.lookup = lookup
        self._cache = [self._load(i) for i in range(len(dataset))] if cache else None

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.dataset.load_pair(index)
        return image, self.lookup[label]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self._cache[index] if self._cache is not None else self._load(index)
        image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        label_t = tv_tensors.Mask(torch.from_numpy(label.astype(np.int64)))
        if self.transform is not None:
            image_t, label_t = self.transform(image_t, label_t)
        return to_model_input(image_t.as_subclass(torch.Tensor)), label_t.as_subclass(torch.Tensor).long()
