"""The dataset formats, each declared once, and :func:`open_dataset`.

Every format is one :class:`DatasetFormat` in :data:`DATASET_FORMATS`: its name, a one-line
description, the spec keys it takes, how it is opened and what ``FORMAT:ROOT[:SPLIT]`` means
for it. :data:`FORMATS` (the keys per format), :data:`ROOT_LAYOUTS` and the help text of the
command line's dataset arguments (:func:`formats_help`) are derived from these declarations.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omniseg.data.ade20k import ade20k
from omniseg.data.cityscapes import Cityscapes
from omniseg.data.cityscapes_polygons import CityscapesPolygons
from omniseg.data.coco import CocoInstances
from omniseg.data.coco_panoptic import CocoPanoptic
from omniseg.data.label_folder import LabelFolderDataset, camvid, camvid_categories, voc_categories
from omniseg.data.yolo import COCO80_NAMES, YoloSegmentation
from omniseg.io import DataError, list_images
from omniseg.structures import CategoryTable

__all__ = [
    "DATASET_FORMATS", "FORMATS", "ROOT_LAYOUTS", "DatasetFormat", "DatasetSlice", "formats_help", "open_dataset",
]  # fmt: skip


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset format.

    * ``open(spec)`` builds the dataset from a spec whose keys are checked against ``required``
      and ``optional`` (``format`` and ``subset`` removed, ``root`` resolved if the format has
      a ``resolve_root``);
    * ``root_layout`` says what ``FORMAT:ROOT[:SPLIT]`` reads (``None``: the format cannot be
      opened from a root alone, only from explicit paths); ``split_required`` for
      ``FORMAT:ROOT:SPLIT``;
    * ``resolve_root(root, split, spec)`` turns ``root`` [+ ``split``] into explicit paths, for
      formats whose reader takes paths; formats whose reader takes the root itself have none.
    """

    name: str
    description: str
    open: Callable[[dict[str, Any]], Any]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    root_layout: str | None = None
    split_required: bool = False
    resolve_root: Callable[[Path, str | None, dict[str, Any]], dict[str, Any] | None] | None = None
    example: str | None = None  # a FORMAT:ROOT[:SPLIT] for the help text
    keys_help: str = ""  # what the keys mean, for open_dataset's documentation


def _path(spec: dict[str, Any], key: str) -> Path | None:
    return Path(spec[key]).expanduser() if spec.get(key) is not None else None


# ----------------------------------------------------------------------------- openers
def _open_camvid(spec: dict[str, Any]) -> LabelFolderDataset:
    return camvid(
        _path(spec, "root"), spec.get("split", "train"), thing_instances=spec.get("thing_instances", "merged")
    )


def _label_folder_categories(spec: dict[str, Any]) -> CategoryTable:
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


def _open_label_folder(spec: dict[str, Any]) -> LabelFolderDataset:
    kwargs = dict(
        categories=_label_folder_categories(spec), ignore_index=int(spec.get("ignore_index", 255)),
        thing_instances=spec.get("thing_instances", "merged"),
    )  # fmt: skip
    if "list_file" in spec:
        return LabelFolderDataset.from_list_file(_path(spec, "list_file"), root=_path(spec, "root"), **kwargs)
    if "images" not in spec or "labels" not in spec:
        raise DataError("label_folder spec needs 'images' and 'labels' folders, or a 'list_file'")
    return LabelFolderDataset.from_folders(
        _path(spec, "images"), _path(spec, "labels"), label_suffix=spec.get("label_suffix", ".png"), **kwargs
    )


def _open_coco(spec: dict[str, Any]) -> CocoInstances:
    return CocoInstances(_path(spec, "annotations"), _path(spec, "images"))


def _open_coco_panoptic(spec: dict[str, Any]) -> CocoPanoptic:
    return CocoPanoptic(
        _path(spec, "annotations"), _path(spec, "panoptic"), _path(spec, "images"),
        categories_file=_path(spec, "categories"),
    )  # fmt: skip


def _open_cityscapes(spec: dict[str, Any]) -> Cityscapes:
    return Cityscapes(
        _path(spec, "root"), spec.get("split", "val"), label_space=spec.get("label_space", "train"),
        images=bool(spec.get("load_images", True)),
    )  # fmt: skip


