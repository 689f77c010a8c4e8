"""Mask2Former's two decoders (Cheng et al. 2022), shared by Mask2Former and OneFormer.

* :class:`MSDeformAttnPixelDecoder`: the backbone's 1/32, 1/16, 1/8 maps, projected to one width,
  go through a multi-scale deformable-attention encoder (sine position + level embeddings); an
  FPN step brings the finest of them to stride 4 with the backbone's 1/4 map, and a 1x1
  projection of that gives the per-pixel mask features.
* :class:`MaskedAttentionDecoder`: learnt queries refined layer by layer -- masked cross-attention
  to one level (round-robin 1/32, 1/16, 1/8; each query sees only where its previous mask
  prediction is >= 0.5), self-attention, FFN -- with class and mask predictions from the initial
  queries and after every layer (deep supervision).

Module and parameter names follow Hugging Face's ``Mask2FormerForUniversalSegmentation`` where
the structure allows (``omniseg.models.hf_import`` renames the rest).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.layers.ms_deform_attn import MSDeformAttn

__all__ = [
    "MLP",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnPixelDecoder",
    "MaskedAttentionDecoder",
    "MaskedAttentionDecoderLayer",
    "sine_position_embedding",
    "sine_position_tokens",
]


def sine_position_embedding(
    size: Sequence[int],
    num_features: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DETR's normalised sine embedding of an ``(H, W)`` grid: ``(1, 2 * num_features, H, W)``,
    the ``y`` half first; coordinates are scaled to ``(0, 2 pi]``."""
    h, w = int(size[0]), int(size[1])
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=dtype, device=device)
    x = torch.arange(1, w + 1, dtype=dtype, device=device)
    y = (y / (y[-1:] + eps) * scale)[:, None].expand(h, w)
    x = (x / (x[-1:] + eps) * scale)[None, :].expand(h, w)
    dim_t = torch.arange(num_features, device=device).to(dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_features)

    def encode(coord: Tensor) -> Tensor:  # sin of the even, cos of the odd frequencies, interleaved
        angles = coord[..., None] / dim_t
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat((encode(y), encode(x)), dim=-1).permute(2, 0, 1)[None]


@functools.lru_cache(maxsize=16)
def sine_position_tokens(
    size: Sequence[int],
    num_features: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`sine_position_embedding` as ``(1, H * W, 2 * num_features)`` tokens, made once per
    grid size, device and dtype (the decoders ask for the same ones on every image; the stride-4
    grid of a 512x512 input is 4 M sines and cosines). Shared: read it, never write into it.
    ``size`` must be hashable (a tuple or ``torch.Size``)."""
    # a plain tensor even when first asked for under inference_mode, so that training may use it too
    with torch.inference_mode(False), torch.no_grad():
        embedding = sine_position_embedding(size, num_features, temperature=temperature, device=device, dtype=dtype)
        return embedding.flatten(2).transpose(1, 2).contiguous()


class MLP(nn.Module):
    """Linear layers with ReLU between them (Mask2Former's mask embedding head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _c2_xavier_fill(module: nn.Conv2d) -> None:
    """Detectron2's ``c2_xavier_fill``, the init of Mask2Former's convolutions."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------- pixel decoder
class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(
        self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        x = self.self_attn_layer_norm(
            x + self.dropout(self.self_attn(x + pos, reference_points, x, spatial_shapes))
        )
        ffn = self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))
        return self.final_layer_norm(x + self.dropout(ffn))


def _reference_points(
    spatial_shapes: list[tuple[int, int]], batch: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``(B, S, L, 2)``: each position's pixel centre ``(x, y)`` in ``[0, 1]``, the same on every
    level (no padding: every level's valid extent is the whole map)."""
    points = []
    for h, w in spatial_shapes:
        y, x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device) / h,
            torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device) / w,
            indexing="ij",
        )
        points.append(torch.stack((x.flatten(), y.flatten()), -1))
    return torch.cat(points)[None, :, None].expand(batch, -1, len(spatial_shapes), -1)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's ``MSDeformAttnPixelDecoder`` over backbone maps at strides 4, 8, 16, 32.

    ``forward([C4, C8, C16, C32]) -> (mask_features (B, mask_dim, H/4, W/4),
    [F32, F16, F8])``, the multi-scale maps (``conv_dim`` channels) the transformer decoder
    attends to, coarsest first.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        num_levels: int = 3,
        strides: Sequence[int] = (4, 8, 16, 32),
        common_stride: int = 4,
        groups: int = 32,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        self.num_levels = num_levels
        self.conv_dim = conv_dim
        # input_projections[0] is the coarsest level (1/32), as in the reference
        self.input_projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, 1), nn.GroupNorm(groups, conv_dim))
            for c in in_channels[-num_levels:][::-1]
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, conv_dim))
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(conv_dim, num_heads, num_levels, num_points, ffn_dim, dropout)
            for _ in range(num_layers)
        )
        self.mask_projection = nn.Conv2d(conv_dim, mask_dim, 1)
        # FPN levels below the transformer's finest stride, down to common_stride (1/4 by default)
        self.num_fpn_levels = int(math.log2(min(strides[-num_levels:])) - math.log2(common_stride))
        self.lateral_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, 1, bias=False), nn.GroupNorm(groups, conv_dim))
            for c in in_channels[: self.num_fpn_levels]
        )
        self.output_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False),
                nn.GroupNorm(groups, conv_dim),
                nn.ReLU(),
            )
            for _ in range(self.num_fpn_levels)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for projection in self.input_projections:
            nn.init.xavier_uniform_(projection[0].weight)
            nn.init.zeros_(projection[0].bias)
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        for conv in [
            self.mask_projection,
            *(m[0] for m in self.lateral_convs),
            *(m[0] for m in self.output_convs),
        ]:
            _c2_xavier_fill(conv)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        coarse_first = list(features)[::-1][: self.num_levels]
        maps = [proj(x) for proj, x in zip(self.input_projections, coarse_first, strict=True)]
        shapes = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
        batch = maps[0].shape[0]
        x = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat(
            [
                sine_position_tokens(s, self.conv_dim // 2, device=x.device, dtype=x.dtype) + self.level_embed[i]
                for i, s in enumerate(shapes)
            ],
            1,
        )
        reference_points = _reference_points(shapes, batch, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, pos, reference_points, shapes)
        outputs = [
            y.transpose(1, 2).reshape(batch, -1, h, w)
            for y, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes, strict=True)
        ]
        # FPN down to stride 4, finest level last
        for i in reversed(range(self.num_fpn_levels)):
            lateral = self.lateral_convs[i](features[i])
            up = F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(self.output_convs[i](lateral + up))
        return self.mask_projection(outputs[-1]), outputs[: self.num_levels]


