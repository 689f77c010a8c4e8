"""The one data model: a set of segments over one image, and its three views.

Every reader, model, metric, writer and visualiser in omniseg speaks :class:`Segments`.
A segment is a binary mask with a category, a score, a crowd flag and an identity
(its panoptic segment id). Three views of the same set:

* semantic  -- ``to_semantic()``: an (H, W) map of category ids;
* instance  -- ``to_instances()``: masks, boxes, labels, scores of the *thing* segments;
* panoptic  -- ``to_panoptic()``: an (H, W) segment-id map plus COCO-style ``segments_info``.

Storage follows the view so that a 4000x3000 image with 300 segments never needs 300 dense
full-size masks:

* non-overlapping sets (semantic, panoptic, ground truth) keep one ``int32`` id map
  (48 MB for 12 Mpx, independent of the segment count);
* overlapping sets (instance predictions, COCO instances) keep COCO compressed RLE,
  which for typical masks is a few hundred bytes each.

Dense ``bool`` masks are produced on demand, one at a time with :meth:`Segments.mask`,
or all at once with :meth:`Segments.masks` for callers that really need a stack.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

VOID = 0
"""Panoptic segment id of unlabelled pixels (COCO panoptic convention)."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool = False
    color: tuple[int, int, int] = (0, 0, 0)


