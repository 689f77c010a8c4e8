"""Dataset readers and writers, one module per file format, and :func:`open_dataset`.

Every dataset object has ``__len__``, ``__getitem__(int) -> Sample``, ``.categories``
(:class:`~omniseg.structures.CategoryTable`) and ``.ignore_index`` (the label value to leave
out of losses and metrics, or ``None`` where the files have no such value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omniseg.data.ade20k import ade20k, ade20k_categories
from omniseg.data.cityscapes import (
    CITYSCAPES_LABELS,
    Cityscapes,
    cityscapes_categories,
    cityscapes_segments,
    label_to_train_ids,
    train_to_label_ids,
    write_instance_results,
    write_semantic_result,
)
from omniseg.data.coco import CocoInstances, segments_to_results, write_results
from omniseg.data.coco_panoptic import CocoPanoptic, CocoPanopticWriter, write_panoptic_png
from omniseg.data.images import DataError, list_images, load_image, load_json, load_label_map, load_rgb_png
from omniseg.data.label_folder import LabelFolderDataset, camvid, camvid_categories, voc_categories
from omniseg.data.yolo import COCO80_NAMES, YoloSegmentation
from omniseg.structures import CategoryTable

__all__ = [
    "CITYSCAPES_LABELS", "COCO80_NAMES", "Cityscapes", "CocoInstances", "CocoPanoptic", "CocoPanopticWriter",
    "DataError", "DatasetSlice", "FORMATS", "LabelFolderDataset", "YoloSegmentation", "ade20k", "ade20k_categories", "camvid",
    "camvid_categories", "cityscapes_categories", "cityscapes_segments", "label_to_train_ids", "list_images",
    "load_image", "load_json", "load_label_map", "load_rgb_png", "open_dataset", "segments_to_results",
    "train_to_label_ids", "voc_categories", "write_instance_results", "write_panoptic_png", "write_results",
    "write_semantic_result",
]  # fmt: skip

# format -> (required keys, optional keys); paths may be relative to the working directory.
# coco, coco_panoptic and yolo accept "root" [+ "split"] instead of explicit paths: the CLI's
# FORMAT:ROOT[:SPLIT] form, resolved by each format's usual layout (see _resolve_root).
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "camvid": (("root",), ("split", "thing_instances")),
    "label_folder": (
        (),
        ("images", "labels", "list_file", "root", "classes", "categories", "ignore_index", "label_suffix",
         "thing_instances"),
    ),
    "coco": (("annotations",), ("images", "root", "split")),
    "coco_panoptic": (("annotations",), ("panoptic", "images", "categories", "root", "split")),
    "cityscapes": (("root",), ("split", "label_space", "load_images")),
    "ade20k": (("root",), ("split", "images", "annotations", "categories")),
    "yolo": (("images",), ("labels", "names", "root", "split")),
}
ROOT_LAYOUTS = {
    "coco": "ROOT/annotations/instances_SPLIT.json + ROOT/SPLIT/ (COCO), ROOT/SPLIT.json + ROOT/, "
    "or ROOT/annotations.json + ROOT/images/ (else ROOT/) without SPLIT",
    "coco_panoptic": "ROOT/annotations/panoptic_SPLIT.json + ROOT/annotations/panoptic_SPLIT/ + ROOT/SPLIT/ "
    "(COCO), or ROOT/SPLIT.json + ROOT/SPLIT/ PNGs (+ ROOT/images or ROOT/input_images if present)",
    "yolo": "ROOT/images/SPLIT + ROOT/labels/SPLIT (without SPLIT: ROOT/images, or its only subfolder)",
}


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _resolve_root(fmt: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Explicit paths for a ``root`` [+ ``split``] spec of coco, coco_panoptic or yolo."""
    root = Path(spec["root"]).expanduser()
    split = spec.get("split")
    out = {k: v for k, v in spec.items() if k not in ("root", "split")}
    if fmt == "yolo":
        images = root / "images" / split if split else root / "images"
        if not split and images.is_dir() and not _images_in(images):
            subfolders = [p for p in images.iterdir() if p.is_dir()]
            if len(subfolders) == 1:
                images = subfolders[0]
        out.setdefault("images", images)
        out.setdefault(
            "labels", root / "labels" / images.name if images.parent.name == "images" else root / "labels"
        )
        return out
    if fmt == "coco":
        if split:
            candidates = [
                (root / "annotations" / f"instances_{split}.json", root / split),
                (root / f"{split}.json", root),
            ]
        else:
            candidates = [(root / "annotations.json", _first_dir(root / "images") or root)]
        for annotations, images in candidates:
            if annotations.is_file():
                out.setdefault("annotations", annotations)
                out.setdefault("images", images if images.is_dir() else None)
                return out
    if fmt == "coco_panoptic":
        if split:
            official = root / "annotations" / f"panoptic_{split}.json"
            if official.is_file():
                out.setdefault("annotations", official)
                out.setdefault("images", _first_dir(root / split))
                return out
            if (root / f"{split}.json").is_file():
                out.setdefault("annotations", root / f"{split}.json")
                out.setdefault("images", _first_dir(root / "images", root / "input_images"))
                return out
    raise DataError(f"{root}: no {fmt} data found for split {split!r}; expected {ROOT_LAYOUTS[fmt]}")


