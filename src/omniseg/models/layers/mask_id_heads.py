"""The prediction heads MaX-DeepLab and kMaX-DeepLab share (deeplab2's ``MaXDeepLab`` heads and
``kMaXPredictor``).

From the memory ``(B, N, D)`` (one vector per mask slot) and a pixel map ``(B, C, H, W)``:

* class logits ``(B, N, K + 1)``: two fully connected layers, the last class "no object";
* mask embeddings ``f (B, N, E)``: two fully connected layers;
* pixel embeddings ``g (B, E, H, W)``: a 3x3 and a 1x1 convolution (``pixel_head="dense"``), or
  kMaX's predictor (``"depthwise"``: a 5x5 depthwise and two 1x1 convolutions, a hundredth of the
  dense head's multiply-adds at 128 channels), L2-normalised over channels (deeplab2's
  ``pixel_space_normalized_feature``, also the input of the instance discrimination loss);
* mask logits ``(B, N, H, W) = BN(f . g)``: one batch norm (a single channel) on the dot products,
  which learns their scale; a softmax over the ``N`` slots turns them into mask-ID probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MaskIDHeads"]


def _two_layers(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class MaskIDHeads(nn.Module):
    """Class, mask-embedding and pixel-embedding heads; ``forward(pixel, memory)`` ->
    ``{"class_logits", "mask_logits", "pixel_embeddings"}``."""

    def __init__(
        self,
        pixel_channels: int,
        memory_channels: int,
        num_classes: int,
        *,
        embedding_dim: int = 128,
        pixel_head: str = "dense",
    ) -> None:
        super().__init__()
        self.class_head = _two_layers(memory_channels, memory_channels, num_classes + 1)
        self.mask_head = _two_layers(memory_channels, memory_channels, embedding_dim)
        if pixel_head == "dense":
            self.pixel_head = nn.Sequential(
                nn.Conv2d(pixel_channels, pixel_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(pixel_channels),
                nn.ReLU(),
                nn.Conv2d(pixel_channels, embedding_dim, 1),
            )
        elif pixel_head == "depthwise":  # deeplab2's kMaX predictor (_pixel_space_head_*)
            self.pixel_head = nn.Sequential(
                nn.Conv2d(pixel_channels, pixel_channels, 5, padding=2, groups=pixel_channels, bias=False),
                nn.BatchNorm2d(pixel_channels),
                nn.GELU(),
                nn.Conv2d(pixel_channels, pixel_channels, 1, bias=False),
                nn.BatchNorm2d(pixel_channels),
                nn.GELU(),
                nn.Conv2d(pixel_channels, embedding_dim, 1),
            )
        else:
            raise ValueError(f"pixel_head must be 'dense' or 'depthwise', got {pixel_head!r}")
        self.mask_norm = nn.BatchNorm2d(1)

    def forward(self, pixel: Tensor, memory: Tensor) -> dict[str, Tensor]:
        embeddings = self.pixel_head(pixel)
        # F.normalize's arithmetic (x / max(|x|, 1e-12)) as one reduction and one multiply: a
        # quarter of its time on a (128, 160, 320) map
        embeddings = embeddings * embeddings.square().sum(1, keepdim=True).clamp_min(1e-24).rsqrt()
        mask_embeddings = self.mask_head(memory)
        b, n = memory.shape[:2]
        logits = torch.einsum("bne,behw->bnhw", mask_embeddings, embeddings)
        logits = self.mask_norm(logits.reshape(b * n, 1, *logits.shape[-2:])).reshape(logits.shape)
        return {
            "class_logits": self.class_head(memory),
            "mask_logits": logits,
            "pixel_embeddings": embeddings,
        }
