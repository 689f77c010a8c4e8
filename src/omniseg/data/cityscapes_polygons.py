"""Cityscapes panoptic ground truth from its polygons, as exported in YOLO polygon files.

The public Roboflow export of 2,641 Cityscapes train-city frames keeps every original polygon of
a frame, stuff and things, in the original draw order. Reading it as Cityscapes' own
``json2labelImg`` does gives panoptic ground truth:

* polygons are rasterised in file order, each painting over the ones before (PIL's polygon fill,
  as the Cityscapes scripts use), so every pixel gets the last polygon that covers it;
* the label space is the 19 evaluated classes in trainId order with the Cityscapes **labelIds**
  as category ids; each thing polygon is one instance; ``persongroup`` ... ``bicyclegroup`` are
  crowd regions of their base class (one crowd segment per class and frame); ``license plate``
  is not drawn (it has no label); every other class (ego vehicle, static, parking, ...) is void;
* frames are presented at **1280x640** by default: the export stretched the 2048x1024 frames to
  640x640, so the image is resized back to the natural 2:1 (at half resolution) and the
  polygons, which have no resolution, are rasterised at that size;
* splits are by city (the export's own train / valid / test folders are a random split and
  ignored): ``train`` = 15 cities, ``val`` = dusseldorf. The export's two other cities are reserved
  for outside evaluation: the splits are an allow-list, so no split offers them and their files
  are never opened.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from omniseg.data.cityscapes import CITYSCAPES_LABELS, IGNORE_TRAIN_ID
from omniseg.data.yolo import parse_label_file
from omniseg.errors import DataError
from omniseg.io import list_images, load_image
from omniseg.structures import Category, CategoryTable, Sample, Segments

__all__ = [
    "CITY_SPLITS",
    "CityscapesPolygons",
    "cityscapes_panoptic_categories",
    "rasterise_frame",
]

CITY_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "aachen", "bochum", "bremen", "cologne", "darmstadt", "erfurt", "hamburg", "hanover", "jena",
        "krefeld", "monchengladbach", "stuttgart", "tubingen", "ulm", "weimar",
    ),
    "val": ("dusseldorf",),
}  # fmt: skip

CROWD_OF = {f"{base}group": base for base in ("person", "rider", "car", "truck", "bicycle", "motorcycle")}
NOT_DRAWN = {"license plate"}
_FRAME = re.compile(r"^(?P<city>[a-z]+)_(?P<seq>\d{6})_(?P<frame>\d{6})_leftImg8bit")


def cityscapes_panoptic_categories() -> CategoryTable:
    """The 19 evaluated classes in trainId order; ids are labelIds; the 8 instance classes are things."""
    labels = sorted((lab for lab in CITYSCAPES_LABELS if lab.train_id != IGNORE_TRAIN_ID), key=lambda lab: lab.train_id)
    return CategoryTable(tuple(Category(lab.id, lab.name, lab.has_instances, lab.color) for lab in labels))


def _label_of_name(categories: CategoryTable) -> dict[str, int]:
    return {c.name: c.id for c in categories}


def rasterise_frame(
    shapes: Sequence[tuple[int, np.ndarray]],
    names: Sequence[str],
    size: tuple[int, int],
    categories: CategoryTable,
) -> Segments:
    """Panoptic ``Segments`` at ``size`` ``(height, width)`` from one frame's normalised polygons
    ``[(class index into names, (K, 2) xy in [0, 1]), ...]`` in draw order."""
    h, w = size
    category_of = _label_of_name(categories)
    things = set(categories.thing_ids)
    canvas = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    segment_of_key: dict[tuple, int] = {}
    info: list[dict] = []
    scale = np.array([w, h], dtype=np.float64)
    for index, (cls, polygon) in enumerate(shapes):
        name = names[cls]
        if name in NOT_DRAWN:
            continue
        base = CROWD_OF.get(name, name)
        category_id = category_of.get(base)
        value = 0  # void classes paint void over what lies beneath, as in Cityscapes' label images
        if category_id is not None:
            crowd = name in CROWD_OF
            # stuff: one segment per class; things: one per polygon; crowd: one per class
            key = ("crowd" if crowd else "stuff", category_id) if crowd or category_id not in things else ("thing", index)
            if key not in segment_of_key:
                segment_of_key[key] = len(info) + 1
                info.append({"id": len(info) + 1, "category_id": category_id, "iscrowd": int(crowd)})
            value = segment_of_key[key]
        points = [tuple(p) for p in (polygon * scale).tolist()]
        if len(points) >= 2:
            draw.polygon(points, fill=value)
    id_map = np.asarray(canvas, dtype=np.int32)
    present = np.zeros(len(info) + 1, dtype=bool)
    present[np.unique(id_map)] = True
    return Segments.from_panoptic(id_map, [s for s in info if present[s["id"]]], categories=categories)


class CityscapesPolygons:
    """The YOLO-polygon export of Cityscapes frames as panoptic :class:`Sample`\\ s of one city split.

    ``root`` is the export's folder (with ``data.yaml`` and ``train`` / ``valid`` / ``test``, each
    ``images`` + ``labels``); ``split`` is ``train`` or ``val`` (by city, see the module docstring);
    ``size`` the ``(height, width)`` frames are presented at (default 640 x 1280).
    """

    ignore_index = None

    def __init__(self, root: str | Path, split: str = "train", *, size: Sequence[int] = (640, 1280)) -> None:
        self.root = Path(root)
        if split not in CITY_SPLITS:
            raise DataError(
                f"{self.root}: unknown split {split!r}; splits are by city: {', '.join(CITY_SPLITS)} "
                "(the export's other cities are reserved for outside evaluation)"
            )
        self.split = split
        self.size = (int(size[0]), int(size[1]))
        self.names = _read_names(self.root / "data.yaml")
        self.categories = cityscapes_panoptic_categories()
        cities = set(CITY_SPLITS[split])
        folders = [d for d in sorted(self.root.iterdir()) if (d / "images").is_dir()] if self.root.is_dir() else []
        if not folders:
            raise DataError(f"{self.root}: no images folders (expected train/, valid/, test/ with images/ and labels/)")
        frames: dict[str, tuple[Path, Path]] = {}
        for folder in folders:
            for image in list_images(folder / "images"):
                match = _FRAME.match(image.name)
                if match is None:
                    raise DataError(f"{image}: file name does not start with a Cityscapes frame id (city_NNNNNN_NNNNNN)")
                if match["city"] not in cities:  # other splits' cities, reserved ones included, are never opened
                    continue
                frame = match.group(0).removesuffix("_leftImg8bit")
                if frame in frames:
                    raise DataError(f"{image}: frame {frame} appears twice (also {frames[frame][0]})")
                frames[frame] = (image, folder / "labels" / f"{image.stem}.txt")
        if not frames:
            raise DataError(f"{self.root}: no frames of the {split} cities ({', '.join(sorted(cities))})")
        self.frame_ids = sorted(frames)
        self._files = [frames[f] for f in self.frame_ids]
        missing = [str(label) for _, label in self._files if not label.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: label file missing for its image ({len(missing)} frame(s) without labels)")
        self._check_orphans(folders, cities)
        self.empty_frames = [str(label) for _, label in self._files if not label.read_text().strip()]
        """Label files with no polygon: allowed by the format (the frame is all void), counted and warned."""
        if self.empty_frames:
            warnings.warn(
                f"{self.root}: {len(self.empty_frames)} frame(s) of {split} have no polygons and are all void "
                f"(first: {self.empty_frames[0]})",
                stacklevel=2,
            )

    def _check_orphans(self, folders: list[Path], cities: set[str]) -> None:
        images = {image.stem for image, _ in self._files}
        for folder in folders:
            for label in sorted((folder / "labels").glob("*.txt")):
                match = _FRAME.match(label.name)
                if match and match["city"] in cities and label.stem not in images:
                    raise DataError(f"{label}: label file has no image in {folder / 'images'}")

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        image_path, label_path = self._files[index]
        h, w = self.size
        image = load_image(image_path)
        if image.shape[:2] != (h, w):
            image = np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
        shapes = parse_label_file(label_path, len(self.names))
        segments = rasterise_frame(shapes, self.names, (h, w), self.categories)
        frame = self.frame_ids[index % len(self)]
        return Sample(image, segments, image_id=frame, file_name=f"{frame}.jpg")

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def _read_names(path: Path) -> list[str]:
    """The class names of a Roboflow ``data.yaml``."""
    import yaml

    try:
        meta = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (the export's class list)") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: malformed YAML ({exc})") from None
    names = meta.get("names") if isinstance(meta, dict) else None
    if isinstance(names, dict):  # {0: name, 1: name, ...}
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: needs a 'names' list")
    unknown = sorted(set(names) - {lab.name for lab in CITYSCAPES_LABELS} - set(CROWD_OF) - NOT_DRAWN)
    if unknown:
        raise DataError(f"{path}: class names that are not Cityscapes labels: {unknown}")
    return [str(n) for n in names]
