"""Panoptic quality evaluation speed: omniseg vs the official COCO panoptic procedure.

Generates (seeded, into a temporary directory) a COCO-panoptic ground truth and a perturbed
prediction set, then times

* ``official``: a faithful in-script copy of panopticapi's per-image procedure
  (``pq_compute_single_core``: PIL -> uint32 array -> rgb2id, ``np.unique`` over
  ``gt * OFFSET + pred``, the counting loop), single process;
* ``hotcoco``: hotcoco's ``PanopticEval`` in process (a peer; also omniseg's default engine);
* ``omniseg``: :func:`omniseg.metrics.evaluate_panoptic_files` in process, default engine
  (hotcoco) and its own engine with 1 and 2 worker processes;
* ``omniseg evaluate --task panoptic --json`` as a subprocess, end to end (start-up included);
* ``decode floor``: reading both PNGs and converting colours to ids, nothing else.

All numbers must agree with the official procedure to 1e-9.

    python benchmarks/pq_eval.py [--images 200] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from _startup import compile_package
from omniseg.metrics import evaluate_panoptic_files
from omniseg.metrics.files import read_panoptic_png
from omniseg.structures import id_to_rgb

WIDTH, HEIGHT = 640, 480
THING_IDS = [1, 2, 3, 4, 5, 7, 9, 13, 17, 23, 31, 44]
STUFF_IDS = [92, 95, 100, 118, 124, 149, 184, 200]


# ----------------------------------------------------------------------------- data
def _random_shape(rng: np.random.Generator, big: bool) -> tuple[str, np.ndarray]:
    """A rectangle or a star-shaped polygon, as vertices in pixel coordinates."""
    scale = rng.uniform(120, 360) if big else rng.uniform(25, 140)
    cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
    if rng.random() < 0.4:
        w, h = scale * rng.uniform(0.5, 1.5), scale * rng.uniform(0.5, 1.5)
        pts = np.array(
            [
                [cx - w / 2, cy - h / 2],
                [cx + w / 2, cy - h / 2],
                [cx + w / 2, cy + h / 2],
                [cx - w / 2, cy + h / 2],
            ]
        )
        return "rect", pts
    k = int(rng.integers(5, 12))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = scale / 2 * rng.uniform(0.5, 1.0, k)
    return "poly", np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _draw(shapes: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Paint shapes in order into an index map (0 = void); later shapes cover earlier ones."""
    canvas = Image.new("I", (WIDTH, HEIGHT), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, index in shapes:
        draw.polygon([tuple(p) for p in pts.round(1).tolist()], fill=int(index))
    return np.asarray(canvas, dtype=np.int32)


def _write_panoptic(
    index_map: np.ndarray, seg_cats: dict[int, tuple[int, int]], path: Path, rng: np.random.Generator
) -> list[dict]:
    """Give segments random 24-bit ids, write the PNG, return ``segments_info`` (present ones only)."""
    present, areas = np.unique(index_map, return_counts=True)
    keep = present != 0
    present, areas = present[keep], areas[keep]
    ids = np.unique(rng.integers(1, 256**3, size=2 * len(present) + 8))
    ids = rng.permutation(ids)[: len(present)]  # distinct non-void ids
    lut = np.zeros(int(index_map.max()) + 1, dtype=np.int64)
    lut[present] = ids
    Image.fromarray(id_to_rgb(lut[index_map])).save(path)
    return [
        {"id": int(i), "category_id": seg_cats[int(k)][0], "iscrowd": seg_cats[int(k)][1], "area": int(a)}
        for k, i, a in zip(present.tolist(), ids.tolist(), areas.tolist(), strict=True)
    ]


def generate(root: Path, n_images: int, seed: int = 0) -> dict[str, Path]:
    """Write gt/pred COCO-panoptic JSONs and PNG folders under ``root``."""
    rng = np.random.default_rng(seed)
    paths = {k: root / k for k in ("gt", "pred")}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    categories = [{"id": c, "name": f"thing{c}", "isthing": 1} for c in THING_IDS]
    categories += [{"id": c, "name": f"stuff{c}", "isthing": 0} for c in STUFF_IDS]
    images, gt_anns, pred_anns = [], [], []
    for image_id in range(1, n_images + 1):
        n_segments = int(rng.integers(5, 26))
        n_stuff = int(rng.integers(1, min(5, n_segments)))
        stuff_cats = rng.choice(STUFF_IDS, size=n_stuff, replace=False).tolist()
        gt_shapes, seg_cats = [], {}
        for k in range(1, n_segments + 1):
            is_stuff = k <= n_stuff
            _, pts = _random_shape(rng, big=is_stuff)
            if is_stuff:
                seg_cats[k] = (stuff_cats[k - 1], 0)
            else:
                seg_cats[k] = (int(rng.choice(THING_IDS)), int(rng.random() < 0.05))
            gt_shapes.append((pts, k))
        # prediction: jittered shapes, some dropped, some relabelled, a few extra
        pred_shapes, pred_cats = [], {}
        for pts, k in gt_shapes:
            if rng.random() < 0.1:
                continue
            jitter = rng.normal(0, rng.uniform(1, 12), size=pts.shape) + rng.normal(0, 6, size=(1, 2))
            cat = seg_cats[k][0]
            if rng.random() < 0.05:
                cat = int(rng.choice(THING_IDS if cat in THING_IDS else STUFF_IDS))
            pred_cats[k] = (cat, 0)
            pred_shapes.append((pts + jitter, k))
        for k in range(n_segments + 1, n_segments + 1 + int(rng.integers(0, 4))):
            _, pts = _random_shape(rng, big=False)
            pred_cats[k] = (int(rng.choice(THING_IDS)), 0)
            pred_shapes.append((pts, k))
        name = f"{image_id:012d}.png"
        images.append(
            {"id": image_id, "file_name": name.replace(".png", ".jpg"), "width": WIDTH, "height": HEIGHT}
        )
        gt_info = _write_panoptic(_draw(gt_shapes), seg_cats, paths["gt"] / name, rng)
        pred_info = _write_panoptic(_draw(pred_shapes), pred_cats, paths["pred"] / name, rng)
        gt_anns.append({"image_id": image_id, "file_name": name, "segments_info": gt_info})
        pred_anns.append({"image_id": image_id, "file_name": name, "segments_info": pred_info})
    gt_json, pred_json = root / "gt.json", root / "pred.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": categories}))
    pred_json.write_text(json.dumps({"annotations": pred_anns}))
    return {"gt_json": gt_json, "gt_dir": paths["gt"], "pred_json": pred_json, "pred_dir": paths["pred"]}


