"""Faster CPU inference for convolutional networks, with the same outputs (to float rounding).

Four things make a ResNet-FPN detector slow on a CPU in eager PyTorch, and none of them needs a
different model to fix:

* **3x3 stride-1 convolutions** dominate the FLOPs (FPN outputs, RPN / RetinaNet heads, the mask
  head). oneDNN runs them as direct convolutions; NNPACK, which ships inside the x86/ARM PyTorch
  builds, runs them with Winograd F(6x6, 3x3) transforms and does 2-3x less work. PyTorch only
  picks NNPACK by itself for batches of 16 or more, so :class:`FastConv2d` calls it directly. Its
  results differ from a direct convolution by ~1e-5 relative (rounding in the transforms). With
  trained-like weights a detector's boxes then still agree to an ulp or two; an untrained ResNet
  whose residual branches are as large as its identity paths amplifies any rounding (batch-norm
  folding and GEMMs included) to 1e-3-1e-2 px, which is why there is a switch
  (``optimize_for_inference(model, winograd=False)``) and the exact path (the model as built).
* **1x1 convolutions** are plain matrix products; MKL's GEMM on the NCHW tensor avoids oneDNN's
  layout reorders and is 1.3-2x faster at these shapes (same sums in another order: ~1e-7).
* **Reorders**: on NCHW tensors every oneDNN convolution converts its input, output and weights to
  and from a blocked layout. A backbone kept in that layout end to end (:class:`MkldnnLayout`,
  weights packed once) skips them, with bit-identical results; with Winograd on, its wide 3x3
  stride-1 convolutions step out of the layout for NNPACK (:class:`MkldnnWinogradConv2d`).
* **Frozen batch norm** after every backbone convolution is a memory-bound pass over each feature
  map; in inference it is an affine map that folds into the convolution's weight and bias.

None of this is on in a built model: :func:`omniseg.optimize_for_inference` switches it on
(:func:`configure_fast_convs`, :class:`InferenceCopy`). Even then the fast paths run only where
they are exact in meaning: no autograd (``torch.no_grad`` / ``inference_mode``), float32 CPU
tensors. Training, GPUs and gradient-based inspection take the ordinary ``nn.Conv2d`` path.

The private PyTorch APIs used here -- ``torch._nnpack_spatial_convolution`` (with
``torch._nnpack_available``), ``torch._C._nn.mkldnn_reorder_conv2d_weight`` and tensor version
counters -- are each probed before first use (:mod:`omniseg.models.layers.private_ops`); where one
is missing or fails, the layer computes its plain path: oneDNN's direct 3x3 convolution instead
of Winograd, unpacked oneDNN weights, the model's own backbone instead of the cached copy.

Folding batch norm changes a module's structure (and its state dict), so it is applied to a
private copy: :class:`InferenceCopy` keeps a folded, fast copy of a module and rebuilds it when any
weight of the original changes (an optimiser step, ``load_state_dict``, ``.to(device)``), so the
model's own state dict never changes.
"""

from __future__ import annotations

import copy
import itertools
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.layers.private_ops import PrivateOp, tensor_key

__all__ = [
    "MKLDNN_REORDER",
    "NNPACK_CONV",
    "FastConv2d",
    "InferenceCopy",
    "MkldnnConv2d",
    "MkldnnLayout",
    "MkldnnWinogradConv2d",
    "configure_fast_convs",
    "fast_path_enabled",
    "fold_batchnorms",
    "freeze_batchnorms",
    "nnpack_available",
    "to_fast_convs",
    "to_mkldnn_layout",
    "winograd_conv",
]


# ----------------------------------------------------------------------- NNPACK (Winograd 3x3)
def _resolve_nnpack():
    # torch._nnpack_available() also initialises NNPACK; calling the convolution before that fails.
    if not torch._nnpack_available():
        raise RuntimeError("this PyTorch build has no NNPACK")
    return torch._nnpack_spatial_convolution