class DatasetSlice:
    """A contiguous slice ``START:STOP`` of a dataset, with the dataset's categories and ignore index."""

    def __init__(self, dataset: Any, subset: str | list[int] | tuple[int, int]) -> None:
        if isinstance(subset, str):
            parts = subset.split(":")
            try:
                if len(parts) != 2:
                    raise ValueError
                bounds = [int(p) if p.strip() else None for p in parts]
            except ValueError:
                raise DataError(f"subset {subset!r}: expected START:STOP, e.g. '0:100' or '100:'") from None
        elif isinstance(subset, list | tuple) and len(subset) == 2:
            bounds = list(subset)
        else:
            raise DataError(f"subset {subset!r}: expected 'START:STOP' or [START, STOP]")
        self.indices = range(len(dataset))[slice(*bounds)]
        if not len(self.indices):
            raise DataError(f"subset {subset!r} of a dataset of {len(dataset)} items is empty")
        self.dataset = dataset
        self.categories = dataset.categories
        self.ignore_index = getattr(dataset, "ignore_index", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def load_pair(self, index: int):
        return self.dataset.load_pair(self.indices[index])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _images_in(folder: Path) -> list[Path]:
    return list_images(folder) if folder.is_dir() else []


def _label_folder_categories(spec: dict) -> CategoryTable:
    if "categories" in spec:
        cats = spec["categories"]
        if cats == "voc":
            return voc_categories()
        if cats == "camvid":
            return camvid_categories()
        return CategoryTable.from_dicts(cats)
    if "classes" in spec:
        return CategoryTable.from_names(list(spec["classes"]))
    raise DataError("label_folder spec needs 'classes' (a list of names, ids 0..n-1) or 'categories'")


def open_dataset(spec: dict[str, Any]) -> Any:
    """A dataset from a spec such as ``{"format": "coco", "annotations": "a.json", "images": "img/"}``.

    Keys per format (required first, then optional):

    * ``camvid``: root; split (train | val | test | trainval, default train); thing_instances
      (merged | components: one segment per connected component of car, pedestrian, bicyclist)
    * ``label_folder``: images + labels folders, or list_file (+ root); classes (names) or
      categories (COCO-style dicts, or "voc" / "camvid"); ignore_index (255); label_suffix (.png);
      thing_instances (merged | components, as for camvid)
    * ``coco``: annotations (JSON); images (folder; absent = annotations only, black images)
    * ``coco_panoptic``: annotations (JSON); panoptic (PNG folder, default: JSON path without
      suffix); images (folder; absent = black images); categories (JSON replacing the file's own)
    * ``cityscapes``: root; split (val); label_space (train | label); load_images (true)
    * ``ade20k``: root; split (validation); images, annotations (folders); categories (CSV)
    * ``yolo``: images (folder); labels (folder, default: images path with images -> labels);
      names (class names, default COCO-80)

    coco, coco_panoptic and yolo also take ``root`` [+ ``split``] instead of explicit paths,
    resolved by the usual layouts in :data:`ROOT_LAYOUTS` (the CLI's ``FORMAT:ROOT[:SPLIT]``).
    Every format takes ``subset``: ``"START:STOP"`` (a slice of the dataset's own order, which is
    sorted by file name) -- e.g. ``"0:100"`` and ``"100:"`` split one folder into train and val.
    """
    if not isinstance(spec, dict) or "format" not in spec:
        raise DataError(
            f"a dataset spec is a dict with a 'format' key, one of {sorted(FORMATS)}; got {spec!r}"
        )
    fmt = spec["format"]
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; expected one of {sorted(FORMATS)}")
    required, optional = FORMATS[fmt]
    if fmt in ROOT_LAYOUTS and "root" in spec:
        spec = _resolve_root(fmt, spec)
    if "subset" in spec:
        subset = spec["subset"]
        return DatasetSlice(open_dataset({k: v for k, v in spec.items() if k != "subset"}), subset)
    missing = [k for k in required if k not in spec]
    unknown = sorted(set(spec) - set(required) - set(optional) - {"format"})
    if missing or unknown:
        raise DataError(
            f"dataset spec for {fmt!r}: missing {missing}, unknown {unknown}; "
            f"required {list(required)}"
            + (" (or root [+ split])" if fmt in ROOT_LAYOUTS else "")
            + f", optional {list(optional)}"
        )
    get = spec.get

    def path(key: str) -> Path | None:
        return Path(spec[key]).expanduser() if spec.get(key) is not None else None

    if fmt == "camvid":
        return camvid(path("root"), get("split", "train"), thing_instances=get("thing_instances", "merged"))
    if fmt == "label_folder":
        kwargs = dict(
            categories=_label_folder_categories(spec), ignore_index=int(get("ignore_index", 255)),
            thing_instances=get("thing_instances", "merged"),
        )  # fmt: skip
        if "list_file" in spec:
            return LabelFolderDataset.from_list_file(path("list_file"), root=path("root"), **kwargs)
        if "images" not in spec or "labels" not in spec:
            raise DataError("label_folder spec needs 'images' and 'labels' folders, or a 'list_file'")
        return LabelFolderDataset.from_folders(
            path("images"), path("labels"), label_suffix=get("label_suffix", ".png"), **kwargs
        )
    if fmt == "coco":
        return CocoInstances(path("annotations"), path("images"))
    if fmt == "coco_panoptic":
        return CocoPanoptic(
            path("annotations"), path("panoptic"), path("images"), categories_file=path("categories")
        )
    if fmt == "cityscapes":
        return Cityscapes(
            path("root"), get("split", "val"), label_space=get("label_space", "train"),
            images=bool(get("load_images", True)),
        )  # fmt: skip
    if fmt == "ade20k":
        return ade20k(
            path("root"), get("split", "validation"), images_dir=path("images"),
            annotations_dir=path("annotations"), categories_csv=path("categories"),
        )  # fmt: skip
    assert fmt == "yolo"
    return YoloSegmentation(path("images"), path("labels"), names=get("names", COCO80_NAMES))
