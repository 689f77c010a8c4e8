"""Load torchvision detection checkpoints into omniseg's RetinaNet and Mask R-CNN.

torchvision keeps the backbone and the FPN in one ``backbone`` module (``backbone.body.*`` is the
ResNet, ``backbone.fpn.*`` the FPN); omniseg keeps them apart (``backbone.*``, ``fpn.*``). Every
other key (``rpn.*``, ``roi_heads.*``, ``head.*``) is the same, because those modules are
torchvision's. So the mapping is a prefix rename, and the load is strict: anything left over or
missing is an error naming the keys.

torchvision's COCO_V1 checkpoints were trained with frozen batch norm at ``eps=0`` (torchvision
calls ``overwrite_eps(model, 0.0)`` when loading them); pass ``frozen_bn_eps=0.0`` for those.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = [
    "convert_torchvision_detection_keys",
    "load_torchvision_maskrcnn",
    "load_torchvision_maskrcnn_into_panoptic",
    "load_torchvision_retinanet",
]

_PREFIXES = (("backbone.body.", "backbone."), ("backbone.fpn.", "fpn."), ("module.", ""))


def convert_torchvision_detection_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision detection keys -> omniseg keys (``backbone.body.`` -> ``backbone.``,
    ``backbone.fpn.`` -> ``fpn.``; a DataParallel ``module.`` prefix is dropped)."""
    converted = {}
    for key, value in state_dict.items():
        for old, new in _PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
        converted[key] = value
    return converted


def _load(model: nn.Module, state_dict: Mapping[str, Tensor], what: str, frozen_bn_eps: float | None) -> None:
    state = convert_torchvision_detection_keys(state_dict)
    # a randomly initialised torchvision model has plain BatchNorm2d: its counters mean nothing here
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"torchvision {what} state dict does not fit this model (is the backbone resnet50?): "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    mismatched = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError(
            f"torchvision {what} state dict: shape mismatch for {mismatched[:8]} "
            f"(e.g. {mismatched[0]}: {tuple(state[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)}); "
            "is num_classes the same?"
        )
    model.load_state_dict(state, strict=True)
    if frozen_bn_eps is not None:
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d | nn.BatchNorm2d):
                module.eps = frozen_bn_eps


def load_torchvision_maskrcnn(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, frozen_bn_eps: float | None = None
) -> nn.Module:
    """Load a torchvision ``maskrcnn_resnet50_fpn`` state dict into an omniseg ``mask_rcnn``
    (``backbone="resnet50"``, same ``num_classes``)."""
    _load(model, state_dict, "Mask R-CNN", frozen_bn_eps)
    return model


def load_torchvision_retinanet(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, frozen_bn_eps: float | None = None
) -> nn.Module:
    """Load a torchvision ``retinanet_resnet50_fpn`` state dict into an omniseg ``retinanet``
    (``backbone="resnet50"``, same ``num_classes``)."""
    _load(model, state_dict, "RetinaNet", frozen_bn_eps)
    return model


def load_torchvision_maskrcnn_into_panoptic(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, frozen_bn_eps: float | None = None
) -> nn.Module:
    """Initialise the Mask R-CNN part of an omniseg ``panoptic_fpn`` from a torchvision
    ``maskrcnn_resnet50_fpn`` state dict; the semantic head keeps its own weights."""
    semantic = {k: v for k, v in model.state_dict().items() if k.startswith("semantic_head.")}
    _load(model, {**state_dict, **semantic}, "Mask R-CNN", frozen_bn_eps)
    return model
