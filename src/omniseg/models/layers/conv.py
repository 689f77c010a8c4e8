"""conv -> BatchNorm -> activation blocks, and batch-norm folding.

A built model computes ``act(bn(conv(x)))`` as written. :func:`omniseg.optimize_for_inference`
switches each :class:`ConvBNAct` to its inference form: BN folded into the convolution (cached
folded weights) and, on CPU, conv + ReLU/ReLU6 as one oneDNN kernel
(``torch.ops.mkldnn._convolution_pointwise``, the kernel torch.compile's CPU backend emits; a
private op, probed before use with the unfused convolution as fallback).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.layers.private_ops import PrivateOp, tensor_key

__all__ = [
    "FUSED_CONV",
    "ConvBNAct",
    "ConvFn",
    "conv_with_weights",
    "fold_batch_norm",
    "run_conv",
    "tracing",
]


def tracing() -> bool:
    """Whether a graph is being captured (tracing, ``torch.compile``): exported graphs hold standard ops."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


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


def conv_with_weights(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """What ``conv(x)`` computes (its padding rule, its rewrites), with ``weight``/``bias`` instead of its own."""
    custom = getattr(conv, "conv_with_weights", None)
    if custom is not None:
        return custom(x, weight, bias)
    out = run_conv(conv, x, lambda t, p, d: F.conv2d(t, weight, bias, conv.stride, p, d, conv.groups))
    if out is not None:
        return out
    # another padding mode or a string padding: the module's own forward with the weights swapped in
    if conv.bias is not None:
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x,))
    out = torch.func.functional_call(conv, {"weight": weight}, (x,))
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def fold_batch_norm(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
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


# ----------------------------------------------------------------- oneDNN fused conv + activation
def _resolve_fused_conv() -> Callable[..., Tensor] | None:
    if not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._convolution_pointwise.default


def _probe_fused_conv(op: Callable[..., Tensor]) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 7, 6, generator=g)
    weight, bias = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, generator=g)
    got = op(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], None)
    expected = F.relu(F.conv2d(x, weight, bias, padding=1))
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


FUSED_CONV = PrivateOp("torch.ops.mkldnn._convolution_pointwise", _resolve_fused_conv, _probe_fused_conv)

# activation module type -> (oneDNN post-op name, its scalars)
_FUSABLE_ACTIVATIONS: dict[type, tuple[str, list[float]]] = {
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
}


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> tail layers (activation, ...); children ``0``/``1``/``2`` as torchvision names them.

    As built, ``forward`` is ``tail(bn(conv(x)))``. Two inference forms, switched on by
    :func:`omniseg.optimize_for_inference` (``fold_bn`` and ``fused_conv``):

    * ``fold_bn``: in eval mode the BN affine is folded into the convolution (one pass over the
      activations instead of two); the folded weights are cached while gradients are off and
      recomputed whenever a weight, BN parameter or running statistic changes (``load_state_dict``,
      optimiser step, ``.to()``);
    * ``fused_conv`` (with ``fold_bn``): on CPU with gradients off, conv + ReLU/ReLU6 run as one
      oneDNN kernel, saving another pass. Never while tracing/compiling.

    Results equal ``act(bn(conv(x)))`` up to float rounding.
    """

    fold_bn: bool = False
    fused_conv: bool = False

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, *tail: nn.Module) -> None:
        super().__init__(conv, bn, *tail)
        self._fold_cache: tuple[tuple, Tensor, Tensor] | None = None

    @property
    def folding(self) -> bool:
        """Whether ``forward`` folds BN into the conv (eval mode, running stats, ``fold_bn``)."""
        return not self.training and self.fold_bn and getattr(self[1], "running_var", None) is not None

    def folded_weight_bias(self) -> tuple[Tensor, Tensor]:
        """The conv weight and bias with BN folded in (cached while gradients are off)."""
        conv, bn = self[0], self[1]
        if torch.is_grad_enabled() or tracing():  # fold differentiably / traceably, never cache
            return fold_batch_norm(conv, bn)
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        keys = [None if t is None else tensor_key(t) for t in tensors]
        if any(k is None for k, t in zip(keys, tensors, strict=True) if t is not None):
            return fold_batch_norm(conv, bn)  # no usable version counter: fold every call, cache nothing
        key = (*keys, bn.eps)
        if self._fold_cache is None or self._fold_cache[0] != key:
            weight, bias = fold_batch_norm(conv, bn)
            self._fold_cache = (key, weight, bias)
        return self._fold_cache[1], self._fold_cache[2]

    def clear_cache(self) -> None:
        self._fold_cache = None

    def apply_tail(self, x: Tensor) -> Tensor:
        """The layers after BN (activation, dropout...)."""
        for layer in list(self)[2:]:
            x = layer(x)
        return x

    def conv_bn(self, x: Tensor, padding: tuple[int, int] | None = None) -> Tensor:
        """conv and BN only (BN folded when :attr:`folding`); ``padding`` overrides the conv's own padding."""
        conv = self[0]
        folding = self.folding
        if not folding and padding is None:
            return self[1](conv(x))
        weight, bias = self.folded_weight_bias() if folding else (conv.weight, conv.bias)
        if padding is None:
            x = conv_with_weights(conv, x, weight, bias)
        else:
            x = F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        return x if folding else self[1](x)

    def _fused_forward(self, x: Tensor, padding: tuple[int, int] | None) -> Tensor | None:
        """conv + BN + activation as one oneDNN call, or None where that does not apply."""
        if (
            not self.fused_conv
            or not self.folding
            or torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or x.layout != torch.strided
            or not torch.backends.mkldnn.enabled
            or tracing()
        ):
            return None
        op = FUSED_CONV.get()
        if op is None:
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
            return op(t, weight, bias, list(padding), stride, list(dilation), groups, attr, scalars, None)

        try:
            x = run_conv(conv, x, conv_fn) if padding is None else conv_fn(x, padding, conv.dilation)
        except RuntimeError as exc:  # e.g. a shape or layout this build's kernel rejects
            FUSED_CONV.fail(exc)
            return None
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
