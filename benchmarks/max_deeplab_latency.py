"""CPU latency and peak memory of MaX-DeepLab (CPU variant) and kMaX-DeepLab against Panoptic FPN
with the same backbone, at the Cityscapes frames' 1280x640, batch 1, side by side.

    python benchmarks/max_deeplab_latency.py [--threads 2] [--repeats 3] [--size 640x1280]

Each model is the one its Cityscapes training config builds (``configs/cityscapes_{kmax_deeplab,
max_deeplab,panoptic_fpn}_lite0.yaml``: EfficientNet-Lite0 with ImageNet weights, untrained heads)
after ``omniseg.optimize_for_inference``. Latency is image in -> panoptic ``Segments`` out
(``omniseg.inference.predict_segments``). With untrained heads a score threshold decides how much
post-processing there is, so Panoptic FPN keeps 100 detections (``box_score_thresh: 0``), its
costliest case; the mask-ID models' post-processing is a per-pixel argmax whatever their scores.
The models take turns over ``--repeats`` runs (medians reported); peak memory is the resident
memory one forward adds above what the process held before it.

Last line: ``result: ratio_kmax_latency=<kMaX / Panoptic FPN> ratio_max_latency=<MaX / Panoptic FPN>``.
"""

from __future__ import annotations

import argparse

import torch

from _latency import alternate, models_from_configs, peak_memory_mib
from omniseg.data.cityscapes_polygons import cityscapes_panoptic_categories
from omniseg.inference import predict_segments

CONFIGS = {
    "kMaX-DeepLab": ("configs/cityscapes_kmax_deeplab_lite0.yaml", {}),
    "MaX-DeepLab": ("configs/cityscapes_max_deeplab_lite0.yaml", {}),
    "Panoptic FPN": (
        "configs/cityscapes_panoptic_fpn_lite0.yaml",
        # at the frame's own size like the other two (its training config runs it at half size)
        {"box_score_thresh": 0.0, "box_detections_per_img": 100, "min_size": None, "max_size": 1280},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="640x1280", help="HxW")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    categories = cityscapes_panoptic_categories().to_dicts()
    models = models_from_configs(CONFIGS, categories=categories)
    h, w = (int(v) for v in args.size.lower().split("x"))
    image = torch.randn(1, 3, h, w)

    def runner(model):
        return lambda: predict_segments(model, image, task="panoptic")

    with torch.inference_mode():
        runs = {name: runner(model) for name, model in models.items()}
        peaks = {name: peak_memory_mib(run) for name, run in runs.items()}
        seconds = alternate(runs, args.repeats)
    reference = seconds["Panoptic FPN"]
    print(f"Cityscapes-sized frame {h}x{w}, batch 1, {args.threads} threads, median of {args.repeats}\n")
    print("| model | latency (ms) | / Panoptic FPN | peak memory added (MiB) | parameters (M) |")
    print("|---|---:|---:|---:|---:|")
    for name, model in models.items():
        peak = f"{peaks[name]:.0f}" if peaks[name] is not None else "n/a"
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {seconds[name] * 1e3:.0f} | {seconds[name] / reference:.2f} | {peak} | {params:.1f} |")
    print(
        f"\nresult: ratio_kmax_latency={seconds['kMaX-DeepLab'] / reference:.3f} "
        f"ratio_max_latency={seconds['MaX-DeepLab'] / reference:.3f}"
    )


if __name__ == "__main__":
    main()
