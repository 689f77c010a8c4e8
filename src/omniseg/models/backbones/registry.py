"""The backbone interface and registry (:mod:`omniseg.models.backbones` re-exports them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "Backbone",
    "PretrainedWeightsUnavailable",
    "build_backbone",
    "list_backbones",
    "load_weights_file",
    "register_backbone",
]

VALID_OUTPUT_STRIDES = (8, 16, 32)


class PretrainedWeightsUnavailable(RuntimeError):
    """Raised when pretrained weights are asked for but cannot be had without a download."""


class Backbone(nn.Module):
    """Base class: ``forward(x) -> [C4, C8, C16, C32]`` (nominal strides 4, 8, 16, 32).

    ``output_stride`` is the real stride of the deepest map (8, 16 or 32); the maps whose nominal
    stride exceeds it stay at ``output_stride`` resolution.
    """

    channels: list[int]
    strides: list[int]
    output_stride: int

    def __init__(self) -> None:
        super().__init__()
        self.strides = [4, 8, 16, 32]
        self.output_stride = 32

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def stem_modules(self) -> list[nn.Module]:
        """The layers that compute the stride-4 map (what Detectron2's ``FREEZE_AT=2`` freezes)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not say which layers form its stem; train it with freeze_stem: false"
        )


BackboneBuilder = Callable[..., Backbone]
_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: register ``fn(*, output_stride, pretrained, **kwargs) -> Backbone`` as ``name``."""

    def decorator(fn: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES:
            raise KeyError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    """Registered backbone names (``timm:<name>`` is accepted in addition to these)."""
    return sorted(_BACKBONES) + ["timm:<any timm model>"]


def build_backbone(
    name: str, *, output_stride: int = 32, pretrained: bool | str = False, **kwargs
) -> Backbone:
    """Build backbone ``name`` at ``output_stride`` (8, 16 or 32).

    ``pretrained``: ``False`` (random init), ``True`` (weights shipped with an installed package,
    else :class:`PretrainedWeightsUnavailable`) or a path to a local weights file.
    Extra keyword arguments go to the backbone's constructor.
    """
    if output_stride not in VALID_OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride}")
    if isinstance(pretrained, (str, Path)):
        pretrained = str(pretrained)
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pretrained weights file for backbone {name!r} not found: {pretrained}")
    if name.startswith("timm:"):
        from omniseg.models.backbones.timm_backbone import TimmBackbone

        return TimmBackbone(name[len("timm:") :], output_stride=output_stride, pretrained=pretrained, **kwargs)
    try:
        builder = _BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {list_backbones()}") from None
    return builder(output_stride=output_stride, pretrained=pretrained, **kwargs)


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors`` file.

    Unwraps the common ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoint layouts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file: say which file
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state dict (got {type(state).__name__})")
    return state
