"""Centre-point heatmaps (CenterNet, Zhou et al. 2019): what point-based detectors share.

* :func:`gaussian_radius`: CenterNet's radius, the largest corner shift that keeps a box's IoU
  with the ground truth above ``min_overlap`` (CornerNet's three cases, with CenterNet's
  arithmetic kept as published, so heatmaps match models trained with its code);
* :func:`draw_gaussians`: every object's Gaussian splatted into its class channel at once
  (an element-wise maximum, as CenterNet's ``draw_umich_gaussian``);
* :func:`heatmap_peaks`: 3x3 max-pool peaks and the top ``k`` over all classes -- CenterNet's
  replacement for NMS.

Everything is batched over objects; coordinates are in heatmap cells (input pixels / stride).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["draw_gaussians", "gaussian_radius", "heatmap_peaks"]


def gaussian_radius(heights: Tensor, widths: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CenterNet's ``gaussian_radius((ceil(h), ceil(w)))`` truncated to an integer, per object.

    ``heights`` / ``widths`` are box sizes in heatmap cells. The three quadratics are
    CenterNet's as published (their roots differ from CornerNet's paper by a factor 2); we keep
    them because the focal loss was tuned on those radii. Computed in float64 like its NumPy.
    """
    h = torch.ceil(heights.double())
    w = torch.ceil(widths.double())
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    radius = torch.minimum(torch.minimum(r1, r2), r3)
    return radius.floor().clamp_min(0).long()


def draw_gaussians(
    centres: Tensor, radii: Tensor, channels: Tensor, num_maps: int, size: tuple[int, int]
) -> Tensor:
    """``(num_maps, H, W)`` heatmaps: object ``n``'s Gaussian around the integer cell
    ``centres[n] = (x, y)`` with ``sigma = (2 r + 1) / 6`` inside the ``(2 r + 1)^2`` window,
    maximised into map ``channels[n]`` (e.g. ``image * C + class``). The centre cell is exactly 1.

    The Gaussian is separable, so each object costs one ``H + W`` row and column and their outer
    product; CenterNet's cut of values below ``eps * max`` never bites inside the window
    (the corner value is about ``exp(-9)``) and is left out.
    """
    h, w = size
    out = torch.zeros((num_maps, h * w), dtype=torch.float32, device=centres.device)
    if len(centres) == 0:
        return out.view(num_maps, h, w)
    sigma = (2 * radii.float() + 1) / 6
    dx = torch.arange(w, device=centres.device)[None] - centres[:, :1]
    dy = torch.arange(h, device=centres.device)[None] - centres[:, 1:]
    gx = torch.exp(-(dx.float() ** 2) / (2 * sigma[:, None] ** 2)) * (dx.abs() <= radii[:, None])
    gy = torch.exp(-(dy.float() ** 2) / (2 * sigma[:, None] ** 2)) * (dy.abs() <= radii[:, None])
    gaussians = (gy[:, :, None] * gx[:, None, :]).flatten(1)
    out.scatter_reduce_(0, channels[:, None].expand_as(gaussians), gaussians, reduce="amax")
    return out.view(num_maps, h, w)


def heatmap_peaks(heat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``k`` highest local maxima (3x3 max-pool) of ``(B, C, H, W)`` scores, over all classes.

    Returns ``(scores, channels, ys, xs)``, each ``(B, k)`` (``k`` capped at ``C * H * W``),
    best first. A cell is a peak when it equals the maximum of its 3x3 neighbourhood, so equal
    neighbours on a plateau are all kept, as in CenterNet.
    """
    b, c, h, w = heat.shape
    keep = F.max_pool2d(heat, 3, stride=1, padding=1) == heat
    scores, index = (heat * keep).flatten(1).topk(min(k, c * h * w))
    channels = torch.div(index, h * w, rounding_mode="floor")
    cell = index - channels * (h * w)
    ys = torch.div(cell, w, rounding_mode="floor")
    return scores, channels, ys, cell - ys * w
