"""Swin Transformer (Liu et al. 2021) as a dense-prediction :class:`Backbone`: timm's
``SwinTransformer`` with a LayerNorm on each stage's output, the layout of Swin for detection /
segmentation (Mask2Former's ``D2SwinTransformer``, Hugging Face's ``SwinBackbone``), so their
weights load (:func:`omniseg.models.hf_import.convert_hf_swin`).

timm builds its shifted-window masks for the ``img_size`` it is given, so build the backbone at
the input size it will see. Hugging Face and the original pad a map to whole windows *before* the
cyclic shift, timm after it: the two agree wherever every stage's map is a whole number of
windows (224 x 224 with 7 x 7 windows: maps 56, 28, 14, 7; 128 x 128 with 4 x 4 windows ...).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from omniseg.models.backbones import Backbone

__all__ = ["SwinBackbone"]


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

    def forward(self, x: Tensor) -> list[Tensor]:
        # timm's Swin stages are channels-last (B, H, W, C): normalise there, then NCHW
        return [
            norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.norms, self.body(x), strict=True)
        ]
