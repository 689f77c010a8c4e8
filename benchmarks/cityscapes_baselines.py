"""The Cityscapes baselines on val (dusseldorf), every model scored on all three tasks, then shipped.

Each model predicts its own task once per frame (its checkpoint's recorded test-time setting);
that output is scored by the semantic (mIoU, 19 classes), instance (COCO mask AP, 8 thing
classes) and panoptic (PQ) metrics — the cross-task figures: Panoptic FPN's mIoU and AP from its
panoptic output, Mask R-CNN's PQ-things (it predicts no stuff), DeepLab's PQ-stuff (one segment per
class: no instances). Every figure is written as an ``omniseg evaluate --save`` record into
``RUN/figures/``; with ``--export`` each model is packaged with its figures by ``omniseg export``
(float16 safetensors + JSON) as its zoo entry.

    python benchmarks/cityscapes_baselines.py [--data ../data/cityscapes_yolo/Cityscapes-3] [--export src/omniseg/zoo]

The data is fetched outside the repository (README, "Cityscapes"); the cities reserved for
outside evaluation are never read (the reader's splits are an allow-list).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from omniseg.evaluate import score_predictions
from omniseg.export import export_model, figure_record
from omniseg.io import atomic_write_json, load_json
from omniseg.predictor import load_predictor

ROOT = Path(__file__).resolve().parents[1]
# zoo name, training run, the task it was trained for
BASELINES = [
    ("cityscapes-deeplabv3plus-lite0", "runs/cityscapes_deeplabv3plus_lite0", "semantic"),
    ("cityscapes-mask-rcnn-lite0", "runs/cityscapes_mask_rcnn_lite0", "instance"),
    ("cityscapes-panoptic-fpn-lite0", "runs/cityscapes_panoptic_fpn_lite0", "panoptic"),
]
METRICS = ("semantic", "instance", "panoptic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "data" / "cityscapes_yolo" / "Cityscapes-3"))
    parser.add_argument("--runs", default=str(ROOT), help="folder the runs/ paths are relative to")
    parser.add_argument("--only", nargs="*", default=None, help="zoo names to measure (default: all three)")
    parser.add_argument("--limit", type=int, default=None, help="first N val frames (a quick check)")
    parser.add_argument("--export", type=Path, default=None, help="export each model with its figures into this folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = {"format": "cityscapes_polygons", "root": args.data, "split": "val"}
    rows, result = [], {}
    for name, run, task in BASELINES:
        if args.only and name not in args.only:
            continue
        checkpoint = Path(args.runs) / run / "best"
        if not checkpoint.with_suffix(".json").is_file():
            print(f"skip {name}: no checkpoint at {checkpoint}")
            continue
        predictor = load_predictor(checkpoint)
        tta = predictor.test_time_augmentation()
        scored = score_predictions(predictor, spec, task=task, metrics=METRICS, limit=args.limit)
        figures = []
        for metric in METRICS:
            summary = scored.scorers[metric].summary(scored.results[metric])
            record = figure_record(
                checkpoint=str(checkpoint), data=spec, task=task, metric=metric,
                flip=tta.flip, scales=tta.scales, metrics=summary,
            )  # fmt: skip
            record["images"] = scored.images
            path = atomic_write_json(checkpoint.parent / "figures" / f"{metric}.json", record)
            figures.append(path)
            print(scored.scorers[metric].table(scored.results[metric]))
        sem = scored.scorers["semantic"].summary(scored.results["semantic"])
        ins = scored.scorers["instance"].summary(scored.results["instance"])
        pan = scored.scorers["panoptic"].summary(scored.results["panoptic"])
        rows.append(
            f"| {name} | {task} | {100 * sem['miou']:.1f} | {100 * ins.get('mask_ap', 0):.1f} | "
            f"{100 * pan['pq']:.1f} | {100 * pan['pq_things']:.1f} | {100 * pan['pq_stuff']:.1f} | "
            f"{1000 * scored.seconds_per_image:.0f} |"
        )
        key = name.removeprefix("cityscapes-").removesuffix("-lite0").replace("-", "_")
        result[f"{key}_miou"] = round(100 * sem["miou"], 2)
        result[f"{key}_mask_ap"] = round(100 * ins.get("mask_ap", 0), 2)
        result[f"{key}_pq"] = round(100 * pan["pq"], 2)
        if args.export:
            # the frames' size: what the recorded scales are relative to, and larger photos are scaled to
            export_model(checkpoint, args.export, name=name, figures=figures, reference_size=(640, 1280))
            print(f"exported {name} -> {args.export}")
    frames = "all 221" if args.limit is None else f"first {args.limit}"
    print(f"\nCityscapes val (dusseldorf, {frames} frames at 1280x640), {args.threads} threads\n")
    print("| model | trained for | mIoU (19) | mask AP (8 things) | PQ | PQ-things | PQ-stuff | ms / frame |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    # merged with earlier runs' figures, so that measuring one model (--only) keeps the others'
    summary_path = Path(args.runs) / "runs" / "cityscapes_baselines.json"
    earlier = load_json(summary_path, "baseline figures") if summary_path.is_file() else {}
    atomic_write_json(summary_path, {**earlier, **result})
    print("\nresult: " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
