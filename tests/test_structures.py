import numpy as np
import pytest

from omniseg.structures import CategoryTable, Segments, id_to_rgb, rgb_to_id


@pytest.fixture
def categories():
    return CategoryTable.from_names(["road", "car", "person"], isthing=[False, True, True], start_id=1)


def _panoptic(categories):
    id_map = np.zeros((6, 8), dtype=np.int32)
    id_map[:, :4] = 10  # road
    id_map[1:3, 4:6] = 20  # car A
    id_map[3:5, 4:7] = 21  # car B
    id_map[0, 7] = 30  # person (crowd)
    info = [
        {"id": 10, "category_id": 1},
        {"id": 20, "category_id": 2},
        {"id": 21, "category_id": 2},
        {"id": 30, "category_id": 3, "iscrowd": 1},
    ]
    return Segments.from_panoptic(id_map, info, categories=categories), id_map


def test_three_views_of_one_panoptic_set(categories):
    seg, id_map = _panoptic(categories)
    semantic = seg.to_semantic(void_value=255)
    assert semantic[0, 0] == 1 and semantic[1, 4] == 2 and semantic[0, 7] == 3 and semantic[0, 5] == 255
    inst = seg.to_instances()
    assert len(inst) == 2  # the crowd person is left out, road is stuff
    np.testing.assert_array_equal(inst.boxes[np.argsort(inst.boxes[:, 1])], [[4, 1, 6, 3], [4, 3, 7, 5]])
    pan_map, info = seg.to_panoptic()
    np.testing.assert_array_equal(pan_map, id_map)
    assert [s["area"] for s in info] == [24, 4, 6, 1]


def test_one_panoptic_annotation_gives_every_tasks_typed_target(categories):
    import torch
    from torchvision.transforms import v2

    from omniseg.data.targets import finalize_target, training_target
    from omniseg.data.transforms import train_transform

    seg, id_map = _panoptic(categories)
    target = training_target(seg, categories)
    # semantic map: contiguous class index (road 0, car 1, person 2), void -> ignore
    expected = np.full(id_map.shape, 255)
    expected[id_map == 10], expected[(id_map == 20) | (id_map == 21)], expected[id_map == 30] = 0, 1, 2
    np.testing.assert_array_equal(target["semantic"].numpy(), expected)
    assert target["category_ids"].tolist() == [1, 2, 2, 3] and target["iscrowd"].tolist() == [False, False, False, True]
    np.testing.assert_array_equal(target["masks"].numpy().astype(bool), seg.masks())
    np.testing.assert_array_equal(target["boxes"].numpy(), seg.boxes())
    assert set(training_target(seg, categories, with_segments=False)) == {"semantic"}

    # a flip and a padded crop move the image, the masks, the boxes and the semantic map together
    image = torch.from_numpy(id_map.astype(np.uint8))[None].repeat(3, 1, 1)  # pixel value = segment id
    transform = train_transform(crop_size=(8, 10), hflip=True)
    transform.transforms[-1] = v2.RandomHorizontalFlip(p=1.0)
    from torchvision import tv_tensors

    out_image, out = transform(tv_tensors.Image(image), target)
    out = finalize_target(out)
    flipped_ids = out_image[0].numpy().astype(int)
    padded = out["semantic"].numpy() == 255
    assert padded.sum() == 8 * 10 - id_map.size + (id_map == 0).sum() and (flipped_ids[padded] == 0).all()
    for mask, box, cat in zip(out["masks"].numpy(), out["boxes"].numpy(), out["category_ids"].tolist(), strict=True):
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # tight, exclusive
        segment_id = int(np.unique(flipped_ids[mask])[0])  # the image pixels under each mask: one segment
        assert {10: 1, 20: 2, 21: 2, 30: 3}[segment_id] == cat


def test_overlapping_masks_roundtrip_through_rle(categories):
    rng = np.random.default_rng(0)
    masks = rng.random((5, 20, 30)) > 0.6
    seg = Segments.from_masks(masks, [2, 3, 2, 2, 3], categories=categories, scores=[0.1, 0.9, 0.5, 0.3, 0.2])
    assert seg.overlapping
    np.testing.assert_array_equal(seg.masks(), masks)
    np.testing.assert_array_equal(seg.areas(), masks.sum((1, 2)))
    # panoptic view: the most confident segment owns an overlapped pixel
    pan, _ = seg.to_panoptic()
    both = masks[1] & masks[2]
    assert (pan[both] == seg.segment_ids[1]).all()