# ------------------------------------------------------------------------- transformer decoder
class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention, self-attention, FFN; each with a residual and a LayerNorm
    (after the block, or before it with ``pre_norm``)."""

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, *, dropout: float = 0.0, pre_norm: bool = False
    ) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _cross(
        self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, mask: Tensor
    ) -> Tensor:
        return self.cross_attn(
            x + query_pos, memory + memory_pos, memory, attn_mask=mask, need_weights=False
        )[0]

    def _self(self, x: Tensor, query_pos: Tensor) -> Tensor:
        return self.self_attn(x + query_pos, x + query_pos, x, need_weights=False)[0]

    def _ffn(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))

    def forward(
        self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, mask: Tensor
    ) -> Tensor:
        """``x, query_pos (B, Q, C)``, ``memory, memory_pos (B, S, C)``, ``mask (B * heads, Q, S)``
        True where a query may not look."""
        if self.pre_norm:
            x = x + self.dropout(
                self._cross(self.cross_attn_layer_norm(x), query_pos, memory, memory_pos, mask)
            )
            x = x + self.dropout(self._self(self.self_attn_layer_norm(x), query_pos))
            return x + self.dropout(self._ffn(self.final_layer_norm(x)))
        x = self.cross_attn_layer_norm(x + self.dropout(self._cross(x, query_pos, memory, memory_pos, mask)))
        x = self.self_attn_layer_norm(x + self.dropout(self._self(x, query_pos)))
        return self.final_layer_norm(x + self.dropout(self._ffn(x)))


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's ``MultiScaleMaskedTransformerDecoder``.

    ``forward([F32, F16, F8], mask_features)`` returns ``{"class_logits" (B, Q, C + 1),
    "mask_logits" (B, Q, H/4, W/4), "aux_outputs": [...]}``: the last prediction and, in
    ``aux_outputs``, the ``num_layers`` earlier ones (from the initial queries on), each a dict of
    the same two keys. ``num_layers`` counts the transformer layers (Mask2Former's ``DEC_LAYERS``
    minus one, Hugging Face's ``decoder_layers`` minus one).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        pre_norm: bool = False,
        mask_dim: int = 256,
        dropout: float = 0.0,
        num_levels: int = 3,
        enforce_input_projection: bool = False,
        learn_query_features: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.hidden_dim = hidden_dim
        # the queries themselves; OneFormer derives them from its task token instead (forward's ``queries``)
        self.query_feat = nn.Embedding(num_queries, hidden_dim) if learn_query_features else None
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # their position embedding
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.input_projections = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1)
            if in_channels != hidden_dim or enforce_input_projection
            else nn.Identity()
            for _ in range(num_levels)
        )
        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout=dropout, pre_norm=pre_norm)
            for _ in range(num_layers)
        )
        self.layernorm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            nn.init.zeros_(layer.cross_attn.in_proj_bias)
        for projection in self.input_projections:
            if isinstance(projection, nn.Conv2d):
                _c2_xavier_fill(projection)

    def predict(
        self, queries: Tensor, mask_features: Tensor, attention_size: Sequence[int] | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Class logits, mask logits and the next layer's attention mask ``(B * heads, Q, h * w)``
        (see :meth:`attention_mask`; ``None`` without an ``attention_size``: after the last layer)."""
        queries = self.layernorm(queries)
        class_logits = self.class_embed(queries)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), mask_features)
        if attention_size is None:
            return class_logits, mask_logits, None
        with torch.no_grad():
            resized = F.interpolate(mask_logits, size=tuple(attention_size), mode="bilinear", align_corners=False)
        return class_logits, mask_logits, self.attention_mask(resized)

    def attention_mask(self, mask_logits: Tensor) -> Tensor:
        """True where a query may not attend: its mask (at the next level's size) has probability
        below 0.5; a query whose mask is empty at that level attends everywhere instead of nowhere."""
        with torch.no_grad():
            mask = mask_logits.sigmoid().flatten(2) < 0.5
            mask &= ~mask.all(-1, keepdim=True)
            return mask[:, None].expand(-1, self.num_heads, -1, -1).flatten(0, 1)

    def forward(
        self,
        features: Sequence[Tensor],
        mask_features: Tensor,
        queries: Tensor | None = None,
        *,
        aux: bool | None = None,
    ) -> dict:
        """``queries (B, Q, C)``, when given, replace the learnt ``query_feat`` as the initial queries.

        ``aux`` (default: in training) also returns every earlier layer's prediction at full size
        (deep supervision). Without it only the last layer's is made: the earlier layers' masks are
        needed only for the attention masks, at the levels' sizes, and bilinear resizing is linear,
        so ``resize(embed @ mask_features) = embed @ resize(mask_features)`` -- the mask features are
        resized once per level and no (B, Q, H/4, W/4) map is built for them (the same masks up to
        float rounding; the full-size products and resizes were 0.6 s of OneFormer's 8.6 s at
        512x512 on one busy thread)."""
        aux = self.training if aux is None else aux
        memories, positions, sizes = [], [], []
        for i, x in enumerate(features[: self.num_levels]):
            sizes.append(tuple(x.shape[-2:]))
            positions.append(sine_position_tokens(x.shape[-2:], self.hidden_dim // 2, device=x.device, dtype=x.dtype))
            memories.append(
                self.input_projections[i](x).flatten(2).transpose(1, 2) + self.level_embed.weight[i]
            )
        batch = mask_features.shape[0]
        if queries is None:
            if self.query_feat is None:
                raise ValueError("this decoder learns no query features: pass the initial queries")
            queries = self.query_feat.weight[None].expand(batch, -1, -1)
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        if aux:
            class_logits, mask_logits, mask = self.predict(queries, mask_features, sizes[0])
            predictions = [{"class_logits": class_logits, "mask_logits": mask_logits}]
        else:
            # channels-last in: PyTorch's CPU bilinear downsampling of a contiguous 256-channel map
            # copies its input twice per call (30x slower than from channels-last at 128 -> 16..64)
            source = mask_features.contiguous(memory_format=torch.channels_last)
            resized_features = [
                F.interpolate(source, size=size, mode="bilinear", align_corners=False) for size in sizes
            ]
            mask = self._low_resolution_mask(queries, resized_features[0])
        for i, layer in enumerate(self.layers):
            queries = layer(queries, query_pos, memories[i % self.num_levels], positions[i % self.num_levels], mask)
            next_level = (i + 1) % self.num_levels
            if aux:
                last = i == len(self.layers) - 1
                class_logits, mask_logits, mask = self.predict(queries, mask_features, None if last else sizes[next_level])
                predictions.append({"class_logits": class_logits, "mask_logits": mask_logits})
            elif i < len(self.layers) - 1:
                mask = self._low_resolution_mask(queries, resized_features[next_level])
        if not aux:
            class_logits, mask_logits, _ = self.predict(queries, mask_features, None)
            return {"class_logits": class_logits, "mask_logits": mask_logits, "aux_outputs": []}
        return {**predictions[-1], "aux_outputs": predictions[:-1]}

    def _low_resolution_mask(self, queries: Tensor, resized_mask_features: Tensor) -> Tensor:
        with torch.no_grad():
            embedding = self.mask_embed(self.layernorm(queries))
            return self.attention_mask(torch.einsum("bqc,bchw->bqhw", embedding, resized_mask_features))
