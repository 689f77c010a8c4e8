"""DeepLabV3+ (EfficientNet-Lite0, output stride 16): omniseg vs segmentation_models_pytorch.

Our model is built from the ``model`` section of ``configs/camvid_deeplabv3plus_lite0.yaml``, so the
figures are those of the architecture the shipped model uses. Inference runs a copy passed through
``omniseg.optimize_for_inference`` (as the predictor does); training runs the model as built.

Inference latency (batch 1, eval) at 480x360 (smp needs it padded to 480x368), 480x368 and 512x512, and training throughput (images/s,
forward + backward + AdamW step, batch 8 at 288x384 crops as in the CamVid recipe), both models
measured alternately in one run so machine noise hits both alike.

    python benchmarks/deeplab_speed.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "camvid_deeplabv3plus_lite0.yaml"


def build_pair(num_classes: int = 11):
    """Our model exactly as the CamVid config builds it (random init), and smp's with the same encoder."""
    import segmentation_models_pytorch as smp
    import yaml

    from omniseg.models import build_model

    spec = dict(yaml.safe_load(CONFIG.read_text())["model"])
    spec.update(num_classes=num_classes, pretrained_backbone=False)
    spec.pop("class_weights", None)
    ours = build_model(spec)
    theirs = smp.DeepLabV3Plus(
        encoder_name="timm-tf_efficientnet_lite0",
        encoder_weights=None,
        encoder_output_stride=spec["output_stride"],
        classes=num_classes,
    )
    return ours, theirs


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _padded(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, -w % multiple, 0, -h % multiple))


def infer_latency(models: dict, size: tuple[int, int], repeats: int) -> dict[str, float]:
    """smp refuses sizes not divisible by 16, so it gets the padded image a user would have to give it."""
    x = torch.randn(1, 3, *size)
    inputs = {name: (_padded(x, 16) if name == "smp" else x) for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for name, model in models.items():
            model.eval()
            model(inputs[name])  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(_timed(lambda m=model, n=name: m(inputs[n])))
    return {name: statistics.median(t) for name, t in times.items()}


def train_throughput(models: dict, size: tuple[int, int], batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *size)
    y = torch.randint(0, 11, (batch, *size))
    steps = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        criterion = torch.nn.CrossEntropyLoss(ignore_index=255)

        def step(model=model, optimizer=optimizer, criterion=criterion, name=name):
            optimizer.zero_grad(set_to_none=True)
            if name == "omniseg":
                loss = sum(model(x, {"semantic": y}).values())
            else:
                loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()

        steps[name] = step
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_timed(step))
    return {name: batch / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from omniseg.optimize import optimize_for_inference

    ours, theirs = build_pair()
    models = {"omniseg": ours, "smp": theirs}  # training: the model as built
    inference_models = {"omniseg": optimize_for_inference(copy.deepcopy(ours)), "smp": theirs}
    params = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in models.items()}
    rows = []
    latency = {}
    for size in [(360, 480), (368, 480), (512, 512)]:
        lat = infer_latency(inference_models, size, args.repeats)
        latency[size] = lat
        rows.append(
            (
                f"inference latency {size[1]}x{size[0]}, batch 1 (ms)"
                + (" (smp padded to 480x368)" if size == (360, 480) else ""),
                lat["omniseg"] * 1e3,
                lat["smp"] * 1e3,
                lat["omniseg"] / lat["smp"],
            )
        )
    thr = train_throughput(models, (288, 384), 8, args.train_repeats)
    rows.append(
        (
            "training throughput 384x288, batch 8 (img/s)",
            thr["omniseg"],
            thr["smp"],
            thr["omniseg"] / thr["smp"],
        )
    )
    print(
        f"torch {torch.__version__}, {args.threads} threads; params: omniseg {params['omniseg']:.2f} M, "
        f"smp {params['smp']:.2f} M\n"
    )
    print("| measure | omniseg | smp | ours / smp |")
    print("|---|---:|---:|---:|")
    for name, a, b, r in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {r:.2f} |")
    r_lat = latency[(360, 480)]["omniseg"] / latency[(360, 480)]["smp"]
    r_lat512 = latency[(512, 512)]["omniseg"] / latency[(512, 512)]["smp"]
    print(
        f"\nresult: ratio_infer_latency={r_lat:.3f} ratio_infer_latency_512={r_lat512:.3f} "
        f"ratio_train_throughput={thr['omniseg'] / thr['smp']:.3f}"
    )


if __name__ == "__main__":
    main()
