"""Model checkpoints: safetensors weights + the model's config + category metadata.

A checkpoint is a directory-free pair of files ``NAME.safetensors`` and ``NAME.json`` so that
``load(path)`` needs nothing else. Both are written atomically (temp file + ``os.replace``), so a
kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from omniseg.structures import CategoryTable


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model it describes."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask_mode(path: str) -> None:
    """mkstemp creates 0600 files; give the final file the mode a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


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
    weights_path, meta_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value
    fd, tmp = tempfile.mkstemp(dir=weights_path.parent, prefix=f".{weights_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "omniseg"})
        _umask_mode(tmp)
        os.replace(tmp, weights_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"model": model_config, "categories": categories.to_dicts(), **(extra or {})}
    atomic_write_json(meta_path, meta)
    return weights_path, meta_path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, metadata)``; float16 tensors come back as float32."""
    weights_path, meta_path = checkpoint_paths(path)
    for p in (weights_path, meta_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint file not found (a checkpoint is NAME.safetensors + NAME.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
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
