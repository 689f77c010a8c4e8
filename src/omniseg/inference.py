"""The one inference path every caller shares: test-time augmentation on raw outputs, then the
model's own ``post_process``.

Every omniseg model follows one contract (the Hugging Face ``post_process_*`` idea):

* ``model.tasks``: the tasks it serves, a tuple of ``"semantic"``, ``"instance"``, ``"panoptic"``,
  ``"detection"``; the first is its default;
* ``model(images, targets)`` in training mode: a dict of named, already weighted losses;
* ``model(images)`` in evaluation mode: its raw outputs (dense class scores for DeepLab,
  detections for the R-CNNs, class and mask logits for mask transformers);
* ``model.post_process(outputs, image_sizes, task=...)``: one :class:`~omniseg.structures.Segments`
  per image, at that image's resolution, for any task in ``tasks``.

Training validation, ``omniseg evaluate``, ``omniseg segment`` and :class:`~omniseg.predictor.Predictor`
all call :func:`predict_segments`, so the figure that picks ``best`` during training is the one
``evaluate`` reports for that checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.structures import Segments

__all__ = [
    "SIZE_POLICIES",
    "TestTimeAugmentation",
    "merge_dense_views",
    "predict_segments",
    "run_model",
    "validate_task",
    "working_size",
]

SIZE_POLICIES = ("reference", "native")
REFERENCE_TOLERANCE = 1.25  # inputs up to 1.25x the reference's pixels run as they are


def working_size(
    image_size: Sequence[int], reference_size: Sequence[int] | None, *, policy: str = "reference"
) -> tuple[int, int]:
    """The size an image of ``image_size`` is run at, for a model whose checkpoint records the
    ``reference_size`` it was trained and validated at (its test-time scales are relative to it).

    ``"reference"`` (the default): an image with more than 1.25x the reference's pixels is scaled
    down, aspect kept, to the reference's pixel count -- a 4000x3000 photo through a model trained
    on 480x360 frames is run at 480x360 (then at the recorded scales), a 3000x3000 one at 416x416,
    and the result mapped back to the photo's size; anything smaller runs as it is, so at the
    reference size nothing changes.
    ``"native"``: always as it is (the network then sees objects at the photo's own scale, and a
    12-MP photo costs the network 12 MP times the recorded scales). Without a recorded reference
    (older checkpoints) images run as they are.
    """
    if policy not in SIZE_POLICIES:
        raise ValueError(f"size policy must be one of {SIZE_POLICIES}, got {policy!r}")
    h, w = int(image_size[0]), int(image_size[1])
    if policy == "native" or not reference_size:
        return h, w
    reference = int(reference_size[0]) * int(reference_size[1])
    if h * w <= REFERENCE_TOLERANCE * reference:
        return h, w
    scale = (reference / (h * w)) ** 0.5
    return max(1, round(h * scale)), max(1, round(w * scale))


@dataclass(frozen=True)
class TestTimeAugmentation:
    """Horizontal flip and input scales; every (scale, flip) view is run and the views merged."""

    __test__ = False  # not a pytest test class, despite the name

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        scales = tuple(float(s) for s in self.scales)
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"test-time scales must be positive numbers, got {list(self.scales)}")
        object.__setattr__(self, "scales", scales)

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.scales == (1.0,)

    def views(self) -> list[tuple[float, bool]]:
        return [(scale, flipped) for scale in self.scales for flipped in ((False, True) if self.flip else (False,))]


def validate_task(model: nn.Module, task: str | None) -> str:
    """``task`` if the model serves it (its default when ``None``), else a ValueError listing its tasks."""
    tasks = tuple(getattr(model, "tasks", ()))
    if not tasks:
        raise TypeError(f"{type(model).__name__} declares no `tasks`; every omniseg model must (see omniseg.inference)")
    if task is None:
        return tasks[0]
    if task not in tasks:
        raise ValueError(f"{type(model).__name__} does not do {task!r} segmentation; its tasks: {', '.join(tasks)}")
    return task


def merge_dense_views(views: Sequence[tuple[Tensor, float, bool]], size: tuple[int, int]) -> Tensor:
    """Merge dense class scores ``(B, C, h, w)`` of several views into log mean probabilities.

    Each view is un-flipped and resized to ``size``; the softmax probabilities are averaged and
    returned as their log, so a softmax of the result gives the average back and its argmax is
    the averaged prediction (a mean of probabilities, not of logits: views that are unsure do
    not outvote views that are sure).
    """
    total = None
    for outputs, _, flipped in views:
        if not isinstance(outputs, Tensor) or outputs.ndim != 4:
            raise TypeError(
                "test-time flip/scales need dense class scores (B, C, H, W) from the model, or a "
                "`merge_test_time_views` method of its own; got "
                f"{type(outputs).__name__}"
            )
        if flipped:
            outputs = outputs.flip(-1)
        if tuple(outputs.shape[-2:]) != tuple(size):
            outputs = F.interpolate(outputs, size=size, mode="bilinear", align_corners=False)
        prob = outputs.float().softmax(1)
        total = prob if total is None else total + prob
    return (total / len(views)).clamp_min(torch.finfo(torch.float32).tiny).log()


def run_model(
    model: nn.Module,
    images: Tensor | Sequence[Tensor],
    tta: TestTimeAugmentation | None = None,
    *,
    task: str | None = None,
) -> Any:
    """The model's raw outputs for a ``(B, 3, H, W)`` batch (or a list of ``(3, H, W)`` images of
    different sizes, for models that take one), merged over the test-time views.

    A model whose outputs depend on the task (``task_conditioned = True``, e.g. OneFormer's task
    token) is run as ``model(images, task=task)``; every other model answers all its tasks from
    one output and is run as ``model(images)``.

    A model whose raw outputs are not dense class scores merges its views itself
    (``model.merge_test_time_views(views, size)``, ``views`` = ``[(outputs, scale, flipped)]``);
    without one, test-time augmentation raises a clear error rather than guessing.
    """
    call = functools.partial(model, task=task) if getattr(model, "task_conditioned", False) else model
    if tta is None or tta.is_identity:
        return call(images)
    if not isinstance(images, Tensor):
        raise ValueError("test-time flip/scales take a (B, 3, H, W) batch of equally sized images")
    size = tuple(images.shape[-2:])
    merge: Callable = getattr(model, "merge_test_time_views", merge_dense_views)
    views = []
    for scale, flipped in tta.views():
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        views.append((call(x.flip(-1) if flipped else x), scale, flipped))
    try:
        return merge(views, size)
    except TypeError as exc:
        raise ValueError(f"{type(model).__name__}: {exc}") from None


@torch.inference_mode()
def predict_segments(
    model: nn.Module,
    images: Tensor | Sequence[Tensor],
    *,
    task: str | None = None,
    tta: TestTimeAugmentation | None = None,
    refine: Callable[[Any], Any] | None = None,
    **post_process_options: Any,
) -> list[Segments]:
    """``Segments`` per image of a normalised ``(B, 3, H, W)`` batch (or list of images): raw outputs (merged over
    ``tta``), optionally ``refine``-d (e.g. the dense CRF), then ``model.post_process``."""
    task = validate_task(model, task)
    outputs = run_model(model, images, tta, task=task)
    if refine is not None:
        outputs = refine(outputs)
    sizes = [tuple(image.shape[-2:]) for image in images]
    return model.post_process(outputs, sizes, task=task, **post_process_options)