def _probe_nnpack(op) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 12, 10, generator=g)
    weight, bias = torch.randn(6, 8, 3, 3, generator=g), torch.randn(6, generator=g)
    got = op(x, weight, bias, [1, 1])
    expected = F.conv2d(x, weight, bias, padding=1)
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-3, atol=1e-3)


NNPACK_CONV = PrivateOp("torch._nnpack_spatial_convolution", _resolve_nnpack, _probe_nnpack)


def nnpack_available() -> bool:
    """Whether the Winograd (NNPACK) path for 3x3 convolutions is usable in this process."""
    return NNPACK_CONV.available()


def fast_path_enabled(x: Tensor) -> bool:
    """The fast kernels apply to float32 CPU tensors outside autograd only, and never while a graph
    is being captured (tracing, scripting, ``torch.compile``, ONNX export): those see plain convs."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
    )


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """1x1 convolution of a contiguous NCHW tensor as one GEMM per image."""
    n, c, h, w = x.shape
    w2d = weight.view(weight.shape[0], c)
    flat = x.reshape(n, c, h * w)
    outs = []
    for i in range(n):
        if bias is None:
            outs.append(torch.mm(w2d, flat[i]))
        else:
            outs.append(torch.addmm(bias[:, None], w2d, flat[i]))
    out = outs[0].unsqueeze(0) if n == 1 else torch.stack(outs)
    return out.view(n, -1, h, w)


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) with faster CPU inference kernels, off until
    switched on (:func:`configure_fast_convs`, called by :func:`omniseg.optimize_for_inference`).

    Outside autograd on float32 CPU tensors: with ``gemm``, 1x1 convolutions (any stride) run as
    GEMMs; with ``winograd``, 3x3 stride-1 convolutions as NNPACK Winograd convolutions; everything
    else (and everything while both are off) is ``nn.Conv2d``.
    """

    gemm: bool = False
    winograd: bool = False

    def _kind(self) -> str:
        plain = self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
        if plain and self.kernel_size == (1, 1) and self.padding == (0, 0):
            return "pointwise"
        if plain and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1):
            return "winograd"
        return "default"

    def forward(self, x: Tensor) -> Tensor:
        if not (self.gemm or self.winograd) or not fast_path_enabled(x) or x.dim() != 4 or not x.is_contiguous():
            return super().forward(x)
        kind = self._kind()
        if kind == "pointwise" and self.gemm:
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]].contiguous()
            return _pointwise(x, self.weight, self.bias)
        # Winograd's fixed tile cost does not pay on tiny maps (e.g. P6 at 13x17): oneDNN is faster there
        if (
            kind == "winograd"
            and self.winograd
            and x.numel()
            and x.shape[0] * x.shape[-2] * x.shape[-1] >= 400
        ):
            out = winograd_conv(x, self.weight, self.bias)
            if out is not None:
                return out
        return super().forward(x)


def winograd_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """3x3, stride 1, padding 1 convolution by NNPACK (Winograd); ``None`` where NNPACK is
    missing or failed (the caller then runs its plain convolution)."""
    op = NNPACK_CONV.get()
    if op is None:
        return None
    try:
        return op(x, weight, bias, [1, 1])
    except RuntimeError as exc:  # e.g. an NNPACK build without this CPU's kernels: never again
        NNPACK_CONV.fail(exc)
        return None


def to_fast_convs(module: nn.Module) -> nn.Module:
    """In place: every plain ``nn.Conv2d`` in ``module`` becomes a :class:`FastConv2d` (the same
    object, its class changed), which computes exactly ``nn.Conv2d`` until
    :func:`configure_fast_convs` switches its kernels on.

    Parameters, buffers and hooks stay the same objects, so optimisers, state dicts and weight
    tying are unaffected. Subclasses of ``nn.Conv2d`` (e.g. TF "same" padding) keep their class,
    because their forward does more than a convolution.
    """
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = FastConv2d
    return module


