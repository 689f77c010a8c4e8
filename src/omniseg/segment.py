"""``omniseg segment``: overlay PNG, label PNG and segments JSON (and other formats, :mod:`omniseg.batch`)
for an image, a folder of images or a manifest of image paths."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from omniseg.io import DataError
from omniseg.predictor import DEFAULT_MODEL, load_predictor


def segment_paths(
    input_path: Path,
    out_dir: Path,
    *,
    model: str | None = None,
    task: str | None = None,
    crf: bool = False,
    flip: bool | None = None,
    scales: list[float] | None = None,
    force: bool = False,
    device: str = "cpu",
    score_thresh: float = 0.5,
    size_policy: str = "reference",
    shard: tuple[int, int] | None = None,
    outputs: str | Sequence[str] | None = None,
    coco_images: Path | None = None,
    quiet: bool = False,
    engine: str = "local",
    address: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    runtime: str = "auto",
) -> int:
    """Segment one image, every image in a folder or in a ``.txt`` manifest; returns a process exit
    code (0, or 1 if any image could not be read).

    ``shard=(I, N)`` takes the I-th of N parts (by file name, :func:`omniseg.batch.select_shard`);
    ``outputs`` picks the formats (:data:`omniseg.batch.OUTPUT_FORMATS`, default overlay, labels,
    json); ``coco_images`` maps file names to COCO image ids; ``engine="ray"`` runs ``workers``
    Ray Data actors of ``threads_per_worker`` CPUs (``address``: an existing cluster). ``runtime``
    ``"onnx"``/``"openvino"`` runs the export folder ``model`` (:mod:`omniseg.runtime`; ``"auto"``:
    the folder's own format, eager for a zoo name or checkpoint). Done images
    are skipped unless ``force``; whole-job files are assembled at the end of every run.

    Instances and detections scoring below ``score_thresh`` are left out (a panoptic merge applies
    its own thresholds); the label PNG holds the category id of each pixel (255 = none), the
    overlay draws the task's view (a detector's boxes as instances); a panoptic result also gets
    ``{stem}_panoptic.png``, the COCO-panoptic id PNG whose ids are the JSON's segment ids.
    """
    from omniseg import batch

    images = batch.select_shard(batch.collect_images(Path(input_path)), shard)
    outputs = batch.parse_outputs(outputs)
    out_dir = Path(out_dir)
    from omniseg.runtime import choose_runtime

    runtime = choose_runtime(model, runtime)
    if runtime == "eager":
        checkpoint, name, categories = batch.model_metadata(model or DEFAULT_MODEL)
    else:
        from omniseg.runtime import exported_metadata

        if model is None:
            raise DataError(f"--runtime {runtime} needs --model DIR, a folder written by omniseg export --format {runtime}")
        checkpoint, name, categories = exported_metadata(model, runtime)
    if engine == "ray":
        model = str(checkpoint)  # absolute: Ray actors need not run in this working directory
    if "cityscapes" in outputs:
        batch.check_cityscapes_ids(categories, name)
    spec = batch.JobSpec(
        out_dir, outputs, task=task, crf=crf, flip=flip, scales=tuple(scales) if scales else None,
        score_thresh=score_thresh, image_ids=batch.resolve_image_ids(images, outputs, coco_images),
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in images if force or not batch.is_done(out_dir, p, outputs)]
    skipped = len(images) - len(todo)
    if skipped and not quiet:
        print(f"skipping {skipped} image(s) already segmented in {out_dir} (use --force to redo)", file=sys.stderr)
    failed: list[Path] = []
    if todo:

        def load():  # in this process, or once in each Ray actor
            predictor = load_predictor(model or DEFAULT_MODEL, device=device, runtime=runtime)
            predictor.size_policy = size_policy  # large photos: omniseg.inference.working_size
            return predictor

        progress = batch.Progress(len(todo), quiet=quiet, skipped=skipped)
        if engine == "ray":
            failed = batch.run_ray(
                load, todo, spec, progress, address=address, workers=workers, threads_per_worker=threads_per_worker
            )
        elif engine == "local":
            failed = batch.run_local(load(), todo, spec, progress)
        else:
            raise DataError(f"--engine {engine!r}: expected local or ray")
        progress.close()
    # every run, even one with nothing left to do, leaves complete whole-job files
    batch.assemble(out_dir, images, outputs, categories=categories, shard=shard)
    if failed:
        print(f"{len(failed)} of {len(todo)} image(s) could not be read and were skipped", file=sys.stderr)
        return 1
    return 0
