"""CPU latency of CenterMask (Wang et al. 2020) against our Mask R-CNN, same backbone, same input.

    python benchmarks/centermask_latency.py [--threads 2] [--repeats 3] [--sizes 640x1280,800x1088]
                                            [--centermask CKPT --mask-rcnn CKPT]

Both models are the ones their Cityscapes training configs build (``configs/cityscapes_{centermask,
mask_rcnn}_lite0.yaml``: EfficientNet-Lite0 with ImageNet weights, Cityscapes' 8 things; both at
the input's own resolution, whatever the configs' ``min_size``) after
``omniseg.optimize_for_inference``. Latency is image in -> instance
``Segments`` out (``omniseg.inference.predict_segments``: the forward pass, peak / box decoding,
mask assembly and pasting, RLE encoding), batch 1. With untrained heads a detector's score
threshold decides how many masks it makes, so both are held at exactly 100 detections per image
(Mask R-CNN: ``box_score_thresh: 0``; CenterMask always keeps its top 100 peaks) -- the paper's
setting and the costliest case for both. ``--centermask`` / ``--mask-rcnn`` time trained checkpoints
or zoo entries instead (Mask R-CNN again held at 100 detections and run at the input's size), so that the boxes, and with them
the pasting cost, are real ones. After one warm-up each, the two models take turns over
``--repeats`` runs and medians are reported, so a busy machine slows both alike.

The last line reads ``result: ratio_latency=<CenterMask / Mask R-CNN at the first size>``.
"""

from __future__ import annotations

import argparse

import torch

from _latency import alternate, models_from_configs, trained_model
from omniseg.data.cityscapes_polygons import cityscapes_panoptic_categories
from omniseg.inference import predict_segments

CONFIGS = {
    # both at the input's own size, whatever their configs' min_size
    "CenterMask": ("configs/cityscapes_centermask_lite0.yaml", {"min_size": None, "max_size": 1333}),
    "Mask R-CNN": (
        "configs/cityscapes_mask_rcnn_lite0.yaml",
        {"box_score_thresh": 0.0, "box_detections_per_img": 100, "min_size": None, "max_size": 1333},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="640x1280,800x1088", help="HxW,HxW (the first gives the ratio)")
    parser.add_argument("--centermask", default=None, help="a trained CenterMask checkpoint or zoo entry")
    parser.add_argument("--mask-rcnn", default=None, help="a trained Mask R-CNN checkpoint or zoo entry")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    categories = cityscapes_panoptic_categories().to_dicts()
    models = models_from_configs(CONFIGS, categories=categories)
    if args.centermask:
        models["CenterMask"] = trained_model(args.centermask)
        models["CenterMask"].min_size, models["CenterMask"].max_size = None, 1333  # the input's own size
    if args.mask_rcnn:
        models["Mask R-CNN"] = trained_model(args.mask_rcnn)
        models["Mask R-CNN"].roi_heads.score_thresh = 0.0  # 100 detections, as CenterMask's 100 peaks
        models["Mask R-CNN"].roi_heads.detections_per_img = 100
        models["Mask R-CNN"].min_size, models["Mask R-CNN"].max_size = None, 1333  # the input's own size
    weights = "trained" if args.centermask and args.mask_rcnn else "ImageNet backbone, untrained heads"
    print(f"batch 1, {args.threads} threads, median of {args.repeats}, {weights}\n")
    print("| input | CenterMask (ms) | masks | Mask R-CNN (ms) | masks | CenterMask / Mask R-CNN |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        image = torch.randn(1, 3, h, w)
        counts: dict[str, int] = {}

        def runner(name, model, image=image, counts=counts):
            def run():
                counts[name] = len(predict_segments(model, image, task="instance")[0])

            return run

        with torch.inference_mode():
            seconds = alternate({n: runner(n, m) for n, m in models.items()}, args.repeats)
        ratios.append(seconds["CenterMask"] / seconds["Mask R-CNN"])
        print(
            f"| {h}x{w} | {seconds['CenterMask'] * 1e3:.0f} | {counts['CenterMask']} "
            f"| {seconds['Mask R-CNN'] * 1e3:.0f} | {counts['Mask R-CNN']} | {ratios[-1]:.3f} |"
        )
    print(f"\nresult: ratio_latency={ratios[0]:.3f}")


if __name__ == "__main__":
    main()
