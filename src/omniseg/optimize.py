"""Fast CPU inference as one explicit transform: :func:`optimize_for_inference`.

A model as built (or as loaded from a checkpoint) computes the plain PyTorch / torchvision path:
BatchNorm after each convolution, oneDNN's direct convolutions, torchvision's RoI heads.
``optimize_for_inference(model)`` switches on, in place, every faster inference path omniseg has;
each computes the same function up to float rounding:

==================== ======================================================================
option               what it switches on (and where)
==================== ======================================================================
``fold_batchnorm``   BatchNorm folded into the preceding convolution: every
                     :class:`~omniseg.models.layers.conv.ConvBNAct` (DeepLab, EfficientNet-Lite),
                     the detectors' backbone copy and the mask-ID models' decoder copy
``fused_conv``       conv + ReLU/ReLU6 of a folded ``ConvBNAct`` as one oneDNN kernel (CPU)
``mkldnn_layout``    detectors (Mask R-CNN, RetinaNet, Panoptic FPN): the backbone runs as a
                     cached, folded copy kept in oneDNN's blocked layout with pre-packed weights
``gemm_1x1``         detector necks / heads: 1x1 convolutions as GEMMs
``winograd``         detector necks / heads and wide backbone 3x3 stride-1 convolutions by NNPACK
                     Winograd (~1e-5 relative differences in the features)
``class_only_masks`` Mask R-CNN: the mask predictor computes the detected class's logits only
``threaded_roi_align`` Mask R-CNN: RoIAlign spreads the RoIs over the intra-op threads
``channels_last``    EfficientNet-Lite backbones run on NHWC tensors (features returned as NCHW);
                     their detectors' backbone copy then keeps that instead of oneDNN's layout
==================== ======================================================================

An option left at ``None`` takes the model's own default (``model.inference_defaults``; detector
configs carry ``fast_inference`` / ``winograd`` keys for it: ``fast_inference=False`` makes every
default off, ``winograd=False`` that one), else ``True``. Calling it again re-configures the
model; all options ``False`` gives back the plain computation.

**For inference only.** The model is put in eval mode; the fast paths act in eval mode without
autograd (``torch.inference_mode()`` / ``torch.no_grad()``) on float32 CPU tensors, and anything
else (training, autograd, GPUs, tracing / ``torch.compile``) still takes the plain path. The
parameters and the state dict are unchanged, so an optimised model saves the same checkpoint.
Private PyTorch / torchvision ops behind these paths are probed before use and fall back to the
plain path where missing or broken (:mod:`omniseg.models.layers.private_ops`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from torch import nn

__all__ = ["INFERENCE_OPTIONS", "inference_defaults", "optimize_for_inference"]

INFERENCE_OPTIONS = (
    "fold_batchnorm",
    "fused_conv",
    "mkldnn_layout",
    "gemm_1x1",
    "winograd",
    "class_only_masks",
    "threaded_roi_align",
    "channels_last",
)

ModelT = TypeVar("ModelT", bound="nn.Module")


def inference_defaults(*, fast_inference: bool = True, winograd: bool = True) -> dict[str, bool]:
    """The :func:`optimize_for_inference` defaults that a model config's ``fast_inference`` and
    ``winograd`` keys stand for (detectors keep them as ``model.inference_defaults``)."""
    if not fast_inference:
        return dict.fromkeys(INFERENCE_OPTIONS, False)
    return {"winograd": bool(winograd)}


def _resolve(model: nn.Module, explicit: Mapping[str, bool | None]) -> dict[str, bool]:
    defaults = getattr(model, "inference_defaults", None) or {}
    unknown = set(defaults) - set(INFERENCE_OPTIONS)
    if unknown:
        raise ValueError(f"{type(model).__name__}.inference_defaults has unknown options {sorted(unknown)}")
    resolved = {}
    for name in INFERENCE_OPTIONS:
        value = explicit.get(name)
        resolved[name] = bool(defaults.get(name, True) if value is None else value)
    return resolved


def optimize_for_inference(
    model: ModelT,
    *,
    fold_batchnorm: bool | None = None,
    fused_conv: bool | None = None,
    mkldnn_layout: bool | None = None,
    gemm_1x1: bool | None = None,
    winograd: bool | None = None,
    class_only_masks: bool | None = None,
    threaded_roi_align: bool | None = None,
    channels_last: bool | None = None,
) -> ModelT:
    """Switch ``model``'s fast CPU inference paths on (in place; returns ``model``, in eval mode).

    For inference only; see the module docstring for what each option switches and the
    defaults. ``model.inference_options`` records the options applied. Call it after moving the
    model to its device (the paths are CPU-only; elsewhere the model computes as before).
    """
    from omniseg.models.layers.conv import ConvBNAct
    from omniseg.models.layers.fast_inference import InferenceCopy, configure_fast_convs

    options = _resolve(
        model,
        {
            "fold_batchnorm": fold_batchnorm,
            "fused_conv": fused_conv,
            "mkldnn_layout": mkldnn_layout,
            "gemm_1x1": gemm_1x1,
            "winograd": winograd,
            "class_only_masks": class_only_masks,
            "threaded_roi_align": threaded_roi_align,
            "channels_last": channels_last,
        },
    )
    model.eval()
    fold = options["fold_batchnorm"]
    for m in model.modules():
        if isinstance(m, ConvBNAct):
            m.fold_bn = fold
            m.fused_conv = fold and options["fused_conv"]
            m.clear_cache()
        # a module with a fast path of its own names the option that switches it (``fast``)
        option = getattr(type(m), "inference_option", None)
        if option is not None:
            if option not in options:
                raise ValueError(f"{type(m).__name__}.inference_option {option!r} is not an inference option")
            m.fast = options[option]
        # a model that can run a cached fast copy of its backbone holds it as ``inference_backbone``
        if hasattr(m, "inference_backbone"):
            copy_options = {
                "fold": fold,
                "mkldnn": options["mkldnn_layout"],
                "gemm": options["gemm_1x1"],
                "winograd": options["winograd"],
            }
            m.inference_backbone = InferenceCopy(**copy_options) if any(copy_options.values()) else None
        # a mask-ID model (MaX-DeepLab, kMaX-DeepLab) runs a folded copy of itself for its decoder
        if hasattr(m, "inference_decoder"):
            from omniseg.models.max_deeplab import decode_image

            m.inference_decoder = (
                InferenceCopy(fold=True, mkldnn=False, gemm=False, winograd=False, run=decode_image) if fold else None
            )
    configure_fast_convs(model, gemm=options["gemm_1x1"], winograd=options["winograd"])
    model.inference_options = options
    return model
