"""COCO instance evaluation speed (mask AP and box AP): ``omniseg evaluate`` vs its peers.

Generates (seeded, into a temporary directory) a COCO instances ground truth with RLE masks and a
results file of scored detections (jittered copies of the ground truth plus false positives),
then times, in one run so that machine load hits every row alike:

* ``pycocotools``: COCOeval ``segm`` then ``bbox`` (the referee), in process;
* ``faster-coco-eval`` and ``hotcoco``: the same two evaluations, in process;
* ``omniseg``: :func:`omniseg.metrics.evaluate_instance_files` in process, and
  ``omniseg evaluate --task instance --json`` as a subprocess (end to end: start-up, JSON
  loading, checking, both evaluations).

Every row's 12 ``segm`` and 12 ``bbox`` stats must equal pycocotools' to 1e-12 (omniseg reports
the first six of each).

    python benchmarks/ap_eval.py [--images 500] [--gt-per-image 10] [--dets-per-image 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from _startup import compile_package

WIDTH, HEIGHT = 640, 480
CATEGORY_IDS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]


# ----------------------------------------------------------------------------- data
def _polygon(rng: np.random.Generator, cx: float, cy: float, scale: float) -> list[float]:
    k = int(rng.integers(5, 12))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = scale / 2 * rng.uniform(0.5, 1.0, k)
    xs = np.clip(cx + radii * np.cos(angles), 0, WIDTH - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, HEIGHT - 1)
    return np.stack([xs, ys], axis=1).reshape(-1).round(2).tolist()


def _rle(poly: list[float]) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], HEIGHT, WIDTH))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def generate(
    root: Path, n_images: int, gt_per_image: int, dets_per_image: int, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``gt.json`` (COCO instances, RLE masks, ~3% crowd) and ``results.json`` under ``root``."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": WIDTH, "height": HEIGHT})
        shapes = []
        for _ in range(gt_per_image):
            # sizes span COCO's small / medium / large area ranges
            scale = float(np.exp(rng.uniform(np.log(8), np.log(300))))
            cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
            cat = int(rng.choice(CATEGORY_IDS))
            poly = _polygon(rng, cx, cy, scale)
            rle = _rle(poly)
            rle_c = {"size": rle["size"], "counts": rle["counts"].encode()}
            area = float(mask_utils.area(rle_c))
            if area == 0:
                continue
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": rle,
                    "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle_c)],
                    "iscrowd": int(rng.random() < 0.03),
                }
            )
            shapes.append((np.asarray(poly).reshape(-1, 2), scale, cat))
        for d in range(dets_per_image):
            if d < len(shapes) and rng.random() < 0.85:  # a jittered detection of a ground-truth object
                pts, scale, cat = shapes[d]
                sigma = scale * rng.uniform(0.01, 0.15)
                pts = pts + rng.normal(0, sigma, size=pts.shape) + rng.normal(0, sigma, size=(1, 2))
                pts = np.clip(pts, 0, [WIDTH - 1, HEIGHT - 1])
                if rng.random() < 0.1:
                    cat = int(rng.choice(CATEGORY_IDS))
                score = rng.uniform(0.3, 1.0)
                results.append(
                    {"image_id": image_id, "category_id": cat, "segmentation": _rle(pts.reshape(-1).round(2).tolist()),
                     "score": round(float(score), 5)}
                )  # fmt: skip
                continue
            else:  # a false positive
                scale = float(np.exp(rng.uniform(np.log(8), np.log(200))))
                cx, cy, cat = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), int(rng.choice(CATEGORY_IDS))
                score = rng.uniform(0.0, 0.8)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": _rle(_polygon(rng, cx, cy, scale)),
                    "score": round(float(score), 5),
                }
            )
    categories = [{"id": c, "name": f"cat{c}"} for c in CATEGORY_IDS]
    gt_json, res_json = root / "gt.json", root / "results.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    res_json.write_text(json.dumps(results))
    return gt_json, res_json


# ----------------------------------------------------------------------------- peers
# Each peer loads the two files itself (as a user would) and runs segm then bbox. The results file
# has masks only: like `omniseg evaluate`, the bbox run gives each detection the box of its mask
# as its "bbox" (so loadRes scores it as a box result, with the box's area: a mask-only result
# list would be scored with the mask's area).
def _with_boxes(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
        out.append(
            {**{k: v for k, v in r.items() if k != "segmentation"}, "bbox": mask_utils.toBbox(rle).tolist()}
        )
    return out


def _quiet_eval(coco_mod, eval_cls, gt_json: Path, res_json: Path) -> dict[str, list[float]]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_mod.COCO(str(gt_json))
        results = json.loads(Path(res_json).read_text())
        out = {}
        for iou_type, res in (("segm", results), ("bbox", _with_boxes(results))):
            dt = gt.loadRes(res)
            ev = eval_cls(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[iou_type] = [float(v) for v in ev.stats]
    return out


def pycocotools_eval(gt_json: Path, res_json: Path) -> dict[str, list[float]]:
    from pycocotools import coco
    from pycocotools.cocoeval import COCOeval

    return _quiet_eval(coco, COCOeval, gt_json, res_json)


def faster_coco_eval_eval(gt_json: Path, res_json: Path) -> dict[str, list[float]]:
    import faster_coco_eval
    from faster_coco_eval import COCOeval_faster

    return _quiet_eval(faster_coco_eval, COCOeval_faster, gt_json, res_json)


def hotcoco_eval(gt_json: Path, res_json: Path) -> dict[str, list[float]]:
    import hotcoco

    return _quiet_eval(hotcoco, hotcoco.COCOeval, gt_json, res_json)


def omniseg_eval(gt_json: Path, res_json: Path) -> dict[str, list[float]]:
    from omniseg.metrics import evaluate_instance_files

    out = evaluate_instance_files(gt_json, res_json)
    return {t: list(out[t].values()) for t in ("segm", "bbox")}


def omniseg_cli(gt_json: Path, res_json: Path) -> dict[str, list[float]]:
    cmd = [sys.executable, "-m", "omniseg", "evaluate", "--task", "instance", "--json",
           "--gt-json", str(gt_json), "--pred-json", str(res_json)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    return {t: list(out[t].values()) for t in ("segm", "bbox")}


# what a hotcoco user runs: hotcoco and json only (importing this file would import pycocotools)
_HOTCOCO_SCRIPT = """
import contextlib, io, json, sys
import hotcoco
with contextlib.redirect_stdout(io.StringIO()):
    gt = hotcoco.COCO(sys.argv[1])
    results = json.load(open(sys.argv[2]))
    boxes = hotcoco.mask.toBbox([r["segmentation"] for r in results])
    with_boxes = [{k: v for k, v in r.items() if k != "segmentation"} | {"bbox": list(b)} for r, b in zip(results, boxes)]
    out = {}
    for iou_type, res in (("segm", results), ("bbox", with_boxes)):
        ev = hotcoco.COCOeval(gt, gt.loadRes(res), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        out[iou_type] = [float(v) for v in ev.stats]
print(json.dumps(out))
"""


def hotcoco_subprocess(gt_json: Path, res_json: Path) -> dict[str, list[float]]:
    """hotcoco end to end, as a script a user would run: interpreter start-up included."""
    cmd = [sys.executable, "-c", _HOTCOCO_SCRIPT, str(gt_json), str(res_json)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def _max_difference(ours: dict[str, list[float]], referee: dict[str, list[float]]) -> float:
    diff = 0.0
    for t in ("segm", "bbox"):
        n = len(ours[t])  # omniseg reports the first six stats, the peers all twelve
        diff = max(diff, max(abs(a - b) for a, b in zip(ours[t], referee[t][:n], strict=True)))
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--gt-per-image", type=int, default=10)
    parser.add_argument("--dets-per-image", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write the data here and keep it")
    parser.add_argument("--repeat", type=int, default=1, help="best of N rounds (rows interleaved per round)")
    args = parser.parse_args(argv)

    compile_package()  # the CLI starts as an installed copy does (benchmarks/_startup.py)
    with tempfile.TemporaryDirectory(prefix="omniseg_ap_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        gt_json, res_json = root / "gt.json", root / "results.json"
        if not (gt_json.exists() and res_json.exists()):
            start = time.perf_counter()
            generate(root, args.images, args.gt_per_image, args.dets_per_image, args.seed)
            print(f"generated {args.images} images in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        n_gt = len(json.loads(gt_json.read_text())["annotations"])
        n_dt = len(json.loads(res_json.read_text()))

        rows: list[tuple[str, str, Callable]] = [
            ("pycocotools COCOeval (referee), in process", "pycocotools", pycocotools_eval),
            ("faster-coco-eval COCOeval_faster, in process", "faster", faster_coco_eval_eval),
            ("hotcoco COCOeval, in process", "hotcoco", hotcoco_eval),
            ("hotcoco COCOeval, end to end (python subprocess)", "hotcoco_e2e", hotcoco_subprocess),
            ("omniseg evaluate_instance_files, in process", "omniseg", omniseg_eval),
            ("`omniseg evaluate --task instance` CLI, end to end", "cli", omniseg_cli),
        ]
        times: dict[str, float] = {key: float("inf") for _, key, _ in rows}
        outs = {}
        for _ in range(args.repeat):  # rounds, so that load from other processes hits every row alike
            for _, key, fn in rows:
                start = time.perf_counter()
                outs[key] = fn(gt_json, res_json)
                times[key] = min(times[key], time.perf_counter() - start)

    referee = outs["pycocotools"]
    diffs = {key: _max_difference(outs[key], referee) for _, key, _ in rows}
    print(
        f"COCO instance evaluation (segm + bbox), {args.images} images {WIDTH}x{HEIGHT}, {n_gt} GT masks, "
        f"{n_dt} detections, {os.cpu_count()} CPUs (segm AP {referee['segm'][0]:.4f}, bbox AP "
        f"{referee['bbox'][0]:.4f}; load average {os.getloadavg()[0]:.1f}, best of {args.repeat})"
    )
    print()
    print("| method | seconds | speed vs pycocotools | max abs diff vs pycocotools | numbers agree (1e-12) |")
    print("|---|---:|---:|---:|:---:|")
    for name, key, _ in rows:
        agree = "yes" if diffs[key] <= 1e-12 else "NO"
        print(
            f"| {name} | {times[key]:.2f} | {times['pycocotools'] / times[key]:.2f}x | {diffs[key]:.1e} | {agree} |"
        )
    identical = all(d <= 1e-12 for d in diffs.values())
    print()
    print(
        f"result: ratio_cli_vs_hotcoco={times['cli'] / times['hotcoco_e2e']:.2f} "
        f"ratio_inproc_vs_hotcoco={times['omniseg'] / times['hotcoco']:.2f} "
        f"ratio_cli_vs_faster_coco_eval={times['cli'] / times['faster']:.2f} "
        f"ratio_cli_vs_pycocotools={times['cli'] / times['pycocotools']:.2f} "
        f"cli_s={times['cli']:.2f} hotcoco_e2e_s={times['hotcoco_e2e']:.2f} identical={identical}"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