def configure_fast_convs(module: nn.Module, *, gemm: bool, winograd: bool) -> int:
    """Switch the kernels of every :class:`FastConv2d` in ``module``: GEMM 1x1 convolutions and
    Winograd 3x3 ones (both off: plain ``nn.Conv2d``). Returns how many convolutions it set."""
    count = 0
    for m in module.modules():
        if isinstance(m, FastConv2d):
            m.gemm, m.winograd = bool(gemm), bool(winograd)
            count += 1
    return count


def _is_batchnorm(module: nn.Module) -> bool:
    # torchvision is imported only by the models that use it (its import pulls in torch._dynamo,
    # ~1-2 s of start-up): if it is not loaded, no module can be one of its FrozenBatchNorm2d
    tv_misc = sys.modules.get("torchvision.ops.misc")
    if tv_misc is not None and isinstance(module, tv_misc.FrozenBatchNorm2d):
        return True
    return (
        isinstance(module, nn.BatchNorm2d) and module.track_running_stats and module.running_mean is not None
    )


def freeze_batchnorms(module: nn.Module) -> nn.Module:
    """In place: every ``nn.BatchNorm2d`` becomes torchvision's ``FrozenBatchNorm2d`` (same eps).

    Detection trains with a few images per GPU, too few for batch statistics; frozen statistics
    are what torchvision and Detectron2 do with a pretrained backbone. The state dict keys stay
    the same (``num_batches_tracked`` is dropped on load). timm's fused ``BatchNormAct2d`` is
    left to timm's own freezer, which keeps its activation.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) in (nn.BatchNorm2d, nn.SyncBatchNorm)
                and child.affine
                and child.track_running_stats
            ):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                with torch.no_grad():
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
                setattr(parent, name, frozen.to(child.weight.device))
            elif type(child).__name__ == "BatchNormAct2d":
                from timm.layers import freeze_batch_norm_2d

                setattr(parent, name, freeze_batch_norm_2d(child))
    return module


@torch.no_grad()
def fold_batchnorms(module: nn.Module) -> int:
    """In place, for inference only: fold each batch norm into the convolution just before it.

    Without tracing the forward, "just before" means registered consecutively in the same parent,
    which is how torchvision, timm and omniseg blocks are written (conv1, bn1, ...; Sequential
    conv -> bn -> act). :class:`InferenceCopy` checks the result against the unfolded module, so
    a block that registers its layers in another order is detected, not silently wrong.
    Returns the number of folded pairs.
    """
    folded = 0
    for parent in list(module.modules()):
        if hasattr(parent, "folded_weight_bias"):  # omniseg's ConvBNAct folds by itself (and fuses more)
            continue
        for (_, conv), (second, bn) in itertools.pairwise(list(parent.named_children())):
            if not (isinstance(conv, nn.Conv2d) and _is_batchnorm(bn)):
                continue
            if bn.running_mean.numel() != conv.out_channels:
                continue
            scale = (bn.running_var + bn.eps).rsqrt()
            if bn.weight is not None:
                scale = bn.weight * scale
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
            act = getattr(bn, "act", None)  # timm BatchNormAct2d: keep its activation
            setattr(parent, second, act if isinstance(act, nn.Module) else nn.Identity())
            folded += 1
    return folded


def _signature(module: nn.Module) -> tuple | None:
    """The weights' identity and versions; ``None`` where version counters are unusable."""
    keys = tuple(tensor_key(t) for t in itertools.chain(module.parameters(), module.buffers()))
    return None if any(k is None for k in keys) else keys


# -------------------------------------------------------------------- oneDNN weight pre-packing
def _resolve_reorder():
    if not torch.backends.mkldnn.is_available():
        return None
    return torch._C._nn.mkldnn_reorder_conv2d_weight


def _probe_reorder(reorder) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 9, 8, generator=g)
    weight, bias = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, generator=g)
    packed = reorder(weight.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1)
    got = torch.mkldnn_convolution(x.to_mkldnn(), packed, bias.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1)
    expected = F.conv2d(x, weight, bias, padding=1)
    return torch.allclose(got.to_dense(), expected, rtol=1e-4, atol=1e-4)