def _open_cityscapes_polygons(spec: dict[str, Any]) -> CityscapesPolygons:
    size = spec.get("size", (640, 1280))
    if isinstance(size, str):  # from --data ...:size=512x1024
        size = tuple(int(v) for v in size.lower().split("x"))
    return CityscapesPolygons(_path(spec, "root"), spec.get("split", "train"), size=size)


def _open_ade20k(spec: dict[str, Any]) -> LabelFolderDataset:
    return ade20k(
        _path(spec, "root"), spec.get("split", "validation"), images_dir=_path(spec, "images"),
        annotations_dir=_path(spec, "annotations"), categories_csv=_path(spec, "categories"),
    )  # fmt: skip


def _open_yolo(spec: dict[str, Any]) -> YoloSegmentation:
    return YoloSegmentation(_path(spec, "images"), _path(spec, "labels"), names=spec.get("names", COCO80_NAMES))


# ----------------------------------------------------------------------------- root layouts
def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _coco_root(root: Path, split: str | None, out: dict[str, Any]) -> dict[str, Any] | None:
    if split:
        candidates = [(root / "annotations" / f"instances_{split}.json", root / split), (root / f"{split}.json", root)]
    else:
        candidates = [(root / "annotations.json", _first_dir(root / "images") or root)]
    for annotations_file, images in candidates:
        if annotations_file.is_file():
            out.setdefault("annotations", annotations_file)
            out.setdefault("images", images if images.is_dir() else None)
            return out
    return None


def _coco_panoptic_root(root: Path, split: str | None, out: dict[str, Any]) -> dict[str, Any] | None:
    if not split:
        return None
    official = root / "annotations" / f"panoptic_{split}.json"
    if official.is_file():
        out.setdefault("annotations", official)
        out.setdefault("images", _first_dir(root / split))
        return out
    if (root / f"{split}.json").is_file():
        out.setdefault("annotations", root / f"{split}.json")
        out.setdefault("images", _first_dir(root / "images", root / "input_images"))
        return out
    return None


def _yolo_root(root: Path, split: str | None, out: dict[str, Any]) -> dict[str, Any]:
    images = root / "images" / split if split else root / "images"
    if not split and images.is_dir() and not list_images(images):
        subfolders = [p for p in images.iterdir() if p.is_dir()]
        if len(subfolders) == 1:
            images = subfolders[0]
    out.setdefault("images", images)
    out.setdefault("labels", root / "labels" / images.name if images.parent.name == "images" else root / "labels")
    return out


