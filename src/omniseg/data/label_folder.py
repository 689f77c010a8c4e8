"""Label-image folders with a class table and an ignore index (CamVid, Pascal VOC, ADE20K style).

A split is either a list file of ``image label`` pairs (CamVid's ``train.txt``) or two folders
paired by file stem.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from omniseg.io import DataError, list_images, load_image, load_label_png
from omniseg.structures import Category, CategoryTable, Sample, Segments, default_color

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
# The SegNet colour convention, so overlays look like the CamVid papers.
CAMVID_COLORS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
CAMVID_IGNORE = 11


def camvid_categories() -> CategoryTable:
    things = {"car", "pedestrian", "bicyclist"}
    return CategoryTable(
        tuple(Category(i, n, n in things, CAMVID_COLORS[i]) for i, n in enumerate(CAMVID_CLASSES))
    )


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_categories() -> CategoryTable:
    return CategoryTable(
        tuple(Category(i, n, i > 0, default_color(i)) for i, n in enumerate(VOC_CLASSES))
    )


def _list_entry(root: Path, entry: str) -> Path:
    """One path of a list file; see :meth:`LabelFolderDataset.from_list_file`."""
    path = Path(entry)
    if not path.is_absolute():
        return root / path
    if path.is_file():
        return path
    return root / path.parent.name / path.name


class LabelFolderDataset:
    """Image + single-channel label pairs; pixel value = category id, ``ignore_index`` = void."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        *,
        categories: CategoryTable,
        ignore_index: int = 255,
        thing_instances: str = "merged",
    ) -> None:
        if thing_instances not in ("merged", "components"):
            raise DataError(f"thing_instances must be 'merged' or 'components', got {thing_instances!r}")
        self.pairs = [(Path(i), Path(lab)) for i, lab in pairs]
        self.categories = categories
        self.ignore_index = ignore_index
        self.thing_instances = thing_instances
        self._valid = np.zeros(max(max(categories.ids), ignore_index) + 1, dtype=bool)
        self._valid[categories.ids] = True
        self._valid[ignore_index] = True

    @classmethod
    def from_list_file(
        cls, list_file: str | Path, *, root: str | Path | None = None, **kwargs
    ) -> LabelFolderDataset:
        """Pairs from a list file of ``IMAGE LABEL`` lines (blank lines skipped).

        Relative paths are taken as written, relative to ``root`` (default: the list file's
        folder). An absolute path is used as written if the file exists; otherwise it is taken
        to come from another machine, as SegNet's CamVid lists (``/SegNet/CamVid/train/x.png``)
        do, and its last folder and file name are looked up under ``root``
        (``ROOT/train/x.png``).
        """
        list_file = Path(list_file)
        if not list_file.is_file():
            raise DataError(f"{list_file}: split list not found")
        root = Path(root) if root is not None else list_file.parent
        pairs = []
        for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"{list_file}:{lineno}: expected 'IMAGE LABEL', got {line!r}")
            image, label = (_list_entry(root, p) for p in parts)
            pairs.append((image, label))
        return cls(pairs, **kwargs)

    @classmethod
    def from_folders(
        cls, image_dir: str | Path, label_dir: str | Path, *, label_suffix: str = ".png", **kwargs
    ) -> LabelFolderDataset:
        label_dir = Path(label_dir)
        pairs = []
        for image in list_images(image_dir):
            label = label_dir / (image.stem + label_suffix)
            if not label.is_file():
                raise DataError(f"{label}: label file for image {image} not found")
            pairs.append((image, label))
        return cls(pairs, **kwargs)

    def __len__(self) -> int:
        return len(self.pairs)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (H, W, 3) uint8, label (H, W) int64)`` with the label checked against the class table."""
        image_path, label_path = self.pairs[index]
        image = load_image(image_path)
        label = load_label_png(label_path, expected_size=image.shape[:2]).astype(np.int64)
        high = int(label.max(initial=0))
        if high >= len(self._valid) or not self._valid[np.unique(label)].all():
            bad = sorted(set(np.unique(label).tolist()) - set(self.categories.ids) - {self.ignore_index})
            raise DataError(
                f"{label_path}: unknown category id(s) {bad}; known ids {self.categories.ids}, "
                f"ignore index {self.ignore_index}"
            )
        return image, label

    def __getitem__(self, index: int) -> Sample:
        image, label = self.load_pair(index)
        if self.thing_instances == "components":
            segments = components_as_instances(label, self.categories, self.ignore_index)
        else:
            segments = Segments.from_semantic(label, categories=self.categories, ignore_index=self.ignore_index)
        return Sample(image, segments, image_id=index, file_name=self.pairs[index][0].name)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def components_as_instances(label: np.ndarray, categories: CategoryTable, ignore_index: int | None) -> Segments:
    """Panoptic segments from a semantic label map: one segment per stuff category present, one per
    8-connected component of each thing category.

    A label map has no instance identity; connected components are the reproducible stand-in
    (touching objects of one class merge, an occluded object split in two becomes two). It turns
    a semantic set such as CamVid into a panoptic training set.
    """
    from scipy import ndimage

    semantic = Segments.from_semantic(label, categories=categories, ignore_index=ignore_index)
    id_map = semantic.id_map.copy()
    category_ids = list(semantic.category_ids)
    things = set(categories.thing_ids)
    next_id = len(category_ids) + 1
    eight = np.ones((3, 3), dtype=bool)
    for segment_id, cat in zip(list(semantic.segment_ids), list(semantic.category_ids), strict=True):
        if int(cat) not in things:
            continue
        components, count = ndimage.label(id_map == segment_id, structure=eight)
        for k in range(2, count + 1):  # component 1 keeps the original segment id
            id_map[components == k] = next_id
            category_ids.append(int(cat))
            next_id += 1
    segments_info = [{"id": i + 1, "category_id": int(c)} for i, c in enumerate(category_ids)]
    return Segments.from_panoptic(id_map, segments_info, categories=categories)


def camvid(root: str | Path, split: str, *, thing_instances: str = "merged") -> LabelFolderDataset:
    """CamVid (SegNet 11-class version) split ``train``, ``val``, ``test`` or ``trainval``.

    ``thing_instances="components"`` gives car / pedestrian / bicyclist one segment per connected
    component (see :func:`components_as_instances`): the panoptic "CamVid-components" set.
    """
    root = Path(root)
    splits = ["train", "val"] if split == "trainval" else [split]
    pairs: list[tuple[Path, Path]] = []
    for name in splits:
        pairs += LabelFolderDataset.from_list_file(
            root / f"{name}.txt", categories=camvid_categories(), ignore_index=CAMVID_IGNORE
        ).pairs
    return LabelFolderDataset(
        pairs, categories=camvid_categories(), ignore_index=CAMVID_IGNORE, thing_instances=thing_instances
    )
