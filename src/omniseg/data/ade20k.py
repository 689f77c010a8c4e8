"""ADE20K SceneParsing (the 150-class MIT benchmark) on top of :class:`LabelFolderDataset`.

Annotations are single-channel PNGs: 0 = "other" (ignored in training and evaluation),
1..150 = the classes of ``objectInfo150.csv`` (``Idx,Ratio,Train,Val,Stuff,Name``). Category
ids stay 1..150 as in the files; :meth:`CategoryTable.index_of` gives contiguous indices.

Layouts found under ``root``:

* ``ADEChallengeData2016``: ``images/{training,validation}`` + ``annotations/{training,validation}``;
* the sceneparsing sample: ``sampleData/images`` + ``sampleData/annotations``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from omniseg.data.label_folder import LabelFolderDataset
from omniseg.errors import DataError
from omniseg.structures import Category, CategoryTable, default_color

ADE20K_IGNORE = 0
ADE20K_NUM_CLASSES = 150


def ade20k_categories(csv_path: str | Path) -> CategoryTable:
    """The 150 classes from ``objectInfo150.csv``; name = first synonym, thing = ``Stuff == 0``."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: ADE20K class table not found")
    cats = []
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Idx", "Stuff", "Name"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {sorted(missing)}")
        for lineno, row in enumerate(reader, 2):
            try:
                idx, stuff = int(row["Idx"]), int(row["Stuff"])
            except (TypeError, ValueError):
                raise DataError(f"{csv_path}:{lineno}: Idx and Stuff must be integers, got {row}") from None
            # ids are 1-based in the files; the colour index follows the class order
            cats.append(Category(idx, row["Name"].split(";")[0].strip(), stuff == 0, default_color(idx - 1)))
    if len(cats) != ADE20K_NUM_CLASSES or sorted(c.id for c in cats) != list(
        range(1, ADE20K_NUM_CLASSES + 1)
    ):
        raise DataError(f"{csv_path}: expected classes 1..{ADE20K_NUM_CLASSES}, got {len(cats)} rows")
    return CategoryTable(tuple(cats))


def _find_dirs(root: Path, split: str | None) -> tuple[Path, Path]:
    candidates = []
    if split is not None:
        candidates.append((root / "images" / split, root / "annotations" / split))
    candidates += [
        (root / "images", root / "annotations"),
        (root / "sampleData" / "images", root / "sampleData" / "annotations"),
    ]
    for images, labels in candidates:
        if images.is_dir() and labels.is_dir() and any(p.is_file() for p in images.iterdir()):
            return images, labels
    tried = ", ".join(str(i) for i, _ in candidates)
    raise DataError(f"{root}: no ADE20K images/annotations folders found (tried {tried})")


def ade20k(
    root: str | Path,
    split: str | None = "validation",
    *,
    images_dir: str | Path | None = None,
    annotations_dir: str | Path | None = None,
    categories_csv: str | Path | None = None,
) -> LabelFolderDataset:
    """ADE20K as a :class:`LabelFolderDataset` with ``ignore_index = 0``.

    ``split`` is ``training`` or ``validation`` for the full release; folders are found under
    ``root`` unless given. ``categories_csv`` defaults to ``root/objectInfo150.csv``.
    """
    root = Path(root)
    if images_dir is None or annotations_dir is None:
        found_images, found_annotations = _find_dirs(root, split)
        images_dir = images_dir if images_dir is not None else found_images
        annotations_dir = annotations_dir if annotations_dir is not None else found_annotations
    categories = ade20k_categories(
        categories_csv if categories_csv is not None else root / "objectInfo150.csv"
    )
    return LabelFolderDataset.from_folders(
        images_dir, annotations_dir, categories=categories, ignore_index=ADE20K_IGNORE
    )
