"""``omniseg.load(...)`` and ``model.predict(image)``: from a checkpoint to segments on a user's image.

The predictor owns what every method shares around the network: reading the image, normalising,
padding for the backbone, test-time flip / multi-scale, optional CRF refinement, and turning the
output back into :class:`~omniseg.structures.Segments` at the image's own resolution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omniseg.checkpoint import CheckpointError, checkpoint_paths, load_model
from omniseg.data.normalize import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from omniseg.inference import TestTimeAugmentation, predict_segments, working_size
from omniseg.io import load_image
from omniseg.models.registry import attach_categories
from omniseg.optimize import optimize_for_inference
from omniseg.structures import CategoryTable, Segments

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
DEFAULT_MODEL = "camvid-deeplabv3plus-lite0"


def zoo_models() -> list[str]:
    return sorted(p.stem for p in ZOO_DIR.glob("*.safetensors"))


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A zoo name (shipped inside the package) or a path to ``NAME.safetensors``/``NAME.json``."""
    if str(name_or_path) in zoo_models():
        return ZOO_DIR / str(name_or_path)
    path = Path(name_or_path)
    weights, meta = checkpoint_paths(path)
    if weights.is_file() and meta.is_file():
        return weights.with_suffix("")
    raise CheckpointError(
        f"{name_or_path}: neither a shipped model ({', '.join(zoo_models()) or 'none installed'}) "
        "nor a checkpoint (NAME.safetensors + NAME.json). omniseg never downloads weights."
    )


