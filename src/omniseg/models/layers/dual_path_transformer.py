"""MaX-DeepLab's dual-path transformer (Wang et al. 2021; deeplab2's
``dual_path_transformer.DualPathTransformerLayer``).

Two paths run side by side: the **pixel path** ``(B, C, H, W)`` (a CNN feature map, with axial
pixel-to-pixel attention in :class:`~omniseg.models.layers.axial_attention.AxialBlock`) and the
**memory path** ``(B, N, D)``, one vector per mask slot. One block communicates both ways:

* pixel-to-memory (P2M) feedback: each pixel attends over the ``N`` memory slots;
* memory-to-pixel and memory-to-memory (M2P, M2M) as one fused attention: each slot attends over
  the concatenation of the ``HW`` pixel keys and the ``N`` memory keys, a single softmax over
  ``HW + N`` (the paper's formulation), so slots weigh pixels against each other in one step;
* a feed-forward network on the memory.

Both attentions are multi-head scaled dot products; residuals are added after a linear/1x1
projection with batch norm (deeplab2 zero-initialises those batch norms' scale in the transformer
so that a fresh block starts as the identity; we keep the default so every parameter receives a
gradient from the first step). The block works at any stride: it can follow any backbone stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.layers.axial_attention import AxialBlock

__all__ = ["DualPathBlock", "DualPathTransformerLayer", "MemoryNorm", "multi_head_attention"]


def multi_head_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` per head: ``query (B, Lq, C)``, ``key (B, Lk, C)``,
    ``value (B, Lk, Cv)`` -> ``(B, Lq, Cv)``."""
    b, lq, c = query.shape
    lk, cv = key.shape[1], value.shape[-1]
    q = query.reshape(b, lq, num_heads, c // num_heads).transpose(1, 2)
    k = key.reshape(b, lk, num_heads, c // num_heads).transpose(1, 2)
    v = value.reshape(b, lk, num_heads, cv // num_heads).transpose(1, 2)
    attention = (q @ k.transpose(-1, -2) * (c // num_heads) ** -0.5).softmax(-1)
    return (attention @ v).transpose(1, 2).reshape(b, lq, cv)


class MemoryNorm(nn.BatchNorm1d):
    """Batch norm of ``(B, N, D)`` memory over batch and slots (deeplab2 normalises the memory
    projections the same way)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class DualPathTransformerLayer(nn.Module):
    """P2M feedback + fused M2P/M2M attention + memory FFN on ``(pixel (B, C, H, W), memory (B, N, D))``.

    ``key_channels`` (shared by queries and keys) and ``value_channels`` are the attention widths of
    both paths; ``num_heads`` heads.
    """

    def __init__(
        self,
        pixel_channels: int,
        memory_channels: int,
        *,
        key_channels: int = 128,
        value_channels: int = 256,
        num_heads: int = 8,
        ffn_channels: int = 2048,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_channels, self.value_channels = key_channels, value_channels
        qkv_pixel = 2 * key_channels + value_channels
        self.pixel_qkv = nn.Sequential(
            nn.Conv2d(pixel_channels, qkv_pixel, 1, bias=False), nn.BatchNorm2d(qkv_pixel)
        )
        self.memory_qkv = nn.Linear(memory_channels, qkv_pixel, bias=False)
        self.memory_qkv_norm = MemoryNorm(qkv_pixel)
        self.pixel_out = nn.Sequential(
            nn.Conv2d(value_channels, pixel_channels, 1, bias=False), nn.BatchNorm2d(pixel_channels)
        )
        self.memory_out = nn.Linear(value_channels, memory_channels, bias=False)
        self.memory_out_norm = MemoryNorm(memory_channels)
        self.ffn = nn.Sequential(
            nn.Linear(memory_channels, ffn_channels), nn.GELU(), nn.Linear(ffn_channels, memory_channels)
        )
        self.ffn_norm = MemoryNorm(memory_channels)

    def forward(self, pixel: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = pixel.shape
        split = [self.key_channels, self.key_channels, self.value_channels]
        pq, pk, pv = self.pixel_qkv(pixel).flatten(2).transpose(1, 2).split(split, dim=-1)  # (B, HW, .)
        mq, mk, mv = self.memory_qkv_norm(self.memory_qkv(memory)).split(split, dim=-1)  # (B, N, .)
        # P2M: pixels read the memory
        p2m = multi_head_attention(pq, mk, mv, self.num_heads)
        pixel = F.relu(pixel + self.pixel_out(p2m.transpose(1, 2).reshape(b, -1, h, w)))
        # M2P + M2M: one softmax over pixels and slots together
        fused = multi_head_attention(mq, torch.cat([pk, mk], 1), torch.cat([pv, mv], 1), self.num_heads)
        memory = F.relu(memory + self.memory_out_norm(self.memory_out(fused)))
        memory = F.relu(memory + self.ffn_norm(self.ffn(memory)))
        return pixel, memory


class DualPathBlock(nn.Module):
    """An axial block on the pixel path (pixel-to-pixel) followed by a :class:`DualPathTransformerLayer`:
    the unit MaX-DeepLab inserts after a backbone stage or a decoder stage."""

    def __init__(
        self,
        pixel_channels: int,
        memory_channels: int,
        *,
        axial_width: int | None = None,
        key_channels: int = 128,
        value_channels: int = 256,
        num_heads: int = 8,
        ffn_channels: int = 2048,
        span: int = 65,
        axial: bool = True,
    ) -> None:
        super().__init__()
        width = axial_width or pixel_channels // 2
        self.axial = (
            AxialBlock(pixel_channels, width=width, num_heads=num_heads, span=span) if axial else None
        )
        self.transformer = DualPathTransformerLayer(
            pixel_channels,
            memory_channels,
            key_channels=key_channels,
            value_channels=value_channels,
            num_heads=num_heads,
            ffn_channels=ffn_channels,
        )

    def forward(self, pixel: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        if self.axial is not None:
            pixel = self.axial(pixel)
        return self.transformer(pixel, memory)
