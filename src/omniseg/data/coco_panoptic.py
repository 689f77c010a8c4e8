"""COCO panoptic: a reader of PNG + JSON annotations and a writer of the same format.

Each image has one RGB PNG whose colour encodes the segment id (``R + 256 G + 256^2 B``,
0 = void) and one JSON ``annotations`` entry whose ``segments_info`` gives each id's
category and crowd flag. Ground truth and predictions use the same format, so the reader
reads both and the writer writes both.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from omniseg.io import DataError, atomic_path, atomic_write_json, load_image, load_json, load_panoptic_png
from omniseg.structures import VOID, CategoryTable, Sample, Segments, id_to_rgb

MAX_SEGMENT_ID = 256**3 - 1  # the largest id an RGB PNG can hold


def _load_categories(data: object, path: Path) -> CategoryTable:
    items = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise DataError(f"{path}: no 'categories' list")
    try:
        return CategoryTable.from_dicts(items)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: bad 'categories' list ({exc})") from None


class CocoPanoptic:
    """A COCO panoptic dataset: ``annotation_file`` (JSON) + ``panoptic_dir`` (PNGs) [+ ``images_dir``].

    * ``panoptic_dir`` defaults to the JSON path without its suffix (``panoptic_val2017.json``
      -> ``panoptic_val2017/``), the COCO convention.
    * ``images_dir=None`` reads annotations only: the image is black, of the PNG's size
      (ground truth or predictions shipped without photos).
    * ``categories_file`` (e.g. ``panoptic_coco_categories.json``) replaces the JSON's own
      ``categories``; one of the two must exist.

    Samples follow the order of ``annotations``. Segments with id 0 in ``segments_info`` are
    dropped with a warning: id 0 is void in the PNG, as in the official evaluation.
    """

    ignore_index = None  # void is segment id 0 in the PNG, not a label value

    def __init__(
        self,
        annotation_file: str | Path,
        panoptic_dir: str | Path | None = None,
        images_dir: str | Path | None = None,
        *,
        categories_file: str | Path | None = None,
    ) -> None:
        self.annotation_file = path = Path(annotation_file)
        self.panoptic_dir = Path(panoptic_dir) if panoptic_dir is not None else path.with_suffix("")
        self.images_dir = Path(images_dir) if images_dir is not None else None
        data = load_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
        if "annotations" not in data:
            raise DataError(f"{path}: missing key 'annotations'; a COCO panoptic file needs a list of them")
        if categories_file is not None:
            self.categories = _load_categories(load_json(categories_file), Path(categories_file))
        else:
            self.categories = _load_categories(data, path)
        if not self.panoptic_dir.is_dir():
            raise DataError(f"{self.panoptic_dir}: panoptic PNG folder for {path} not found")
        if self.images_dir is not None and not self.images_dir.is_dir():
            raise DataError(f"{self.images_dir}: images folder not found")
        self.images: dict[object, dict] = {}
        for info in data.get("images", []):
            if not isinstance(info, dict) or "id" not in info:
                raise DataError(f"{path}: image entry {str(info)[:80]} has no id")
            self.images[info["id"]] = info
        if not isinstance(data["annotations"], list):
            raise DataError(f"{path}: 'annotations' must be a list")
        self.annotations: list[dict] = []
        known = set(self.categories.ids)
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or not {"image_id", "file_name", "segments_info"} <= ann.keys():
                raise DataError(
                    f"{path}: annotation {str(ann)[:80]} needs image_id, file_name, segments_info"
                )
            where = f"{path}: image {ann['image_id']}"
            seen: set[int] = set()
            for s in ann["segments_info"]:
                if s.get("category_id") not in known:
                    raise DataError(
                        f"{where}: segment {s.get('id')} has unknown category id {s.get('category_id')}"
                    )
                if s.get("id") in seen:
                    raise DataError(f"{where}: duplicate segment id {s.get('id')}")
                seen.add(s.get("id"))
            self.annotations.append(ann)

    def __len__(self) -> int:
        return len(self.annotations)

    def load_segments(self, index: int) -> Segments:
        ann = self.annotations[index]
        png = self.panoptic_dir / ann["file_name"]
        info = self.images.get(ann["image_id"])
        size = (
            (int(info["height"]), int(info["width"]))
            if info and "height" in info and "width" in info
            else None
        )
        id_map = load_panoptic_png(png, expected_size=size)
        segments_info = []
        for s in ann["segments_info"]:
            if int(s["id"]) == VOID:
                warnings.warn(
                    f"{png}: segment id 0 is void in a panoptic PNG; dropping its entry", stacklevel=2
                )
                continue
            segments_info.append(s)
        listed = np.array(sorted(int(s["id"]) for s in segments_info), dtype=np.int64)
        present = np.unique(id_map)
        missing = np.setdiff1d(present[present != VOID], listed)
        if len(missing):
            raise DataError(
                f"{png}: segment id(s) {missing[:10].tolist()} are in the PNG but not in the "
                f"segments_info of {self.annotation_file}"
            )
        return Segments.from_panoptic(id_map, segments_info, categories=self.categories)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.annotation_file}")
        index %= len(self)
        ann = self.annotations[index]
        segments = self.load_segments(index)
        info = self.images.get(ann["image_id"], {})
        file_name = str(info.get("file_name", Path(ann["file_name"]).with_suffix(".jpg").name))
        if self.images_dir is None:
            image = np.zeros((*segments.image_size, 3), dtype=np.uint8)
        else:
            image_path = self.images_dir / file_name
            image = load_image(image_path)
            if image.shape[:2] != segments.image_size:
                h, w = segments.image_size
                raise DataError(
                    f"{image_path}: image size {image.shape[1]}x{image.shape[0]} does not match its "
                    f"panoptic PNG {self.panoptic_dir / ann['file_name']} ({w}x{h})"
                )
        return Sample(image, segments, image_id=ann["image_id"], file_name=file_name)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


# --------------------------------------------------------------------------- writer
def panoptic_id_map_and_info(segments: Segments) -> tuple[np.ndarray, list[dict]]:
    """``(id_map int32, segments_info)`` with integer ``area`` and ``bbox`` (x, y, w, h).

    Overlapping sets are flattened first (the highest score wins a pixel). Segments left
    without pixels are not listed, as in COCO. Areas and boxes come from one ``bincount`` and
    one ``find_objects`` over the map, not one full-image mask per segment.
    """
    from scipy import ndimage  # imported here: scipy costs import time that readers never need

    id_map = segments.id_map if segments.id_map is not None else segments.to_panoptic()[0]
    n = len(segments)
    if n and int(segments.segment_ids.max()) > MAX_SEGMENT_ID:
        raise ValueError(f"segment ids above {MAX_SEGMENT_ID} cannot be stored in an RGB PNG")
    order = np.argsort(segments.segment_ids, kind="stable")
    sorted_ids = segments.segment_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, id_map), max(n - 1, 0))
    rows = np.where(sorted_ids[pos] == id_map, order[pos] + 1, 0) if n else np.zeros_like(id_map)
    areas = np.bincount(rows.ravel(), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(rows, max_label=n) if n else []
    # ids in the map that no segment claims would become unlisted segments in the PNG
    id_map = np.where(rows > 0, id_map, VOID).astype(np.int32)
    info = []
    for i in range(n):
        if areas[i] == 0 or boxes[i] is None:
            continue
        ys, xs = boxes[i]
        info.append(
            {
                "id": int(segments.segment_ids[i]),
                "category_id": int(segments.category_ids[i]),
                "iscrowd": int(segments.iscrowd[i]),
                "area": int(areas[i]),
                "bbox": [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start],
            }
        )
    return id_map, info


def write_panoptic_png(segments: Segments, path: str | Path) -> list[dict]:
    """Write ``segments`` as a COCO panoptic PNG (atomically); returns its ``segments_info``."""
    id_map, info = panoptic_id_map_and_info(segments)
    with atomic_path(path) as tmp:
        Image.fromarray(id_to_rgb(id_map)).save(tmp, format="PNG")
    return info


class CocoPanopticWriter:
    """Write a COCO panoptic dataset (ground truth or predictions) one image at a time.

    ``add`` writes the PNG at once; ``close`` (or leaving the ``with`` block) writes the JSON
    with ``images``, ``annotations`` and ``categories``. Every file is written to a temporary
    name and moved into place, so an interrupted run never truncates a file written before.
    """

    def __init__(
        self, annotation_file: str | Path, categories: CategoryTable, panoptic_dir: str | Path | None = None
    ):
        self.annotation_file = Path(annotation_file)
        self.panoptic_dir = (
            Path(panoptic_dir) if panoptic_dir is not None else self.annotation_file.with_suffix("")
        )
        self.categories = categories
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, image_id: int | str, segments: Segments, *, file_name: str | None = None) -> dict:
        """Write the PNG for one image; ``file_name`` is the photo's name (its stem names the PNG)."""
        file_name = file_name or f"{image_id}.jpg"
        png_name = Path(file_name).with_suffix(".png").name
        info = write_panoptic_png(segments, self.panoptic_dir / png_name)
        h, w = segments.image_size
        self.images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        entry = {"image_id": image_id, "file_name": png_name, "segments_info": info}
        self.annotations.append(entry)
        return entry

    def close(self) -> Path:
        data = {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [
                {"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color)}
                for c in self.categories
            ],
        }
        return atomic_write_json(self.annotation_file, data, indent=None)

    def __enter__(self) -> CocoPanopticWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # a failed run keeps its PNGs but does not publish a JSON that would claim to be complete
        if exc_type is None:
            self.close()
