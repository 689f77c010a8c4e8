"""CPU latency of CenterMask (Wang et al. 2020) against our Mask R-CNN, same backbone, same input.

    python benchmarks/centermask_latency.py [--backbone efficientnet_lite0] [--threads 2] [--repeats 1]
                                            [--sizes 640x1280,800x1088] [--num-classes 9]

Both models are built with ``--backbone`` (ImageNet weights where it ships them), the same number
of classes (default: Cityscapes' 8 things + background), at the input's own resolution
(``min_size: null``), and go through ``omniseg.optimize_for_inference``. Latency is image in ->
instance ``Segments`` out (``omniseg.inference.predict_segments``: the forward pass, peak / box
decoding, mask assembly and pasting, RLE encoding), batch 1. With untrained heads a detector's
score threshold decides how many masks it makes, so both are held at exactly 100 detections per
image (Mask R-CNN: ``box_score_thresh: 0``; CenterMask always keeps its top 100 peaks) -- the
paper's setting and the costliest case for both. After one warm-up each, the two models alternate
over ``--repeats`` runs and medians are reported, so a busy machine slows both alike.

The last line reads ``result: ratio_latency=<CenterMask / Mask R-CNN at the first size>``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from omniseg.inference import predict_segments
from omniseg.models import build_model
from omniseg.optimize import optimize_for_inference


def build(name: str, backbone: str, num_classes: int) -> torch.nn.Module:
    config = {"name": name, "num_classes": num_classes, "backbone": backbone, "min_size": None}
    if name == "mask_rcnn":
        config.update(box_score_thresh=0.0, box_detections_per_img=100)
    try:
        model = build_model({**config, "pretrained_backbone": True})
    except Exception:  # a backbone without shipped weights: random ones time the same
        model = build_model(config)
    return optimize_for_inference(model.eval())


def time_once(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, int]:
    start = time.perf_counter()
    segments = predict_segments(model, image[None], task="instance")
    return time.perf_counter() - start, len(segments[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sizes", default="640x1280,800x1088", help="HxW,HxW (the first gives the ratio)")
    parser.add_argument("--num-classes", type=int, default=9, help="counting the background")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: build(name, args.backbone, args.num_classes) for name in ("centermask", "mask_rcnn")}
    ratios = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        image = torch.randn(3, h, w)
        times: dict[str, list[float]] = {name: [] for name in models}
        counts = {}
        for model in models.values():  # warm-up: caches, oneDNN primitives, Winograd plans
            time_once(model, image)
        for _ in range(args.repeats):
            for name, model in models.items():
                seconds, counts[name] = time_once(model, image)
                times[name].append(seconds)
        median = {name: statistics.median(t) for name, t in times.items()}
        ratios.append(median["centermask"] / median["mask_rcnn"])
        print(
            f"{h}x{w}: CenterMask {median['centermask'] * 1e3:.0f} ms ({counts['centermask']} masks), "
            f"Mask R-CNN {median['mask_rcnn'] * 1e3:.0f} ms ({counts['mask_rcnn']} masks), "
            f"ratio {ratios[-1]:.3f}  [{args.backbone}, {args.threads} threads, batch 1, "
            f"median of {args.repeats}]"
        )
    print(f"result: ratio_latency={ratios[0]:.3f}")


if __name__ == "__main__":
    main()
