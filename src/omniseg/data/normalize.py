"""The model input: an RGB image normalised as the backbone was pretrained.

Apart from :mod:`omniseg.data.transforms` (training augmentation, torchvision transforms v2)
because inference needs only this, and importing torchvision costs ~1-2 s of every start-up
(its ``ops`` pull in ``torch._dynamo``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(
    image: np.ndarray | torch.Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(H, W, 3) uint8`` array or ``(3, H, W) uint8`` tensor -> normalised ``(3, H, W) float32``."""
    if isinstance(image, np.ndarray):
        # torch cannot wrap a read-only array (a cached or memory-mapped image): copy that one
        array = np.ascontiguousarray(image) if image.flags.writeable else np.array(image)
        image = torch.from_numpy(array).permute(2, 0, 1)
    image = image.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image - mean_t) / std_t