def default_color(index: int) -> tuple[int, int, int]:
    """A distinct, deterministic colour for the ``index``-th category (golden-ratio hues)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65 + 0.35 * ((index // 7) % 2), 0.95 - 0.25 * ((index // 3) % 2))
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass(frozen=True)
class CategoryTable:
    """Category metadata that travels with a dataset, a checkpoint and every result.

    Category ids may be non-contiguous (COCO); models work with contiguous indices
    ``0..len-1`` and convert through :meth:`index_of` / :meth:`id_of`.
    """

    categories: tuple[Category, ...]
    _by_id: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        by_id: dict[int, int] = {}
        for index, cat in enumerate(self.categories):
            if cat.id in by_id:
                raise ValueError(f"duplicate category id {cat.id} ({cat.name!r})")
            by_id[cat.id] = index
        object.__setattr__(self, "_by_id", by_id)

    @classmethod
    def from_names(
        cls, names: Sequence[str], *, isthing: Sequence[bool] | None = None, start_id: int = 0
    ) -> CategoryTable:
        flags = list(isthing) if isthing is not None else [False] * len(names)
        return cls(
            tuple(
                Category(start_id + i, name, flags[i], default_color(i)) for i, name in enumerate(names)
            )
        )

    @classmethod
    def from_dicts(cls, items: Iterable[dict]) -> CategoryTable:
        """From COCO-style dicts (``id``, ``name``, optional ``isthing`` and ``color``)."""
        cats = []
        for i, item in enumerate(items):
            color = item.get("color")
            cats.append(
                Category(
                    int(item["id"]),
                    str(item.get("name", item["id"])),
                    bool(item.get("isthing", True)),
                    tuple(int(c) for c in color) if color else default_color(i),
                )
            )
        return cls(tuple(cats))

    def to_dicts(self) -> list[dict]:
        return [
            {"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color)}
            for c in self.categories
        ]

    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self):
        return iter(self.categories)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._by_id

    def __getitem__(self, category_id: int) -> Category:
        return self.categories[self.index_of(category_id)]

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.categories]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def thing_ids(self) -> list[int]:
        return [c.id for c in self.categories if c.isthing]

    @property
    def stuff_ids(self) -> list[int]:
        return [c.id for c in self.categories if not c.isthing]

    def index_of(self, category_id: int) -> int:
        try:
            return self._by_id[int(category_id)]
        except KeyError:
            raise KeyError(f"unknown category id {category_id}; known ids: {self.ids[:20]}...") from None

    def id_of(self, index: int) -> int:
        return self.categories[int(index)].id

    def id_lookup(self, fill: int = -1) -> np.ndarray:
        """Array ``a`` with ``a[category_id] = contiguous index`` (``fill`` elsewhere)."""
        table = np.full(max(self.ids) + 1 if self.categories else 1, fill, dtype=np.int64)
        for index, cat in enumerate(self.categories):
            table[cat.id] = index
        return table

    def palette(self) -> np.ndarray:
        """``(max_id + 1, 3) uint8``: colour of each category id (black for unknown ids)."""
        pal = np.zeros((max(self.ids) + 1 if self.categories else 1, 3), dtype=np.uint8)
        for cat in self.categories:
            pal[cat.id] = cat.color
        return pal


def _as_rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _rles_of_index_map(index: np.ndarray, n: int) -> list[dict]:
    """COCO compressed RLE of each segment ``1..n`` of an index map, from one pass over its runs.

    Encoding ``index == k`` per segment reads the whole map n times (at 12 MP, ~1 s for a dozen
    segments); instead the column-major map is split once into runs of equal values, and each
    segment's RLE is its runs with the gaps between them, compressed by pycocotools (the same
    canonical string ``mask_utils.encode`` writes: tests compare).
    """
    h, w = index.shape
    if not index.size:
        return [_as_rle(np.zeros((h, w), dtype=bool)) for _ in range(n)]
    small = np.uint8 if n < 2**8 else np.uint16 if n < 2**16 else np.int32  # less memory to transpose
    flat = index.astype(small, copy=False).ravel(order="F")
    change = np.empty(flat.size, dtype=bool)
    change[0] = True
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    values = flat[starts]
    ends = np.append(starts[1:], flat.size)
    order = np.argsort(values, kind="stable")  # runs grouped by segment, in image order within each
    bounds = np.searchsorted(values[order], np.arange(n + 2))
    rles = []
    for k in range(1, n + 1):
        runs = order[bounds[k] : bounds[k + 1]]
        run_starts, run_ends = starts[runs], ends[runs]
        # alternating counts, zeros first: gap before each run, the run, and the zeros after the last
        gaps = run_starts - np.concatenate([[0], run_ends[:-1]])
        counts = np.empty(2 * len(runs) + 1, dtype=np.int64)
        counts[0:-1:2], counts[1:-1:2] = gaps, run_ends - run_starts
        counts[-1] = flat.size - (run_ends[-1] if len(runs) else 0)
        if len(runs) and counts[-1] == 0:  # a mask that ends on a run has no trailing zeros
            counts = counts[:-1]
        rles.append(mask_utils.frPyObjects({"counts": counts.tolist(), "size": [h, w]}, h, w))
    return rles


@dataclass
class Instances:
    """The instance view: per-thing masks, boxes (x1, y1, x2, y2), category ids and scores."""

    masks: np.ndarray  # (N, H, W) bool
    boxes: np.ndarray  # (N, 4) float32, xyxy in pixels
    category_ids: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float32

    def __len__(self) -> int:
        return len(self.category_ids)


class Segments:
    """A set of segments over one ``(height, width)`` image. See the module docstring."""

    def __init__(
        self,
        image_size: tuple[int, int],
        category_ids: Sequence[int] | np.ndarray,
        *,
        categories: CategoryTable | None = None,
        scores: Sequence[float] | np.ndarray | None = None,
        iscrowd: Sequence[bool] | np.ndarray | None = None,
        segment_ids: Sequence[int] | np.ndarray | None = None,
        id_map: np.ndarray | None = None,
        rles: list[dict] | None = None,
    ) -> None:
        if (id_map is None) == (rles is None):
            raise ValueError("Segments needs exactly one of id_map (non-overlapping) or rles (overlapping)")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.category_ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
        n = len(self.category_ids)
        self.scores = (
            np.ones(n, dtype=np.float32) if scores is None else np.asarray(scores, dtype=np.float32).reshape(-1)
        )
        self.iscrowd = np.zeros(n, dtype=bool) if iscrowd is None else np.asarray(iscrowd, dtype=bool).reshape(-1)
        self.segment_ids = (
            np.arange(1, n + 1, dtype=np.int64)
            if segment_ids is None
            else np.asarray(segment_ids, dtype=np.int64).reshape(-1)
        )
        self.categories = categories
        if not (len(self.scores) == len(self.iscrowd) == len(self.segment_ids) == n):
            raise ValueError("category_ids, scores, iscrowd and segment_ids must have the same length")
        if id_map is not None:
            id_map = np.asarray(id_map)
            if id_map.shape != self.image_size:
                raise ValueError(f"id_map shape {id_map.shape} does not match image size {self.image_size}")
            if n and (self.segment_ids == VOID).any():
                raise ValueError("segment id 0 is reserved for void pixels in an id map")
            self._id_map: np.ndarray | None = id_map.astype(np.int32, copy=False)
            self._rles: list[dict] | None = None
        else:
            assert rles is not None
            if len(rles) != n:
                raise ValueError(f"{len(rles)} RLEs for {n} segments")
            for rle in rles:
                if tuple(rle["size"]) != self.image_size:
                    raise ValueError(f"RLE size {rle['size']} does not match image size {self.image_size}")
            self._id_map = None
            self._rles = list(rles)
        if categories is not None:
            unknown = sorted({int(c) for c in self.category_ids} - set(categories.ids))
            if unknown:
                raise ValueError(f"unknown category id(s) {unknown}; known: {categories.ids}")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_masks(
        cls,
        masks: np.ndarray,
        category_ids: Sequence[int] | np.ndarray,
        **kwargs,
    ) -> Segments:
        """From an ``(N, H, W)`` stack of (possibly overlapping) binary masks; stored as RLE."""
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
        image_size = masks.shape[1:]
        rles = [_as_rle(m) for m in masks.astype(bool)]
        return cls(image_size, category_ids, rles=rles, **kwargs)

    @classmethod
    def from_semantic(
        cls,
        label_map: np.ndarray,
        *,
        categories: CategoryTable | None = None,
        ignore_index: int | None = 255,
        scores: np.ndarray | None = None,
    ) -> Segments:
        """One segment per category present in a semantic label map; ``ignore_index`` pixels are void.

        ``scores`` optionally gives a per-category-id score (e.g. the mean confidence).
        """
        label_map = np.asarray(label_map)
        if label_map.dtype.kind not in "iu" or label_map.min(initial=0) < 0:
            raise ValueError(f"label map must hold non-negative integers, got dtype {label_map.dtype}")
        present = np.flatnonzero(np.bincount(label_map.ravel()))
        if ignore_index is not None:
            present = present[present != ignore_index]
        if categories is not None:
            unknown = sorted(set(present.tolist()) - set(categories.ids))
            if unknown:
                raise ValueError(f"label map has unknown category id(s) {unknown}; known: {categories.ids}")
        # segment id = position + 1, so id 0 stays void
        lut = np.zeros(int(label_map.max(initial=0)) + 1, dtype=np.int32)
        lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        id_map = lut[label_map]
        if ignore_index is not None and ignore_index <= label_map.max(initial=0):
            id_map[label_map == ignore_index] = VOID
        seg_scores = None if scores is None else np.asarray(scores)[present]
        return cls(label_map.shape, present, categories=categories, id_map=id_map, scores=seg_scores)

    @classmethod
    def from_panoptic(
        cls,
        id_map: np.ndarray,
        segments_info: Sequence[dict],
        *,
        categories: CategoryTable | None = None,
    ) -> Segments:
        """From a panoptic segment-id map and COCO ``segments_info`` (``id``, ``category_id``, ``iscrowd``)."""
        return cls(
            id_map.shape,
            [s["category_id"] for s in segments_info],
            categories=categories,
            scores=[s.get("score", 1.0) for s in segments_info],
            iscrowd=[bool(s.get("iscrowd", 0)) for s in segments_info],
            segment_ids=[s["id"] for s in segments_info],
            id_map=id_map,
        )

    @classmethod
    def empty(cls, image_size: tuple[int, int], *, categories: CategoryTable | None = None) -> Segments:
        return cls(image_size, [], categories=categories, id_map=np.zeros(image_size, dtype=np.int32))

    # ---------------------------------------------------------------- basic access
    def __len__(self) -> int:
        return len(self.category_ids)

    def __repr__(self) -> str:
        kind = "id_map" if self._id_map is not None else "rle"
        return f"Segments(n={len(self)}, image_size={self.image_size}, storage={kind})"

    @property
    def overlapping(self) -> bool:
        return self._rles is not None

    @property
    def id_map(self) -> np.ndarray | None:
        """The segment-id map when the set is stored as one (non-overlapping sets)."""
        return self._id_map

    def mask(self, i: int) -> np.ndarray:
        """Dense ``(H, W) bool`` mask of segment ``i``."""
        if self._id_map is not None:
            return self._id_map == self.segment_ids[i]
        return mask_utils.decode(self._rles[i]).astype(bool)

    def masks(self) -> np.ndarray:
        """Dense ``(N, H, W) bool`` stack. Costs N*H*W bytes: prefer :meth:`mask` or :meth:`rles`."""
        h, w = self.image_size
        if not len(self):
            return np.zeros((0, h, w), dtype=bool)
        if self._id_map is not None:
            return self._id_map[None] == self.segment_ids[:, None, None]
        return np.moveaxis(mask_utils.decode(self._rles), -1, 0).astype(bool)

    def rles(self) -> list[dict]:
        """COCO compressed RLE per segment (``counts`` as bytes)."""
        if self._rles is not None:
            return self._rles
        return _rles_of_index_map(self._index_map(), len(self))

    def index_map(self) -> np.ndarray | None:
        """``(H, W) int32`` segment positions ``1..N`` per pixel (0: void, or an id no segment
        lists) for a non-overlapping set, else None. Computed once and shared: do not modify."""
        return self._index_map() if self._id_map is not None else None

    def _index_map(self) -> np.ndarray:
        """Id map as segment positions ``1..N`` (0 = void or an id no segment lists).

        COCO panoptic ids reach 256^3, so a lookup table indexed by id would be huge;
        ``searchsorted`` over the N sorted ids keeps the cost O(H*W*log N) with no big table.
        """
        assert self._id_map is not None
        cached = getattr(self, "_index_cache", None)  # areas, boxes and segment JSON all need it; 12 MP costs ~1 s
        if cached is not None:
            return cached
        self._index_cache = self._compute_index_map()
        return self._index_cache

    def _compute_index_map(self) -> np.ndarray:
        order = np.argsort(self.segment_ids, kind="stable")
        sorted_ids = self.segment_ids[order]
        if not len(sorted_ids):
            return np.zeros(self.image_size, dtype=np.int32)
        pos = np.searchsorted(sorted_ids, self._id_map).clip(max=len(sorted_ids) - 1)
        hit = sorted_ids[pos] == self._id_map
        return np.where(hit, order[pos] + 1, 0).astype(np.int32)

    def areas(self) -> np.ndarray:
        if self._id_map is not None:
            if getattr(self, "_areas_cache", None) is None:  # JSON, overlay legend and COCO results all ask
                self._areas_cache = np.bincount(self._index_map().ravel(), minlength=len(self) + 1)[1:].astype(np.int64)
            return self._areas_cache.copy()
        return np.asarray(mask_utils.area(self._rles), dtype=np.int64).reshape(-1)

    def boxes(self) -> np.ndarray:
        """``(N, 4) float32`` tight boxes (x1, y1, x2, y2), x2/y2 exclusive; zeros for empty masks."""
        if not len(self):
            return np.zeros((0, 4), dtype=np.float32)
        if self._id_map is not None:
            cached = getattr(self, "_boxes_cache", None)
            if cached is not None:
                return cached.copy()
            # which rows and columns each segment touches, by two scatters over the index map
            # (scipy.ndimage.find_objects did it, but importing it cost a one-image job 0.2-0.4 s)
            index = self._index_map()
            h, w = index.shape
            in_row = np.zeros((len(self) + 1, h), dtype=bool)
            in_row[index, np.arange(h)[:, None]] = True
            in_col = np.zeros((len(self) + 1, w), dtype=bool)
            in_col[index, np.arange(w)[None, :]] = True
            in_row, in_col = in_row[1:], in_col[1:]
            boxes = np.stack([in_col.argmax(1), in_row.argmax(1),
                              w - in_col[:, ::-1].argmax(1), h - in_row[:, ::-1].argmax(1)], axis=1)  # fmt: skip
            return np.where(in_row.any(1)[:, None], boxes, 0).astype(np.float32)
        xywh = np.asarray(mask_utils.toBbox(self.rles()), dtype=np.float32).reshape(-1, 4)
        return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)

    def subset(self, keep: np.ndarray | Sequence[int] | Sequence[bool]) -> Segments:
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        common = dict(
            categories=self.categories,
            scores=self.scores[index],
            iscrowd=self.iscrowd[index],
            segment_ids=self.segment_ids[index],
        )
        if self._id_map is not None:
            kept = np.zeros(int(self._id_map.max(initial=0)) + 1, dtype=bool)
            ids = self.segment_ids[index]
            kept[ids[ids <= len(kept) - 1]] = True
            id_map = np.where(kept[self._id_map], self._id_map, VOID).astype(np.int32)
            return Segments(self.image_size, self.category_ids[index], id_map=id_map, **common)
        return Segments(
            self.image_size, self.category_ids[index], rles=[self._rles[i] for i in index], **common
        )

    def resized(self, image_size: tuple[int, int], *, chunk_pixels: int = 1 << 26) -> Segments:
        """The same segments over an image of ``image_size``, nearest-neighbour (pixel centres
        mapped to pixel centres): the way results computed on a downscaled image are mapped back.

        An id map is indexed once; RLE masks are decoded, resampled and re-encoded a chunk at a
        time (``chunk_pixels`` bytes of dense masks at most), so a 12-MP photo with 100 instances
        never holds them all dense at once.
        """
        h, w = int(image_size[0]), int(image_size[1])
        if (h, w) == self.image_size:
            return self
        rows = np.minimum(((np.arange(h) + 0.5) * self.image_size[0] / h).astype(np.int64), self.image_size[0] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * self.image_size[1] / w).astype(np.int64), self.image_size[1] - 1)
        common = dict(
            categories=self.categories, scores=self.scores, iscrowd=self.iscrowd, segment_ids=self.segment_ids
        )
        if self._id_map is not None:

            def gather(grid: np.ndarray) -> np.ndarray:  # two 1-D takes: 4x faster than grid[rows[:, None], cols]
                return grid.take(cols, axis=1).take(rows, axis=0)

            out = Segments((h, w), self.category_ids, id_map=gather(self._id_map), **common)
            # the index map resamples the same way, and gathering it is ~10x cheaper than
            # recomputing it from the large id map (a searchsorted per pixel)
            small = self._index_map()
            out._index_cache = gather(small)
            # areas carry over exactly: small pixel (r, c) becomes count(r) x count(c) pixels
            weights = np.outer(np.bincount(rows, minlength=small.shape[0]), np.bincount(cols, minlength=small.shape[1]))
            areas = np.bincount(small.ravel(), weights=weights.ravel(), minlength=len(self) + 1)[1:]
            out._areas_cache = np.rint(areas).astype(np.int64)
            if h >= small.shape[0] and w >= small.shape[1]:
                # upscaled, every small pixel is a non-empty block of the large map: a box's edges
                # are the first large row/column of its first and past its last small one
                x1, y1, x2, y2 = self.boxes().T.astype(np.int64)
                big = np.stack([np.searchsorted(cols, x1), np.searchsorted(rows, y1),
                                np.searchsorted(cols, x2), np.searchsorted(rows, y2)], axis=1)  # fmt: skip
                out._boxes_cache = np.where((out._areas_cache > 0)[:, None], big, 0).astype(np.float32)
            return out
        rles: list[dict] = []
        step = max(1, chunk_pixels // max(h * w, 1))
        for start in range(0, len(self), step):
            small = mask_utils.decode(self._rles[start : start + step])  # (h0, w0, k) Fortran order
            large = np.asfortranarray(small[rows[:, None], cols[None, :]])
            rles.extend(mask_utils.encode(large))
        return Segments((h, w), self.category_ids, rles=rles, **common)

    def things(self) -> Segments:
        if self.categories is None:
            return self
        thing = set(self.categories.thing_ids)
        return self.subset(np.array([int(c) in thing for c in self.category_ids], dtype=bool))

    # ---------------------------------------------------------------- the three views
    def to_semantic(self, *, void_value: int = 255, dtype: type | np.dtype = np.int64) -> np.ndarray:
        """``(H, W)`` category-id map (``dtype``, default int64); unlabelled and crowd-free void
        pixels get ``void_value``. A narrower ``dtype`` (uint8 for a label PNG) saves memory on
        large images; ids or a void value it cannot hold raise ``ValueError``.

        Overlapping segments are painted in ascending score order, so the most confident wins.
        """
        h, w = self.image_size
        values = np.concatenate([[void_value], self.category_ids]).astype(np.int64)
        info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
        if info is not None and len(values) and (values.min() < info.min or values.max() > info.max):
            raise ValueError(f"category ids / void value {values.min()}..{values.max()} do not fit {np.dtype(dtype)}")
        if self._id_map is not None:
            return values.astype(dtype)[self._index_map()]
        label = np.full((h, w), void_value, dtype=dtype)
        for i in np.argsort(self.scores, kind="stable"):
            label[self.mask(i)] = self.category_ids[i]
        return label

    def to_instances(self, *, things_only: bool = True, include_crowd: bool = False) -> Instances:
        """Masks, boxes, labels and scores of the (thing) segments, highest score first."""
        keep = np.ones(len(self), dtype=bool)
        if things_only and self.categories is not None:
            thing = set(self.categories.thing_ids)
            keep &= np.array([int(c) in thing for c in self.category_ids], dtype=bool)
        if not include_crowd:
            keep &= ~self.iscrowd
        sub = self.subset(keep)
        order = np.argsort(-sub.scores, kind="stable")
        sub = sub.subset(order)
        return Instances(sub.masks(), sub.boxes(), sub.category_ids.copy(), sub.scores.copy())

    def to_panoptic(self) -> tuple[np.ndarray, list[dict]]:
        """``(id_map int32, segments_info)`` in COCO panoptic form.

        For overlapping sets, pixels go to the highest-scoring segment covering them;
        segments left with no pixels are dropped.
        """
        if self._id_map is not None:
            id_map = self._id_map
            segs = self
        else:
            h, w = self.image_size
            id_map = np.zeros((h, w), dtype=np.int32)
            for i in np.argsort(self.scores, kind="stable"):
                id_map[self.mask(i)] = self.segment_ids[i]
            segs = Segments(
                self.image_size,
                self.category_ids,
                categories=self.categories,
                scores=self.scores,
                iscrowd=self.iscrowd,
                segment_ids=self.segment_ids,
                id_map=id_map,
            )
        areas = segs.areas()
        boxes = segs.boxes()
        info = []
        for i in range(len(segs)):
            if areas[i] == 0:
                continue
            x1, y1, x2, y2 = boxes[i].tolist()
            info.append(
                {
                    "id": int(segs.segment_ids[i]),
                    "category_id": int(segs.category_ids[i]),
                    "iscrowd": int(segs.iscrowd[i]),
                    "area": int(areas[i]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(segs.scores[i]),
                }
            )
        return id_map, info


@dataclass
class Sample:
    """One dataset item: an RGB image and its ground-truth segments."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    segments: Segments
    image_id: int | str = 0
    file_name: str = ""
    ignore_mask: np.ndarray | None = None  # (H, W) bool, pixels to leave out of losses and metrics
    # (N,) bool per segment: labelled by a box only (its mask is the filled box), so mask losses
    # leave it out (Mask^X R-CNN); None = every segment has a real mask
    box_only: np.ndarray | None = None

    @property
    def categories(self) -> CategoryTable | None:
        return self.segments.categories


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colour to segment id: ``R + 256 G + 256^2 B``."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"panoptic PNG must be RGB, got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    id_map = np.asarray(id_map, dtype=np.int64)
    return np.stack([id_map % 256, (id_map // 256) % 256, (id_map // 65536) % 256], axis=-1).astype(np.uint8)
