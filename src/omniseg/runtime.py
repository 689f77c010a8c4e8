"""Running exported graphs (``omniseg export --format onnx|openvino``) behind the eager API.

:func:`load_exported` returns a :class:`~omniseg.predictor.Predictor` whose ``model`` is a
:class:`GraphModel`: its ``forward`` runs the onnxruntime / OpenVINO session and returns the raw
outputs the eager model would (dense logits; for RetinaNet, detections from the model class's
``detect_from_dense`` around the graph), and its ``post_process`` is the eager model's own,
taken from the model class rebuilt from ``model.json``'s config (random weights: post-processing
needs none). Pre-processing, the working-size policy and test-time flip/scales are the
Predictor's, so ``omniseg segment --runtime onnx`` writes what ``--runtime eager`` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from omniseg.errors import DataError
from omniseg.export import GRAPH_FILES, GRAPH_META, GRAPH_OUTPUTS
from omniseg.io import load_json

__all__ = ["RUNTIMES", "GraphModel", "choose_runtime", "exported_metadata", "load_exported", "read_export_meta"]

RUNTIMES = ("eager", *GRAPH_FILES)


def choose_runtime(model: str | Path | None, runtime: str = "auto") -> str:
    """``runtime`` itself, or for ``"auto"``: the format an export folder was written in (its
    model.json says onnx or openvino), else ``"eager"`` (a zoo name or checkpoint)."""
    if runtime != "auto":
        if runtime not in RUNTIMES:
            raise DataError(f"runtime {runtime!r}: choose auto or one of {', '.join(RUNTIMES)}")
        return runtime
    meta_path = Path(model) / GRAPH_META if model is not None else None
    if meta_path is not None and meta_path.is_file():
        written = load_json(meta_path, "export metadata")
        if isinstance(written, dict) and written.get("format") in GRAPH_FILES:
            return written["format"]
    return "eager"


def read_export_meta(directory: str | Path, runtime: str) -> dict:
    """``model.json`` of an export folder, checked against the graph file ``runtime`` runs."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not an export folder (omniseg export --format {runtime} --out DIR)")
    graph = directory / GRAPH_FILES[runtime]
    if not graph.is_file():
        raise DataError(f"{graph}: not found; --runtime {runtime} needs a folder written by omniseg export --format {runtime}")
    meta_path = directory / GRAPH_META
    meta = load_json(meta_path, "export metadata")
    missing = [k for k in ("model", "categories", "input", "outputs") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{meta_path}: not an omniseg export's model.json (missing {', '.join(missing)})")
    name = meta["model"].get("name")
    if name not in GRAPH_OUTPUTS or meta["outputs"] != list(GRAPH_OUTPUTS[name]):
        raise DataError(f"{meta_path}: model {meta['model'].get('name')!r} with outputs {meta['outputs']} is not one this version runs")
    return meta


def _session(graph: Path, runtime: str, threads: int) -> Any:
    """A callable ``(N, 3, H, W) float32 array -> list of the graph's output arrays``."""
    if runtime == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise DataError("--runtime onnx needs onnxruntime: pip install 'omniseg[export]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"images": x})
    try:
        import openvino
    except ImportError:
        raise DataError("--runtime openvino needs openvino: pip install 'omniseg[openvino]'") from None
    # f32 precision: on CPUs with bf16/fp16 units OpenVINO would otherwise lower the precision
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = openvino.Core().compile_model(str(graph), "CPU", config)
    request = compiled.create_infer_request()  # one request reused: no per-call allocation
    return lambda x: [result[output] for result in (request.infer({0: x}),) for output in compiled.outputs]


class GraphModel(nn.Module):
    """An exported graph as an omniseg model: ``forward(images)`` returns the eager model's raw
    outputs — the session's logits ``(B, C, H, W)``, or for a model whose graph is its network
    alone (RetinaNet) its ``detect_from_dense`` around the session; ``tasks``, ``categories`` and
    ``post_process`` are the eager model class's."""

    def __init__(self, run: Any, template: nn.Module, runtime: str) -> None:
        super().__init__()
        self._run = run
        self.runtime = runtime
        self.tasks: tuple[str, ...] = tuple(template.tasks)
        self.categories = getattr(template, "categories", None)
        self._post_process = template.post_process
        # RetinaNet: resize / pad, anchors, decoding and NMS (no weights) around the graph
        self._around = getattr(template, "detect_from_dense", None)

    def run_graph(self, images: Tensor) -> list[Tensor]:
        """The graph's outputs for a ``(B, 3, H, W)`` batch, as tensors on ``images``' device."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return [torch.from_numpy(np.asarray(y)).to(images.device) for y in self._run(x)]

    def forward(self, images: Tensor) -> Any:
        if self._around is not None:
            return self._around(images, self.run_graph)
        return self.run_graph(images)[0]

    def post_process(self, outputs: Tensor, image_sizes: Sequence[Sequence[int]], **options: Any) -> list:
        return self._post_process(outputs, image_sizes, **options)


def load_exported(directory: str | Path, *, runtime: str = "onnx", device: str = "cpu"):
    """A Predictor running the export in ``directory`` with ``runtime`` (``"onnx"``/``"openvino"``)."""
    from omniseg.models import build_model
    from omniseg.models.registry import attach_categories
    from omniseg.predictor import Predictor
    from omniseg.structures import CategoryTable

    if runtime not in GRAPH_FILES:
        raise DataError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if torch.device(device).type != "cpu":
        raise DataError(f"--runtime {runtime} runs on the CPU; got --device {device}")
    directory = Path(directory)
    meta = read_export_meta(directory, runtime)
    categories = CategoryTable.from_dicts(meta["categories"])
    # the class's post_process only; its weights stay random and are never run
    template = build_model({**meta["model"], "pretrained_backbone": False}).eval()
    attach_categories(template, categories)
    model = GraphModel(_session(directory / GRAPH_FILES[runtime], runtime, torch.get_num_threads()), template, runtime)
    spec = meta["input"]
    if float(spec.get("pixel_scale", 255.0)) != 255.0:
        raise DataError(f"{directory / GRAPH_META}: pixel_scale {spec['pixel_scale']} (this version feeds pixels / 255)")
    info = {k: v for k, v in meta.items() if k in ("name", "task", "inference")}
    info.setdefault("name", directory.name)
    return Predictor(model, categories, meta=info, device=device, mean=tuple(spec["mean"]), std=tuple(spec["std"]))


def exported_metadata(directory: str | Path, runtime: str) -> tuple[Path, str, Any]:
    """An export folder's absolute path, name and categories, from its model.json alone (no
    session built): what :func:`omniseg.batch.model_metadata` gives for a checkpoint."""
    from omniseg.structures import CategoryTable

    meta = read_export_meta(directory, runtime)
    return Path(directory).resolve(), str(meta.get("name", Path(directory).name)), CategoryTable.from_dicts(meta["categories"])
