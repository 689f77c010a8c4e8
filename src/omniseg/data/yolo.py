"""YOLO (Ultralytics) segmentation labels: one ``.txt`` per image, one polygon per line.

Each line is ``class x1 y1 x2 y2 ...`` with coordinates normalised to [0, 1] by the image
width and height. A line with exactly four numbers is a box ``cx cy w h`` (detection labels
mixed into a segmentation set): its segment is the filled rectangle, marked **box-only** in
:attr:`Sample.box_only`, so that models with a mask loss (Mask^X R-CNN) leave its mask out. Masks
are rasterised by pycocotools and kept as compressed RLE.

The images folder drives the listing: an image without a label file is a negative (no
segments); a label file without an image is an *orphan*, listed in :attr:`YoloSegmentation.orphans`
and a :class:`DataError` when asked for by name.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from omniseg.io import DataError, list_images, load_image
from omniseg.structures import CategoryTable, Sample, Segments

COCO80_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# The official COCO category id of each of the 80 classes (COCO skips 11 ids of 1..90),
# for writing COCO-format results from a YOLO-trained model.
COCO80_TO_COCO_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60,
    61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip


def parse_label_file(
    path: str | Path, num_classes: int, *, box_flags: bool = False
) -> list[tuple[int, np.ndarray]] | list[tuple[int, np.ndarray, bool]]:
    """``[(class, (K, 2) float64 normalised polygon), ...]`` from one label file; with
    ``box_flags`` each entry also says whether its line was a box (``class cx cy w h``).

    Malformed lines are a :class:`DataError` naming the file and line; coordinates outside
    [0, 1] are clipped with a warning.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable label file ({exc})") from None
    shapes = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        try:
            cls = int(parts[0])
        except ValueError:
            raise DataError(f"{where}: class must be an integer, got {parts[0]!r}") from None
        if not 0 <= cls < num_classes:
            raise DataError(f"{where}: class {cls} out of range 0..{num_classes - 1}")
        try:
            values = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError as exc:
            raise DataError(f"{where}: coordinates must be numbers ({exc})") from None
        if not np.isfinite(values).all():
            raise DataError(f"{where}: coordinates must be finite")
        is_box = len(values) == 4
        if is_box:
            cx, cy, w, h = values
            values = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2,
                               cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2])  # fmt: skip
        elif len(values) < 6 or len(values) % 2:
            raise DataError(
                f"{where}: expected 'class x1 y1 x2 y2 x3 y3 ...' (an even number of at least 6 "
                f"coordinates) or 'class cx cy w h', got {len(values)} numbers"
            )
        if values.min() < 0.0 or values.max() > 1.0:
            warnings.warn(
                f"{where}: coordinates outside [0, 1] (min {values.min():.4g}, max {values.max():.4g}) clipped",
                stacklevel=2,
            )
            values = np.clip(values, 0.0, 1.0)
        shapes.append((cls, values.reshape(-1, 2), is_box) if box_flags else (cls, values.reshape(-1, 2)))
    return shapes


def polygons_to_segments(
    shapes: Sequence[tuple[int, np.ndarray]], image_size: tuple[int, int], *, categories: CategoryTable
) -> Segments:
    """Rasterise normalised polygons to RLE segments of an image of ``(height, width)``."""
    h, w = image_size
    if not shapes:
        return Segments((h, w), [], categories=categories, rles=[])
    rles = []
    for _, poly in shapes:
        pixels = (poly * np.array([w, h], dtype=np.float64)).ravel().tolist()
        rles.append(mask_utils.frPyObjects([pixels], h, w)[0])
    return Segments((h, w), [cls for cls, _ in shapes], categories=categories, rles=rles)


class YoloSegmentation:
    """An images folder + a labels folder of YOLO polygon files, as a dataset of :class:`Sample`.

    ``labels_dir`` defaults to the YOLO convention: the images path with its last ``images``
    component replaced by ``labels`` (``images/train2017`` -> ``labels/train2017``).
    Category ids are the class indices 0..len(names)-1, all things.
    """

    ignore_index = None  # polygon labels have no ignore label

    def __init__(
        self,
        images_dir: str | Path,
        labels_dir: str | Path | None = None,
        *,
        names: Sequence[str] = COCO80_NAMES,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.labels_dir = Path(labels_dir) if labels_dir is not None else _default_labels_dir(self.images_dir)
        self.categories = CategoryTable.from_names(list(names), isthing=[True] * len(names))
        self.image_files = list_images(self.images_dir)
        if not self.labels_dir.is_dir():
            raise DataError(f"{self.labels_dir}: labels folder not found")
        self._index_of_stem = {p.stem: i for i, p in enumerate(self.image_files)}
        if len(self._index_of_stem) != len(self.image_files):
            raise DataError(f"{self.images_dir}: two images share a file stem; labels could not be paired")
        self.label_files = sorted(self.labels_dir.glob("*.txt"))
        self.orphans: list[Path] = [p for p in self.label_files if p.stem not in self._index_of_stem]
        """Label files with no image: reported, never silently used."""
        self.negatives: list[Path] = [
            p for p in self.image_files if not (self.labels_dir / f"{p.stem}.txt").is_file()
        ]
        """Images with no label file: samples with no segments."""

    def __len__(self) -> int:
        return len(self.image_files)

    def label_path(self, index: int) -> Path:
        return self.labels_dir / f"{self.image_files[index].stem}.txt"

    def index_of(self, name: str) -> int:
        """Index of the image with stem ``name``; orphan labels and unknown names are DataErrors."""
        if name in self._index_of_stem:
            return self._index_of_stem[name]
        orphan = self.labels_dir / f"{name}.txt"
        if orphan.is_file():
            raise DataError(f"{orphan}: label file has no image in {self.images_dir}")
        raise DataError(f"{self.images_dir}: no image named {name!r}")

    def __getitem__(self, index: int | str) -> Sample:
        if isinstance(index, str):
            index = self.index_of(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.images_dir}")
        index %= len(self)
        image_path = self.image_files[index]
        image = load_image(image_path)
        label_path = self.label_path(index)
        shapes = (
            parse_label_file(label_path, len(self.categories), box_flags=True) if label_path.is_file() else []
        )
        segments = polygons_to_segments([s[:2] for s in shapes], image.shape[:2], categories=self.categories)
        box_only = np.array([s[2] for s in shapes], dtype=bool)
        stem = image_path.stem
        return Sample(
            image, segments, image_id=int(stem) if stem.isdigit() else stem, file_name=image_path.name,
            box_only=box_only if box_only.any() else None,
        )  # fmt: skip

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def _default_labels_dir(images_dir: Path) -> Path:
    parts = list(images_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return images_dir.parent / "labels"
