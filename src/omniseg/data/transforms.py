"""Shared pre-processing and augmentation (torchvision transforms v2, masks move with images)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def semantic_train_transform(
    *,
    crop_size: Sequence[int] | None,
    short_side: int,
    scale_range: Sequence[float] = (0.75, 1.5),
    hflip: bool = True,
    color_jitter: float = 0.2,
    ignore_index: int = 255,
) -> v2.Compose:
    """Random scale (on the short side), random crop padded with ignore, flip, colour; uint8 in, uint8 out."""
    steps: list = [
        v2.RandomResize(int(short_side * scale_range[0]), int(short_side * scale_range[1]) + 1, antialias=True)
    ]
    if crop_size:
        steps.append(
            v2.RandomCrop(
                tuple(crop_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
            )
        )
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    return v2.Compose(steps)


def to_model_input(
    image: np.ndarray | torch.Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(H, W, 3) uint8`` array or ``(3, H, W) uint8`` tensor -> normalised ``(3, H, W) float32``."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    image = image.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image - mean_t) / std_t
