"""Swin Transformer (Liu et al. 2021) as a dense-prediction :class:`Backbone`: timm's
``SwinTransformer`` with a LayerNorm on each stage's output, the layout of Swin for detection /
segmentation (Mask2Former's ``D2SwinTransformer``, Hugging Face's ``SwinBackbone``), so their
weights load (:func:`omniseg.models.hf_import.convert_hf_swin`).

timm builds its shifted-window masks for the ``img_size`` it is given, so build the backbone at
the input size it will see. Where a stage's map is not a whole number of windows (512 x 512 with
7 x 7 windows: maps 128, 64, 32, 16), the original Swin for detection (and Hugging Face, and so
every Mask2Former / OneFormer checkpoint) pads the map to whole windows *before* the cyclic
shift; timm pads after it, which moves the padding into other windows and changes every later
stage (0.5 in the last stage's features at 512 x 512). Each block's window attention is
therefore replaced by :func:`padded_then_shifted_attention`, timm's own steps in the original's
order, over timm's own modules and masks (they are computed for the padded size either way).
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from omniseg.models.backbones.registry import Backbone

__all__ = ["SwinBackbone", "padded_then_shifted_attention"]


def padded_then_shifted_attention(block: nn.Module, x: Tensor) -> Tensor:
    """(Shifted-)window attention of a timm ``SwinTransformerBlock`` on ``x`` (B, H, W, C) in the
    original Swin's order: pad to whole windows, shift, attend, shift back, crop."""
    from timm.models.swin_transformer import window_partition, window_reverse

    _, h, w, c = x.shape
    wh, ww = block.window_size
    x = torch.nn.functional.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    _, hp, wp, _ = x.shape
    shift = tuple(block.shift_size)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    mask = block.get_attn_mask(x) if getattr(block, "dynamic_mask", False) else block.attn_mask
    windows = block.attn(window_partition(x, block.window_size).view(-1, block.window_area, c), mask=mask)
    x = window_reverse(windows.view(-1, wh, ww, c), block.window_size, hp, wp)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :h, :w].contiguous()


class SwinBackbone(Backbone):
    """``forward(x) -> [C4, C8, C16, C32]`` (NCHW), each stage's output layer-normalised.

    ``timm_kwargs`` override the architecture of ``model_name`` (``embed_dim``, ``depths``,
    ``num_heads``, ``window_size``, ``mlp_ratio``, ...). Randomly initialised: load weights with
    ``load_state_dict`` (no download).
    """

    def __init__(
        self,
        model_name: str = "swin_tiny_patch4_window7_224",
        *,
        img_size: int | Sequence[int] = 224,
        always_partition: bool = True,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        import timm

        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.body = timm.create_model(
            model_name,
            pretrained=False,
            features_only=True,
            out_indices=(0, 1, 2, 3),
            img_size=img_size,
            # windows and shifts stay as configured at every stage, however small its map (as in
            # Swin for detection and HF's SwinBackbone), not shrunk to the map as in classification
            always_partition=always_partition,
            **timm_kwargs,
        )
        self.channels = list(self.body.feature_info.channels())
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)
        from timm.models.swin_transformer import SwinTransformerBlock

        for block in self.body.modules():
            if isinstance(block, SwinTransformerBlock):  # the original's pad-then-shift order
                block._attn = types.MethodType(padded_then_shifted_attention, block)

    def forward(self, x: Tensor) -> list[Tensor]:
        # timm's Swin stages are channels-last (B, H, W, C): normalise there, then NCHW
        return [
            norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.norms, self.body(x), strict=True)
        ]
