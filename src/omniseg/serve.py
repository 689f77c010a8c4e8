"""``omniseg serve``: the segmentation models behind an HTTP API and a web page.

* ``POST /v1/segment``: an image (multipart field ``file``, or the raw request body) -> the per-image
  JSON of ``omniseg segment`` (:func:`omniseg.predictor.segments_json`), plus the overlay PNG as
  base64 when ``overlay=true``;
* ``GET /v1/models``: the served models with their tasks and categories;
* ``GET /healthz`` (the process answers) and ``GET /readyz`` (every model loaded and warmed up);
* ``GET /``: the web page (``omniseg/static``, no external assets).

Requests for one model go to one queue; a worker thread per model takes up to ``max_batch`` of
them, waiting at most ``max_wait_ms`` after the oldest arrived, and runs them in model calls of
``model_batch`` images (by default the size measured fastest per image at warm-up: on a CPU that
is often 1, on a GPU the whole batch). The worker also decodes each image and encodes its answer,
between model calls (see :class:`ModelWorker`). The event loop only parses, checks image headers
and awaits, so it keeps answering (health checks, 4xx, 503) while a model
computes. At most ``max_in_flight`` segment requests are admitted at once; the rest get 503
with ``Retry-After`` at once, so a burst costs a bounded amount of memory instead of a growing queue.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import io
import logging
import math
import queue
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from omniseg.batch import png_bytes
from omniseg.data.normalize import to_model_input
from omniseg.inference import predict_segments
from omniseg.predictor import Predictor, load_predictor, segments_json
from omniseg.structures import Segments
from omniseg.visualize import VIEWS, overlay, present_categories

__all__ = ["Limits", "ModelWorker", "ServiceError", "create_app", "decode_image", "serve"]

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_IN_FLIGHT = 32
DEFAULT_SCORE_THRESH = 0.5  # as `omniseg segment`: the service answers what the command writes
RETRY_AFTER_S = 1
WARMUP_SIZE = (64, 64)
# a client that keeps sending after its body passed the limit is read (and discarded) up to this
# multiple of the limit, so that it receives the 413 rather than a connection reset mid-upload
_DRAIN_FACTOR = 4


class ServiceError(Exception):
    """An answer other than 200: its status, a message naming the problem, and extra JSON fields."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra


@dataclass(frozen=True)
class Limits:
    """What one request may cost, and how requests are batched."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_batch: int = 4
    max_wait_ms: float = 10.0
    model_batch: int | None = None
    """Images per model call; ``None``: measured at warm-up (see :meth:`ModelWorker.tune_model_batch`)."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_in_flight", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.model_batch is not None and not 1 <= self.model_batch <= self.max_batch:
            raise ValueError(f"model_batch must be between 1 and max_batch ({self.max_batch}), got {self.model_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


# ----------------------------------------------------------------------------- decoding
def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


# magic numbers, to tell a broken image of a known format (400) from data that is no image (415)
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"),
)  # fmt: skip


