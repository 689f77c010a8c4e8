"""``omniseg segment`` at scale: inputs, shards, output formats, progress and the Ray Data engine.

:func:`omniseg.segment.segment_paths` drives a job with these pieces:

* inputs (:func:`collect_images`): one image, a folder, or a ``.txt`` manifest of image paths
  (relative ones relative to the manifest's folder; blank lines and ``#`` comments ignored).
  Outputs are named by file stem, so two images with the same stem in one job are an error
  (:func:`check_unique_stems`) rather than one silently overwriting the other's files.
* shards (:func:`select_shard`): ``--shard I/N`` keeps the images whose file name hashes
  (CRC-32 of the UTF-8 name, mod N) to ``I``. The hash depends on the name only — not on the
  listing order, the folder, the machine or Python's per-process ``hash()`` salt — so N jobs
  ``0/N .. N-1/N`` cover every image exactly once.
* outputs (:data:`OUTPUT_FORMATS`): per-image files written atomically by
  :func:`write_image_outputs` (the one writer the local loop and the Ray actors share); the
  whole-job files (``coco_results.json``, ``panoptic.json``) are assembled by :func:`assemble`
  from small per-image JSON fragments under ``OUT/parts/``, at the end of every run, so a
  resumed or interrupted job ends with complete files and a crash never leaves half of one.
* progress (:class:`Progress`): a tqdm bar on a terminal, summary lines otherwise.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from omniseg.io import (
    IMAGE_SUFFIXES,
    DataError,
    atomic_write_bytes,
    atomic_write_json,
    encode_png,
    list_images,
    load_image,
    load_json,
)
from omniseg.output_formats import OUTPUT_FORMATS

if TYPE_CHECKING:
    from omniseg.predictor import Predictor
    from omniseg.structures import CategoryTable, Segments

DEFAULT_OUTPUTS = ("overlay", "labels", "json")  # what omniseg segment has always written
PARTS = "parts"  # OUT/parts/{coco,panoptic}/{stem}.json: the per-image fragments of whole-job files


# ----------------------------------------------------------------------------- inputs and shards
def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, shards numbered ``0..N-1``."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise DataError(
            f"--shard {text!r}: expected I/N with 0 <= I < N (shards are numbered from 0), "
            "e.g. --shard 0/2 and --shard 1/2"
        )
    return i, n


def shard_of(name: str, count: int) -> int:
    """The shard (0..count-1) of a file name: CRC-32 is stable across machines and Python runs."""
    return zlib.crc32(name.encode("utf-8")) % count


def select_shard(images: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    if shard is None:
        return list(images)
    index, count = shard
    return [p for p in images if shard_of(p.name, count) == index]


def read_manifest(path: Path) -> list[Path]:
    """Image paths listed in a text file, one per line; relative ones are relative to its folder.

    Listed files that do not exist are kept: they are reported as failed images, like
    unreadable ones, instead of stopping the job. The same file listed twice is segmented once.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})") from None
    images: dict[Path, None] = {}  # ordered and de-duplicated
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        image = Path(entry).expanduser()
        images[image if image.is_absolute() else path.parent / image] = None
    if not images:
        raise DataError(f"{path}: the manifest lists no image paths (one per line; # starts a comment)")
    return list(images)