# ----------------------------------------------------------------------------- the registry
DATASET_FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        DatasetFormat(
            "camvid", "CamVid, SegNet's 11 classes (thing_instances=components: panoptic)",
            _open_camvid, ("root",), ("split", "thing_instances"),
            root_layout="ROOT/SPLIT.txt lists image/label pairs; SPLIT train|val|test|trainval (default train)",
            example="camvid:../shared/data/camvid:val",
            keys_help="root; split (train | val | test | trainval, default train); thing_instances (merged | "
            "components: one segment per connected component of car, pedestrian, bicyclist)",
        ),
        DatasetFormat(
            "label_folder", "image + single-channel label PNG folders paired by file stem, or a list file "
            "of IMAGE LABEL lines; classes or categories (COCO-style dicts, or 'voc' / 'camvid')",
            _open_label_folder, (),
            ("images", "labels", "list_file", "root", "classes", "categories", "ignore_index", "label_suffix",
             "thing_instances"),
            keys_help="images + labels folders, or list_file (+ root, default: the list file's folder); "
            "classes (names) or categories (COCO-style dicts, or 'voc' / 'camvid'); ignore_index (255); "
            "label_suffix (.png); thing_instances (merged | components, as for camvid)",
        ),
        DatasetFormat(
            "coco", "COCO instances JSON (polygons or RLE) + photos (none: black images)",
            _open_coco, ("annotations",), ("images", "root", "split"),
            root_layout="ROOT/annotations/instances_SPLIT.json + ROOT/SPLIT/ (COCO), ROOT/SPLIT.json + ROOT/, "
            "or ROOT/annotations.json + ROOT/images/ (else ROOT/) without SPLIT",
            resolve_root=_coco_root,
            keys_help="annotations (JSON); images (folder; absent = annotations only, black images)",
        ),
        DatasetFormat(
            "coco_panoptic", "COCO panoptic JSON + id PNGs + photos (none: black images)",
            _open_coco_panoptic, ("annotations",), ("panoptic", "images", "categories", "root", "split"),
            root_layout="ROOT/annotations/panoptic_SPLIT.json + ROOT/annotations/panoptic_SPLIT/ PNGs + "
            "ROOT/SPLIT/ photos (COCO), or ROOT/SPLIT.json + ROOT/SPLIT/ PNGs (+ ROOT/images or "
            "ROOT/input_images photos if present)",
            split_required=True, resolve_root=_coco_panoptic_root,
            example="coco_panoptic:../shared/data/coco_panoptic_sample:panoptic_examples",
            keys_help="annotations (JSON); panoptic (PNG folder, default: JSON path without suffix); images "
            "(folder; absent = black images); categories (JSON replacing the file's own)",
        ),
        DatasetFormat(
            "cityscapes", "Cityscapes fine: 19 train classes (label_space=label: 34 labelIds)",
            _open_cityscapes, ("root",), ("split", "label_space", "load_images"),
            root_layout="ROOT/leftImg8bit/SPLIT + ROOT/gtFine/SPLIT; SPLIT train|val (default val)",
            keys_help="root; split (val); label_space (train | label); load_images (true)",
        ),
        DatasetFormat(
            "cityscapes_polygons", "Cityscapes panoptic from the YOLO polygon export: 19 classes (labelIds), "
            "8 thing classes, groups as crowd, frames at 1280x640",
            _open_cityscapes_polygons, ("root",), ("split", "size"),
            root_layout="ROOT/data.yaml + ROOT/{train,valid,test}/{images,labels}; SPLIT by city: train (15 "
            "cities) | val (dusseldorf); the other cities are reserved and never read",
            keys_help="root; split (train | val, by city); size (HEIGHTxWIDTH, default 640x1280)",
        ),
        DatasetFormat(
            "ade20k", "ADE20K SceneParsing, 150 classes (0 = other, ignored)",
            _open_ade20k, ("root",), ("split", "images", "annotations", "categories"),
            root_layout="ROOT/objectInfo150.csv + ROOT/images/SPLIT + ROOT/annotations/SPLIT (SPLIT "
            "training|validation, default validation), or ROOT/sampleData/{images,annotations}",
            keys_help="root; split (validation); images, annotations (folders); categories (CSV)",
        ),
        DatasetFormat(
            "yolo", "YOLO polygon .txt labels + images (names default: COCO-80)",
            _open_yolo, ("images",), ("labels", "names", "root", "split"),
            root_layout="ROOT/images/SPLIT + ROOT/labels/SPLIT (without SPLIT: ROOT/images, or its only subfolder)",
            resolve_root=_yolo_root, example="yolo:../shared/data/coco128_seg:train2017",
            keys_help="images (folder); labels (folder, default: images path with images -> labels); names "
            "(class names, default COCO-80)",
        ),
    )
}  # fmt: skip

# format -> (required keys, optional keys)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    name: (f.required, f.optional) for name, f in DATASET_FORMATS.items()
}
# format -> what FORMAT:ROOT[:SPLIT] reads, for the formats that can be opened from a root
ROOT_LAYOUTS: dict[str, str] = {name: f.root_layout for name, f in DATASET_FORMATS.items() if f.root_layout}


def formats_help(width: int = 100) -> str:
    """The help text of the command line's ``FORMAT:ROOT[:SPLIT]`` dataset arguments."""
    column = 30
    lines = ["FORMAT:ROOT[:SPLIT], one of"]
    for f in DATASET_FORMATS.values():
        if not f.root_layout:
            continue
        head = f"  {f.name}:{'ROOT:SPLIT' if f.split_required else 'ROOT[:SPLIT]'}"
        body = textwrap.wrap(f.description, width - column) + textwrap.wrap(f.root_layout, width - column)
        if len(head) < column:
            lines.append(head.ljust(column) + body.pop(0))
        else:
            lines.append(head)
        lines += [" " * column + text for text in body]
    examples = [f.example for f in DATASET_FORMATS.values() if f.example]
    if examples:
        lines += ["e.g. " + examples[0]] + ["     " + e for e in examples[1:]]
    python_only = [f.name for f in DATASET_FORMATS.values() if not f.root_layout]
    tail = "Dataset options are added as :KEY=VALUE. From Python and configs, open_dataset() also takes explicit paths"
    tail += f", and the format(s) {', '.join(python_only)}." if python_only else "."
    return "\n".join(lines + textwrap.wrap(tail, width))