class Predictor:
    """A loaded model plus its category metadata; ``predict(image) -> Segments``.

    ``meta["inference"]`` (written with the checkpoint) records the test-time flip and scales the
    model was measured with, and the image size they are relative to (``reference_size``); they
    are the defaults of :meth:`predict`, and ``size_policy`` (:func:`~omniseg.inference.working_size`)
    says how images much larger than the reference are run.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        categories: CategoryTable,
        *,
        meta: dict | None = None,
        device: str | torch.device = "cpu",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.model = attach_categories(model, categories).to(device).eval()
        self.categories = categories
        self.meta = meta or {}
        self.device = torch.device(device)
        self.mean, self.std = mean, std
        self.tasks: tuple[str, ...] = tuple(model.tasks)
        # the task the checkpoint was validated on (its figures are for that one), else the model's first
        self.task = self.meta["task"] if self.meta.get("task") in self.tasks else self.tasks[0]
        self.recorded = dict(self.meta.get("inference", {}))
        self.reference_size: tuple[int, int] | None = (
            tuple(int(v) for v in self.recorded["reference_size"]) if self.recorded.get("reference_size") else None
        )
        self.size_policy = "reference"

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.meta.get("model", {}).get("name", "model")))

    def test_time_augmentation(
        self, *, flip: bool | None = None, scales: Sequence[float] | None = None
    ) -> TestTimeAugmentation:
        """The recorded flip/scales, overridden where ``flip`` or ``scales`` are given."""
        return TestTimeAugmentation(
            flip=bool(self.recorded.get("flip", False) if flip is None else flip),
            scales=tuple(self.recorded.get("scales", (1.0,)) if scales is None else scales),
        )

    def predict(
        self,
        image: np.ndarray | str | Path,
        *,
        task: str | None = None,
        crf: bool = False,
        flip: bool | None = None,
        scales: Sequence[float] | None = None,
        score_thresh: float | None = None,
        size_policy: str | None = None,
    ) -> Segments:
        """Segments of one image (array ``(H, W, 3) uint8`` RGB, or a path) for ``task`` (by
        default the one the checkpoint was validated on, else the model's first). ``crf`` refines dense class scores with the fully connected
        CRF; ``score_thresh`` leaves out instances scoring below it. An image much larger than the
        checkpoint's reference size is run downscaled (``size_policy``, default
        :attr:`size_policy`; :func:`~omniseg.inference.working_size`) and its segments mapped back
        to the image's own size, nearest-neighbour, without a full-size float map per class."""
        if not isinstance(image, np.ndarray):
            image = load_image(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        original = image.shape[:2]
        image = self.working_image(image, size_policy=size_policy)
        x = to_model_input(image, mean=self.mean, std=self.std).unsqueeze(0).to(self.device)
        tta = self.test_time_augmentation(flip=flip, scales=scales)
        refine = (lambda outputs: crf_refine(image, outputs)) if crf else None
        segments = predict_segments(
            self.model, x, task=task or self.task, tta=tta, refine=refine, score_thresh=score_thresh
        )[0]
        return segments.resized(original)


    def working_image(self, image: np.ndarray, *, size_policy: str | None = None) -> np.ndarray:
        """``image`` as the model is run on it: scaled down to the reference size when it is much
        larger (:func:`~omniseg.inference.working_size`), else unchanged; map the segments back
        with ``segments.resized(image.shape[:2])``."""
        size = working_size(image.shape[:2], self.reference_size, policy=size_policy or self.size_policy)
        if size == tuple(image.shape[:2]):
            return image
        # PIL's bilinear resize widens its kernel when shrinking (antialiased), unlike F.interpolate
        return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def crf_refine(image: np.ndarray, outputs: object) -> torch.Tensor:
    """Dense-CRF refinement of one image's dense class scores ``(1, C, H, W)``, as log probabilities."""
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 4 or outputs.shape[0] != 1:
        raise ValueError("the dense CRF refines per-pixel class scores; this model's outputs are not such scores")
    from omniseg.models.crf import dense_crf

    prob = dense_crf(image, outputs[0].float().softmax(0).cpu())
    return prob.clamp_min(torch.finfo(torch.float32).tiny).log()[None].to(outputs.device)


def load_predictor(name_or_path: str | Path = DEFAULT_MODEL, *, device: str = "cpu", runtime: str = "auto") -> Predictor:
    """A Predictor for a zoo name or checkpoint (``runtime="eager"``), or for a folder written by
    ``omniseg export --format onnx|openvino`` run by onnxruntime / OpenVINO (``runtime="onnx"`` /
    ``"openvino"``; ``"auto"``: the folder's own format): the same pre-processing, test-time
    settings and ``post_process`` either way."""
    if runtime == "auto":
        from omniseg.runtime import choose_runtime

        runtime = choose_runtime(name_or_path, runtime)
    if runtime != "eager":
        from omniseg.runtime import load_exported

        return load_exported(name_or_path, runtime=runtime, device=device)
    path = resolve_checkpoint(name_or_path)
    model, meta = load_model(path, device=device)
    optimize_for_inference(model)  # the fast CPU paths; the same function up to float rounding
    categories = CategoryTable.from_dicts(meta["categories"])
    meta.setdefault("name", path.name)
    return Predictor(model, categories, meta=meta, device=device)


def segments_json(segments: Segments, *, image_path: str, model: str) -> dict:
    """The per-image JSON ``omniseg segment`` writes: one entry per segment, with its RLE.

    ``area``, ``bbox`` and ``segmentation`` all describe the segment's own mask — for overlapping
    instances the whole mask, not the part left visible by a panoptic paint-over — and segments
    with no pixel are left out.
    """
    names = {c.id: c.name for c in segments.categories} if segments.categories else {}
    areas, boxes = segments.areas(), segments.boxes()
    info = []
    for i, rle in enumerate(segments.rles()):
        if areas[i] == 0:
            continue
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        category_id = int(segments.category_ids[i])
        info.append(
            {
                "id": int(segments.segment_ids[i]),
                "category_id": category_id,
                "category_name": names.get(category_id, str(category_id)),
                "iscrowd": int(segments.iscrowd[i]),
                "area": int(areas[i]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(segments.scores[i]),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            }
        )
    return {
        "image": image_path,
        "model": model,
        "height": segments.image_size[0],
        "width": segments.image_size[1],
        "segments": info,
    }


def dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=1)
