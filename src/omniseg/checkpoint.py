"""Model checkpoints: safetensors weights + the model's config + category metadata.

A checkpoint is a directory-free pair of files ``NAME.safetensors`` and ``NAME.json`` so that
``load(path)`` needs nothing else. Both are written atomically (:mod:`omniseg.io`), so a kill
mid-write leaves the previous checkpoint intact.

torch and safetensors are imported inside the functions: ``from omniseg.checkpoint import
CheckpointError`` (what the command line does) costs no torch import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omniseg.errors import CheckpointError, DataError
from omniseg.io import atomic_path, atomic_write_json, load_json
from omniseg.structures import CategoryTable

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointError", "checkpoint_paths", "load_model", "read_checkpoint", "save_checkpoint"]


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, metadata)`` paths for a checkpoint given either file or the common stem."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    model_config: dict,
    categories: CategoryTable,
    half: bool = False,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write weights and metadata; ``half`` stores float tensors as float16 (loaded back as float32)."""
    from safetensors.torch import save_file

    weights_path, meta_path = checkpoint_paths(path)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"format": "omniseg"})
    meta = {"model": model_config, "categories": categories.to_dicts(), **(extra or {})}
    atomic_write_json(meta_path, meta)
    return weights_path, meta_path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, metadata)``; float16 tensors come back as float32."""
    import torch
    from safetensors.torch import load_file

    weights_path, meta_path = checkpoint_paths(path)
    for p in (weights_path, meta_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint file not found (a checkpoint is NAME.safetensors + NAME.json)")
    try:
        meta = load_json(meta_path, "checkpoint metadata")
    except DataError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: checkpoint metadata must be a JSON object")
    for key in ("model", "categories"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: missing '{key}' entry")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    state = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in state.items()}
    return state, meta


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    from omniseg.models import build_model

    state, meta = read_checkpoint(path)
    config = dict(meta["model"])
    config["pretrained_backbone"] = False  # the checkpoint carries every weight
    model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint_paths(path)[0]}: weights do not fit model {config.get('name')!r} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.to(device).eval(), meta
