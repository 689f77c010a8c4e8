"""Dilated convolutions computed by exact, faster rewrites, and gradient-layout helpers.

:class:`AtrousDepthwiseConv2d` is an ``nn.Conv2d`` (same parameters, same state dict) whose
forward picks, per input size, a space-to-batch rewrite, a sum of shifted products or the direct
kernel; all are exact re-expressions of the same convolution (public PyTorch ops only), used in
training and inference alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.layers.conv import ConvFn, tracing

__all__ = ["AtrousDepthwiseConv2d", "keep_grad_format"]


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _to_subgrids(x: Tensor, d: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B*d*d, C, ceil(H/d), ceil(W/d))`` channels-last: the d x d interleaved sub-grids."""
    batch, channels, height, width = x.shape
    h, w = math.ceil(height / d), math.ceil(width / d)
    if h * d != height or w * d != width:
        x = F.pad(x, [0, w * d - width, 0, h * d - height])
    x = x.reshape(batch, channels, h, d, w, d).permute(0, 3, 5, 2, 4, 1)
    return x.reshape(batch * d * d, h, w, channels).permute(0, 3, 1, 2)


def _from_subgrids(y: Tensor, d: int, height: int, width: int, fmt: torch.memory_format) -> Tensor:
    """Inverse (and adjoint) of :func:`_to_subgrids`: interleave the sub-grids, crop to ``height x width``."""
    batch_dd, channels, h, w = y.shape
    y = y.permute(0, 2, 3, 1).reshape(batch_dd // (d * d), d, d, h, w, channels).permute(0, 3, 1, 4, 2, 5)
    y = y.reshape(-1, h * d, w * d, channels)[:, :height, :width]
    # one copy into a fresh tensor (not a view: the next layer may be an in-place activation)
    out = torch.empty((y.shape[0], channels, height, width), dtype=y.dtype, device=y.device, memory_format=fmt)
    return out.copy_(y.permute(0, 3, 1, 2))


class _ToSubgrids(torch.autograd.Function):
    """:func:`_to_subgrids` whose backward is the exact inverse, so gradients keep the input's memory
    format (a BN backward fed an NCHW gradient for a channels-last input is ~10x slower)."""

    @staticmethod
    def forward(ctx, x: Tensor, d: int) -> Tensor:
        ctx.d, ctx.size, ctx.fmt = d, x.shape[-2:], _memory_format(x)
        return _to_subgrids(x, d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _from_subgrids(grad, ctx.d, *ctx.size, ctx.fmt), None


class _FromSubgrids(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, d: int, height: int, width: int, fmt: torch.memory_format) -> Tensor:
        ctx.d = d
        return _from_subgrids(y, d, height, width, fmt)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _to_subgrids(grad, ctx.d), None, None, None, None


class _KeepGradFormat(torch.autograd.Function):
    """Identity whose backward hands the gradient on in the input's memory format."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.fmt = _memory_format(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=ctx.fmt)


def keep_grad_format(x: Tensor) -> Tensor:
    """``x``, with its gradient handed back in ``x``'s memory format (identity without autograd).

    Gradients summed from several consumers, or coming through slicing and pooling, can arrive
    in NCHW for a channels-last tensor; the BatchNorm backward that usually precedes is ~10x
    slower on such mixed layouts than one layout conversion.
    """
    if torch.is_grad_enabled() and x.requires_grad and not tracing():
        return _KeepGradFormat.apply(x)
    return x


def _space_to_batch_conv(x: Tensor, dilation: int, conv_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """A stride-1 "same" conv with ``dilation`` as an undilated conv (``conv_fn``) on the d x d sub-grids.

    Pixel (i, j) of a dilated conv only meets pixels congruent to it modulo d, so the d*d interleaved
    sub-grids of the (zero-padded to a multiple of d) map are independent images that see the kernel
    undilated -- TF's ``atrous_conv2d`` trick. Exact, including the zero padding at every border.
    """
    height, width = x.shape[-2:]
    fmt = _memory_format(x)
    if torch.is_grad_enabled() and not tracing():
        return _FromSubgrids.apply(conv_fn(_ToSubgrids.apply(x, dilation)), dilation, height, width, fmt)
    return _from_subgrids(conv_fn(_to_subgrids(x, dilation)), dilation, height, width, fmt)


def _shifted_depthwise(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """Depthwise "same" conv as a sum of shifted per-channel products; taps that miss the map are skipped."""
    channels, k = x.shape[1], weight.shape[-1]
    c = k // 2
    height, width = x.shape[-2:]
    x = keep_grad_format(x)  # the sliced products' gradients would otherwise arrive as NCHW
    taps = weight.reshape(channels, k, k)
    out = x * taps[:, c, c].reshape(1, channels, 1, 1)
    if bias is not None:
        out = out + bias.reshape(1, channels, 1, 1)
    for i in range(k):
        dy = (i - c) * dilation
        for j in range(k):
            dx = (j - c) * dilation
            if (i == c and j == c) or abs(dy) >= height or abs(dx) >= width:
                continue
            y0, y1, x0, x1 = max(0, -dy), min(height, height - dy), max(0, -dx), min(width, width - dx)
            out[:, :, y0:y1, x0:x1] += x[:, :, y0 + dy : y1 + dy, x0 + dx : x1 + dx] * taps[:, i, j].reshape(
                1, channels, 1, 1
            )
    return out


class AtrousDepthwiseConv2d(nn.Conv2d):
    """Depthwise k x k conv, stride 1, dilation d, "same" zero padding: an ``nn.Conv2d`` computed faster.

    PyTorch's CPU kernels handle dilated depthwise convs badly: on the DeepLab shapes here (e.g. 1152
    channels, 5x5, d=2 at 23x30; 320 channels, 3x3, d=6..18) the exact rewrites below are 1.5-6x
    faster, forward and backward. Same parameters and results as the plain conv (state-dict
    compatible); the computation is chosen per input size:

    * ``space_to_batch`` (:func:`_space_to_batch_conv`) when each sub-grid is at least k x k, in
      training always and in inference from d = 4 on (below, oneDNN's direct kernel is faster);
    * ``shift`` (:func:`_shifted_depthwise`) when the dilation is large for the map, so that most
      taps fall off it (ASPP rates 12/18 on a 23x30 map);
    * ``direct`` otherwise.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int, bias: bool = False) -> None:
        super().__init__(
            channels,
            channels,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=channels,
            bias=bias,
        )

    def strategy(self, x: Tensor) -> str:
        d, k = self.dilation[0], self.kernel_size[0]
        if d == 1:
            return "direct"
        if math.ceil(x.shape[-2] / d) >= k and math.ceil(x.shape[-1] / d) >= k:
            return "space_to_batch" if torch.is_grad_enabled() or d >= 4 else "direct"
        return "shift"

    def run_conv(self, x: Tensor, conv_fn: ConvFn) -> Tensor | None:
        strategy = self.strategy(x)
        if strategy == "direct":
            return conv_fn(x, self.padding, self.dilation)
        if strategy == "space_to_batch":
            pad = self.kernel_size[0] // 2
            return _space_to_batch_conv(x, self.dilation[0], lambda t: conv_fn(t, (pad, pad), (1, 1)))
        return None

    def conv_with_weights(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This convolution with ``weight``/``bias`` (e.g. BN-folded) in place of its own."""
        out = self.run_conv(x, lambda t, p, d: F.conv2d(t, weight, bias, self.stride, p, d, self.groups))
        return out if out is not None else _shifted_depthwise(x, weight, bias, self.dilation[0])

    def forward(self, x: Tensor) -> Tensor:
        if tracing():  # an exported graph holds the one standard dilated conv, valid at any input size
            return super().forward(x)
        return self.conv_with_weights(x, self.weight, self.bias)
