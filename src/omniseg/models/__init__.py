"""Models: one file per method, all built through one registry (:mod:`omniseg.models.registry`)."""

from omniseg.models.registry import (
    attach_categories,
    build_model,
    list_models,
    model_arguments,
    register_model,
)

__all__ = ["attach_categories", "build_model", "list_models", "model_arguments", "register_model"]