def _reuse(root: Path, n_images: int) -> dict[str, Path] | None:
    """The data already in ``root`` (from ``--keep``) if it has ``n_images`` images."""
    try:
        if len(json.loads((root / "gt.json").read_text())["annotations"]) != n_images:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return {
        "gt_json": root / "gt.json",
        "gt_dir": root / "gt",
        "pred_json": root / "pred.json",
        "pred_dir": root / "pred",
    }


# ----------------------------------------------------------------------------- the peer
# A faithful copy of cocodataset/panopticapi evaluation.py (pq_compute_single_core and
# PQStat.pq_average, commit 7bb4655), minus progress printing; it is the referee here.
OFFSET = 256 * 256 * 256
VOID = 0


def _official_rgb2id(color: np.ndarray) -> np.ndarray:
    if color.dtype == np.uint8:
        color = color.astype(np.int32)
    return color[:, :, 0] + 256 * color[:, :, 1] + 256 * 256 * color[:, :, 2]


class _PQStatCat:
    def __init__(self) -> None:
        self.iou, self.tp, self.fp, self.fn = 0.0, 0, 0, 0


def official_pq(gt_json: Path, gt_folder: Path, pred_json: Path, pred_folder: Path) -> dict:
    with open(gt_json) as f:
        gt = json.load(f)
    with open(pred_json) as f:
        pred = json.load(f)
    categories = {el["id"]: el for el in gt["categories"]}
    pred_annotations = {el["image_id"]: el for el in pred["annotations"]}
    pq_stat: dict[int, _PQStatCat] = defaultdict(_PQStatCat)
    for gt_ann in gt["annotations"]:
        pred_ann = pred_annotations[gt_ann["image_id"]]
        pan_gt = np.array(Image.open(os.path.join(gt_folder, gt_ann["file_name"])), dtype=np.uint32)
        pan_gt = _official_rgb2id(pan_gt)
        pan_pred = np.array(Image.open(os.path.join(pred_folder, pred_ann["file_name"])), dtype=np.uint32)
        pan_pred = _official_rgb2id(pan_pred)
        gt_segms = {el["id"]: el for el in gt_ann["segments_info"]}
        pred_segms = {el["id"]: el for el in pred_ann["segments_info"]}

        pred_labels_set = {el["id"] for el in pred_ann["segments_info"]}
        labels, labels_cnt = np.unique(pan_pred, return_counts=True)
        for label, label_cnt in zip(labels, labels_cnt, strict=True):
            if label not in pred_segms:
                if label == VOID:
                    continue
                raise KeyError(f"segment {label} in PNG but not in JSON")
            pred_segms[label]["area"] = label_cnt
            pred_labels_set.remove(label)
            if pred_segms[label]["category_id"] not in categories:
                raise KeyError(f"unknown category {pred_segms[label]['category_id']}")
        if len(pred_labels_set) != 0:
            raise KeyError(f"segments {pred_labels_set} in JSON but not in PNG")

        pan_gt_pred = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
        gt_pred_map = {}
        labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
        for label, intersection in zip(labels, labels_cnt, strict=True):
            gt_id = label // OFFSET
            pred_id = label % OFFSET
            gt_pred_map[(gt_id, pred_id)] = intersection

        gt_matched, pred_matched = set(), set()
        for label_tuple, intersection in gt_pred_map.items():
            gt_label, pred_label = label_tuple
            if gt_label not in gt_segms:
                continue
            if pred_label not in pred_segms:
                continue
            if gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (
                pred_segms[pred_label]["area"]
                + gt_segms[gt_label]["area"]
                - intersection
                - gt_pred_map.get((VOID, pred_label), 0)
            )
            iou = intersection / union
            if iou > 0.5:
                pq_stat[gt_segms[gt_label]["category_id"]].tp += 1
                pq_stat[gt_segms[gt_label]["category_id"]].iou += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)

        crowd_labels_dict = {}
        for gt_label, gt_info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_info["iscrowd"] == 1:
                crowd_labels_dict[gt_info["category_id"]] = gt_label
                continue
            pq_stat[gt_info["category_id"]].fn += 1

        for pred_label, pred_info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            intersection = gt_pred_map.get((VOID, pred_label), 0)
            if pred_info["category_id"] in crowd_labels_dict:
                intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
            if intersection / pred_info["area"] > 0.5:
                continue
            pq_stat[pred_info["category_id"]].fp += 1

    results: dict = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        pq, sq, rq, n = 0.0, 0.0, 0.0, 0
        per_class = {}
        for label, label_info in categories.items():
            if isthing is not None and (label_info["isthing"] == 1) != isthing:
                continue
            s = pq_stat[label]
            if s.tp + s.fp + s.fn == 0:
                per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_class = s.iou / (s.tp + 0.5 * s.fp + 0.5 * s.fn)
            sq_class = s.iou / s.tp if s.tp != 0 else 0
            rq_class = s.tp / (s.tp + 0.5 * s.fp + 0.5 * s.fn)
            per_class[label] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq, sq, rq = pq + pq_class, sq + sq_class, rq + rq_class
        results[name] = {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}
        if name == "All":
            results["per_class"] = per_class
    return results


