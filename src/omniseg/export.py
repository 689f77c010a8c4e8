"""``omniseg export``: package a trained checkpoint for shipping.

``--format safetensors`` is the zoo packaging: float16 weights + one JSON with the model's
config, categories, the task and test-time settings it was measured with, and the figures
measured for it (the records ``omniseg evaluate --save`` writes). The zoo entries under
``omniseg/zoo`` are rebuilt by this command, never by hand; a model in ``--out`` is then loadable
by path, or by name once ``--out`` is the package's zoo folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from omniseg.checkpoint import checkpoint_paths, read_checkpoint
from omniseg.errors import CheckpointError, DataError
from omniseg.io import atomic_path, atomic_write_json, load_json

__all__ = ["EXPORT_FORMATS", "export_model", "figure_record"]

EXPORT_FORMATS = ("safetensors",)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# what a zoo JSON keeps from a training run's best.json besides model + categories
_CARRIED_KEYS = ("task", "inference", "epoch", "val", "recipe")


def figure_record(
    *,
    checkpoint: str,
    data: dict,
    task: str,
    metric: str,
    flip: bool,
    scales: Sequence[float],
    metrics: dict[str, float],
) -> dict:
    """One measured figure: what was evaluated (``task``'s output scored by ``metric``'s metric),
    on which data, with which test-time setting; ``metrics`` are the metric's named scalars."""
    return {
        "checkpoint": str(checkpoint),
        "data": data,
        "task": task,
        "metric": metric,
        "inference": {"flip": bool(flip), "scales": [float(s) for s in scales]},
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def export_model(
    source: str | Path,
    out_dir: str | Path,
    *,
    format: str = "safetensors",
    name: str | None = None,
    figures: Sequence[str | Path] = (),
    reference_size: Sequence[int] | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.safetensors`` (float16) + ``out_dir/NAME.json``; returns both paths.

    ``source`` is a zoo name or a checkpoint path; ``name`` defaults to the checkpoint's stem
    (``best`` of a training run is rarely the name you want: pass one). ``figures`` are JSON files
    written by ``omniseg evaluate --save``, attached under ``"figures"``. ``reference_size``
    (H, W) records the image size the model's test-time scales are relative to, for checkpoints
    trained before training recorded it (:func:`omniseg.inference.working_size`).
    """
    import torch
    from safetensors.torch import save_file

    from omniseg.predictor import resolve_checkpoint

    if format not in EXPORT_FORMATS:
        raise DataError(f"--format {format!r}: this version exports {', '.join(EXPORT_FORMATS)}")
    path = resolve_checkpoint(source)
    state, meta = read_checkpoint(path)
    name = name or path.name
    if not _NAME.match(name):
        raise DataError(f"--name {name!r}: use lower-case letters, digits, '.', '_' and '-' (a file and zoo name)")
    records = []
    for figure in figures:
        record = load_json(figure, "figures file")
        if not isinstance(record, dict) or "metrics" not in record or "task" not in record:
            raise DataError(f"{figure}: not a figures file (write one with omniseg evaluate ... --save FILE)")
        records.append(record)
    exported = {"name": name, "model": meta["model"], "categories": meta["categories"]}
    exported.update({k: meta[k] for k in _CARRIED_KEYS if k in meta})
    exported["figures"] = records
    if reference_size is not None:
        if len(reference_size) != 2 or min(int(v) for v in reference_size) < 1:
            raise DataError(f"reference size {list(reference_size)}: expected a height and a width, e.g. 640x1280")
        exported["inference"] = {**exported.get("inference", {}), "reference_size": [int(v) for v in reference_size]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = checkpoint_paths(out_dir / name)
    if weights_path.resolve() == checkpoint_paths(path)[0].resolve():
        raise CheckpointError(f"{weights_path}: export would overwrite its own source; choose another --out or --name")
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if any(not torch.isfinite(v).all() for v in half.values() if v.is_floating_point()):
        raise CheckpointError(f"{path}: some weights overflow float16; this checkpoint cannot ship in float16")
    with atomic_path(weights_path) as tmp:
        save_file(half, str(tmp), metadata={"format": "omniseg"})
    atomic_write_json(meta_path, exported)
    return weights_path, meta_path
