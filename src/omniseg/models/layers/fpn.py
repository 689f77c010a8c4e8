"""Feature Pyramid Network neck (Lin et al. 2017) on torchvision's implementation.

Lateral 1x1 convolutions bring every backbone level to ``out_channels``; a top-down pass adds each
level to the 2x nearest-upsampled level above it; a 3x3 convolution smooths each sum. Optional
extra levels above the last one:

* ``extra="maxpool"``: P6 = 1x1 max-pool with stride 2 of P5 (Mask R-CNN / Faster R-CNN, used by the
  RPN only);
* ``extra="p6p7"``: P6 = 3x3 stride-2 conv, P7 = 3x3 stride-2 conv of ReLU(P6) (RetinaNet), computed
  from P5 (torchvision's ``retinanet_resnet50_fpn``) or from C5 (the paper; ``p6p7_from="c5"``).

Built on ``torchvision.ops.FeaturePyramidNetwork`` so that its parameter names are torchvision's
(``inner_blocks.i.0``, ``layer_blocks.i.0``, ``extra_blocks.p6`` ...): the ``backbone.fpn.*`` part of
a torchvision detection checkpoint loads with the prefix changed and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from omniseg.models.layers.fast_inference import to_fast_convs

__all__ = ["FPN"]

EXTRA_LEVELS = (None, "maxpool", "p6p7")


class FPN(FeaturePyramidNetwork):
    """FPN over a list of backbone feature maps (fine to coarse); returns a list (fine to coarse).

    ``in_channels`` lists the channels of the maps it will be given, e.g. ``backbone.channels`` for
    P2-P5 or ``backbone.channels[1:]`` for P3-P5.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        *,
        extra: str | None = None,
        p6p7_from: str = "p5",
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        if extra not in EXTRA_LEVELS:
            raise ValueError(f"extra must be one of {EXTRA_LEVELS}, got {extra!r}")
        if p6p7_from not in ("p5", "c5"):
            raise ValueError(f"p6p7_from must be 'p5' or 'c5', got {p6p7_from!r}")
        extra_blocks = None
        if extra == "maxpool":
            extra_blocks = LastLevelMaxPool()
        elif extra == "p6p7":
            # LastLevelP6P7 reads P5 when its in_channels equal out_channels, else C5
            p6_in = out_channels if p6p7_from == "p5" else in_channels[-1]
            if p6p7_from == "c5" and p6_in == out_channels:
                raise ValueError("p6p7_from='c5' needs C5 channels different from out_channels")
            extra_blocks = LastLevelP6P7(p6_in, out_channels)
        super().__init__(list(in_channels), out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outputs = len(self.in_channels) + {None: 0, "maxpool": 1, "p6p7": 2}[extra]
        to_fast_convs(self)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:  # type: ignore[override]
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"FPN built for {len(self.in_channels)} levels, got {len(features)} feature maps"
            )
        named = OrderedDict((str(i), f) for i, f in enumerate(features))
        return list(super().forward(named).values())
