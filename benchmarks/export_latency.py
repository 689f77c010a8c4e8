"""Exported graphs vs eager PyTorch: latency of each graph-exportable zoo model run three ways.

Each model is exported with ``omniseg export --format openvino`` (which writes model.onnx too) into a
temporary folder, then timed side by side, batch 1, the runs taking turns so machine noise hits all
alike:

- **eager**: the model as ``omniseg segment`` runs it (``optimize_for_inference``, ``no_grad``);
- **onnxruntime**: ``model.onnx``, CPUExecutionProvider, ``--threads`` intra-op threads;
- **openvino**: ``model.xml`` compiled for the CPU at float32 precision, ``--threads`` threads.

Two figures per runtime: the network alone (normalised tensor in, logits out) and the whole
``Predictor.predict`` (pre-processing, the recorded test-time flip/scales, post-processing), which is
what ``omniseg segment --runtime`` costs per image. Ratios are eager / runtime (above 1: faster than
eager). Also checked: the largest logit difference from eager on the frame.

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
from omniseg.cli import main as omniseg_main
from omniseg.data.transforms import to_model_input
from omniseg.predictor import load_predictor

ROOT = Path(__file__).resolve().parents[1]
# zoo model -> a frame at the size it is run at (CamVid's own; Cityscapes' working 1280x640)
MODELS = {
    "camvid-deeplabv3plus-lite0": (ROOT / "assets" / "camvid_0016E5_07959.png", None),
    "cityscapes-deeplabv3plus-lite0": (ROOT / "assets" / "camvid_0016E5_07959.png", (640, 1280)),
}
RUNTIMES = ("eager", "onnx", "openvino")


def frame(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, size) in MODELS.items():
            out = Path(tmp) / name
            if omniseg_main(["export", "--model", name, "--format", "openvino", "--out", str(out)]) != 0:
                return 1
            predictors = {"eager": load_predictor(name)}
            predictors.update({rt: load_predictor(out, runtime=rt) for rt in RUNTIMES[1:]})
            image = frame(path, size)
            x = to_model_input(image, mean=predictors["eager"].mean, std=predictors["eager"].std).unsqueeze(0)
            with torch.no_grad():
                reference = predictors["eager"].model(x)
                diffs = {rt: (predictors[rt].model(x) - reference).abs().max().item() for rt in RUNTIMES[1:]}

            with torch.no_grad():
                net = alternate({rt: partial(predictors[rt].model, x) for rt in RUNTIMES}, args.repeats)
                e2e = alternate({rt: partial(predictors[rt].predict, image) for rt in RUNTIMES}, max(3, args.repeats // 2))
            tta = predictors["eager"].test_time_augmentation()
            for rt in RUNTIMES:
                rows.append(
                    f"| {name} | {image.shape[0]}x{image.shape[1]} | {rt} | {net[rt] * 1000:.0f} | "
                    f"{net['eager'] / net[rt]:.2f} | {e2e[rt] * 1000:.0f} | {e2e['eager'] / e2e[rt]:.2f} | {diffs.get(rt, 0.0):.1e} |"
                )
            short = name.split("-")[0]
            for rt in RUNTIMES[1:]:
                ratios[f"{short}_{rt}_speedup"] = net["eager"] / net[rt]
                ratios[f"{short}_{rt}_predict_speedup"] = e2e["eager"] / e2e[rt]
            print(f"# {name}: test-time flip={tta.flip} scales={list(tta.scales)}", flush=True)

    print(f"\nbatch 1, {args.threads} threads, median of {args.repeats} (predict: {max(3, args.repeats // 2)}), "
          "runs alternating; speed-up = eager time / runtime time\n")  # fmt: skip
    print("| model | frame | runtime | network ms | speed-up | predict ms | speed-up | max logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nresult: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
