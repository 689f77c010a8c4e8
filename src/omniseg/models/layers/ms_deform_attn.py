"""Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR), in plain PyTorch.

Each query looks at ``num_points`` locations per head and per feature level, placed around its
reference point by learnt offsets, and sums the bilinearly sampled values with learnt softmax
weights. The official CUDA kernel (``MSDeformAttnFunction``) is replaced by one ``F.grid_sample``
per level, which is what Deformable DETR's own ``ms_deform_attn_core_pytorch`` does and what runs
unchanged on CPU and CUDA.

Shapes: ``B`` batch, ``S`` flattened value positions over all levels, ``Q`` queries, ``M`` heads,
``D`` channels per head, ``L`` levels, ``P`` points per level and head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "multi_scale_deformable_attention"]


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sampled and weighted values: ``(B, Q, M * D)``.

    ``value (B, S, M, D)`` holds the levels' ``(H_l, W_l)`` maps (``spatial_shapes``) flattened row
    by row and concatenated; ``sampling_locations (B, Q, M, L, P, 2)`` are ``(x, y)`` in ``[0, 1]``
    of each level's extent (0 = left/top edge, 1 = right/bottom edge; outside reads zeros);
    ``attention_weights (B, Q, M, L, P)`` weight the samples (already normalised by the caller).
    """
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = [
        (int(h), int(w))
        for h, w in (spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes)
    ]
    if len(shapes) != levels:
        raise ValueError(f"{len(shapes)} spatial shapes for sampling locations over {levels} levels")
    per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants [-1, 1] and one (batch * head) image per sampling grid
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (B*M, Q, L, P, 2)
    samples = []
    for level, (h, w) in enumerate(shapes):
        image = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, channels, h, w)
        samples.append(
            F.grid_sample(
                image, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # (B*M, D, Q, P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, D, Q)
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable DETR's ``MSDeformAttn``: offsets and weights predicted from the query, values
    projected from the input maps, one output projection. Parameter names and initialisation are
    the reference implementation's (offsets start on a ring of directions, one per head, at
    distances 1..P; weights start uniform)."""

    def __init__(
        self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values  # onto the square's border
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Sequence[Sequence[int]],
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``query (B, Q, C)`` (position embedding already added), ``reference_points (B, Q, L, 2)``
        as ``(x, y)`` in ``[0, 1]``, ``value (B, S, C)`` the flattened levels of ``spatial_shapes``,
        ``padding_mask (B, S)`` True where ``value`` is padding -> ``(B, Q, C)``."""
        batch, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.embed_dim // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points).softmax(-1)
        weights = weights.view(batch, queries, heads, levels, points)
        # offsets are in pixels of each level: normalise by its (W, H)
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        )
        return self.output_proj(multi_scale_deformable_attention(value, spatial_shapes, locations, weights))
