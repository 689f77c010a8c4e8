"""kMaX-DeepLab's k-means cross-attention (Yu et al. 2022; deeplab2's ``kmax_transformer_layer``).

Cross-attention between ``N`` queries and ``HW`` pixels normally takes a softmax over the pixels
for every query. kMaX reads the queries as cluster centres and the cross-attention as one k-means
step:

* assignment: the layer's own prediction head (deeplab2's kMaX predictor: depthwise pixel head)
  gives mask logits from the current centres on this layer's pixel map ``(B, N, H, W)`` (stride
  32, 16 or 8; deeplab2's ``pixel_space``, a 1x1 conv + BN + GELU of the decoder map), each pixel
  goes to its best centre, ``A = one_hot(argmax_N(logits))`` -- a hard assignment over the
  *clusters* (deeplab2: ``clustering_result``), no gradient through it;
* update: each centre adds the sum of the values of its pixels, ``A @ V`` (batch-normalised, then
  projected), the residual way.

Then self-attention among the centres and a feed-forward network, as in any transformer decoder.
The prediction that drove the assignment is also returned: kMaX supervises every layer's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.layers.dual_path_transformer import MemoryNorm, multi_head_attention
from omniseg.models.layers.mask_id_heads import MaskIDHeads

__all__ = ["KMeansCrossAttentionLayer", "kmeans_assignment"]


def kmeans_assignment(mask_logits: Tensor) -> Tensor:
    """``(B, N, H, W)`` mask logits -> ``(B, N, HW)`` one-hot assignment of every pixel to the centre
    with the largest logit (a constant: the argmax has no gradient)."""
    b, n = mask_logits.shape[:2]
    best = mask_logits.detach().flatten(2).argmax(1)  # (B, HW)
    return F.one_hot(best, n).transpose(1, 2).to(mask_logits.dtype)


class KMeansCrossAttentionLayer(nn.Module):
    """One kMaX transformer decoder layer on ``pixel (B, C, H, W)`` (this stage's decoder map) and
    ``centres (B, N, D)``.

    Returns the updated centres and the layer's prediction (``class_logits``, ``mask_logits``,
    ``pixel_embeddings`` at this map's resolution) made before the update.
    """

    def __init__(
        self,
        pixel_channels: int,
        memory_channels: int,
        num_classes: int,
        *,
        value_channels: int = 256,
        num_heads: int = 8,
        ffn_channels: int = 2048,
        embedding_dim: int = 128,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pixel_space = nn.Sequential(
            nn.GELU(), nn.Conv2d(pixel_channels, pixel_channels, 1, bias=False), nn.BatchNorm2d(pixel_channels), nn.GELU()
        )
        self.predictor = MaskIDHeads(
            pixel_channels, memory_channels, num_classes, embedding_dim=embedding_dim, pixel_head="depthwise"
        )
        self.pixel_value = nn.Sequential(
            nn.Conv2d(pixel_channels, value_channels, 1, bias=False), nn.BatchNorm2d(value_channels)
        )
        self.update_norm = MemoryNorm(value_channels)
        self.update_out = nn.Linear(value_channels, memory_channels, bias=False)
        self.update_out_norm = MemoryNorm(memory_channels)
        self.self_qkv = nn.Linear(memory_channels, 3 * memory_channels, bias=False)
        self.self_out = nn.Linear(memory_channels, memory_channels, bias=False)
        self.self_norm = MemoryNorm(memory_channels)
        self.ffn = nn.Sequential(
            nn.Linear(memory_channels, ffn_channels), nn.GELU(), nn.Linear(ffn_channels, memory_channels)
        )
        self.ffn_norm = MemoryNorm(memory_channels)

    def forward(self, pixel: Tensor, centres: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pixel_space = self.pixel_space(pixel)
        prediction = self.predictor(pixel_space, centres)
        assignment = kmeans_assignment(prediction["mask_logits"])  # (B, N, HW)
        values = self.pixel_value(pixel_space).flatten(2).transpose(1, 2)  # (B, HW, Cv)
        update = self.update_out_norm(self.update_out(F.relu(self.update_norm(assignment @ values))))
        centres = F.relu(centres + update)
        q, k, v = self.self_qkv(centres).chunk(3, dim=-1)
        centres = F.relu(
            centres + self.self_norm(self.self_out(multi_head_attention(q, k, v, self.num_heads)))
        )
        centres = F.relu(centres + self.ffn_norm(self.ffn(centres)))
        return centres, prediction
