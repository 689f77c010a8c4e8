"""Photos much larger than a model's training frames: the size policy (run at the reference size,
map back nearest-neighbour) and ``Segments.resized``, which maps results back in bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from omniseg.inference import validate_task, working_size
from omniseg.models.layers.dense_prediction import semantic_segments_from_scores
from omniseg.predictor import Predictor
from omniseg.structures import CategoryTable, Segments

CATEGORIES = CategoryTable.from_dicts(
    [{"id": 0, "name": "red", "isthing": 0}, {"id": 1, "name": "green", "isthing": 0},
     {"id": 5, "name": "blue", "isthing": 0}]
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


class DominantChannel(nn.Module):
    """Class scores = the normalised RGB channels (each pixel goes to its strongest channel); it
    records the input sizes it is run at."""

    tasks = ("semantic",)

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))
        self.seen: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(images.shape[-2:]))
        return images * self.scale

    def post_process(self, outputs, image_sizes, *, task: str = "semantic", **_: object) -> list[Segments]:
        validate_task(self, task)
        return semantic_segments_from_scores(outputs, image_sizes, self.categories)


def _bands(height: int, width: int) -> np.ndarray:
    """Red, green and blue vertical thirds."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for k in range(3):
        image[:, k * width // 3 : (k + 1) * width // 3, k] = 230
    return image


def test_working_size_policy():
    reference = (360, 480)
    assert working_size((360, 480), reference) == (360, 480)  # at the reference: as today
    assert working_size((400, 500), reference) == (400, 500)  # up to 1.25x the pixels: as it is
    assert working_size((120, 160), reference) == (120, 160)  # smaller: never upscaled
    assert working_size((3000, 4000), reference) == (360, 480)  # a 12-MP photo: the reference's pixels
    h, w = working_size((3000, 3000), reference)
    assert (h, w) == (416, 416) and abs(h * w - 360 * 480) / (360 * 480) < 0.01  # aspect kept
    assert working_size((3000, 4000), reference, policy="native") == (3000, 4000)
    assert working_size((3000, 4000), None) == (3000, 4000)  # no recorded reference: as it is
    with pytest.raises(ValueError, match="size policy must be one of"):
        working_size((10, 10), reference, policy="tiles")


def test_a_large_photo_runs_at_the_reference_size_and_comes_back_at_its_own():
    model = DominantChannel()
    predictor = Predictor(model, CATEGORIES, meta={"inference": {"flip": False, "scales": [1.5], "reference_size": [36, 48]}})
    photo = _bands(600, 800)
    segments = predictor.predict(photo)
    assert model.seen == [(54, 72)]  # 36 x 48, then the recorded 1.5x scale
    assert segments.image_size == (600, 800)
    labels = segments.to_semantic()
    # each band keeps its category, up to a reference-pixel's width (16 px here) at the edges
    for k, category in enumerate((0, 1, 5)):
        inner = labels[:, k * 800 // 3 + 20 : (k + 1) * 800 // 3 - 20]
        assert (inner == category).all()
    # the same as predicting the downscaled photo as it is and mapping the result back
    small = np.asarray(Image.fromarray(photo).resize((48, 36), Image.BILINEAR))
    expected = predictor.predict(small, size_policy="native").resized((600, 800))
    assert np.array_equal(expected.to_semantic(), labels)
    # the override runs it as it is
    model.seen.clear()
    assert predictor.predict(photo[:60, :80], size_policy="native").image_size == (60, 80)
    assert model.seen == [(90, 120)]


def _nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    rows = ((np.arange(size[0]) + 0.5) * array.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * array.shape[1] / size[1]).astype(int)
    return array[rows][:, cols]


def test_resized_id_map_and_rle_segments_are_nearest_neighbour():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(7, 9))
    semantic = Segments.from_semantic(np.asarray(CATEGORIES.ids)[labels], categories=CATEGORIES)
    up = semantic.resized((20, 31))
    assert np.array_equal(up.to_semantic(), _nearest(semantic.to_semantic(), (20, 31)))
    assert list(up.category_ids) == list(semantic.category_ids) and up.categories is CATEGORIES
    masks = rng.random((5, 7, 9)) > 0.6
    instances = Segments.from_masks(masks, [0, 1, 5, 5, 0], scores=[0.9, 0.8, 0.7, 0.6, 0.5], categories=CATEGORIES)
    for chunk_pixels in (1 << 26, 20 * 31 * 2):  # all masks at once, or two at a time
        resized = instances.resized((20, 31), chunk_pixels=chunk_pixels)
        assert np.array_equal(resized.masks(), np.stack([_nearest(m, (20, 31)) for m in masks]))
        assert np.allclose(resized.scores, instances.scores)
        assert all(tuple(r["size"]) == (20, 31) for r in resized.rles())
    assert instances.resized((7, 9)) is instances


def test_resized_areas_boxes_and_rles_equal_those_of_the_large_map_itself():
    """``resized`` carries the index map, areas and (upscaling) boxes over from the small map
    instead of recomputing them at full size: they must equal a fresh computation on the large map,
    and the one-pass RLEs must equal pycocotools' encoding of each mask."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for trial in range(150):
        h0, w0 = (int(v) for v in rng.integers(1, 12, 2))
        n = int(rng.integers(0, 6))
        ids = np.arange(1, n + 1) * 7
        id_map = rng.choice(np.concatenate([[0], ids]), size=(h0, w0)).astype(np.int32)
        small = Segments((h0, w0), rng.integers(0, 3, n), id_map=id_map, segment_ids=ids)
        size = tuple(int(v) for v in rng.integers(1, 40, 2))  # up- and downscaling, either axis
        large = small.resized(size)
        fresh = Segments(size, small.category_ids, id_map=large.id_map.copy(), segment_ids=ids)
        assert np.array_equal(large.areas(), fresh.areas()), trial
        assert np.array_equal(large.boxes(), fresh.boxes()), trial
        encoded = [mask_utils.encode(np.asfortranarray((large.id_map == i).astype(np.uint8))) for i in ids]
        assert large.rles() == encoded == fresh.rles(), trial
