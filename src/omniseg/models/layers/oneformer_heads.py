"""OneFormer's own parts (Jain et al. 2023) around Mask2Former's decoders.

* :class:`QueryTransformer`: the task-conditioned object queries -- the task token repeated
  ``Q - 1`` times, refined by a small DETR decoder whose memory is the sine position embedding of
  the stride-4 mask features and whose keys add a 1x1 projection of those features (the reference
  implementation's arrangement, kept so its weights load);
* :class:`TextEncoder` / :class:`TextMapper`: the training-only text side -- a CLIP-style text
  transformer over tokenised "a photo with a {class}" texts, an MLP to the query width and
  learnable context tokens, giving the text queries of the query-text contrastive loss.

Module and parameter names follow Hugging Face's ``OneFormerForUniversalSegmentation``
(``omniseg.models.hf_import`` renames the rest). All attention is batch-first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.layers.mask2former_decoder import MLP, sine_position_tokens

__all__ = ["QueryTransformer", "QueryTransformerLayer", "TextEncoder", "TextEncoderLayer", "TextMapper"]


class QueryTransformerLayer(nn.Module):
    """DETR decoder layer: self-attention, cross-attention to the memory, ReLU FFN; post-norm, or
    pre-norm with ``pre_norm``."""

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, *, dropout: float = 0.0, pre_norm: bool = False
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _self(self, x: Tensor, query_pos: Tensor) -> Tensor:
        return self.self_attn(x + query_pos, x + query_pos, x, need_weights=False)[0]

    def _cross(self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_key: Tensor) -> Tensor:
        return self.multihead_attn(x + query_pos, memory_key, memory, need_weights=False)[0]

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x), inplace=True)))

    def forward(self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_key: Tensor) -> Tensor:
        """``memory`` are the values; ``memory_key`` the keys (the values plus their projected
        features, summed once by :class:`QueryTransformer` for all layers)."""
        if self.pre_norm:
            x = x + self.dropout(self._self(self.norm1(x), query_pos))
            x = x + self.dropout(self._cross(self.norm2(x), query_pos, memory, memory_key))
            return x + self.dropout(self._ffn(self.norm3(x)))
        x = self.norm1(x + self.dropout(self._self(x, query_pos)))
        x = self.norm2(x + self.dropout(self._cross(x, query_pos, memory, memory_key)))
        return self.norm3(x + self.dropout(self._ffn(x)))


class QueryTransformer(nn.Module):
    """``forward(task_token (B, C), query_pos (Q - 1, C), mask_features (B, mask_dim, h, w))`` ->
    the object queries ``(B, Q - 1, C)``.

    Every query starts as the (normalised) task token; ``task_token=None`` starts them at zero
    (the reference's choice when the task token is not normalised).
    """

    def __init__(
        self,
        mask_dim: int,
        hidden_dim: int,
        *,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 2,
        dropout: float = 0.0,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.input_projection = nn.Conv2d(mask_dim, hidden_dim, 1)
        self.layers = nn.ModuleList(
            QueryTransformerLayer(hidden_dim, num_heads, ffn_dim, dropout=dropout, pre_norm=pre_norm)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.xavier_uniform_(self.input_projection.weight)
        nn.init.zeros_(self.input_projection.bias)

    def forward(self, task_token: Tensor | None, query_pos: Tensor, mask_features: Tensor) -> Tensor:
        batch, _, h, w = mask_features.shape
        # the memory's values are the positions themselves; its keys add the projected features
        memory = sine_position_tokens(
            (h, w), self.hidden_dim // 2, device=mask_features.device, dtype=mask_features.dtype
        ).expand(batch, -1, -1)
        # the keys (values + projected features) are the same for every layer: summed once
        memory_key = memory + self.input_projection(mask_features).flatten(2).transpose(1, 2)
        query_pos = query_pos[None].expand(batch, -1, -1)
        if task_token is None:
            x = torch.zeros_like(query_pos)
        else:
            x = task_token[:, None].expand(-1, query_pos.shape[1], -1)
        for layer in self.layers:
            x = layer(x, query_pos, memory, memory_key)
        return self.norm(x)


# ----------------------------------------------------------------------------------- text side
class _TextMLP(nn.Module):
    """CLIP's FFN: Linear, QuickGELU, Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))


class TextEncoderLayer(nn.Module):
    """CLIP's pre-norm residual attention block."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = _TextMLP(width)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        h = self.layer_norm1(x)
        x = x + self.self_attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.layer_norm2(x))


class _TextLayers(nn.Module):
    def __init__(self, width: int, num_layers: int, num_heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TextEncoderLayer(width, num_heads) for _ in range(num_layers))


class TextEncoder(nn.Module):
    """CLIP's text transformer: token + position embeddings, pre-norm layers, final LayerNorm, the
    feature at each text's end-of-text token (its highest id). ``heads = width // 64`` as in CLIP.

    ``causal`` applies CLIP's causal attention mask; Hugging Face's OneFormer builds that mask but
    never passes it to its layers, so ``causal=False`` is what its text encoder computes.
    """

    def __init__(
        self,
        *,
        context_length: int = 77,
        width: int = 256,
        num_layers: int = 6,
        vocab_size: int = 49408,
        causal: bool = True,
    ) -> None:
        super().__init__()
        if width < 64:
            raise ValueError(f"text encoder width {width} < 64: CLIP's heads are 64 wide")
        self.context_length = context_length
        self.causal = causal
        self.transformer = _TextLayers(width, num_layers, width // 64)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:  # CLIP's initialisation
        width, num_layers = self.positional_embedding.shape[1], len(self.transformer.layers)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = (
            (width**-0.5) * ((2 * num_layers) ** -0.5),
            width**-0.5,
            (2 * width) ** -0.5,
        )
        for layer in self.transformer.layers:
            nn.init.normal_(layer.self_attn.in_proj_weight, std=attn_std)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
            nn.init.normal_(layer.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens (N, context_length)`` -> ``(N, width)``."""
        x = self.token_embedding(tokens) + self.positional_embedding
        mask = None
        if self.causal:
            n = tokens.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool, device=tokens.device).triu(1)
        for layer in self.transformer.layers:
            x = layer(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(len(x), device=x.device), tokens.argmax(-1)]


class TextMapper(nn.Module):
    """Tokenised texts ``(B, T, L)`` -> text queries ``(B, T + n_ctx, hidden_dim)``: encoded texts
    projected by a ``proj_layers`` MLP, then the ``n_ctx`` learnable context tokens (their width is
    the query width; the reference sizes them by the text width and requires the two to agree)."""

    def __init__(
        self,
        hidden_dim: int,
        *,
        width: int = 256,
        num_layers: int = 6,
        context_length: int = 77,
        vocab_size: int = 49408,
        proj_layers: int = 2,
        n_ctx: int = 16,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(
            context_length=context_length,
            width=width,
            num_layers=num_layers,
            vocab_size=vocab_size,
            causal=causal,
        )
        self.text_projector = MLP(width, hidden_dim, hidden_dim, proj_layers)
        self.prompt_ctx = nn.Embedding(n_ctx, hidden_dim) if n_ctx > 0 else None
        with torch.no_grad():
            for layer in self.text_projector.layers:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, num_texts, length = tokens.shape
        queries = self.text_projector(self.text_encoder(tokens.reshape(batch * num_texts, length)))
        queries = queries.reshape(batch, num_texts, -1)
        if self.prompt_ctx is not None:
            queries = torch.cat([queries, self.prompt_ctx.weight[None].expand(batch, -1, -1)], 1)
        return queries