MKLDNN_REORDER = PrivateOp("torch._C._nn.mkldnn_reorder_conv2d_weight", _resolve_reorder, _probe_reorder)


class MkldnnConv2d(nn.Module):
    """Inference-only convolution on oneDNN-layout tensors, weights packed once.

    On an NCHW tensor every oneDNN convolution reorders its input into a blocked layout, its
    output back, and its weights too; a chain of them kept in the blocked layout skips all three.
    Same kernel, so the same results bit for bit. Without the (private) weight pre-packing op
    the weights stay in oneDNN's plain layout and are reordered per call.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        weight = conv.weight.detach().float().to_mkldnn()
        bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        reorder = MKLDNN_REORDER.get()
        if reorder is not None:
            try:
                weight = reorder(weight, self.padding, self.stride, self.dilation, self.groups)
            except RuntimeError as exc:
                MKLDNN_REORDER.fail(exc)
        # plain attributes, not buffers: oneDNN tensors have no storage to save or deep-copy
        self.packed = (weight, bias.to_mkldnn())

    def forward(self, x: Tensor) -> Tensor:
        return torch.mkldnn_convolution(
            x, self.packed[0], self.packed[1], self.padding, self.stride, self.dilation, self.groups
        )


class MkldnnWinogradConv2d(nn.Module):
    """A 3x3 stride-1 convolution inside a oneDNN-layout chain, run by NNPACK (Winograd).

    The two layout conversions cost less than the direct convolution saves once a layer has a
    hundred-odd channels (ResNet stages 2-4); below that the chain keeps oneDNN.
    """

    min_channels = 128

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight.detach().float().clone()
        self.bias = None if conv.bias is None else conv.bias.detach().float().clone()
        self.fallback = MkldnnConv2d(conv)

    @classmethod
    def applies(cls, conv: nn.Conv2d) -> bool:
        plain = conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
        shape = conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        return plain and shape and conv.in_channels >= cls.min_channels and nnpack_available()

    def forward(self, x: Tensor) -> Tensor:
        out = winograd_conv(x.to_dense(), self.weight, self.bias)
        return self.fallback(x) if out is None else out.to_mkldnn()


class MkldnnLayout(nn.Module):
    """Runs ``module`` (whose plain convolutions became :class:`MkldnnConv2d`) in oneDNN layout:
    dense tensors in, dense tensors out."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> object:
        return _to_dense(self.module(x.to_mkldnn()))


def _to_dense(out: object) -> object:
    if isinstance(out, Tensor):
        return out.to_dense() if out.is_mkldnn else out
    if isinstance(out, dict):
        return type(out)((k, _to_dense(v)) for k, v in out.items())
    return type(out)(_to_dense(v) for v in out)  # type: ignore[call-overload]


def to_mkldnn_layout(module: nn.Module, *, winograd: bool = False) -> MkldnnLayout:
    """A copy of ``module`` running in oneDNN layout. Only plain convolutions are converted (wide
    3x3 stride-1 ones to :class:`MkldnnWinogradConv2d` with ``winograd``); other layers must accept
    oneDNN tensors (ReLU, max-pool and ``+`` do) or the caller's check fails and it keeps the dense
    module."""
    converted = copy.deepcopy(module)
    for parent in list(converted.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Conv2d, FastConv2d):
                wide = winograd and MkldnnWinogradConv2d.applies(child)
                setattr(parent, name, MkldnnWinogradConv2d(child) if wide else MkldnnConv2d(child))
    return MkldnnLayout(converted)


