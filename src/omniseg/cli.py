"""The ``omniseg`` command: train, evaluate, segment, show, export, serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omniseg.errors import CheckpointError, DataError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=5")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.ckpt exactly")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate prediction files against ground truth, or a checkpoint on a dataset split",
    )
    p.add_argument(
        "--task", choices=["semantic", "instance", "panoptic", "detection"], default=None,
        help="files: which metric; with --checkpoint: which of the model's tasks (default: its first)",
    )  # fmt: skip
    p.add_argument(
        "--metric", choices=["semantic", "instance", "panoptic", "detection"], default=None,
        help="with --checkpoint: score the task's output with this task's metric (cross-task figures)",
    )  # fmt: skip
    p.add_argument("--gt-json", type=Path)
    p.add_argument("--gt-dir", type=Path)
    p.add_argument("--pred-json", type=Path)
    p.add_argument("--pred-dir", type=Path)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--workers", type=int, default=None, help="processes for panoptic evaluation (default: all cores)")
    p.add_argument("--checkpoint", help="zoo name or checkpoint path (with --data)")
    p.add_argument(
        "--data",
        help="dataset split as FORMAT:ROOT:SPLIT[:KEY=VALUE...] (e.g. camvid:../shared/data/camvid:val)",
    )
    p.add_argument("--subset", help="with --data: a slice START:STOP of the split in file order (e.g. 100:)")
    p.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=None,
        help="test-time horizontal flip (default: as the checkpoint records)",
    )  # fmt: skip
    p.add_argument(
        "--scales", type=float, nargs="+", default=None,
        help="test-time scales, e.g. 1 1.25 1.5 (default: as the checkpoint records)",
    )  # fmt: skip
    p.add_argument("--crf", action="store_true", help="dense CRF refinement")
    p.add_argument(
        "--native-size", action="store_true",
        help="run the model on each image as it is, however large (default: images with more than 1.25x "
        "the pixels the model was trained at are run at that size and the result mapped back)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--save", type=Path, default=None,
        help="with --checkpoint: also write the figure (data, task, test-time setting, metrics) as JSON "
        "for omniseg export --figures",
    )  # fmt: skip


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="package a checkpoint: float16 safetensors + JSON (the zoo format)",
        description="Package a checkpoint for shipping. The zoo entries are rebuilt with this command.",
    )  # fmt: skip
    p.add_argument("--model", required=True, help="zoo name or checkpoint path (e.g. runs/x/best)")
    p.add_argument(
        "--format", default="safetensors", choices=["safetensors", "onnx", "openvino"],
        help="safetensors: NAME.safetensors + NAME.json (the zoo format); onnx: DIR/model.onnx + model.json; "
        "openvino: also DIR/model.xml + model.bin (the semantic models and RetinaNet)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder to write the exported files into")
    p.add_argument("--name", default=None, help="the exported model's name (default: the checkpoint's file stem)")
    p.add_argument(
        "--figures", type=Path, nargs="*", default=[],
        help="figure files written by omniseg evaluate --save, recorded in the JSON",
    )  # fmt: skip
    p.add_argument(
        "--reference-size", default=None, metavar="HxW",
        help="record the image size the model's test-time scales are relative to (checkpoints trained "
        "before training recorded it), e.g. 640x1280",
    )  # fmt: skip


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment an image, a folder of images or a .txt list of image paths")
    p.add_argument("input", type=Path)
    p.add_argument("--model", default=None, help="zoo name or checkpoint path (default: the shipped CamVid model)")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--crf", action="store_true", help="dense CRF refinement")
    p.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=None,
        help="test-time horizontal flip (default: as the model records)",
    )  # fmt: skip
    p.add_argument(
        "--scales", type=float, nargs="+", default=None,
        help="test-time scales, e.g. 1 1.25 1.5 (default: as the model records)",
    )  # fmt: skip
    p.add_argument("--task", default=None, help="which of the model's tasks (default: its first)")
    p.add_argument("--force", action="store_true", help="redo images whose outputs already exist")
    p.add_argument("--score-thresh", type=float, default=0.5, help="instance models and box detectors: keep detections scoring at least this")
    p.add_argument(
        "--native-size", action="store_true",
        help="run the model on each image as it is, however large (default: images with more than 1.25x "
        "the pixels the model was trained at are run at that size and the result mapped back)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--runtime", choices=["auto", "eager", "onnx", "openvino"], default="auto",
        help="onnx / openvino: --model is a folder written by omniseg export --format onnx / openvino; "
        "auto (default): such a folder's own format, else eager PyTorch",
    )  # fmt: skip
    _add_segment_batch(p)


def _add_segment_batch(p) -> None:
    """Options for large jobs: shards, output formats, progress, the Ray engine (omniseg.batch)."""
    from omniseg.output_formats import OUTPUT_FORMATS

    p.add_argument(
        "--shard", default=None, metavar="I/N",
        help="take part I of N (0 <= I < N), split by a hash of the file name: N jobs cover every image once",
    )  # fmt: skip
    p.add_argument(
        "--outputs", default=None, metavar="LIST",
        help="comma-separated formats (default: overlay,labels,json): "
        + "; ".join(f"{k} = {v}" for k, v in OUTPUT_FORMATS.items()),
    )  # fmt: skip
    p.add_argument(
        "--coco-images", type=Path, default=None, metavar="ANNOTATIONS.json",
        help="COCO annotations whose images' file_name -> id give the image ids (default: the numeric file stem)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="print errors only")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: a pool of Ray Data actors")
    p.add_argument("--address", default=None, help="--engine ray: the Ray cluster to join (e.g. auto); default: a local one")
    p.add_argument("--workers", type=int, default=2, help="--engine ray: actors, each with its own model")
    p.add_argument("--threads-per-worker", type=int, default=1, help="--engine ray: CPUs and torch threads per actor")


def _add_show(sub, *, with_formats: bool) -> None:
    epilog = None
    if with_formats:  # the formats list imports every dataset reader (~30 ms): only `omniseg show` needs it
        from omniseg.data.registry import formats_help

        epilog = formats_help()
    p = sub.add_parser(
        "show", help="draw a dataset sample's ground truth", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("data", help="FORMAT:ROOT[:SPLIT] (formats below), e.g. camvid:../shared/data/camvid:train")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--view", choices=["semantic", "instance", "panoptic"], default="panoptic")
    p.add_argument("--out", type=Path, default=Path("show.png"))


def _auto_or_int(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve models over HTTP: a JSON API and a web page")
    p.add_argument(
        "--model", action="append", default=None,
        help="zoo name or checkpoint path; repeat to serve several (default: the shipped CamVid model)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=4, help="requests taken together per model")
    p.add_argument(
        "--model-batch", default="auto", type=_auto_or_int,
        help="images per model call: auto (the size measured fastest per image at warm-up) or a number <= --max-batch",
    )  # fmt: skip
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request may wait for a batch to fill")
    p.add_argument("--max-in-flight", type=int, default=32, help="requests admitted at once; the rest get 503")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit in MB (413 above)")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="image size limit (413 above)")


def parse_data_arg(text: str) -> dict:
    """``FORMAT:ROOT[:SPLIT][:KEY=VALUE...]`` -> a dataset spec for :func:`omniseg.data.open_dataset`.

    e.g. ``camvid:../shared/data/camvid:val:thing_instances=components``.
    """
    parts = text.split(":")
    if len(parts) < 2:
        raise DataError(f"--data {text!r}: expected FORMAT:ROOT[:SPLIT], e.g. camvid:../shared/data/camvid:val")
    spec = {"format": parts[0], "root": parts[1]}
    if len(parts) > 2 and parts[2]:
        spec["split"] = parts[2]
    for option in parts[3:]:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise DataError(f"--data {text!r}: {option!r} should be KEY=VALUE (a dataset option)")
        spec[key] = value
    return spec


def cmd_train(args) -> int:
    from omniseg.engine.config import load_config
    from omniseg.engine.train import train

    config = load_config(args.config, args.overrides)
    out = train(config, resume=args.resume)
    print(f"done: checkpoint {out / 'best.safetensors'}, curve {out / 'training_curve.png'}")
    return 0


def _evaluate_panoptic_files(args) -> tuple[dict, object]:
    from omniseg.io import load_json
    from omniseg.metrics import files
    from omniseg.structures import CategoryTable

    _require(args, "gt_json", "gt_dir", "pred_json", "pred_dir")
    result = files.evaluate_panoptic_files(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers)
    # names for the per-class rows
    return result, None if args.json else CategoryTable.from_dicts(load_json(args.gt_json).get("categories", []))


def _evaluate_semantic_files(args) -> tuple[dict, object]:
    from omniseg.metrics import files

    _require(args, "gt_dir", "pred_dir", "num_classes")
    return files.evaluate_semantic_dirs(
        args.gt_dir, args.pred_dir, num_classes=args.num_classes, ignore_index=args.ignore_index
    ), None


def _evaluate_instance_files(args) -> tuple[dict, object]:
    from omniseg.metrics import files

    _require(args, "gt_json", "pred_json")
    return files.evaluate_instance_files(args.gt_json, args.pred_json), None


# prediction files on disk, by --task: (evaluator, table layout); a box detector's results are COCO instances
FILE_EVALUATORS = {
    "panoptic": (_evaluate_panoptic_files, "panoptic"),
    "semantic": (_evaluate_semantic_files, "semantic"),
    "instance": (_evaluate_instance_files, "instance"),
    "detection": (_evaluate_instance_files, "instance"),
}


def cmd_evaluate(args) -> int:
    if args.checkpoint:
        if not args.data:
            raise DataError("--checkpoint needs --data FORMAT:ROOT:SPLIT")
        from omniseg.evaluate import evaluate_checkpoint
        from omniseg.predictor import load_predictor

        spec = parse_data_arg(args.data)
        if args.subset:
            spec["subset"] = args.subset
        predictor = load_predictor(args.checkpoint)
        if args.native_size:
            predictor.size_policy = "native"
        result, metric = evaluate_checkpoint(
            predictor, spec, task=args.task, metric=args.metric, flip=args.flip, scales=args.scales, crf=args.crf
        )
        print(json.dumps(result, default=float) if args.json else metric.table(result))
        if args.save:
            from omniseg.export import figure_record
            from omniseg.io import atomic_write_json

            tta = predictor.test_time_augmentation(flip=args.flip, scales=args.scales)
            task = args.task or predictor.task
            record = figure_record(
                checkpoint=args.checkpoint, data=spec, task=task, metric=args.metric or task,
                flip=tta.flip, scales=tta.scales, metrics=metric.summary(result),
            )  # fmt: skip
            if args.crf:
                record["inference"]["crf"] = True
            atomic_write_json(args.save, record)
        return 0
    if args.task not in FILE_EVALUATORS:
        raise DataError(f"evaluate needs --task {{{','.join(FILE_EVALUATORS)}}} for files, or --checkpoint with --data")
    evaluator, layout = FILE_EVALUATORS[args.task]
    result, categories = evaluator(args)
    if args.json:
        print(json.dumps(result, default=float))
    else:
        from omniseg.metrics.table import format_table

        print(format_table(result, layout, categories))
    return 0


def _require(args, *names: str) -> None:
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is None]
    if missing:
        raise DataError(f"evaluate --task {args.task} needs {' '.join(missing)}")


def cmd_segment(args) -> int:
    from omniseg.batch import parse_shard
    from omniseg.segment import segment_paths

    return segment_paths(
        args.input, args.out, model=args.model, task=args.task, crf=args.crf, flip=args.flip, scales=args.scales,
        force=args.force, device=args.device, score_thresh=args.score_thresh,
        size_policy="native" if args.native_size else "reference",
        shard=parse_shard(args.shard) if args.shard else None, outputs=args.outputs, coco_images=args.coco_images,
        quiet=args.quiet, engine=args.engine, address=args.address, workers=args.workers,
        threads_per_worker=args.threads_per_worker, runtime=args.runtime,
    )


def cmd_export(args) -> int:
    from omniseg.export import export_model

    reference = None
    if args.reference_size:
        try:
            reference = [int(v) for v in args.reference_size.lower().split("x")]
        except ValueError:
            raise DataError(f"--reference-size {args.reference_size!r}: expected HxW, e.g. 640x1280") from None
    weights, meta = export_model(
        args.model, args.out, format=args.format, name=args.name, figures=args.figures, reference_size=reference
    )
    print(f"wrote {weights} and {meta}")
    return 0


def cmd_show(args) -> int:
    from omniseg.show import show_sample

    path = show_sample(parse_data_arg(args.data), args.index, args.out, args.view)
    print(f"wrote {path}")
    return 0


def cmd_serve(args) -> int:
    try:
        from omniseg.serve import Limits, serve
    except ImportError as exc:
        raise DataError(f"omniseg serve needs the serve extra ({exc}): pip install 'omniseg[serve]'") from None
    from omniseg.predictor import DEFAULT_MODEL

    limits = Limits(
        max_bytes=int(args.max_body_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6),
        max_in_flight=args.max_in_flight, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        model_batch=None if args.model_batch == "auto" else args.model_batch,
    )  # fmt: skip
    serve(args.model or [DEFAULT_MODEL], host=args.host, port=args.port, limits=limits)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="omniseg", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_segment(sub)
    _add_show(sub, with_formats=argv[:1] == ["show"])
    _add_export(sub)
    _add_serve(sub)
    args = parser.parse_args(argv)
    handlers = {
        "train": cmd_train, "evaluate": cmd_evaluate, "segment": cmd_segment, "show": cmd_show, "export": cmd_export,
        "serve": cmd_serve,
    }  # fmt: skip
    try:
        return handlers[args.command](args)
    except (DataError, CheckpointError, FileNotFoundError, FloatingPointError) as exc:
        print(f"omniseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # metrics and structures raise ValueError with the file or field named
        print(f"omniseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"omniseg {args.command}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from omniseg import __version__

    return f"omniseg {__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
