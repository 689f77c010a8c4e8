"""Mask^X R-CNN on Cityscapes: mask AP on the box-only classes (B) and on the masked ones (A), per row.

Each row is a training run of ``configs/cityscapes_maskx_<row>.yaml`` (same backbone, data recipe
and budget; A = person, car, bicycle, bus with masks in training, B = rider, truck, train,
motorcycle with boxes only; the oracle has masks for all eight). Every model predicts the val
frames (dusseldorf) once; its instances are scored by COCO mask AP over B's and A's categories
separately (``InstanceAP.compute(category_ids=...)``).

    python benchmarks/mask_x_rcnn_cityscapes.py [--rows agnostic transfer transfer_mlp oracle] [--limit N]

Last line: ``result: ap_b_<row>=... ap_a_<row>=...`` (percent) for each row that has a checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from omniseg.evaluate import score_predictions
from omniseg.predictor import load_predictor

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "agnostic": "class-agnostic mask head (baseline)",
    "transfer": "transfer (cls+box, MLP)",
    "transfer_mlp": "transfer + MLP mask branch",
    "oracle": "fully supervised oracle",
}
SET_A = ("person", "car", "bicycle", "bus")
SET_B = ("rider", "truck", "train", "motorcycle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "data" / "cityscapes_yolo" / "Cityscapes-3"))
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--limit", type=int, default=None, help="first N val frames (a quick check)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = {"format": "cityscapes_polygons", "root": args.data, "split": "val"}
    lines, result = [], {}
    for row in args.rows:
        checkpoint = ROOT / "runs" / f"cityscapes_maskx_{row}" / "best"
        if not checkpoint.with_suffix(".json").is_file():
            print(f"skip {row}: no checkpoint at {checkpoint} (omniseg train configs/cityscapes_maskx_{row}.yaml)")
            continue
        predictor = load_predictor(checkpoint)
        by_name = {c.name: c.id for c in predictor.categories}
        scored = score_predictions(predictor, spec, task="instance", metrics=["instance"], limit=args.limit)
        metric = scored.scorers["instance"].metric
        ap = {name: metric.compute([by_name[c] for c in names])["segm"] for name, names in (("B", SET_B), ("A", SET_A))}
        lines.append(
            f"| {ROWS[row]} | {100 * ap['B']['AP']:.1f} | {100 * ap['B']['AP50']:.1f} "
            f"| {100 * ap['A']['AP']:.1f} | {100 * ap['A']['AP50']:.1f} |"
        )
        result[f"ap_b_{row}"] = round(100 * ap["B"]["AP"], 2)
        result[f"ap_a_{row}"] = round(100 * ap["A"]["AP"], 2)
    frames = "all 221" if args.limit is None else f"first {args.limit}"
    print(f"\nCityscapes val (dusseldorf, {frames} frames at 1280x640); A = {', '.join(SET_A)}; B = {', '.join(SET_B)}\n")
    print("| method | mask AP on B | AP50 on B | mask AP on A | AP50 on A |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(lines))
    print("\nresult: " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