class InferenceCopy:
    """A fast inference copy of a module, rebuilt when the module's weights change.

    The copy has batch norms folded into convolutions (``fold``), and runs in oneDNN layout
    (``mkldnn``, :func:`to_mkldnn_layout`: no reorders, exactly the arithmetic of the folded module)
    or, where that layout does not apply (a layer without oneDNN-layout support), with
    :class:`FastConv2d` convolutions (GEMM 1x1 if ``gemm``, Winograd 3x3 if ``winograd``). Each step
    is checked against the original module on a small input and skipped if it changes the outputs
    beyond rounding or fails: a ``check_size`` square image, passed as ``run(module, image)``
    (default ``module(image)``; e.g. a whole model's decoder checked on its backbone's features).

    Not an ``nn.Module`` on purpose: held outside the module tree, it stays out of the state dict,
    ``.to()`` and ``.parameters()``; the weight signature check notices device moves and in-place
    updates (each costs microseconds per forward). That check reads PyTorch's private tensor
    version counters; where they are unusable, :meth:`get` returns the module itself.
    """

    def __init__(
        self,
        *,
        fold: bool = True,
        winograd: bool = True,
        mkldnn: bool = True,
        gemm: bool = True,
        check_size: int = 64,
        run: Callable[[nn.Module, Tensor], object] | None = None,
    ) -> None:
        self.fold = fold
        self.run = run
        self.winograd = winograd
        self.mkldnn = mkldnn
        self.gemm = gemm
        self.check_size = check_size
        self._copy: nn.Module | None = None
        self._signature: tuple | None = None

    def __getstate__(self) -> dict:
        # the copy is a cache (and oneDNN tensors cannot be pickled or deep-copied): rebuild it
        return {**self.__dict__, "_copy": None, "_signature": None}

    def get(self, module: nn.Module) -> nn.Module:
        """The fast copy of ``module`` (built or rebuilt as needed), or ``module`` itself when its
        weights cannot be tracked."""
        signature = _signature(module)
        if signature is None:
            self._copy = self._signature = None
            return module
        if self._copy is None or signature != self._signature:
            self._copy = self._build(module)
            self._signature = signature
        return self._copy

    def invalidate(self) -> None:
        """Drop the copy (rebuilt on the next :meth:`get`), e.g. after changing ``fold``/``winograd``."""
        self._copy = None

    @torch.no_grad()
    def _build(self, module: nn.Module) -> nn.Module:
        param = next(module.parameters())
        x = torch.randn(1, 3, self.check_size, self.check_size, generator=torch.Generator().manual_seed(0))
        x = x.to(device=param.device, dtype=param.dtype)
        was_training = module.training
        module.eval()
        run = self.run or (lambda m, image: m(image))
        try:
            expected = _flatten(run(module, x))
        finally:
            module.train(was_training)

        def same(candidate: nn.Module) -> bool:
            try:
                got = _flatten(run(candidate, x))
            except Exception:  # e.g. an op without oneDNN-layout support: not this copy
                return False
            return len(got) == len(expected) and all(
                torch.allclose(e, g, rtol=1e-3, atol=1e-4 * (1 + e.abs().max().item()))
                for e, g in zip(expected, got, strict=True)
            )

        fast = _frozen_copy(module)
        if self.fold and fold_batchnorms(fast) and not same(fast):
            warnings.warn(
                f"batch-norm folding changed the outputs of {type(module).__name__}; using it unfolded",
                stacklevel=3,
            )
            fast = _frozen_copy(module)
        usable = (
            param.device.type == "cpu"
            and param.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
        )
        if self.mkldnn and usable and not _runs_channels_last(fast):
            candidate = to_mkldnn_layout(fast, winograd=self.winograd)
            if same(candidate):
                return candidate
        fast = to_fast_convs(fast)
        configure_fast_convs(fast, gemm=self.gemm, winograd=self.winograd)
        return fast


def _runs_channels_last(module: nn.Module) -> bool:
    """Whether a part of ``module`` runs on NHWC tensors (``optimize_for_inference``'s
    ``channels_last``), which is faster than oneDNN's blocked layout for it: keep that."""
    return any(
        getattr(type(m), "inference_option", None) == "channels_last" and getattr(m, "fast", False)
        for m in module.modules()
    )


def _frozen_copy(module: nn.Module) -> nn.Module:
    fast = copy.deepcopy(module).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast


def _flatten(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in _flatten(item)]  # type: ignore[union-attr]
