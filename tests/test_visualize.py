"""Overlays: shape, colours, outlines, legend, untouched background, and scale."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniseg.show import DATASET_CHOICES, show_sample
from omniseg.structures import Category, CategoryTable, Segments
from omniseg.visualize import LEGEND_BACKGROUND, overlay, present_categories, save_png, shade

CATS = CategoryTable(
    (
        Category(1, "road", False, (200, 0, 200)),
        Category(2, "car", True, (0, 200, 0)),
        Category(3, "person", True, (0, 0, 220)),
        Category(7, "sky", False, (230, 200, 0)),  # in the table, absent from the image
    )
)


def _scene() -> tuple[np.ndarray, Segments]:
    """A 20x30 image: road at the bottom, two touching cars, one person, void elsewhere."""
    id_map = np.zeros((20, 30), dtype=np.int32)
    id_map[12:, :] = 5  # road
    id_map[4:10, 2:8] = 11  # car A
    id_map[4:10, 8:14] = 12  # car B, touching A at column 8
    id_map[2:6, 20:24] = 13  # person
    info = [
        {"id": 5, "category_id": 1},
        {"id": 11, "category_id": 2},
        {"id": 12, "category_id": 2},
        {"id": 13, "category_id": 3},
    ]
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    return image, Segments.from_panoptic(id_map, info, categories=CATS)


def _legend_colors(out: np.ndarray, height: int) -> set[tuple[int, int, int]]:
    strip = out[height:].reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(strip, axis=0)}


def test_shape_dtype_and_untouched_background() -> None:
    image, seg = _scene()
    out = overlay(image, seg, legend=False)
    assert out.shape == image.shape and out.dtype == np.uint8
    void = seg.id_map == 0
    np.testing.assert_array_equal(out[void], image[void])  # blending happens on segments only
    assert not np.array_equal(out[~void], image[~void])
    with_legend = overlay(image, seg)
    assert with_legend.dtype == np.uint8 and with_legend.shape[0] > 20 and with_legend.shape[1] >= 30
    np.testing.assert_array_equal(with_legend[:20, :30], out)
    gray = overlay(image[..., 0], seg, legend=False)  # grayscale images are accepted
    assert gray.shape == (20, 30, 3)
    with pytest.raises(ValueError, match="does not match"):
        overlay(image[:10], seg)
    with pytest.raises(ValueError, match="unknown view"):
        overlay(image, seg, view="depth")


def test_alpha_blending_and_outlines() -> None:
    image, seg = _scene()
    out = overlay(image, seg, view="semantic", alpha=0.5, outlines=False, legend=False)
    expected = np.round(image[15, 15] * 0.5 + np.array(CATS[1].color) * 0.5)
    np.testing.assert_array_equal(out[15, 15], expected)
    np.testing.assert_array_equal(overlay(image, seg, alpha=0.0, outlines=False, legend=False), image)

    white = (255, 255, 255)
    lined = overlay(image, seg, view="panoptic", outlines=True, legend=False, outline_color=white)
    assert (lined[12, :] == white).all()  # road's top row borders void
    assert (lined[6, 7] == white).all() and (lined[6, 8] == white).all()  # car A | car B
    assert not (lined[15, 15] == white).all() and not (lined[7, 5] == white).all()  # interiors
    # the semantic view merges the two cars: no line between them
    semantic = overlay(image, seg, view="semantic", outlines=True, legend=False, outline_color=white)
    assert not (semantic[6, 7] == white).all() and not (semantic[6, 8] == white).all()
    assert (semantic[4, 5] == white).all()  # car A's top edge borders void
    void = seg.id_map == 0
    np.testing.assert_array_equal(lined[void], image[void])  # outlines stay inside segments


def test_views_colour_categories_and_instances() -> None:
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    _, seg = _scene()
    kw = dict(alpha=1.0, outlines=False, legend=False)
    semantic = overlay(image, seg, view="semantic", **kw)
    assert tuple(semantic[7, 4]) == tuple(semantic[7, 10]) == CATS[2].color
    panoptic = overlay(image, seg, view="panoptic", **kw)
    assert tuple(panoptic[7, 4]) != tuple(panoptic[7, 10])  # two cars, two shades
    assert tuple(panoptic[15, 15]) == CATS[1].color  # stuff keeps its category colour
    instance = overlay(image, seg, view="instance", **kw)
    assert (instance[15, 15] == 0).all()  # stuff is not drawn in the instance view
    assert tuple(instance[7, 4]) == tuple(panoptic[7, 4])
    assert len({shade((0, 200, 0), k) for k in range(20)}) == 20


def test_legend_lists_exactly_the_categories_present() -> None:
    image, seg = _scene()
    assert [c.name for c in present_categories(seg, view="panoptic")] == ["road", "car", "person"]
    assert [c.name for c in present_categories(seg, view="instance")] == ["car", "person"]
    swatches = {c.color for c in CATS}
    for view, names in (("panoptic", {"road", "car", "person"}), ("instance", {"car", "person"})):
        out = overlay(image, seg, view=view)
        found = _legend_colors(out, 20) & swatches
        assert found == {CATS[[c.id for c in CATS if c.name == n][0]].color for n in names}, view
        assert LEGEND_BACKGROUND in _legend_colors(out, 20)
    only_person = seg.subset([3])
    assert [c.name for c in present_categories(only_person)] == ["person"]
    empty = Segments.empty((20, 30), categories=CATS)
    assert present_categories(empty) == []
    np.testing.assert_array_equal(overlay(image, empty)[:20, :30], image)


def test_overlapping_rle_segments_highest_score_on_top() -> None:
    masks = np.zeros((3, 20, 30), dtype=bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 6:16, 6:16] = True
    masks[2, 0:1, 29:30] = True  # a one-pixel mask in the corner
    seg = Segments.from_masks(masks, [2, 3, 3], scores=[0.9, 0.5, 0.7], categories=CATS)
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    out = overlay(image, seg, view="instance", alpha=1.0, outlines=False, legend=False)
    assert tuple(out[8, 8]) == CATS[2].color  # the car (0.9) covers the person (0.5)
    assert tuple(out[14, 14]) == CATS[3].color
    assert out[0, 29].any() and not out[0, 28].any() and not out[19, 0].any()
    no_table = Segments.from_masks(masks, [2, 3, 3])  # categories unknown: drawn anyway
    assert overlay(image, no_table, legend=False, alpha=1.0)[8, 8].any()
    assert [c.name for c in present_categories(no_table)] == ["2", "3"]


def test_the_banded_blend_equals_a_per_pixel_blend_with_hundreds_of_colours() -> None:
    """Past 85 colours a key x 768 no longer fits uint16: the table index must be computed wider."""
    from omniseg.visualize import _render_keys

    h, w, n = 40, 300, 240
    rng = np.random.default_rng(5)
    cats = CategoryTable.from_dicts([{"id": i + 1, "name": f"c{i}", "isthing": 1} for i in range(n)])
    id_map = (np.arange(w)[None, :].repeat(h, 0) * n // w + 1).astype(np.int32)  # n vertical stripes
    id_map[:5] = 0  # a void band, left as it is
    seg = Segments((h, w), np.arange(1, n + 1), categories=cats, id_map=id_map)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = overlay(image, seg, view="panoptic", alpha=0.3, outlines=False, legend=False)
    keys, color_of_key, _ = _render_keys(seg, "panoptic", cats)
    assert len(color_of_key) > 86
    a = np.float32(0.3)
    expected = np.round(image * (1 - a) + color_of_key[keys].astype(np.float32) * a).astype(np.uint8)
    expected[keys == 0] = image[keys == 0]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("storage", ["id_map", "rle"])
def test_large_image_many_segments_is_fast_and_lean(storage: str) -> None:
    """4000x3000 with 300 segments: seconds, and far below an (N, H, W) stack (3.6 GB)."""
    h, w, n = 3000, 4000, 300
    rng = np.random.default_rng(1)
    cats = CategoryTable.from_dicts(
        [{"id": i + 1, "name": f"c{i}", "isthing": i % 2 == 0} for i in range(40)]
    )
    if storage == "id_map":  # a 15 x 20 grid of 200-pixel cells, one segment each
        id_map = (np.arange(h)[:, None] // 200 * 20 + np.arange(w)[None, :] // 200 + 1).astype(np.int32)
        seg = Segments((h, w), rng.integers(1, 41, n), categories=cats, id_map=id_map)
    else:  # overlapping boxes of up to 400 pixels a side
        from pycocotools import mask as mask_utils

        rles = []
        for x, y, bw, bh in zip(rng.integers(0, w - 400, n), rng.integers(0, h - 400, n),
                                rng.integers(10, 400, n), rng.integers(10, 400, n), strict=True):  # fmt: skip
            rles.append(mask_utils.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)[0])
        seg = Segments((h, w), rng.integers(1, 41, n), categories=cats, rles=rles, scores=rng.random(n))
    image = np.full((h, w, 3), 90, dtype=np.uint8)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = overlay(image, seg, view="panoptic")
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape[:2] >= (h, w) and out.dtype == np.uint8
    assert peak < 400e6, f"peak {peak / 1e6:.0f} MB"  # measured ~190 MB; a mask stack would be 3600 MB
    assert elapsed < 60, f"{elapsed:.1f} s"  # measured 1-3 s on 2 idle CPU cores; loose for loaded CI


def test_save_png_and_show_sample(tmp_path: Path, shared_data: Path) -> None:
    image, seg = _scene()
    path = save_png(overlay(image, seg), tmp_path / "sub" / "a.png")
    assert np.asarray(Image.open(path)).shape[1] >= 30
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((2, 2), dtype=np.float32), tmp_path / "b.png")

    spec = {
        "format": "coco_panoptic",
        "annotations": str(shared_data / "panoptic_pq_fixtures" / "coco_gt.json"),
    }
    out = show_sample(spec, 0, tmp_path, "panoptic")
    assert out == tmp_path / "bird_panoptic.png" and Image.open(out).size[0] == 240
    out = show_sample(
        {"format": "yolo", "images": str(shared_data / "coco128_seg" / "images" / "train2017")},
        3, tmp_path / "yolo.png", "instance",
    )  # fmt: skip
    assert Image.open(out).mode == "RGB"
    with pytest.raises(Exception, match="out of range"):
        show_sample(spec, 10, tmp_path / "x.png", "panoptic")
    assert "coco_panoptic" in DATASET_CHOICES and "yolo" in DATASET_CHOICES
