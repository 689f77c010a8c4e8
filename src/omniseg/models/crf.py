"""Fully-connected CRF refinement (DeepLab v1/v2) as an optional post-process.

The mean-field inference with Gaussian appearance and smoothness kernels is done by
``pydensecrf`` (PyPI ``pydensecrf2``): its permutohedral-lattice filtering makes the fully
connected pairwise term linear in the pixel count, which no pure-PyTorch code does as well.
Install with ``pip install 'omniseg[crf]'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CRFParams:
    """Kernel parameters in DeepLab's notation (w1, theta_alpha, theta_beta, w2, theta_gamma)."""

    iterations: int = 5
    appearance_weight: float = 4.0  # w1
    appearance_xy: float = 60.0  # theta_alpha, pixels
    appearance_rgb: float = 5.0  # theta_beta, intensity levels
    smoothness_weight: float = 3.0  # w2
    smoothness_xy: float = 3.0  # theta_gamma, pixels


def dense_crf(image: np.ndarray, probabilities: torch.Tensor | np.ndarray, params: CRFParams = CRFParams()) -> torch.Tensor:
    """Refine ``(C, H, W)`` class probabilities with a dense CRF over the ``(H, W, 3) uint8`` image."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise ImportError(
            "CRF refinement needs pydensecrf: pip install 'omniseg[crf]' (package pydensecrf2)"
        ) from None
    prob = probabilities.detach().cpu().numpy() if isinstance(probabilities, torch.Tensor) else probabilities
    num_classes, height, width = prob.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image {image.shape[:2]} and probabilities {(height, width)} differ in size")
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    unary = -np.log(np.clip(prob, 1e-8, 1.0)).reshape(num_classes, -1).astype(np.float32)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.smoothness_xy, compat=params.smoothness_weight)
    crf.addPairwiseBilateral(
        sxy=params.appearance_xy,
        srgb=params.appearance_rgb,
        rgbim=np.ascontiguousarray(image[..., :3].astype(np.uint8)),
        compat=params.appearance_weight,
    )
    refined = np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(num_classes, height, width)
    return torch.from_numpy(refined)