# ----------------------------------------------------------------------------- timing
def decode_floor(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> int:
    """Read both PNGs of every image and convert colours to ids; nothing else."""
    gt = json.loads(Path(gt_json).read_text())
    pred = {a["image_id"]: a for a in json.loads(Path(pred_json).read_text())["annotations"]}
    checksum = 0
    for ann in gt["annotations"]:
        a = read_panoptic_png(Path(gt_dir) / ann["file_name"])
        b = read_panoptic_png(Path(pred_dir) / pred[ann["image_id"]]["file_name"])
        checksum += int(a[0, 0]) + int(b[0, 0])
    return checksum


def hotcoco_pq(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict:
    from hotcoco import panoptic

    ev = panoptic.PanopticEval(str(gt_json), str(pred_json), gt_folder=str(gt_dir), pred_folder=str(pred_dir))
    ev.evaluate()
    raw = ev.results()
    out = {g: raw[g] for g in ("All", "Things", "Stuff")}
    out["per_class"] = {str(k): v for k, v in raw["per_class"].items()}
    return out


# what a hotcoco user runs: hotcoco and json only (importing this file would import omniseg too)
_HOTCOCO_SCRIPT = """
import json, sys
from hotcoco import panoptic
ev = panoptic.PanopticEval(sys.argv[1], sys.argv[3], gt_folder=sys.argv[2], pred_folder=sys.argv[4])
ev.evaluate()
raw = ev.results()
out = {g: raw[g] for g in ("All", "Things", "Stuff")}
out["per_class"] = {str(k): v for k, v in raw["per_class"].items()}
print(json.dumps(out))
"""


def hotcoco_subprocess(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict:
    """hotcoco end to end, as a script a user would run: interpreter start-up included."""
    cmd = [sys.executable, "-c", _HOTCOCO_SCRIPT, str(gt_json), str(gt_dir), str(pred_json), str(pred_dir)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def omniseg_cli(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "omniseg", "evaluate", "--task", "panoptic", "--json",
           "--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--pred-json", str(pred_json),
           "--pred-dir", str(pred_dir)]  # fmt: skip
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def _max_difference(ours: dict, official: dict) -> float:
    diffs = []
    for group in ("All", "Things", "Stuff"):
        if ours[group]["n"] != official[group]["n"]:
            return float("inf")
        diffs += [abs(ours[group][k] - official[group][k]) for k in ("pq", "sq", "rq")]
    for cat, vals in official["per_class"].items():
        mine = {str(c): v for c, v in ours["per_class"].items()}  # int keys in-script, str in JSON
        diffs += [abs(mine[str(cat)][k] - vals[k]) for k in ("pq", "sq", "rq")]
    return max(diffs)


def _time_interleaved(fns: dict, repeat: int) -> tuple[dict, dict, dict]:
    """Best-of-``repeat`` wall and CPU time of each function, run in rounds so that load from
    other processes hits every method alike. CPU time (this process only) stays meaningful on a
    busy machine, where wall time mostly measures waiting."""
    wall = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    outputs: dict[str, object] = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return wall, cpu, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per row")
    parser.add_argument("--keep", type=Path, default=None, help="write the data here and keep it")
    args = parser.parse_args(argv)

    compile_package()  # the CLI starts as an installed copy does (benchmarks/_startup.py)
    with tempfile.TemporaryDirectory(prefix="omniseg_pq_") as tmp:
        root = args.keep or Path(tmp)
        start = time.perf_counter()
        data = _reuse(root, args.images)
        if data is None:
            data = generate(root, args.images, args.seed)
            print(f"generated {args.images} images in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        paths = (data["gt_json"], data["gt_dir"], data["pred_json"], data["pred_dir"])

        times, cpu, out = _time_interleaved(
            {
                "official": lambda: official_pq(*paths),
                "hotcoco": lambda: hotcoco_pq(*paths),
                "hotcoco_e2e": lambda: hotcoco_subprocess(*paths),
                "auto": lambda: evaluate_panoptic_files(*paths),
                "one": lambda: evaluate_panoptic_files(*paths, workers=1, engine="omniseg"),
                "two": lambda: evaluate_panoptic_files(*paths, workers=2, engine="omniseg"),
                "cli": lambda: omniseg_cli(*paths),
                "floor": lambda: decode_floor(*paths),
            },
            args.repeat,
        )
    official = out["official"]
    diffs = {
        k: _max_difference(out[k], official)
        for k in ("official", "hotcoco", "hotcoco_e2e", "auto", "one", "two", "cli")
    }
    identical = all(d <= 1e-9 for d in diffs.values())
    n = args.images
    rows = [
        ("official panopticapi procedure, 1 process (referee)", "official"),
        ("hotcoco 1.3.0 PanopticEval, in process", "hotcoco"),
        ("hotcoco 1.3.0 PanopticEval, end to end (python subprocess)", "hotcoco_e2e"),
        ("omniseg evaluate_panoptic_files, default engine (hotcoco)", "auto"),
        ("omniseg evaluate_panoptic_files, own engine, workers=1", "one"),
        ("omniseg evaluate_panoptic_files, own engine, workers=2", "two"),
        ("`omniseg evaluate --task panoptic` CLI, end to end", "cli"),
        ("decode floor (2 PNG reads + rgb->id), 1 process", "floor"),
    ]
    print(
        f"PQ evaluation, {n} COCO-panoptic images {WIDTH}x{HEIGHT}, {os.cpu_count()} CPUs "
        f"(PQ {official['All']['pq']:.4f}; load average {os.getloadavg()[0]:.1f}, best of {args.repeat})"
    )
    print()
    print(
        "| method | seconds | ms/image | speed vs official | max abs diff vs official | numbers agree (1e-9) |"
    )
    print("|---|---:|---:|---:|---:|:---:|")
    for name, key in rows:
        t = times[key]
        diff = f"{diffs[key]:.1e}" if key in diffs else "-"
        agree = "-" if key not in diffs else ("yes" if diffs[key] <= 1e-9 else "NO")
        print(f"| {name} | {t:.2f} | {1000 * t / n:.2f} | {times['official'] / t:.2f}x | {diff} | {agree} |")
    print()
    print(
        f"result: ratio_cli_vs_hotcoco={times['cli'] / times['hotcoco_e2e']:.2f} "
        f"ratio_inproc_vs_hotcoco={times['auto'] / times['hotcoco']:.2f} "
        f"speedup_cli_vs_official={times['official'] / times['cli']:.2f} "
        f"speedup_own_engine_1proc_vs_official={times['official'] / times['one']:.2f} "
        f"cli_s={times['cli']:.2f} hotcoco_e2e_s={times['hotcoco_e2e']:.2f} identical={identical}"
    )
    if not identical:
        print(f"MISMATCH: max difference {max(diffs.values()):.3e} exceeds 1e-9", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
