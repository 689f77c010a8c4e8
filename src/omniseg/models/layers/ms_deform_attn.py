"""Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR), in plain PyTorch.

Each query looks at ``num_points`` locations per head and per feature level, placed around its
reference point by learnt offsets, and sums the bilinearly sampled values with learnt softmax
weights. The official CUDA kernel (``MSDeformAttnFunction``) is replaced by one ``F.embedding_bag``
(a weighted sum of value rows per query and head; see :func:`multi_scale_deformable_attention`),
which runs unchanged on CPU and CUDA and needs nothing compiled.

Shapes: ``B`` batch, ``S`` flattened value positions over all levels, ``Q`` queries, ``M`` heads,
``D`` channels per head, ``L`` levels, ``P`` points per level and head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "grid_sample_deformable_attention", "multi_scale_deformable_attention"]


def _level_shapes(spatial_shapes: Sequence[Sequence[int]] | Tensor) -> list[tuple[int, int]]:
    rows = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
    return [(int(h), int(w)) for h, w in rows]


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

    Every sample is ``grid_sample``'s bilinear read (``align_corners=False``, zero padding): four
    corner pixels with weights ``(1 - |dx|)(1 - |dy|)``. Times the sample's attention weight, each
    output row ``(b, q, m)`` is a weighted sum of ``L * P * 4`` rows of ``value`` -- one
    ``F.embedding_bag`` over all of them. That is the same sum as a ``grid_sample`` per level
    followed by the weighted sum over points (:func:`grid_sample_deformable_attention`, tested
    equal), but the corner weights are computed once per sample instead of once per channel
    and no ``(B*M, D, Q, L*P)`` tensor of samples is built: one layer of a 512x512 input's pixel
    decoder (5,376 queries, 8 heads, 3 levels, 4 points) took 0.09 s against 0.56 s on one thread.
    """
    batch, positions, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = _level_shapes(spatial_shapes)
    if len(shapes) != levels:
        raise ValueError(f"{len(shapes)} spatial shapes for sampling locations over {levels} levels")
    device = value.device
    level_shape = (1, 1, 1, levels, 1, 1)
    heights = torch.tensor([h for h, _ in shapes], device=device).view(level_shape)
    widths = torch.tensor([w for _, w in shapes], device=device).view(level_shape)
    starts = torch.tensor([0] + [h * w for h, w in shapes[:-1]], device=device).cumsum(0).view(level_shape)
    # pixel coordinates: pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H)
    x = sampling_locations[..., :1] * widths - 0.5  # (B, Q, M, L, P, 1)
    y = sampling_locations[..., 1:] * heights - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    # the 1-D factors of the four corners, zero where the corner lies outside the map (zero padding);
    # the attention weight is folded into the vertical ones. All of this is on (..., 1) tensors: only
    # the last two steps touch the (..., 4) corners
    left = (1 - fx) * ((x0 >= 0) & (x0 < widths))
    right = fx * ((x0 >= -1) & (x0 < widths - 1))
    weights = attention_weights[..., None]
    top = (1 - fy) * ((y0 >= 0) & (y0 < heights)) * weights
    bottom = fy * ((y0 >= -1) & (y0 < heights - 1)) * weights
    coefficients = torch.cat([left * top, right * top, left * bottom, right * bottom], dim=-1)
    # rows of value.view(B * S * M, D) are ordered (b, s, m); the corners are +1 pixel right, +1 row down
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1, 1)
    m = torch.arange(heads, device=device).view(1, 1, heads, 1, 1, 1)
    top_left = (b * positions + starts + y0 * widths + x0) * heads + m
    corner_step = torch.cat([torch.zeros_like(widths), torch.ones_like(widths), widths, widths + 1], dim=-1) * heads
    if batch * positions * heads < 2**31:  # int32 row indices: half the memory traffic of the (..., 4) sums
        top_left, corner_step = top_left.int(), corner_step.int()
    # a corner outside the map has coefficient 0; clamping only keeps its row index valid
    rows = (top_left + corner_step).clamp_(0, batch * positions * heads - 1)
    output = F.embedding_bag(
        rows.reshape(batch * queries * heads, -1),
        value.reshape(batch * positions * heads, channels),
        per_sample_weights=coefficients.reshape(batch * queries * heads, -1).to(value.dtype),
        mode="sum",
    )  # bags ordered (b, q, m): already (B, Q, M, D)
    return output.view(batch, queries, heads * channels)


def grid_sample_deformable_attention(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The same sum as :func:`multi_scale_deformable_attention` in Deformable DETR's own
    ``ms_deform_attn_core_pytorch`` form: one ``F.grid_sample`` per level, then the weighted sum over
    points. Kept as the reference the faster form is tested against (values and gradients)."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = _level_shapes(spatial_shapes)
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # [-1, 1], one grid per (batch, head)
    samples = [
        F.grid_sample(
            per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, channels, h, w),
            grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False,
        )
        for level, (h, w) in enumerate(shapes)
    ]  # fmt: skip  -- each (B*M, D, Q, P)
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
