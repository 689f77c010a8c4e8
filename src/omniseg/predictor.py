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
import torch.nn.functional as F

from omniseg.checkpoint import CheckpointError, checkpoint_paths, load_model
from omniseg.data.images import load_image
from omniseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_model_input
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
    """A loaded model plus its category metadata; ``predict(image) -> Segments``."""

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
        self.model = model.to(device).eval()
        self.categories = categories
        self.meta = meta or {}
        self.device = torch.device(device)
        self.mean, self.std = mean, std
        self.task = getattr(model, "task", "semantic")
        self.tta = dict(self.meta.get("inference", {}))

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.meta.get("model", {}).get("name", "model")))

    @torch.inference_mode()
    def semantic_probabilities(
        self, image: np.ndarray, *, flip: bool | None = None, scales: Sequence[float] | None = None
    ) -> torch.Tensor:
        """``(C, H, W)`` class probabilities at the image's resolution, averaged over the TTA views."""
        flip = self.tta.get("flip", False) if flip is None else flip
        scales = tuple(self.tta.get("scales", (1.0,)) if scales is None else scales)
        x = to_model_input(image, mean=self.mean, std=self.std).unsqueeze(0).to(self.device)
        h, w = x.shape[-2:]
        total = None
        for scale in scales:
            xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            views = [xs, xs.flip(-1)] if flip else [xs]
            for i, view in enumerate(views):
                logits = self.model(view)
                if i == 1:
                    logits = logits.flip(-1)
                if logits.shape[-2:] != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                prob = logits.softmax(1)[0]
                total = prob if total is None else total + prob
        return total / total.sum(0, keepdim=True)

    def predict(self, image: np.ndarray | str | Path, *, crf: bool = False, **tta) -> Segments:
        """Segments of one image (array ``(H, W, 3) uint8`` RGB, or a path)."""
        if not isinstance(image, np.ndarray):
            image = load_image(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        if self.task != "semantic":
            if crf or any(v for v in tta.values()):
                raise ValueError(f"CRF and test-time flip/scales apply to semantic models, not to a {self.task} model")
            x = to_model_input(image, mean=self.mean, std=self.std).to(self.device)
            with torch.inference_mode():
                return self.model([x])[0]
        prob = self.semantic_probabilities(image, **tta)
        if crf:
            from omniseg.models.crf import dense_crf

            prob = dense_crf(image, prob.cpu())
        confidence, index = prob.max(0)
        ids = np.asarray(self.categories.ids)[index.cpu().numpy()]
        # per-segment score = mean confidence of its pixels
        conf = confidence.cpu().numpy().ravel()
        sums = np.bincount(ids.ravel(), weights=conf, minlength=max(self.categories.ids) + 1)
        counts = np.bincount(ids.ravel(), minlength=max(self.categories.ids) + 1)
        scores = sums / np.maximum(counts, 1)
        return Segments.from_semantic(ids, categories=self.categories, ignore_index=None, scores=scores)


def load_predictor(name_or_path: str | Path = DEFAULT_MODEL, *, device: str = "cpu") -> Predictor:
    path = resolve_checkpoint(name_or_path)
    model, meta = load_model(path, device=device)
    categories = CategoryTable.from_dicts(meta["categories"])
    meta.setdefault("name", path.name)
    return Predictor(model, categories, meta=meta, device=device)


def segments_json(segments: Segments, *, image_path: str, model: str) -> dict:
    """The per-image JSON ``omniseg segment`` writes: one entry per segment, with its RLE."""
    _, info = segments.to_panoptic()
    names = {c.id: c.name for c in segments.categories} if segments.categories else {}
    rles = {int(s): r for s, r in zip(segments.segment_ids, segments.rles(), strict=True)}
    for entry in info:
        entry["category_name"] = names.get(entry["category_id"], str(entry["category_id"]))
        rle = rles[entry["id"]]
        entry["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return {
        "image": image_path,
        "model": model,
        "height": segments.image_size[0],
        "width": segments.image_size[1],
        "segments": info,
    }


def dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=1)
