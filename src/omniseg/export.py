"""``omniseg export``: package a trained checkpoint for shipping.

``--format safetensors`` is the zoo packaging: float16 weights + one JSON with the model's
config, categories, the task and test-time settings it was measured with, and the figures
measured for it (the records ``omniseg evaluate --save`` writes). The zoo entries under
``omniseg/zoo`` are rebuilt by this command, never by hand; a model in ``--out`` is then loadable
by path, or by name once ``--out`` is the package's zoo folder.

``--format onnx`` writes ``DIR/model.onnx`` + ``DIR/model.json`` (:data:`GRAPH_META`): a float32
graph for any batch size, height and width (``torch.export`` with dynamic dimensions, through
``torch.onnx.export``) — for the semantic models ``images (N, 3, H, W) -> logits (N, C, H, W)``,
for RetinaNet its network alone (``images`` padded to multiples of 32 -> ``cls_logits``,
``bbox_regression``; anchors, decoding and NMS stay outside) — and what running it needs:
normalisation, categories, the recorded test-time settings, and the model config whose
``post_process`` turns the outputs into segments. ``--format openvino`` also converts that graph
to ``DIR/model.xml`` + ``.bin``. :mod:`omniseg.runtime` runs both (``omniseg segment --runtime
onnx|openvino``). :data:`GRAPH_OUTPUTS` lists the models that export; the others get the reason
from :func:`export_graph`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from omniseg.checkpoint import checkpoint_paths, read_checkpoint
from omniseg.errors import CheckpointError, DataError
from omniseg.io import atomic_path, atomic_write_json, load_json

__all__ = [
    "EXPORT_FORMATS",
    "GRAPH_EXPORTABLE",
    "GRAPH_META",
    "export_graph",
    "export_model",
    "figure_record",
]

EXPORT_FORMATS = ("safetensors", "onnx", "openvino")
GRAPH_META = "model.json"  # beside model.onnx (and model.xml) in a graph export folder
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
OPSET = 18
# the models that export, with their graph's outputs: the semantic models whole (dense logits at
# the input size, any H x W); RetinaNet's network alone (dense_network: anchors, decoding and NMS
# run outside the graph, detect_from_dense), on batches padded to multiples of 32
GRAPH_OUTPUTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("deeplabv1", "deeplabv2", "deeplabv3", "deeplabv3plus"), ("logits",)),
    "retinanet": ("cls_logits", "bbox_regression"),
}
GRAPH_EXPORTABLE = tuple(GRAPH_OUTPUTS)
_WHY_NOT = dict.fromkeys(
    ("mask_rcnn", "mask_x_rcnn", "panoptic_fpn", "centermask"),
    "its raw outputs are score-filtered, variable-length detections whose RoI heads, NMS and mask "
    "pasting run data-dependent Python around the network",
)
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
    if format in GRAPH_FILES:
        return export_graph(source, out_dir, format=format, name=name, reference_size=reference_size)
    path = resolve_checkpoint(source)
    state, meta = read_checkpoint(path)
    name = name or path.name
    if not _NAME.match(name):
        raise DataError(
            f"--name {name!r}: use lower-case letters, digits, '.', '_' and '-' (a file and zoo name)"
        )
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
        exported["inference"] = _with_reference(exported.get("inference", {}), reference_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = checkpoint_paths(out_dir / name)
    if weights_path.resolve() == checkpoint_paths(path)[0].resolve():
        raise CheckpointError(
            f"{weights_path}: export would overwrite its own source; choose another --out or --name"
        )
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if any(not torch.isfinite(v).all() for v in half.values() if v.is_floating_point()):
        raise CheckpointError(
            f"{path}: some weights overflow float16; this checkpoint cannot ship in float16"
        )
    with atomic_path(weights_path) as tmp:
        save_file(half, str(tmp), metadata={"format": "omniseg"})
    atomic_write_json(meta_path, exported)
    return weights_path, meta_path


def _with_reference(inference: dict, reference_size: Sequence[int]) -> dict:
    if len(reference_size) != 2 or min(int(v) for v in reference_size) < 1:
        raise DataError(
            f"reference size {list(reference_size)}: expected a height and a width, e.g. 640x1280"
        )
    return {**inference, "reference_size": [int(v) for v in reference_size]}


def _require(module: str, extra: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DataError(f"{what} needs {module}, which is not installed: pip install 'omniseg[{extra}]'")


def export_graph(
    source: str | Path,
    out_dir: str | Path,
    *,
    format: str = "onnx",
    name: str | None = None,
    reference_size: Sequence[int] | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/model.onnx`` and ``out_dir/model.json`` (``format="onnx"``), plus
    ``model.xml``/``.bin`` converted from it (``"openvino"``); returns ``(graph, model.json)``.

    Raises :class:`CheckpointError` naming the reason for a model that does not export.
    """
    import torch

    from omniseg.checkpoint import load_model
    from omniseg.data.normalize import IMAGENET_MEAN, IMAGENET_STD
    from omniseg.predictor import resolve_checkpoint

    if format not in GRAPH_FILES:
        raise DataError(f"--format {format!r}: graph formats are {', '.join(GRAPH_FILES)}")
    for module in ("onnx", "onnxscript"):
        _require(module, "export", f"--format {format}")
    if format == "openvino":
        _require("openvino", "openvino", "--format openvino")
    path = resolve_checkpoint(source)
    config_name = load_json(checkpoint_paths(path)[1], "checkpoint metadata").get("model", {}).get("name")
    if config_name not in GRAPH_EXPORTABLE:
        why = _WHY_NOT.get(config_name, "only models whose raw output is dense logits export to a graph")
        raise CheckpointError(
            f"{path.name}: a {config_name} model cannot be exported to {format}: {why}; export its "
            "weights with --format safetensors. "
            f"Graph-exportable models: {', '.join(GRAPH_EXPORTABLE)}"
        )
    model, meta = load_model(path)  # the plain eager model: no inference rewrites (omniseg.optimize)
    # RetinaNet exports its network alone, on batches zero-padded to multiples of 32 (as
    # omniseg.runtime pads them); the semantic models whole, at any size
    network = model.dense_network() if hasattr(model, "dense_network") else model
    size_multiple = 1 if network is model else 32
    outputs = list(GRAPH_OUTPUTS[config_name])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # batch 2 in the example: torch.export fixes a dimension traced at size 1 to 1
    example = torch.zeros(2, 3, 256, 320)
    dynamic = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    if size_multiple > 1:
        # declared multiples keep the five levels' shape expressions small (with free H and W,
        # torch.export's sympy simplification runs for many minutes)
        dynamic.update({2: size_multiple * torch.export.Dim("h", min=2), 3: size_multiple * torch.export.Dim("w", min=2)})
    with torch.no_grad():
        program = torch.onnx.export(
            network, (example,), dynamo=True, opset_version=OPSET, input_names=["images"], output_names=outputs,
            dynamic_shapes={"images": dynamic}, external_data=False, verbose=False,
        )  # fmt: skip
    onnx_path = out_dir / GRAPH_FILES["onnx"]
    with atomic_path(onnx_path) as tmp:
        program.save(str(tmp))
    graph_path = onnx_path
    if format == "openvino":
        import openvino

        graph_path = out_dir / GRAPH_FILES["openvino"]
        # float32 kept: OpenVINO would otherwise compress the weights to float16
        openvino.save_model(openvino.convert_model(str(onnx_path)), str(graph_path), compress_to_fp16=False)
    inference = dict(meta.get("inference", {}))
    if reference_size is not None:
        inference = _with_reference(inference, reference_size)
    exported = {
        "format": format,
        "name": name or path.name,
        "graph": graph_path.name,
        "tasks": list(model.tasks),
        "task": meta.get("task", model.tasks[0]),
        "model": meta["model"],
        "categories": meta["categories"],
        "inference": inference,
        # what to feed: RGB pixels / 255, minus mean, over std, NCHW float32
        "input": {
            "name": "images",
            "layout": "NCHW",
            "dtype": "float32",
            "color": "RGB",
            "pixel_scale": 255.0,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "size_multiple": size_multiple,  # H and W the graph takes (zero padding after normalising)
        },  # fmt: skip
        "outputs": outputs,
        "source": {"checkpoint": str(path), "torch": torch.__version__, "opset": OPSET},
    }
    meta_path = atomic_write_json(out_dir / GRAPH_META, exported)
    return graph_path, meta_path
