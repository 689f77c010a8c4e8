"""Atrous Spatial Pyramid Pooling (DeepLabV3), key- and behaviour-compatible with torchvision.

Layout (identical module names to ``torchvision.models.segmentation.deeplabv3.ASPP``, so state dicts
map one to one)::

    convs.0   1x1 conv - BN - ReLU
    convs.1-3 3x3 atrous conv - BN - ReLU  (rates 6/12/18 at output stride 16, 12/24/36 at 8)
    convs.4   image pooling: global average - 1x1 conv - BN - ReLU
    project   concat -> 1x1 conv - BN - ReLU - dropout

``separable=True`` makes the atrous branches depthwise-separable, as in DeepLabV3+ (TF reference
``aspp_with_separable_conv``): 3x3 depthwise - BN - ReLU - 1x1 pointwise - BN - ReLU. That changes
the parameters, so it is not loadable from torchvision; it costs a fraction of the dense version.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.layers.atrous import AtrousDepthwiseConv2d, keep_grad_format
from omniseg.models.layers.conv import ConvBNAct


def atrous_rates_for(output_stride: int) -> tuple[int, int, int]:
    """DeepLab's ASPP rates: (6, 12, 18) at output stride 16, doubled at 8, halved at 32."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    scale = 16 // output_stride if output_stride <= 16 else 0.5
    return tuple(int(r * scale) for r in (6, 12, 18))  # type: ignore[return-value]


class ASPPConv(ConvBNAct):
    """3x3 atrous conv - BN - ReLU (torchvision's ``ASPPConv``)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPSeparableConv(nn.Sequential):
    """3x3 atrous depthwise - BN - ReLU - 1x1 pointwise - BN - ReLU (DeepLabV3+ ``split_separable_conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            ConvBNAct(
                AtrousDepthwiseConv2d(in_channels, 3, dilation),
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
            ),
            ConvBNAct(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ),
        )


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average - 1x1 conv - BN - ReLU.

    Unlike torchvision's, ``forward`` returns the ``(B, C, 1, 1)`` vector without upsampling it:
    :class:`ASPP` folds it into the projection instead (see there).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPP(nn.Module):
    """ASPP with torchvision's module layout; see the module docstring."""

    def __init__(
        self,
        in_channels: int,
        atrous_rates: Sequence[int] = (6, 12, 18),
        out_channels: int = 256,
        *,
        dropout: float = 0.5,
        separable: bool = False,
    ) -> None:
        super().__init__()
        branch = ASPPSeparableConv if separable else ASPPConv
        modules: list[nn.Module] = [
            ConvBNAct(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )
        ]
        modules += [branch(in_channels, out_channels, rate) for rate in atrous_rates]
        modules.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(modules)
        self.project = ConvBNAct(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.atrous_rates = tuple(atrous_rates)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = keep_grad_format(x)  # five consumers (one a global pool): keep the summed gradient's layout
        *spatial_branches, pooling = self.convs
        spatial = torch.cat([branch(x) for branch in spatial_branches], dim=1)
        pooled = pooling(x)  # (B, C, 1, 1)
        # The pooling branch is constant over the image (torchvision upsamples a 1x1 map, which is a
        # broadcast), so its share of the 1x1 projection is a per-image bias: W_pool @ pooled. Adding
        # it by broadcasting gives the same result without materialising, concatenating and
        # convolving C constant channels at every pixel.
        project = self.project
        split = spatial.shape[1]
        if project.folding:
            weight, bias = project.folded_weight_bias()
            y = F.conv2d(spatial, weight[:, :split], bias).add_(F.conv2d(pooled, weight[:, split:]))
        else:
            weight = project[0].weight
            y = project[1](F.conv2d(spatial, weight[:, :split]).add_(F.conv2d(pooled, weight[:, split:])))
        return project.apply_tail(y)