# ----------------------------------------------------------------------------- opening
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


class MaskClassesView:
    """A dataset whose thing segments keep their masks only for ``classes`` (category names or ids):
    the others become box-only (:attr:`Sample.box_only`), as in Mask^X R-CNN's partially
    supervised training, where box labels are plentiful and mask labels rare."""

    def __init__(self, dataset: Any, classes: Sequence[str | int]) -> None:
        if isinstance(classes, str | int) or not len(classes):
            raise DataError(f"mask_classes {classes!r}: expected a non-empty list of category names or ids")
        table = dataset.categories
        by_name = {c.name: c.id for c in table}
        ids = []
        for c in classes:
            cid = by_name.get(c) if isinstance(c, str) else c
            if cid is None or cid not in table.ids:
                raise DataError(
                    f"mask_classes: unknown category {c!r}; known: {', '.join(c.name for c in table)}"
                )
            ids.append(int(cid))
        self.dataset = dataset
        self.categories = table
        self.ignore_index = getattr(dataset, "ignore_index", None)
        self.mask_category_ids = np.asarray(sorted(set(ids)), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        box_only = ~np.isin(sample.segments.category_ids, self.mask_category_ids)
        if sample.box_only is not None:
            box_only |= sample.box_only
        return dataclasses.replace(sample, box_only=box_only)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def open_dataset(spec: dict[str, Any]) -> Any:
    """A dataset from a spec such as ``{"format": "coco", "annotations": "a.json", "images": "img/"}``.

    ``format`` is a name in :data:`DATASET_FORMATS`; the other keys are that format's (listed
    below, required first); paths may be relative to the working directory. Formats whose
    reader takes explicit paths but that have a root layout also take ``root`` [+ ``split``]
    instead (the CLI's ``FORMAT:ROOT[:SPLIT]``, resolved as :data:`ROOT_LAYOUTS` says). Every
    format takes ``subset``: ``"START:STOP"`` (a slice of the dataset's own order, which is
    sorted by file name) -- e.g. ``"0:100"`` and ``"100:"`` split one folder into train and val --
    and ``mask_classes``: a list of category names or ids whose segments keep their masks, every
    other segment becoming box-only (:class:`MaskClassesView`; Mask^X R-CNN's partial supervision).
    """
    if not isinstance(spec, dict) or "format" not in spec:
        raise DataError(
            f"a dataset spec is a dict with a 'format' key, one of {sorted(DATASET_FORMATS)}; got {spec!r}"
        )
    name = spec["format"]
    if name not in DATASET_FORMATS:
        raise DataError(f"unknown dataset format {name!r}; expected one of {sorted(DATASET_FORMATS)}")
    fmt = DATASET_FORMATS[name]
    if "subset" in spec:
        return DatasetSlice(open_dataset({k: v for k, v in spec.items() if k != "subset"}), spec["subset"])
    if "mask_classes" in spec:
        return MaskClassesView(
            open_dataset({k: v for k, v in spec.items() if k != "mask_classes"}), spec["mask_classes"]
        )
    if fmt.resolve_root is not None and "root" in spec:
        root = Path(spec["root"]).expanduser()
        split = spec.get("split")
        rest = {k: v for k, v in spec.items() if k not in ("root", "split")}
        resolved = fmt.resolve_root(root, split, rest)
        if resolved is None:
            raise DataError(f"{root}: no {name} data found for split {split!r}; expected {fmt.root_layout}")
        spec = resolved
    missing = [k for k in fmt.required if k not in spec]
    unknown = sorted(set(spec) - set(fmt.required) - set(fmt.optional) - {"format"})
    if missing or unknown:
        raise DataError(
            f"dataset spec for {name!r}: missing {missing}, unknown {unknown}; "
            f"required {list(fmt.required)}"
            + (" (or root [+ split])" if fmt.resolve_root is not None else "")
            + f", optional {list(fmt.optional)}"
        )
    return fmt.open(spec)


open_dataset.__doc__ += "\n    Keys per format:\n\n" + "\n".join(
    textwrap.fill(
        f"* ``{f.name}``: {f.keys_help}" + ("; or root [+ split]" if f.resolve_root else ""),
        96, initial_indent="    ", subsequent_indent="      ",
    )  # fmt: skip
    for f in DATASET_FORMATS.values()
)
