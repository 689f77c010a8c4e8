"""The model registry: every method is built through it.

A method registers a keyword-only builder::

    @register_model("deeplabv3plus")
    def deeplabv3plus(*, num_classes: int, backbone: str = "efficientnet_lite0", ...) -> nn.Module: ...

``build_model({"name": "deeplabv3plus", "num_classes": 12})`` calls it. Builders name their own
arguments (backbone, classes) and forward ``**kwargs`` to the model class, so every constructor
option is reachable from a config. The registry records the builder's arguments (its own with
their defaults, the forwarded ones as given) on the model as ``model.config`` (JSON-serialisable,
``name`` included), so ``build_model(model.config)`` rebuilds the same architecture from a checkpoint.

Method modules are imported on first use, so importing :mod:`omniseg.models` stays cheap and a
method under construction elsewhere in the tree cannot break the others.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import pkgutil
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["attach_categories", "build_model", "list_models", "model_arguments", "register_model"]

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_DISCOVERED = False

# Subpackages that hold building blocks, not methods.
_NOT_METHODS = {"backbones", "layers", "registry", "optimize", "torchvision_import", "hf_import", "crf"}
# The module of a model whose name is not its module's (a test holds every builder to this), so
# that loading one model imports one method module: importing them all costs seconds of start-up
# (torchvision's detection code pulls in torch._dynamo, the matchers scipy.optimize).
_MODULE_OF = {"deeplabv1": "deeplab", "deeplabv2": "deeplab", "deeplabv3": "deeplab", "deeplabv3plus": "deeplab"}


def home_module(name: str) -> str:
    """The method module expected to register model ``name`` (``omniseg.models.<module>``)."""
    return _MODULE_OF.get(name, name)


def _find(name: str) -> None:
    """Import the module that registers ``name``: its home module first, every module if need be."""
    package = __name__.rpartition(".")[0]
    module = home_module(name)
    if module not in _NOT_METHODS and importlib.util.find_spec(f"{package}.{module}") is not None:
        try:
            importlib.import_module(f"{package}.{module}")
        except Exception as exc:  # reported on lookup, as discovery does
            _IMPORT_ERRORS[module] = f"{type(exc).__name__}: {exc}"
    if name not in _MODELS:
        _discover()


def _jsonable(value: Any) -> Any:
    """Tuples to lists, tensors/arrays to lists; anything else must already be JSON."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_dicts"):  # a CategoryTable
        return value.to_dicts()
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    return value


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a keyword-only model builder under ``name``.

    The returned wrapper sets ``model.config`` to ``{"name": name, **all builder arguments}``
    unless the builder already set a non-empty ``config`` itself.
    """

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _MODELS and _MODELS[name] is not fn:
            raise KeyError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def builder(*args: Any, **kwargs: Any) -> nn.Module:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            model = fn(*bound.args, **bound.kwargs)
            if not getattr(model, "config", None):
                arguments = dict(bound.arguments)
                extra = arguments.pop(
                    next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), ""), {}
                )
                config = _jsonable({"name": name, **arguments, **extra})
                try:
                    json.dumps(config)
                except TypeError as exc:
                    warnings.warn(f"config of model {name!r} is not JSON-serialisable: {exc}", stacklevel=2)
                model.config = config
            return model

        _MODELS[name] = builder
        return builder

    return decorator


def _discover() -> None:
    """Import every method module in this package once, so that their builders register."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name in _NOT_METHODS or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except Exception as exc:  # one broken method must not hide the others; reported on lookup
            _IMPORT_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"


def list_models() -> list[str]:
    """Names of all registered models."""
    _discover()
    return sorted(_MODELS)


def model_arguments(name: str) -> list[str]:
    """The keyword arguments of model ``name``'s builder (to fill in what a dataset knows)."""
    if name not in _MODELS:
        _find(name)
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(_MODELS)}")
    return list(inspect.signature(_MODELS[name]).parameters)


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build a model from ``{"name": <registered name>, **builder kwargs}``."""
    if "name" not in config:
        raise KeyError(f"model config needs a 'name' (one of {list_models()}); got keys {sorted(config)}")
    kwargs = dict(config)
    name = kwargs.pop("name")
    if name not in _MODELS:
        _find(name)
    if name not in _MODELS:
        hint = f"; modules that failed to import: {_IMPORT_ERRORS}" if _IMPORT_ERRORS else ""
        raise KeyError(f"unknown model {name!r}; registered: {sorted(_MODELS)}{hint}")
    return _MODELS[name](**kwargs)


def attach_categories(model: nn.Module, categories: Any) -> nn.Module:
    """Give a model that was built from class counts alone (DeepLab) the category table its
    ``post_process`` maps class indices through; a model that has one keeps it."""
    if getattr(model, "categories", None) is None:
        model.categories = categories
    return model
