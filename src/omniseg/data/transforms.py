"""Shared pre-processing and augmentation (torchvision transforms v2, masks move with images)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from omniseg.data.normalize import IMAGENET_MEAN, IMAGENET_STD, to_model_input  # noqa: F401 (re-exported)
from omniseg.data.targets import SemanticMap


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range``, relative to each image's own size
    (v2 ships absolute-size resizes only; datasets of mixed sizes need a relative one)."""

    def __init__(self, scale_range: Sequence[float]) -> None:
        super().__init__()
        low, high = (float(s) for s in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be 0 < low <= high, got {list(scale_range)}")
        self.scale_range = (low, high)

    def make_params(self, flat_inputs: list) -> dict:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        h, w = v2.functional.get_size(image)
        scale = float(torch.empty(()).uniform_(*self.scale_range))
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt, params: dict):
        return v2.functional.resize(inpt, size=params["size"], antialias=True)


def train_transform(
    *,
    scale_range: Sequence[float] | None = None,
    crop_size: Sequence[int] | None = None,
    hflip: bool = True,
    color_jitter: float = 0.0,
    ignore_index: int = 255,
) -> v2.Compose:
    """The training augmentation of every task: random scale, random crop (padded: image 0,
    instance masks 0, the semantic map ``ignore_index``), horizontal flip, colour jitter.

    Applied to ``(tv_tensors.Image, target)`` with the typed target of
    :func:`omniseg.data.targets.training_target`, so boxes, masks and the semantic map move with
    the image; uint8 in, uint8 out.
    """
    steps: list = []
    if scale_range:
        steps.append(RandomScale(scale_range))
    if crop_size:
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: 0, SemanticMap: ignore_index, "others": 0}
        steps.append(v2.RandomCrop(tuple(crop_size), pad_if_needed=True, fill=fill))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    return v2.Compose(steps)
