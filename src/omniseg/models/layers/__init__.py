"""Building blocks shared by several methods.

* :class:`ConvBNAct` -- conv, BatchNorm, activation; BN folded and activation fused at inference;
* :class:`AtrousDepthwiseConv2d` -- a dilated depthwise conv computed by exact, faster rewrites;
* :class:`~omniseg.models.layers.aspp.ASPP` -- DeepLab's atrous spatial pyramid pooling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ASPP",
    "ASPPConv",
    "ASPPPooling",
    "ASPPSeparableConv",
    "AtrousDepthwiseConv2d",
    "ConvBNAct",
    "ConvFn",
    "atrous_rates_for",
    "fold_batch_norm",
    "keep_grad_format",
    "run_conv",
    "set_bn_folding",
]


def _find_fused_conv():
    """oneDNN's conv + activation kernel (the one torch.compile's CPU backend emits), if present."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_FUSED_CONV = _find_fused_conv()
# activation module type -> (oneDNN post-op name, its scalars)
_FUSABLE_ACTIVATIONS: dict[type, tuple[str, list[float]]] = {
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
}


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


# conv_fn(x, padding, dilation) -> output: "run this layer's convolution (weights, stride, groups
# and any fused post-op bound) on x". Conv classes that rewrite their computation (TF "SAME" padding,
# space-to-batch) implement ``run_conv(x, conv_fn)`` so the same rewrite serves the plain and the fused path.
ConvFn = Callable[[Tensor, tuple[int, int], tuple[int, int]], Tensor]


def run_conv(conv: nn.Conv2d, x: Tensor, conv_fn: ConvFn) -> Tensor | None:
    """``conv`` applied to ``x`` through ``conv_fn``; None if ``conv`` cannot be expressed that way."""
    custom = getattr(conv, "run_conv", None)
    if custom is not None:
        return custom(x, conv_fn)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return None
    return conv_fn(x, conv.padding, conv.dilation)


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
    y = y.reshape(-1, h * d, w * d, channels)[:, :height, :width].contiguous().permute(0, 3, 1, 2)
    return y.contiguous(memory_format=fmt)


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
    if torch.is_grad_enabled() and x.requires_grad and not _tracing():
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
    if torch.is_grad_enabled() and not _tracing():
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

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = self.run_conv(x, lambda t, p, d: F.conv2d(t, weight, bias, self.stride, p, d, self.groups))
        return out if out is not None else _shifted_depthwise(x, weight, bias, self.dilation[0])


def tensor_key(t: Tensor) -> tuple:
    """Identifies a tensor's storage and contents version, for caches of derived weights.

    Inference tensors (made under ``torch.inference_mode``) have no version counter; they cannot
    be changed in place outside inference mode, so their storage identifies them.
    """
    return (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device)


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of one conv equal to ``bn(conv(x))`` with BN in eval mode (running stats)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.ndim - 1))).to(conv.weight.dtype)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight, bias.to(conv.weight.dtype)


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> tail layers (activation, ...); children ``0``/``1``/``2`` as torchvision names them.

    Inference is made cheap because it dominates deployment on CPU:

    * in eval mode the BN affine is folded into the convolution (one pass over the activations
      instead of two); the folded weights are cached while gradients are off and recomputed whenever
      a weight, BN parameter or running statistic changes (``load_state_dict``, optimiser step, ``.to()``);
    * on CPU with gradients off, conv + ReLU/ReLU6 run as one oneDNN kernel (the kernel torch.compile
      emits), saving another pass. Never while tracing/compiling, so exported graphs hold standard ops.

    Results equal ``act(bn(conv(x)))`` up to float rounding; set ``fold_bn = False`` (or
    :func:`set_bn_folding`) for bit-exact comparisons with unfused code.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, *tail: nn.Module) -> None:
        super().__init__(conv, bn, *tail)
        self.fold_bn = True
        self._fold_cache: tuple[tuple, Tensor, Tensor] | None = None

    @property
    def folding(self) -> bool:
        """Whether ``forward`` folds BN into the conv (eval mode, running stats, ``fold_bn``)."""
        return not self.training and self.fold_bn and self[1].running_var is not None

    def folded_weight_bias(self) -> tuple[Tensor, Tensor]:
        """The conv weight and bias with BN folded in (cached while gradients are off)."""
        conv, bn = self[0], self[1]
        if torch.is_grad_enabled() or _tracing():  # fold differentiably / traceably, never cache
            return fold_batch_norm(conv, bn)
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple(None if t is None else tensor_key(t) for t in tensors)
        key += (bn.eps,)
        if self._fold_cache is None or self._fold_cache[0] != key:
            weight, bias = fold_batch_norm(conv, bn)
            self._fold_cache = (key, weight, bias)
        return self._fold_cache[1], self._fold_cache[2]

    def apply_tail(self, x: Tensor) -> Tensor:
        """The layers after BN (activation, dropout...)."""
        for layer in list(self)[2:]:
            x = layer(x)
        return x

    def conv_bn(self, x: Tensor, padding: tuple[int, int] | None = None) -> Tensor:
        """conv and BN only (BN folded in eval mode); ``padding`` overrides the conv's own padding."""
        conv = self[0]
        if self.folding:
            weight, bias = self.folded_weight_bias()
        else:
            weight, bias = conv.weight, conv.bias
        if padding is None:
            x = conv._conv_forward(x, weight, bias)
        else:
            x = F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        return x if self.folding else self[1](x)

    def _fused_forward(self, x: Tensor, padding: tuple[int, int] | None) -> Tensor | None:
        """conv + BN + activation as one oneDNN call, or None where that does not apply."""
        if (
            _FUSED_CONV is None
            or not self.folding
            or torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or not torch.backends.mkldnn.enabled
            or _tracing()
        ):
            return None
        conv = self[0]
        tail = list(self)[2:]
        attr, scalars = "none", []
        if tail and type(tail[0]) in _FUSABLE_ACTIVATIONS:
            attr, scalars = _FUSABLE_ACTIVATIONS[type(tail[0])]
            tail = tail[1:]
        weight, bias = self.folded_weight_bias()
        stride, groups = list(conv.stride), conv.groups

        def conv_fn(t: Tensor, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
            return _FUSED_CONV(t, weight, bias, list(padding), stride, list(dilation), groups, attr, scalars, None)

        x = run_conv(conv, x, conv_fn) if padding is None else conv_fn(x, padding, conv.dilation)
        if x is None:
            return None
        for layer in tail:
            x = layer(x)
        return x

    def forward(self, x: Tensor, padding: tuple[int, int] | None = None) -> Tensor:
        """``padding`` (symmetric, rows/columns) replaces the conv's own padding logic when given."""
        fused = self._fused_forward(x, padding)
        if fused is not None:
            return fused
        return self.apply_tail(self.conv_bn(x, padding))


def set_bn_folding(module: nn.Module, enabled: bool) -> nn.Module:
    """Turn eval-mode BN folding of every :class:`ConvBNAct` in ``module`` on or off; returns it."""
    for m in module.modules():
        if isinstance(m, ConvBNAct):
            m.fold_bn = enabled
            m._fold_cache = None
    return module


# aspp.py builds on ConvBNAct, so it is imported after the definitions above.
from omniseg.models.layers.aspp import (  # noqa: E402
    ASPP,
    ASPPConv,
    ASPPPooling,
    ASPPSeparableConv,
    atrous_rates_for,
)
