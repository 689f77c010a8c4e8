"""Exported graphs vs eager PyTorch: latency of each graph-exportable zoo model run three ways.

Each model is exported with ``omniseg export --format openvino`` (which writes model.onnx too) into a
temporary folder, then timed side by side, batch 1, the runs taking turns so machine noise hits all
alike:

- **eager**: the model as ``omniseg segment`` runs it (``optimize_for_inference``, ``no_grad``);
- **onnxruntime**: ``model.onnx``, CPUExecutionProvider, ``--threads`` intra-op threads;
- **openvino**: ``model.xml`` compiled for the CPU at float32 precision, ``--threads`` threads.

Two figures per runtime: the model call (normalised tensor in, logits out; for RetinaNet detections
out, the graph with resizing, decoding and NMS around it) and the whole
``Predictor.predict`` (pre-processing, the recorded test-time flip/scales, post-processing), which is
what ``omniseg segment --runtime`` costs per image. Ratios are eager / runtime (above 1: faster than
eager). Also checked on the frame: the largest difference from the exported model run eagerly as
it was exported (without ``optimize_for_inference``'s rewrites): logits, or RetinaNet's boxes in px.

    python benchmarks/export_latency.py [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _latency import alternate
from omniseg.checkpoint import load_model
from omniseg.cli import main as omniseg_main
from omniseg.data.normalize import to_model_input
from omniseg.predictor import load_predictor, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CAMVID_FRAME = ROOT / "assets" / "camvid_0016E5_07959.png"
# model -> a frame at the size it is run at (CamVid's own; Cityscapes' working 1280x640); the zoo
# has no RetinaNet: it is the coco128 config's model (ImageNet backbone, untrained heads whose class
# logits are widened so that a frame gives dozens of detections, as a trained model's would)
MODELS = {
    "camvid-deeplabv3plus-lite0": (CAMVID_FRAME, None),
    "cityscapes-deeplabv3plus-lite0": (CAMVID_FRAME, (640, 1280)),
    "retinanet-lite0 (coco128 config)": (CAMVID_FRAME, (480, 640)),
}


def retinanet_checkpoint(path: Path) -> Path:
    from omniseg.checkpoint import save_checkpoint
    from omniseg.engine.config import load_config
    from omniseg.models import build_model
    from omniseg.structures import CategoryTable

    torch.manual_seed(0)
    config = {**load_config(ROOT / "configs" / "coco128_retinanet_lite0.yaml")["model"], "num_classes": 81}
    model = build_model(config).eval()
    with torch.no_grad():
        model.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        model.head.classification_head.cls_logits.bias.fill_(-2.0)
    categories = CategoryTable.from_dicts([{"id": i, "name": f"class{i}", "isthing": True} for i in range(1, 81)])
    save_checkpoint(path, model, model_config=config, categories=categories, extra={"task": "detection"})
    return path
RUNTIMES = ("eager", "onnx", "openvino")


def frame(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image)


def _difference(ours, reference) -> float:
    """Largest logit difference; for detections (lists of dicts), the set distance of the boxes in
    px (each box to its nearest same-class box on the other side, both ways): near-equal scores may
    list the same detections in another order."""
    if isinstance(reference, torch.Tensor):
        return (ours - reference).abs().max().item()
    worst = 0.0
    for a, b in zip(ours, reference, strict=True):
        if len(a["boxes"]) != len(b["boxes"]):
            return float("inf")
        if len(a["boxes"]):
            distance = torch.cdist(a["boxes"], b["boxes"], p=float("inf"))
            distance[a["labels"][:, None] != b["labels"][None, :]] = float("inf")
            worst = max(worst, distance.min(1).values.max().item(), distance.min(0).values.max().item())
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, size) in MODELS.items():
            out = Path(tmp) / name.split()[0]
            source = str(retinanet_checkpoint(Path(tmp) / "retinanet" / "best")) if "retinanet" in name else name
            if omniseg_main(["export", "--model", source, "--format", "openvino", "--out", str(out)]) != 0:
                return 1
            predictors = {"eager": load_predictor(source)}
            predictors.update({rt: load_predictor(out, runtime=rt) for rt in RUNTIMES[1:]})
            image = frame(path, size)
            x = to_model_input(image, mean=predictors["eager"].mean, std=predictors["eager"].std).unsqueeze(0)
            plain, _ = load_model(resolve_checkpoint(source))  # what was exported: no inference rewrites
            with torch.no_grad():
                reference = plain.eval()(x)
                diffs = {rt: _difference(predictors[rt].model(x), reference) for rt in RUNTIMES[1:]}

            with torch.no_grad():
                net = alternate({rt: partial(predictors[rt].model, x) for rt in RUNTIMES}, args.repeats)
                e2e = alternate({rt: partial(predictors[rt].predict, image) for rt in RUNTIMES}, max(3, args.repeats // 2))
            tta = predictors["eager"].test_time_augmentation()
            for rt in RUNTIMES:
                rows.append(
                    f"| {name} | {image.shape[0]}x{image.shape[1]} | {rt} | {net[rt] * 1000:.0f} | "
                    f"{net['eager'] / net[rt]:.2f} | {e2e[rt] * 1000:.0f} | {e2e['eager'] / e2e[rt]:.2f} | {diffs.get(rt, 0.0):.1e} |"
                )
            short = name.split("-")[0]  # camvid, cityscapes, retinanet
            for rt in RUNTIMES[1:]:
                ratios[f"{short}_{rt}_speedup"] = net["eager"] / net[rt]
                ratios[f"{short}_{rt}_predict_speedup"] = e2e["eager"] / e2e[rt]
            print(f"# {name}: test-time flip={tta.flip} scales={list(tta.scales)}", flush=True)

    print(f"\nbatch 1, {args.threads} threads, median of {args.repeats} (predict: {max(3, args.repeats // 2)}), "
          "runs alternating; speed-up = eager time / runtime time\n")  # fmt: skip
    print("| model | frame | runtime | network ms | speed-up | predict ms | speed-up | max logit (box px) diff |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nresult: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
