"""CPU latency of omniseg's Mask R-CNN against torchvision's, same weights, same image, side by side.

    python benchmarks/maskrcnn_latency.py [--repeats 5] [--threads 2] [--height 800 --width 1088] [--no-winograd]

Both models get the same ResNet-50-FPN weights: torchvision's seeded random initialisation made
trained-like (``tests/tv_reference.py``: calibrated and frozen batch norm, damped residual branches,
spread class biases), loaded into omniseg with ``load_torchvision_maskrcnn``; ours then goes through
``omniseg.optimize_for_inference`` (``--no-winograd``: with ``winograd=False``). Batch 1; the two
models alternate over ``--repeats`` runs and medians are reported, so that a busy machine slows
both alike. Stage times come from hooks on torchvision's submodules and the matching parts of ours;
``mask pasting`` is torchvision's ``transform.postprocess`` against our ``paste_masks``.

Outputs are compared on the same run (``match_detections``: same label, nearest box), and the last
line reads ``result: ratio_latency=... max_box_diff=... min_mask_iou=...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision.models.detection.roi_heads as tv_roi_heads
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import omniseg.models.mask_rcnn as omniseg_mask_rcnn  # noqa: E402
from omniseg.models import build_model  # noqa: E402
from omniseg.models.torchvision_import import load_torchvision_maskrcnn  # noqa: E402
from omniseg.optimize import optimize_for_inference  # noqa: E402
from tv_reference import make_trained_like, match_detections, normalise, structured_images  # noqa: E402

STAGES = ("pre-processing", "backbone", "FPN", "RPN", "RoI box head", "mask head", "mask pasting")


class StageTimer:
    """Accumulates wall time per stage for the run in progress (hooks and wrapped callables)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self._starts: dict[int, float] = {}

    def hook(self, module: nn.Module, stage: str) -> None:
        def pre(mod: nn.Module, args: Any) -> None:
            self._starts[id(mod)] = time.perf_counter()

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            self.current[stage] += time.perf_counter() - self._starts.pop(id(mod))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap(self, fn: Callable, stage: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[stage] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        out = dict(self.current)
        self.current = defaultdict(float)
        return out


def instrument_torchvision(model: nn.Module, timer: StageTimer) -> None:
    timer.hook(model.transform, "pre-processing")
    timer.hook(model.backbone.body, "backbone")
    timer.hook(model.backbone.fpn, "FPN")
    timer.hook(model.rpn, "RPN")
    heads = model.roi_heads
    for module in (heads.box_roi_pool, heads.box_head, heads.box_predictor):
        timer.hook(module, "RoI box head")
    heads.postprocess_detections = timer.wrap(heads.postprocess_detections, "RoI box head")
    for module in (heads.mask_roi_pool, heads.mask_head, heads.mask_predictor):
        timer.hook(module, "mask head")
    tv_roi_heads.maskrcnn_inference = timer.wrap(tv_roi_heads.maskrcnn_inference, "mask head")
    # postprocess = boxes back to image size (negligible) + paste_masks_in_image
    model.transform.postprocess = timer.wrap(model.transform.postprocess, "mask pasting")


def instrument_ours(model: nn.Module, timer: StageTimer) -> None:
    omniseg_mask_rcnn.preprocess = timer.wrap(omniseg_mask_rcnn.preprocess, "pre-processing")
    # the fast path runs a batch-norm-folded copy of the backbone: time that one (built by the warm-up)
    copy = model.inference_backbone
    backbone = copy.get(model.backbone) if copy is not None else model.backbone
    timer.hook(backbone, "backbone")
    timer.hook(model.fpn, "FPN")
    timer.hook(model.rpn, "RPN")
    heads = model.roi_heads
    for module in (heads.box_roi_pool, heads.box_head, heads.box_predictor):
        timer.hook(module, "RoI box head")
    heads.postprocess_detections = timer.wrap(heads.postprocess_detections, "RoI box head")
    timer.hook(heads.mask_roi_pool, "mask head")
    timer.hook(heads.mask_head, "mask head")
    omniseg_mask_rcnn.mask_probabilities = timer.wrap(omniseg_mask_rcnn.mask_probabilities, "mask head")
    omniseg_mask_rcnn.paste_masks = timer.wrap(omniseg_mask_rcnn.paste_masks, "mask pasting")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1088)
    parser.add_argument(
        "--no-winograd",
        dest="winograd",
        action="store_false",
        help="direct 3x3 convolutions only (winograd=False)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = args.height, args.width

    torch.manual_seed(args.seed)
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=h, max_size=1333)
    make_trained_like(theirs, structured_images(2, h, w, seed=args.seed + 1))
    ours = build_model({"name": "mask_rcnn", "num_classes": 91, "min_size": h, "max_size": 1333})
    load_torchvision_maskrcnn(ours, theirs.state_dict())
    optimize_for_inference(ours, winograd=args.winograd)
    image = structured_images(1, h, w, seed=args.seed + 2)[0]
    ours_input = [normalise(image)]

    with torch.no_grad():
        reference = theirs([image])[0]  # warm-up, and the outputs compared below
    result = ours.detect(ours_input)  # warm-up (builds the folded backbone copy)
    stats = match_detections(reference, result[0], score_thresh=0.05)

    timer = StageTimer()
    instrument_torchvision(theirs, timer)
    instrument_ours(ours, timer)
    totals: dict[str, list[float]] = {"torchvision": [], "omniseg": []}
    stages: dict[str, list[dict[str, float]]] = {"torchvision": [], "omniseg": []}
    for _ in range(args.repeats):
        for name in ("torchvision", "omniseg"):
            start = time.perf_counter()
            if name == "torchvision":
                with torch.no_grad():
                    theirs([image])
            else:
                ours.detect(ours_input)
            totals[name].append(time.perf_counter() - start)
            stages[name].append(timer.take())
    # the product path: Segments (RLE masks) instead of full-size probability maps
    start = time.perf_counter()
    ours.post_process(ours(ours_input), [tuple(x.shape[-2:]) for x in ours_input])
    segments_time = time.perf_counter() - start

    def median_run(name: str) -> dict[str, float]:
        # the stage times of the run with the median total, so that the stages add up to it
        order = sorted(range(len(totals[name])), key=lambda i: totals[name][i])
        return stages[name][order[len(order) // 2]]

    def median_stage(name: str, stage: str) -> float:
        return median_run(name).get(stage, 0.0)

    tv_total = statistics.median(totals["torchvision"])
    our_total = statistics.median(totals["omniseg"])
    mode = "optimize_for_inference()" if args.winograd else "optimize_for_inference(winograd=False)"
    print(
        f"Mask R-CNN ResNet-50-FPN, CPU, {args.threads} threads, batch 1, {h}x{w}, "
        f"{len(reference['boxes'])} detections, median of {args.repeats} alternating runs; omniseg: {mode}\n"
    )
    print("| stage | torchvision (s) | omniseg (s) | omniseg / torchvision |")
    print("|---|---:|---:|---:|")
    for stage in STAGES:
        a, b = median_stage("torchvision", stage), median_stage("omniseg", stage)
        print(f"| {stage} | {a:.3f} | {b:.3f} | {b / a if a else float('nan'):.2f} |")
    other_tv = tv_total - sum(median_stage("torchvision", s) for s in STAGES)
    other_ours = our_total - sum(median_stage("omniseg", s) for s in STAGES)
    print(f"| other (box resize, glue) | {other_tv:.3f} | {other_ours:.3f} | |")
    print(f"| **total** | **{tv_total:.3f}** | **{our_total:.3f}** | **{our_total / tv_total:.2f}** |")
    print(f"\nomniseg forward() + post_process() -> Segments with RLE masks (one run): {segments_time:.3f} s")
    print(
        f"outputs: {stats['matched']} matched detections, {stats['unmatched']} unmatched, "
        f"max box diff {stats['max_box_diff']:.2e} px, max score diff {stats['max_score_diff']:.2e}, "
        f"min mask IoU {stats['min_mask_iou']:.4f}"
    )
    print(
        f"result: ratio_latency={our_total / tv_total:.3f} max_box_diff={stats['max_box_diff']:.2e} "
        f"min_mask_iou={stats['min_mask_iou']:.4f}"
    )


if __name__ == "__main__":
    main()