def collect_images(input_path: Path) -> list[Path]:
    """The job's images: one image, every image in a folder (by name) or a ``.txt`` manifest's."""
    input_path = Path(input_path)
    if input_path.is_dir():
        images = list_images(input_path)
        if not images:
            raise DataError(f"{input_path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    elif input_path.is_file() and input_path.suffix.lower() == ".txt":
        images = read_manifest(input_path)
    elif input_path.is_file():
        images = [input_path]
    else:
        raise DataError(f"{input_path}: no such image, folder or manifest")
    check_unique_stems(images, input_path)
    return images


def check_unique_stems(images: Sequence[Path], source: Path) -> None:
    """Outputs are named by stem: ``a/x.jpg`` and ``b/x.png`` in one job would overwrite each other."""
    seen: dict[str, Path] = {}
    for image in images:
        other = seen.setdefault(image.stem, image)
        if other != image:
            raise DataError(
                f"{source}: {other} and {image} have the same file stem {image.stem!r}, so their outputs "
                "would overwrite each other; rename one, or segment them in separate jobs (--out folders)"
            )


# ----------------------------------------------------------------------------- output formats
def parse_outputs(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"overlay,labels,coco"`` -> the formats, validated; ``None`` -> :data:`DEFAULT_OUTPUTS`."""
    if text is None:
        return DEFAULT_OUTPUTS
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in OUTPUT_FORMATS]
    if unknown or not names:
        raise DataError(
            f"--outputs {text!r}: unknown format(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(OUTPUT_FORMATS)}"
        )
    return tuple(dict.fromkeys(names))


def fragment_path(out_dir: Path, kind: str, stem: str) -> Path:
    return out_dir / PARTS / kind / f"{stem}.json"


def image_output_paths(out_dir: Path, image: Path, outputs: Sequence[str]) -> list[Path]:
    """The files an image is done with (the resume check); fragments are written last."""
    stem = image.stem
    files = {
        "overlay": [out_dir / f"{stem}_overlay.png"],
        "labels": [out_dir / f"{stem}_labels.png"],
        "json": [out_dir / f"{stem}.json"],
        "coco": [fragment_path(out_dir, "coco", stem)],
        "panoptic": [out_dir / "panoptic" / f"{stem}.png", fragment_path(out_dir, "panoptic", stem)],
        "cityscapes": [out_dir / f"{stem}_labelIds.png"],
    }
    return [p for name in outputs for p in files[name]]


def is_done(out_dir: Path, image: Path, outputs: Sequence[str]) -> bool:
    return all(p.is_file() for p in image_output_paths(out_dir, image, outputs))


def resolve_image_ids(
    images: Sequence[Path], outputs: Sequence[str], coco_images: Path | None = None
) -> dict[str, int | str]:
    """COCO image id per image path (as ``str``), for the coco and panoptic outputs.

    From ``coco_images`` (a COCO annotations JSON: its ``images`` entries' ``file_name`` -> ``id``,
    matched by file name), else the numeric stem (COCO's files are ``000000000139.jpg``). COCO
    results need integer ids, so a non-numeric stem without ``coco_images`` is an error there;
    a panoptic JSON takes the stem itself (Cityscapes' panoptic ids are such strings).
    """
    if "coco" not in outputs and "panoptic" not in outputs:
        return {}
    by_name: dict[str, int | str] | None = None
    if coco_images is not None:
        data = load_json(coco_images, "COCO annotations JSON")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{coco_images}: expected a COCO annotations JSON with an 'images' list")
        try:
            by_name = {Path(im["file_name"]).name: im["id"] for im in data["images"]}
        except (KeyError, TypeError):
            raise DataError(f"{coco_images}: every 'images' entry needs 'file_name' and 'id'") from None
    ids: dict[str, int | str] = {}
    for image in images:
        if not image.is_file():
            continue  # a listed file that is missing fails on its own, reported with the others
        if by_name is not None:
            if image.name not in by_name:
                raise DataError(f"{image}: not among the images of {coco_images} (matched by file name)")
            ids[str(image)] = by_name[image.name]
        elif image.stem.isdigit():
            ids[str(image)] = int(image.stem)
        elif "coco" in outputs:
            raise DataError(
                f"{image}: no COCO image id: the file stem is not a number (as COCO's file names are); "
                "pass --coco-images ANNOTATIONS.json to map file names to image ids"
            )
        else:
            ids[str(image)] = image.stem
    return ids


def check_cityscapes_ids(categories: CategoryTable, model: str) -> None:
    """labelIds PNGs hold category ids as they are: the model's ids must be Cityscapes labelIds."""
    from omniseg.data.cityscapes import CITYSCAPES_LABELS

    names = {lab.id: lab.name for lab in CITYSCAPES_LABELS}
    for cat in categories:
        if names.get(cat.id, "").lower() != cat.name.lower():
            expected = f"labelId {cat.id} is {names[cat.id]!r}" if cat.id in names else "no such labelId"
            raise DataError(
                f"--outputs cityscapes: model {model}'s category ids are not Cityscapes labelIds "
                f"(its id {cat.id} is {cat.name!r}; {expected}); use a Cityscapes model"
            )


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to segment and write one image (picklable for Ray actors)."""

    out_dir: Path
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    task: str | None = None
    crf: bool = False
    flip: bool | None = None
    scales: tuple[float, ...] | None = None
    score_thresh: float = 0.5
    image_ids: dict[str, int | str] = field(default_factory=dict)


def resolve_task(predictor: Predictor, task: str | None) -> tuple[str, str]:
    """``(task, view)``: the model's task by default; a detector's boxes are drawn as instances."""
    from omniseg.visualize import VIEWS

    task = task or predictor.task
    if task not in predictor.tasks:
        raise DataError(f"model {predictor.name} does {', '.join(predictor.tasks)} segmentation, not {task!r}")
    return task, task if task in VIEWS else "instance"


def png_bytes(array: np.ndarray) -> bytes:
    """The PNG of a uint8 label map or image (:func:`omniseg.io.encode_png`: fast at 12 MP),
    compressed on as many threads as the job's torch uses (a Ray actor: its CPUs)."""
    torch = sys.modules.get("torch")  # never imported for this: a job without torch uses one
    return encode_png(array, threads=torch.get_num_threads() if torch else 1)


def coco_results(segments: Segments, image_id: int | str) -> list[dict]:
    """COCO results entries of one image: the thing segments (every one if no category is a
    thing), as :class:`~omniseg.metrics.instance.InstanceAP` scores them in memory."""
    from pycocotools import mask as mask_utils

    things = set(segments.categories.thing_ids) if segments.categories is not None else set()
    keep = [i for i, c in enumerate(segments.category_ids) if not things or int(c) in things]
    if not keep:
        return []
    rles = segments.rles()
    rles = [rles[i] for i in keep]
    boxes = mask_utils.toBbox(rles).reshape(-1, 4)
    return [
        {
            "image_id": image_id,
            "category_id": int(segments.category_ids[i]),
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in box],
            "score": float(segments.scores[i]),
        }
        for i, rle, box in zip(keep, rles, boxes, strict=True)
    ]


def write_image_outputs(
    spec: JobSpec, path: Path, image: np.ndarray, segments: Segments, *, view: str, model: str
) -> list[Path]:
    """Write one image's files in ``spec.outputs``; returns them. The one writer both engines use."""
    from omniseg.predictor import dump_json, segments_json
    from omniseg.structures import id_to_rgb
    from omniseg.visualize import overlay

    out, stem, written = spec.out_dir, path.stem, []

    def put(target: Path, data: bytes) -> None:
        written.append(atomic_write_bytes(target, data))

    if "labels" in spec.outputs:
        if len(segments) and int(segments.category_ids.max()) > 255:
            raise DataError(f"{path}: category ids above 255 do not fit a label PNG")
        put(out / f"{stem}_labels.png", png_bytes(segments.to_semantic(void_value=255, dtype=np.uint8)))
    if "cityscapes" in spec.outputs:  # ids were checked to be labelIds (0..33); nothing predicted = 0
        put(out / f"{stem}_labelIds.png", png_bytes(segments.to_semantic(void_value=0, dtype=np.uint8)))
    if "overlay" in spec.outputs:
        put(out / f"{stem}_overlay.png", png_bytes(overlay(image, segments, view=view)))
    if "json" in spec.outputs:
        put(out / f"{stem}.json", dump_json(segments_json(segments, image_path=str(path), model=model)).encode())
        if view == "panoptic":  # the COCO-panoptic PNG (R + 256 G + 256^2 B = the JSON's segment ids)
            put(out / f"{stem}_panoptic.png", png_bytes(id_to_rgb(segments.to_panoptic()[0])))
    image_id = spec.image_ids.get(str(path))
    h, w = segments.image_size
    record = {"id": image_id, "file_name": path.name, "height": h, "width": w}
    if "panoptic" in spec.outputs:
        id_map, info = segments.to_panoptic()
        put(out / "panoptic" / f"{stem}.png", png_bytes(id_to_rgb(id_map)))
        annotation = {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": info}
        # fragments last: a fragment on disk means the image's files are complete
        written.append(atomic_write_json(fragment_path(out, "panoptic", stem), {"image": record, **annotation}, indent=None))
    if "coco" in spec.outputs:
        results = coco_results(segments, image_id)
        written.append(atomic_write_json(fragment_path(out, "coco", stem), {"image": record, "results": results}, indent=None))
    return written


def segment_image(
    predictor: Predictor, spec: JobSpec, path: Path, image: np.ndarray, *, view: str, task: str
) -> list[Path]:
    """Segment one decoded image and write its files (both engines run exactly this)."""
    segments = predictor.predict(
        image, task=task, crf=spec.crf, flip=spec.flip, scales=spec.scales, score_thresh=spec.score_thresh
    )
    return write_image_outputs(spec, path, image, segments, view=view, model=predictor.name)


# ----------------------------------------------------------------------------- whole-job files
def whole_job_names(shard: tuple[int, int] | None) -> dict[str, str]:
    """A shard writes ``coco_results.shard-I-of-N.json``: shards sharing an out folder never
    replace each other's files; a run without --shard (which skips every done image) assembles
    the whole job's ``coco_results.json``."""
    suffix = "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"
    return {"coco": f"coco_results{suffix}.json", "panoptic": f"panoptic{suffix}.json"}


def _fragments(out_dir: Path, kind: str, images: Sequence[Path]) -> list[dict]:
    """This job's fragments, in job order; images that failed (no fragment) are left out."""
    found = []
    for image in images:
        path = fragment_path(out_dir, kind, image.stem)
        if path.is_file():
            found.append(load_json(path, f"{kind} fragment"))
    return found


def assemble(
    out_dir: Path,
    images: Sequence[Path],
    outputs: Sequence[str],
    *,
    categories: CategoryTable,
    shard: tuple[int, int] | None = None,
) -> list[Path]:
    """Write the whole-job files of ``images`` from their fragments, atomically; returns them."""
    names, written = whole_job_names(shard), []
    if "coco" in outputs:
        parts = _fragments(out_dir, "coco", images)
        results = [r for part in parts for r in part["results"]]
        written.append(atomic_write_json(out_dir / names["coco"], results, indent=None))
    if "panoptic" in outputs:
        parts = _fragments(out_dir, "panoptic", images)
        panoptic = {
            "images": [part["image"] for part in parts],
            "annotations": [{k: part[k] for k in ("image_id", "file_name", "segments_info")} for part in parts],
            "categories": categories.to_dicts(),
        }
        written.append(atomic_write_json(out_dir / names["panoptic"], panoptic, indent=None))
    return written


# ----------------------------------------------------------------------------- progress
def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Progress of ``total`` images: a live tqdm bar when ``stream`` is a terminal; otherwise
    (a log file, a batch system) one line every ``every`` images or ``seconds`` seconds, whichever
    comes first, since carriage-return redraws make one endless line in a log. ``quiet`` prints
    errors only. :meth:`close` prints the summary line (with the ``skipped`` count of images done
    before, unless it is ``None``: nothing is skipped, e.g. in evaluation)."""

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        quiet: bool = False,
        every: int | None = None,
        seconds: float = 30.0,
        skipped: int | None = 0,
        desc: str = "segment",
    ) -> None:
        self.total, self.quiet, self.skipped, self.desc = total, quiet, skipped, desc
        self.stream = stream if stream is not None else sys.stderr
        self.every = every if every is not None else max(1, math.ceil(total / 10))
        self.seconds = seconds
        self.done = self.failed = 0
        self.start = self._last_time = time.monotonic()
        self._last_done = 0
        isatty = getattr(self.stream, "isatty", None)
        self.bar = None
        if not quiet and total > 1 and isatty is not None and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", file=self.stream)

    def error(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def update(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.monotonic()
        due = self.done - self._last_done >= self.every or now - self._last_time >= self.seconds
        if self.quiet or self.total <= 1 or not due or self.done == self.total:
            return  # the last image is reported by the summary line
        self._last_done, self._last_time = self.done, now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate
        print(
            f"{self.desc}: {self.done}/{self.total} images, {rate:.1f} img/s, {self.failed} failed, eta {_clock(eta)}",
            file=self.stream, flush=True,
        )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        skipped = "" if self.skipped is None else f", {self.skipped} skipped (already done)"
        print(
            f"{self.desc}: done, {self.done} images in {_clock(elapsed)} ({self.done / max(elapsed, 1e-9):.2f} img/s), "
            f"{self.failed} failed{skipped}",
            file=self.stream, flush=True,
        )  # fmt: skip


# ----------------------------------------------------------------------------- engines
def run_local(predictor: Predictor, todo: Sequence[Path], spec: JobSpec, progress: Progress) -> list[Path]:
    """Segment ``todo`` in this process; returns the images that could not be read."""
    task, view = resolve_task(predictor, spec.task)
    failed = []
    for path in todo:
        try:
            image = load_image(path)
        except DataError as exc:  # unreadable or missing: reported, the job goes on
            progress.error(f"skipped: {exc}")
            failed.append(path)
            progress.update(failed=True)
            continue
        written = segment_image(predictor, spec, path, image, view=view, task=task)
        progress.update()
        if len(todo) == 1 and not progress.quiet:
            print("wrote " + ", ".join(map(str, written)))
    return failed


class SegmentActor:
    """A Ray Data actor: loads the predictor once, then segments and writes batches of paths."""

    def __init__(self, load: Callable[[], Predictor], spec: JobSpec, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # match the CPUs Ray reserved for this actor
        self.spec = spec
        self.predictor = load()
        self.task, self.view = resolve_task(self.predictor, spec.task)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = []
        for path, file in zip(batch["path"], batch["file"], strict=True):
            path = Path(str(path))  # as the job lists it: recorded in the JSON, as one process does
            try:
                image = load_image(Path(str(file)))
            except DataError as exc:  # unreadable or missing: reported by the driver, not fatal
                errors.append(str(exc))
                continue
            segment_image(self.predictor, self.spec, path, image, view=self.view, task=self.task)
            errors.append("")
        return {"path": np.asarray(batch["path"]), "error": np.asarray(errors, dtype=object)}


def _quiet_ray_logs(quiet: bool) -> None:
    """Ray's INFO lines (execution plans, timings) would drown our progress lines in a log."""
    logging.getLogger("ray.data").setLevel(logging.ERROR if quiet else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours are on


def run_ray(
    load: Callable[[], Predictor],
    todo: Sequence[Path],
    spec: JobSpec,
    progress: Progress,
    *,
    address: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
) -> list[Path]:
    """Segment ``todo`` with a pool of ``workers`` Ray actors of ``threads_per_worker`` CPUs each.

    Connects to the cluster at ``address`` (``"auto"``: the one ``ray start`` runs here), joins a
    Ray session this process already started, or else starts a local one for this job and stops
    it at the end. Returns the images that could not be read.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise DataError("--engine ray needs Ray Data: pip install 'omniseg[ray]'") from None
    if workers < 1 or threads_per_worker < 1:
        raise DataError("--workers and --threads-per-worker must be at least 1")
    _quiet_ray_logs(progress.quiet)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address, num_cpus=None if address else workers * threads_per_worker,
            include_dashboard=False, logging_level=logging.ERROR,
        )  # fmt: skip
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours is the one progress display
        # actors need not share this process's working directory: they read and write absolute paths
        spec = replace(spec, out_dir=Path(spec.out_dir).resolve())
        rows = [{"path": str(p), "file": str(Path(p).resolve())} for p in todo]
        dataset = ray.data.from_items(rows).map_batches(
            SegmentActor,
            fn_constructor_kwargs={"load": load, "spec": spec, "threads": threads_per_worker},
            batch_size=1,  # one image per call: even load across actors, live progress
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads_per_worker,
        )
        failed = []
        for row in dataset.iter_rows():
            if row["error"]:
                progress.error(f"skipped: {row['error']}")
                failed.append(Path(str(row["path"])))
            progress.update(failed=bool(row["error"]))
        return failed
    finally:
        if started:
            ray.shutdown()


def model_metadata(model: str) -> tuple[Path, str, CategoryTable]:
    """The model's absolute checkpoint path (without suffix), name and categories, from its JSON
    alone (no weights loaded)."""
    from omniseg.checkpoint import checkpoint_paths
    from omniseg.predictor import resolve_checkpoint
    from omniseg.structures import CategoryTable

    path = resolve_checkpoint(model)
    meta: dict[str, Any] = load_json(checkpoint_paths(path)[1], "checkpoint metadata")
    return path.resolve(), str(meta.get("name", path.name)), CategoryTable.from_dicts(meta["categories"])
