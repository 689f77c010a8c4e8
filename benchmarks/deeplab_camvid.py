"""CamVid val accuracy of a semantic checkpoint under each inference option, with time per image.

Variants: the frame as it is (scale 1); one scale (``--single-scale``, default the middle of the
checkpoint's own test-time scales); that scale flipped; flip + all test-time scales (``--scales``,
default those recorded in the checkpoint, else 1, 1.25, 1.5); the first and the last again with the
dense CRF. Prints a markdown table (class-average mIoU, pixel accuracy, ms/image) and per-class IoU
of the best variant.

    python benchmarks/deeplab_camvid.py [--checkpoint camvid-deeplabv3plus-lite0] [--scales 1.25 1.5 1.75] [--limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from omniseg.data import open_dataset
from omniseg.metrics.task_metrics import metric_for_task
from omniseg.predictor import load_predictor

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


def evaluate(predictor, dataset, *, flip: bool, scales, crf: bool, limit: int | None) -> tuple[dict, float]:
    """The metric ``omniseg evaluate`` computes, timing the prediction alone (not data loading)."""
    metric = metric_for_task("semantic", predictor.categories)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    elapsed = 0.0
    for i in range(n):
        sample = dataset[i]
        start = time.perf_counter()
        pred = predictor.predict(sample.image, crf=crf, flip=flip, scales=scales)
        elapsed += time.perf_counter() - start
        metric.update(sample.image_id, sample.segments, pred)
    return metric.compute(), elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="camvid-deeplabv3plus-lite0")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-crf", action="store_true")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="test-time scales of the last variant")
    parser.add_argument("--single-scale", type=float, default=None, help="scale of the one-scale variants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise SystemExit(f"CamVid not found at {args.data}")
    predictor = load_predictor(args.checkpoint)
    dataset = open_dataset({"format": "camvid", "root": str(args.data), "split": args.split})
    scales = tuple(args.scales or predictor.recorded.get("scales") or (1.0, 1.25, 1.5))
    single = args.single_scale or sorted(scales)[len(scales) // 2]
    variants = [
        ("scale 1", False, (1.0,)),
        (f"scale {single:g}", False, (single,)),
        (f"flip, scale {single:g}", True, (single,)),
        ("flip + scales " + ", ".join(f"{x:g}" for x in scales), True, scales),
    ]
    if single == 1.0:
        variants.pop(0)
    rows, results = [], {}
    for index, (name, flip, view_scales) in enumerate(variants):
        with_crf = not args.no_crf and index in (0, len(variants) - 1)  # CRF costs ~0.4 s per image
        for crf in (False, True) if with_crf else (False,):
            label = name + (" + CRF" if crf else "")
            res, sec = evaluate(predictor, dataset, flip=flip, scales=view_scales, crf=crf, limit=args.limit)
            results[label] = res
            rows.append((label, res["miou"] * 100, res["pixel_accuracy"] * 100, sec * 1000))
    print(f"checkpoint {args.checkpoint}, CamVid {args.split} ({args.limit or len(dataset)} images), "
          f"{args.threads} threads\n")
    print("| inference | mIoU (%) | pixel acc (%) | ms / image |")
    print("|---|---:|---:|---:|")
    for label, miou, acc, ms in rows:
        print(f"| {label} | {miou:.2f} | {acc:.2f} | {ms:.0f} |")
    best = max(results, key=lambda k: results[k]["miou"])
    print(f"\nper-class IoU ({best}):\n")
    print("| " + " | ".join(predictor.categories.names) + " |")
    print("|" + "---:|" * len(predictor.categories))
    print("| " + " | ".join(f"{v * 100:.1f}" for v in results[best]["per_class_iou"]) + " |")
    base = results[variants[0][0]]["miou"]
    summary = " ".join(
        f"miou_{k.replace(' + ', '_').replace(' ', '_').replace(',', '')}={v['miou'] * 100:.2f}" for k, v in results.items()
    )
    crf_delta = ""
    if not args.no_crf:
        crf_delta = f" crf_delta_single={(results[variants[0][0] + ' + CRF']['miou'] - base) * 100:+.2f}"
    print(f"\nresult: {summary}{crf_delta}")


if __name__ == "__main__":
    main()
