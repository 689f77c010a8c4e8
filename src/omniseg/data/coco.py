"""COCO instances: a reader of annotation JSON files and a writer of results JSON files.

The reader turns every annotation (polygons, uncompressed RLE or compressed RLE) into
COCO compressed RLE with pycocotools, so overlapping instance masks cost a few hundred bytes
each instead of a dense ``(N, H, W)`` stack. ``iscrowd`` is kept on each segment. An annotation
with a ``bbox`` and no ``segmentation`` (a detection label) becomes the filled box, marked
box-only in :attr:`Sample.box_only` so that mask losses leave it out (Mask^X R-CNN).

The writer produces the *results* format that ``pycocotools.cocoeval.COCOeval`` reads:
one dict per predicted mask with ``image_id``, ``category_id``, ``segmentation`` (compressed
RLE, ``counts`` as str), ``score`` and ``bbox`` (x, y, w, h).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from omniseg.io import DataError, atomic_write_json, load_image, load_json
from omniseg.structures import CategoryTable, Sample, Segments


def _require_keys(data: object, keys: Iterable[str], path: Path) -> dict:
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; a COCO file needs {list(keys)}")
    return data


def segmentation_to_rle(segmentation: object, height: int, width: int, *, where: str = "") -> dict:
    """One COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as compressed RLE.

    ``where`` names the file and annotation in error messages.
    """
    if isinstance(segmentation, list):
        # detectron2's rule: a polygon needs an even number of coordinates and at least 3 points;
        # shorter ones come from broken annotation tools and carry no area.
        polygons = [
            [float(v) for v in p]
            for p in segmentation
            if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
        ]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(s) for s in segmentation["size"]]
        if size != [height, width]:
            raise DataError(
                f"{where}: mask size {size[1]}x{size[0]} does not match its image {width}x{height}"
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        if not isinstance(counts, bytes):
            raise DataError(f"{where}: RLE counts must be a list, str or bytes, got {type(counts).__name__}")
        return {"size": size, "counts": counts}
    raise DataError(f"{where}: unsupported segmentation {str(segmentation)[:80]!r}")


class CocoInstances:
    """A COCO instances annotation file (``instances_*.json`` style) as a dataset of :class:`Sample`.

    ``images_dir=None`` reads annotations only: each sample's image is a black array of the
    size the JSON gives (for evaluation and for datasets shipped without photos).
    Images are listed in JSON order; an empty ``annotations`` list is allowed (all negatives),
    a missing ``annotations`` key is an error.
    """

    ignore_index = None  # instance files have no ignore label; unlabelled pixels are background

    def __init__(self, annotation_file: str | Path, images_dir: str | Path | None = None) -> None:
        self.annotation_file = Path(annotation_file)
        self.images_dir = Path(images_dir) if images_dir is not None else None
        if self.images_dir is not None and not self.images_dir.is_dir():
            raise DataError(f"{self.images_dir}: images folder not found")
        data = _require_keys(
            load_json(self.annotation_file), ("images", "annotations", "categories"), self.annotation_file
        )
        path = self.annotation_file
        try:
            self.categories = CategoryTable.from_dicts(data["categories"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: bad 'categories' list ({exc})") from None
        if not isinstance(data["annotations"], list):
            raise DataError(f"{path}: 'annotations' must be a list, got {type(data['annotations']).__name__}")
        self.images: list[dict] = []
        self._index_of_image: dict[int, int] = {}
        for info in data["images"]:
            try:
                image_id, h, w = info["id"], int(info["height"]), int(info["width"])
                str(info["file_name"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"{path}: image entry {str(info)[:80]} lacks id/file_name/height/width ({exc})"
                ) from None
            if image_id in self._index_of_image:
                raise DataError(f"{path}: duplicate image id {image_id}")
            if h <= 0 or w <= 0:
                raise DataError(f"{path}: image {image_id} has size {w}x{h}")
            self._index_of_image[image_id] = len(self.images)
            self.images.append(info)
        self._annotations: list[list[dict]] = [[] for _ in self.images]
        known = set(self.categories.ids)
        for ann in data["annotations"]:
            where = f"{path}: annotation {ann.get('id', '?') if isinstance(ann, dict) else '?'}"
            if (
                not isinstance(ann, dict)
                or not {"image_id", "category_id"} <= ann.keys()
                or not {"segmentation", "bbox"} & ann.keys()
            ):
                raise DataError(f"{where}: needs image_id, category_id and a segmentation (or a bbox)")
            if "segmentation" not in ann:
                box = ann["bbox"]
                if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
                    raise DataError(f"{where}: bbox must be [x, y, width, height], got {str(box)[:80]}")
            if ann["category_id"] not in known:
                raise DataError(
                    f"{where}: unknown category id {ann['category_id']}; known ids {sorted(known)}"
                )
            if ann["image_id"] not in self._index_of_image:
                raise DataError(f"{where}: refers to image id {ann['image_id']}, which is not in 'images'")
            self._annotations[self._index_of_image[ann["image_id"]]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def annotations(self, index: int) -> list[dict]:
        """The raw annotation dicts of image ``index`` (JSON order)."""
        return self._annotations[index]

    def load_segments(self, index: int) -> Segments:
        info = self.images[index]
        h, w = int(info["height"]), int(info["width"])
        anns = self._annotations[index]
        rles = [
            segmentation_to_rle(
                a["segmentation"], h, w, where=f"{self.annotation_file}: annotation {a.get('id', '?')}"
            )
            if "segmentation" in a
            else mask_utils.frPyObjects(np.asarray([a["bbox"]], dtype=np.float64), h, w)[0]
            for a in anns
        ]
        return Segments(
            (h, w),
            [int(a["category_id"]) for a in anns],
            categories=self.categories,
            iscrowd=[bool(a.get("iscrowd", 0)) for a in anns],
            rles=rles,
        )

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.annotation_file}")
        index %= len(self)
        info = self.images[index]
        h, w = int(info["height"]), int(info["width"])
        if self.images_dir is None:
            image = np.zeros((h, w, 3), dtype=np.uint8)
        else:
            image_path = self.images_dir / info["file_name"]
            image = load_image(image_path)
            if image.shape[:2] != (h, w):
                raise DataError(
                    f"{image_path}: image size {image.shape[1]}x{image.shape[0]} does not match "
                    f"{w}x{h} given in {self.annotation_file}"
                )
        box_only = np.array(["segmentation" not in a for a in self._annotations[index]], dtype=bool)
        return Sample(
            image, self.load_segments(index), image_id=info["id"], file_name=str(info["file_name"]),
            box_only=box_only if box_only.any() else None,
        )  # fmt: skip

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


# --------------------------------------------------------------------------- results writer
def segments_to_results(image_id: int | str, segments: Segments) -> list[dict]:
    """COCO results entries for one image's predicted segments (crowd segments are skipped:
    a prediction cannot be a crowd region, and COCOeval treats crowd ground truth as ignore)."""
    if not len(segments):
        return []
    rles = segments.rles()
    keep = [i for i in range(len(segments)) if not segments.iscrowd[i]]
    boxes = mask_utils.toBbox([rles[i] for i in keep]) if keep else np.zeros((0, 4))
    results = []
    for box, i in zip(np.asarray(boxes).reshape(-1, 4), keep, strict=True):
        counts = rles[i]["counts"]
        results.append(
            {
                "image_id": image_id,
                "category_id": int(segments.category_ids[i]),
                "segmentation": {
                    "size": [int(s) for s in rles[i]["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                },
                "score": float(segments.scores[i]),
                "bbox": [float(v) for v in box],
            }
        )
    return results


def write_results(
    path: str | Path,
    predictions: Mapping[int | str, Segments] | Iterable[tuple[int | str, Segments]],
) -> list[dict]:
    """Write a COCO results JSON for ``{image_id: Segments}`` (or ``(image_id, Segments)`` pairs).

    Category ids are written as the Segments hold them (dataset ids, not contiguous indices).
    Returns the list that was written.
    """
    items = predictions.items() if isinstance(predictions, Mapping) else predictions
    results: list[dict] = []
    for image_id, segments in items:
        results += segments_to_results(image_id, segments)
    atomic_write_json(path, results, indent=None)
    return results