def _looks_like(data: bytes) -> str | None:
    """The image format ``data`` starts like, from its magic number, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # RIFF alone is also WAV, AVI...
        return "WebP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _truncated(exc: Exception) -> bool:
    # Pillow says so only in its messages ("image file is truncated", "Truncated File Read")
    return "truncat" in str(exc).lower()


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An uploaded image opened from its header alone (no pixel decoded yet), checked.

    The pixel count is checked from the header, so a small file declaring a huge image (a
    decompression bomb) costs nothing. Raises :class:`ServiceError`: 415 for data that is no image
    format Pillow knows, 400 for a corrupt header or an empty image, 413 for more than
    ``max_pixels`` pixels.
    """
    if not data:
        raise ServiceError(400, "empty request: send an image as the multipart field 'file' or as the request body")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        known = _looks_like(data)
        if known:  # Pillow says "cannot identify" for a format it knows when the header is broken
            raise ServiceError(400, f"corrupt {known}: the data starts like one, but its header is unreadable") from None
        head = data[:8].hex(" ")
        raise ServiceError(
            415, f"not an image: the data (starting with bytes {head}) is in no format Pillow reads "
            "(send PNG, JPEG, WebP, BMP, TIFF or GIF)",
        ) from None  # fmt: skip
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ServiceError(413, f"image too large: over the limit of {max_pixels / 1e6:g} megapixels ({exc})") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error... on a broken header
        problem = "truncated image (the data ends inside its header)" if _truncated(exc) else "corrupt image header"
        raise ServiceError(400, f"{problem}: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels or width == 0 or height == 0:
        image.close()
        if width * height > max_pixels:
            raise ServiceError(
                413, f"image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels, "
                f"over the limit of {max_pixels / 1e6:g} megapixels",
            )  # fmt: skip
        raise ServiceError(400, f"empty image: {width}x{height} pixels")
    return image


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An uploaded image as RGB ``(H, W, 3) uint8``, converted as :func:`omniseg.io.load_image`
    converts files (EXIF rotation applied, transparency composed on black).

    Checked by :func:`open_image` first; raises :class:`ServiceError` as it does, and 400 for
    image data that is corrupt or truncated.
    """
    with open_image(data, max_pixels=max_pixels) as image:
        width, height = image.size
        try:
            image.load()
        except Exception as exc:
            problem = "truncated image" if _truncated(exc) else "corrupt image data"
            raise ServiceError(400, f"{problem} ({image.format}, {width}x{height}): {type(exc).__name__}: {exc}") from None
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block must not make a readable image unreadable (as load_image)
            oriented = image
        if oriented.mode in ("RGBA", "LA", "P", "PA"):
            rgba = oriented.convert("RGBA")
            oriented = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        return np.array(oriented.convert("RGB"))


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes`` (never held beyond it)."""
    declared = request.headers.get("content-length")
    too_large = ServiceError(413, f"request body too large: over the limit of {_megabytes(max_bytes)}")
    if declared is not None and declared.isdigit() and int(declared) > _DRAIN_FACTOR * max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _DRAIN_FACTOR * max_bytes:
            break
        if size <= max_bytes:
            chunks.append(chunk)
        elif chunks:
            chunks.clear()  # over the limit: keep reading so the client gets the 413, but hold nothing
    if size > max_bytes:
        raise too_large
    return b"".join(chunks)


async def _upload(request: Request, max_bytes: int) -> tuple[bytes, str, dict[str, str]]:
    """``(image bytes, file name, form fields)`` of a multipart form or of a raw body."""
    body = await _read_body(request, max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body, "upload", {}

    async def one_chunk() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, one_chunk(), max_files=1, max_fields=16).parse()
    except MultiPartException as exc:
        raise ServiceError(400, f"malformed multipart form: {exc}") from None
    try:
        upload = form.get("file")
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if not isinstance(upload, UploadFile):
            names = ", ".join(sorted({k for k, _ in form.multi_items()})) or "none"
            raise ServiceError(400, f"the multipart form has no file field 'file' (its fields: {names})")
        data = await upload.read()
        return data, upload.filename or "upload", fields
    finally:
        await form.close()


# ----------------------------------------------------------------------------- batching
@dataclass
class _Job:
    load: Callable[[], np.ndarray]
    task: str
    score_thresh: float | None
    answer: Callable[[np.ndarray, Segments], Any]
    image: np.ndarray | None = None
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def choose_model_batch(seconds_per_image: dict[int, float], *, tolerance: float = 0.05) -> int:
    """The smallest call size whose time per image is within ``tolerance`` of the fastest: a
    bigger call only where it clearly pays, since every image in it waits for the whole call."""
    best = min(seconds_per_image.values())
    return min(size for size, seconds in seconds_per_image.items() if seconds <= (1 + tolerance) * best)


class ModelWorker:
    """One model's queue and the thread that runs it.

    Jobs of the same task, score threshold and image size are stacked into one ``(B, 3, H, W)``
    tensor and go through :func:`omniseg.inference.predict_segments` in one call: that is a real
    batch for every omniseg model, and it keeps the model's test-time flip/scales (which need equal
    sizes). Images of different sizes taken in the same round run as separate calls in the same
    round rather than padded into one batch: padding would change what the model sees at the
    borders, and the service must answer what :meth:`Predictor.predict` answers for the image alone
    (a stacked batch matches it up to float rounding: the CamVid model's masks are identical, one
    segment's mean score differed by 6e-8 in a batch of 4).

    A job's image is decoded, and its answer encoded, in this thread between model calls, not in a
    thread pool beside them: queued jobs hold the compressed upload rather than its pixels (a
    12-MP photo is 36 MB decoded, a few MB as a JPEG), and the few milliseconds of
    each (decoding ~5 ms, the JSON ~3 ms for a 480x360 frame) do not compete with the model's
    threads, which use every core.
    """

    def __init__(
        self, predictor: Predictor, *, max_batch: int = 4, max_wait_ms: float = 10.0, model_batch: int | None = None
    ) -> None:
        self.predictor = predictor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.model_batch = model_batch  # None until tuned at warm-up
        self.tuning: dict[int, float] = {}  # batch size -> measured seconds per image
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        # observed by tests and the benchmark: model calls, rounds, images, largest batch
        self.model_calls = self.rounds = self.images = self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name=f"omniseg-serve-{predictor.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)

    def submit(
        self,
        load: Callable[[], np.ndarray],
        task: str,
        score_thresh: float | None,
        answer: Callable[[np.ndarray, Segments], Any],
    ) -> concurrent.futures.Future:
        """Queue one image; the future gets ``answer(image, segments)`` (segments at the image's
        size), or the exception ``load``, the model or ``answer`` raised. ``load`` returns the
        ``(H, W, 3) uint8`` image; both run in this worker's thread."""
        job = _Job(load, task, score_thresh, answer)
        self.queue.put(job)
        return job.future

    def _run(self) -> None:
        try:
            # the first call pays for lazy initialisation (allocator, kernels); do it before /readyz says so
            self.predictor.predict(np.zeros((*WARMUP_SIZE, 3), dtype=np.uint8))
            if self.model_batch is None:
                self.model_batch = self.tune_model_batch()
        except BaseException as exc:  # reported by /readyz and to every request
            self.error = exc
        self.ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._process(batch)

    def tune_model_batch(self, repeats: int = 2) -> int:
        """The model-call size (1, 2, 4, ... up to ``max_batch``) with the least time per image
        (the smallest within 5% of it).

        Measured on a mid-grey image at the model's reference size (what most requests run at):
        one untimed round over the sizes (allocation for each new shape), then ``repeats`` timed
        rounds, the sizes interleaved within each round so that a machine getting busier or
        quieter during the measurement biases no size; the best time per size counts.
        Why not always the whole batch: on a 2-core CPU the CamVid model at 480x360 (flip and 1.5x
        scale) ran 2.2 images/s one at a time and 1.0-1.2 in calls of 4 (activations outgrow the
        caches); on a GPU, batching is what pays.
        """
        p = self.predictor
        image = np.full((*(p.reference_size or WARMUP_SIZE), 3), 128, dtype=np.uint8)
        x = to_model_input(p.working_image(image), mean=p.mean, std=p.std).to(p.device)
        sizes = sorted({min(2**k, self.max_batch) for k in range(self.max_batch.bit_length() + 1)})
        batches = {size: x.expand(size, *x.shape).contiguous() for size in sizes}
        best = dict.fromkeys(sizes, math.inf)
        for attempt in range(repeats + 1):
            for size in sizes:
                start = time.perf_counter()
                predict_segments(p.model, batches[size], task=p.task, tta=p.test_time_augmentation())
                if attempt:
                    best[size] = min(best[size], (time.perf_counter() - start) / size)
        self.tuning = best
        return choose_model_batch(self.tuning)

    def _next_batch(self) -> list[_Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = first.enqueued + self.max_wait  # the oldest job's wait, not this thread's
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch

    def _process(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # clients that left
        if self.error is not None:
            for job in live:
                job.future.set_exception(ServiceError(503, f"model {self.predictor.name} failed to load: {self.error}"))
            return
        groups: dict[tuple, list[tuple[_Job, np.ndarray]]] = {}
        p = self.predictor
        for job in live:  # large photos run at the model's reference size, as Predictor.predict does
            try:
                job.image = job.load()
            except Exception as exc:
                job.future.set_exception(exc)
                continue
            image = p.working_image(job.image)
            groups.setdefault((job.task, job.score_thresh, image.shape), []).append((job, image))
        self.rounds += 1
        chunks = [
            (task, score_thresh, pairs[i : i + self.model_batch])
            for (task, score_thresh, _), pairs in groups.items()
            for i in range(0, len(pairs), self.model_batch)
        ]
        for task, score_thresh, pairs in chunks:
            jobs = [job for job, _ in pairs]
            try:
                x = torch.stack([to_model_input(image, mean=p.mean, std=p.std) for _, image in pairs]).to(p.device)
                results = predict_segments(
                    p.model, x, task=task, tta=p.test_time_augmentation(), score_thresh=score_thresh
                )
            except Exception as exc:
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            self.model_calls += 1
            self.images += len(jobs)
            self.largest_batch = max(self.largest_batch, len(jobs))
            for job, segments in zip(jobs, results, strict=True):
                try:
                    job.future.set_result(job.answer(job.image, segments.resized(job.image.shape[:2])))
                except Exception as exc:
                    job.future.set_exception(exc)
                job.image = None  # the answer is out: free the pixels now, not when the request ends


# ----------------------------------------------------------------------------- the app
def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ServiceError(422, f"{name}={value!r}: expected true or false")


def _parse_fraction(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ServiceError(422, f"{name}={value!r}: expected a number between 0 and 1") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ServiceError(422, f"{name}={value!r}: expected a number between 0 and 1")
    return number


def _overlay_payload(image: np.ndarray, segments: Segments, view: str, alpha: float, legend: bool) -> dict:
    drawn = overlay(image, segments, view=view, alpha=alpha, legend=legend)
    return {
        "png_base64": base64.b64encode(png_bytes(drawn)).decode("ascii"),
        "width": int(drawn.shape[1]),
        "height": int(drawn.shape[0]),
        "view": view,
        "alpha": alpha,
        "legend": [
            {"category_id": c.id, "name": c.name, "color": list(c.color)}
            for c in present_categories(segments, view=view)
        ],
    }


class _Service:
    """What the endpoints share: the workers by model name, the limits, the in-flight count."""

    def __init__(self, predictors: Sequence[Predictor], limits: Limits) -> None:
        self.limits = limits
        self.workers: dict[str, ModelWorker] = {}
        for p in predictors:
            if p.name in self.workers:
                raise ValueError(f"two models are named {p.name!r}; serve each model once")
            self.workers[p.name] = ModelWorker(
                p, max_batch=limits.max_batch, max_wait_ms=limits.max_wait_ms, model_batch=limits.model_batch
            )
        if not self.workers:
            raise ValueError("no model to serve")
        self.default_model = next(iter(self.workers))
        self.in_flight = 0
        self.rejected = 0

    def worker(self, name: str | None) -> ModelWorker:
        name = name or self.default_model
        if name not in self.workers:
            raise ServiceError(
                404, f"unknown model {name!r}; served models: {', '.join(self.workers)}", choices=list(self.workers)
            )
        return self.workers[name]

    async def segment(self, request: Request) -> JSONResponse:
        params = dict(request.query_params)
        data, filename, fields = await _upload(request, self.limits.max_bytes)
        params.update(fields)  # curl -F model=... works as well as ?model=...
        unknown = sorted(set(params) - {"model", "task", "score_thresh", "overlay", "alpha", "legend"})
        if unknown:
            raise ServiceError(
                422, f"unknown parameter(s) {', '.join(unknown)}; known: model, task, score_thresh, overlay, alpha, legend"
            )
        worker = self.worker(params.get("model"))
        p = worker.predictor
        task = params.get("task") or p.task
        if task not in p.tasks:
            raise ServiceError(
                422, f"model {p.name} does {', '.join(p.tasks)} segmentation, not {task!r}", choices=list(p.tasks)
            )
        score_thresh = _parse_fraction("score_thresh", params.get("score_thresh", str(DEFAULT_SCORE_THRESH)))
        want_overlay = _parse_bool("overlay", params.get("overlay", "false"))
        alpha = _parse_fraction("alpha", params.get("alpha", "0.5"))
        legend = _parse_bool("legend", params.get("legend", "true"))
        if not worker.ready.is_set():
            raise ServiceError(503, f"model {p.name} is still loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        max_pixels = self.limits.max_pixels
        open_image(data, max_pixels=max_pixels).close()  # the header's 4xx at once, not after the queue
        view = task if task in VIEWS else "instance"  # as `omniseg segment`: a detector's boxes as instances

        def answer(image: np.ndarray, segments: Segments) -> JSONResponse:  # rendered in the worker too
            out = segments_json(segments, image_path=filename, model=p.name)
            if want_overlay:
                out["overlay"] = _overlay_payload(image, segments, view, alpha, legend)
            return JSONResponse(out)

        load = functools.partial(decode_image, data, max_pixels=max_pixels)
        return await asyncio.wrap_future(worker.submit(load, task, score_thresh, answer))


def _error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse({"detail": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)


def _load_without_a_thread_team(models: Sequence[Predictor | str]) -> list[Predictor]:
    """Load ``models`` with one intra-op thread, so that this thread starts no OpenMP team.

    libgomp counts the threads of every team in the process, and once they outnumber the cores
    it stops spinning between parallel regions: had this thread (the event loop's) run the
    loading's operators on two threads, its idle team would have made the model thread's team
    sleep and wake at every operator. Measured on 2 cores, the CamVid model in a worker thread:
    0.43 s a call, its second thread 74% busy, against 0.40 s and 99% with no team here.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [m if isinstance(m, Predictor) else load_predictor(m) for m in models]
    finally:
        torch.set_num_threads(threads)  # what the worker threads' teams start with


def create_app(models: Sequence[Predictor | str], limits: Limits | None = None) -> FastAPI:
    """The service for ``models`` (predictors, or zoo names / checkpoint paths to load now).

    The models are warmed up in their worker threads once the app starts; ``/readyz`` answers
    200 when all are. The app sets Pillow's decompression-bomb limit to ``limits.max_pixels``
    while it runs.
    """
    limits = limits or Limits()
    predictors = _load_without_a_thread_team(models)
    service = _Service(predictors, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        saved_limit = Image.MAX_IMAGE_PIXELS
        # Pillow's own guard as a second line behind decode_image's header check: any image it is
        # asked to open beyond the limit is an error, not a warning
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, never a grey half image
        for worker in service.workers.values():
            worker.start()
        try:
            yield
        finally:
            for worker in service.workers.values():
                worker.stop()
            Image.MAX_IMAGE_PIXELS = saved_limit

    app = FastAPI(title="omniseg", summary="semantic, instance and panoptic segmentation", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error_response(exc)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        states = {
            name: ("failed" if w.error else "ready") if w.ready.is_set() else "loading"
            for name, w in service.workers.items()
        }
        ok = all(state == "ready" for state in states.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "models": states},
            status_code=200 if ok else 503,
            headers={} if ok else {"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.get("/v1/models")
    async def models_list() -> dict:
        return {
            "default": service.default_model,
            "models": [
                {
                    "name": name,
                    "tasks": list(w.predictor.tasks),
                    "default_task": w.predictor.task,
                    "ready": w.ready.is_set() and w.error is None,
                    "model_batch": w.model_batch,
                    "seconds_per_image_by_batch": {str(k): round(v, 4) for k, v in w.tuning.items()},
                    "categories": [
                        {"id": c.id, "name": c.name, "isthing": bool(c.isthing), "color": list(c.color)}
                        for c in w.predictor.categories
                    ],
                }
                for name, w in service.workers.items()
            ],
            "limits": {
                "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels,
                "max_in_flight": limits.max_in_flight, "max_batch": limits.max_batch,
                "max_wait_ms": limits.max_wait_ms,
            },
        }  # fmt: skip

    @app.post("/v1/segment")
    async def segment(request: Request) -> JSONResponse:
        # admission first, before a byte of the body is read: the bound is on memory, not just on work
        if service.in_flight >= limits.max_in_flight:
            service.rejected += 1
            raise ServiceError(
                503, f"busy: {service.in_flight} requests in flight (the limit); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )  # fmt: skip
        service.in_flight += 1  # the event loop is one thread: no lock needed
        request_id = uuid.uuid4().hex
        try:
            response = await service.segment(request)
        except ServiceError as exc:
            response = _error_response(exc)
        except Exception as exc:  # a model that cannot take this image: say so, log it, keep serving
            logger.exception("request %s failed", request_id)
            response = _error_response(ServiceError(500, f"inference failed: {type(exc).__name__}: {exc}"))
        finally:
            service.in_flight -= 1
        response.headers["X-Request-ID"] = request_id
        return response

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(
    models: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
) -> None:
    """Load ``models`` and serve them until interrupted (``omniseg serve``)."""
    import uvicorn

    app = create_app(models, limits)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"omniseg serve: listening on {host}: the service has no authentication", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
