"""Axial attention with relative positions (Axial-DeepLab, Wang et al. 2020; deeplab2's
``axial_layers.AxialAttention`` and ``axial_blocks.AxialBlock``).

Full 2-D self-attention over an ``H x W`` map costs ``(HW)^2``; axial attention factorises it into
attention along each column (height axis) followed by attention along each row (width axis), each
pixel seeing its whole column, then its whole row. Per head, query ``q_o``, keys ``k_p`` and values
``v_p`` along the axis, and learned relative embeddings ``r`` indexed by the offset ``p - o``::

    y_o = sum_p softmax_p(q_o.k_p + q_o.r^q_{p-o} + k_p.r^k_{p-o}) (v_p + r^v_{p-o})

Offsets beyond ``span - 1`` share the outermost embedding (deeplab2 limits the span with its
``query_shape`` / memory flange). deeplab2 batch-normalises the three similarity terms separately;
we scale them by ``1/sqrt(d)`` instead (one fewer set of statistics for small CPU batches) and keep
its batch norm on the retrieved output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AxialAttention", "AxialBlock", "relative_index"]


def relative_index(length: int, span: int, device: torch.device | None = None) -> Tensor:
    """``(length, length)`` index of the embedding of offset ``p - o`` (row ``o``, column ``p``),
    offsets clipped to ``[-(span - 1), span - 1]`` and shifted to ``[0, 2 span - 2]``."""
    positions = torch.arange(length, device=device)
    offset = positions[None, :] - positions[:, None]
    return offset.clamp(-(span - 1), span - 1) + span - 1


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis (``axis=2``: height, ``axis=3``: width) of ``(B, C, H, W)``.

    Keys and queries have ``key_channels`` in total, values ``value_channels``, split over
    ``num_heads``; the output has ``value_channels`` channels (deeplab2: keys = input width,
    values = 2x, ``value_expansion``).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        axis: int,
        key_channels: int,
        value_channels: int,
        num_heads: int = 8,
        span: int = 65,
    ) -> None:
        super().__init__()
        if axis not in (2, 3):
            raise ValueError(f"axis must be 2 (height) or 3 (width), got {axis}")
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(
                f"{key_channels} key / {value_channels} value channels do not split into {num_heads} heads"
            )
        self.axis, self.num_heads, self.span = axis, num_heads, span
        self.key_dim, self.value_dim = key_channels // num_heads, value_channels // num_heads
        self.qkv = nn.Sequential(
            nn.Conv2d(in_channels, 2 * key_channels + value_channels, 1, bias=False),
            nn.BatchNorm2d(2 * key_channels + value_channels),
        )
        # one table per kind, shared by the heads (as Axial-DeepLab), offsets -(span-1)..span-1
        self.query_rel = nn.Parameter(torch.randn(2 * span - 1, self.key_dim) * self.key_dim**-0.5)
        self.key_rel = nn.Parameter(torch.randn(2 * span - 1, self.key_dim) * self.key_dim**-0.5)
        self.value_rel = nn.Parameter(torch.randn(2 * span - 1, self.value_dim) * self.value_dim**-0.5)
        self.out_norm = nn.BatchNorm2d(value_channels)

    def forward(self, x: Tensor) -> Tensor:
        # bring the attended axis last-but-one: (B * other, heads, L, d)
        if self.axis == 2:
            x = x.permute(0, 3, 1, 2)  # (B, W, C, H): columns, sequences along H
        else:
            x = x.permute(0, 2, 1, 3)  # (B, H, C, W): rows, sequences along W
        b, other, _, length = x.shape
        qkv = self.qkv(x.reshape(b * other, -1, length, 1)).reshape(b * other, -1, length)
        hk, hv = self.num_heads * self.key_dim, self.num_heads * self.value_dim
        q, k, v = qkv.split([hk, hk, hv], dim=1)
        q = q.reshape(-1, self.num_heads, self.key_dim, length).transpose(-1, -2)  # (n, h, L, dk)
        k = k.reshape(-1, self.num_heads, self.key_dim, length).transpose(-1, -2)
        v = v.reshape(-1, self.num_heads, self.value_dim, length).transpose(-1, -2)
        index = relative_index(length, self.span, x.device)
        rq, rk, rv = self.query_rel[index], self.key_rel[index], self.value_rel[index]  # (L, L, d)
        logits = q @ k.transpose(-1, -2)
        logits = logits + torch.einsum("nhod,opd->nhop", q, rq) + torch.einsum("nhpd,opd->nhop", k, rk)
        attention = (logits * self.key_dim**-0.5).softmax(-1)
        out = attention @ v + torch.einsum("nhop,opd->nhod", attention, rv)  # (n, h, L, dv)
        out = out.transpose(-1, -2).reshape(b * other, hv, length, 1)
        out = self.out_norm(out).reshape(b, other, hv, length)
        return out.permute(0, 2, 3, 1) if self.axis == 2 else out.permute(0, 2, 1, 3)


class AxialBlock(nn.Module):
    """deeplab2's axial bottleneck: 1x1 conv to ``width`` -> height attention -> width attention ->
    1x1 conv back to ``channels``, plus the residual (the pixel-to-pixel path of MaX-DeepLab)."""

    def __init__(self, channels: int, *, width: int, num_heads: int = 8, span: int = 65) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.height = AxialAttention(
            width, axis=2, key_channels=width, value_channels=width, num_heads=num_heads, span=span
        )
        self.width = AxialAttention(
            width, axis=3, key_channels=width, value_channels=width, num_heads=num_heads, span=span
        )
        self.act = nn.ReLU()
        self.expand = nn.Sequential(nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.width(self.act(self.height(self.reduce(x)))))
        return self.act(x + self.expand(y))