def test_semantic_roundtrip_and_ignore(categories):
    label = np.array([[1, 1, 2], [255, 3, 3]])
    seg = Segments.from_semantic(label, categories=categories, ignore_index=255)
    assert seg.category_ids.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(seg.to_semantic(void_value=255), label)
    with pytest.raises(ValueError, match="unknown category id"):
        Segments.from_semantic(np.array([[7]]), categories=categories)


def test_large_image_uses_one_id_map_not_dense_masks(categories):
    h, w, n = 3000, 4000, 300
    id_map = (np.arange(h * w, dtype=np.int32).reshape(h, w) // (h * w // n + 1)) + 1
    info = [{"id": i + 1, "category_id": 1 + i % 3} for i in range(n)]
    seg = Segments.from_panoptic(id_map, info, categories=categories)
    assert seg.id_map.nbytes == h * w * 4  # 48 MB, not 300 x 12 Mpx
    assert seg.mask(5).sum() == (id_map == 6).sum()
    assert seg.areas().sum() == h * w


def test_rgb_id_conversion_roundtrip():
    ids = np.array([[0, 255, 2586368], [16770360, 16711691, 1]])
    np.testing.assert_array_equal(rgb_to_id(id_to_rgb(ids)), ids)


def test_category_table_rejects_duplicates_and_unknown_ids(categories):
    with pytest.raises(ValueError, match="duplicate"):
        CategoryTable.from_dicts([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(KeyError, match="unknown category id 9"):
        categories.index_of(9)
    assert categories.id_lookup()[3] == 2


def test_to_semantic_in_a_narrow_dtype_equals_int64_and_refuses_ids_it_cannot_hold():
    id_map = np.array([[0, 7, 7], [14, 7, 0]], dtype=np.int32)
    small_ids = Segments((2, 3), [3, 200], id_map=id_map, segment_ids=[7, 14])
    wide = small_ids.to_semantic(void_value=255)
    narrow = small_ids.to_semantic(void_value=255, dtype=np.uint8)
    assert wide.dtype == np.int64 and narrow.dtype == np.uint8
    assert np.array_equal(narrow, wide) and wide.tolist() == [[255, 3, 3], [200, 3, 255]]
    overlapping = Segments((2, 3), [3, 200], rles=small_ids.rles(), scores=[0.9, 0.5])
    assert np.array_equal(overlapping.to_semantic(void_value=255, dtype=np.uint8), wide)
    with pytest.raises(ValueError, match="do not fit uint8"):
        Segments((2, 3), [3, 300], id_map=id_map, segment_ids=[7, 14]).to_semantic(dtype=np.uint8)
    with pytest.raises(ValueError, match="do not fit uint8"):
        small_ids.to_semantic(void_value=-1, dtype=np.uint8)


def test_boxes_of_an_id_map_equal_those_of_its_rle_masks() -> None:
    """Boxes from the id map (two scatters) against pycocotools' toBbox of the same masks."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(3)
    for trial in range(30):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        n = int(rng.integers(1, 7))
        id_map = rng.integers(0, n + 1, (h, w)).astype(np.int32)  # 0: void
        id_map[id_map == 2] = 0  # segment 2 is empty: its box is zeros
        id_map[: h // 2, : w // 3][id_map[: h // 2, : w // 3] == 3] = 0  # one segment off a corner
        seg = Segments((h, w), np.arange(1, n + 1), id_map=id_map, segment_ids=np.arange(1, n + 1))
        masks = np.asfortranarray(np.stack([id_map == i for i in range(1, n + 1)], axis=2).astype(np.uint8))
        xywh = mask_utils.toBbox(mask_utils.encode(masks)).reshape(-1, 4)
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        np.testing.assert_array_equal(seg.boxes(), expected.astype(np.float32), err_msg=f"trial {trial}")
