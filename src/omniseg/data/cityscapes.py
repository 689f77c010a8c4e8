"""Cityscapes: the label table, a reader of the ``leftImg8bit`` / ``gtFine`` layout, id conversion
and a results writer.

Layout (as distributed)::

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_instanceIds.png

``instanceIds`` hold ``labelId * 1000 + k`` for each instance of a thing class, and the plain
``labelId`` for stuff and for thing pixels that belong to no single instance (crowd groups).
The reader turns these into one panoptic-style id map; thing pixels without an instance
become crowd segments.

Two label spaces:

* ``"train"`` (default): the 19 evaluated classes, category id = trainId 0..18; pixels of
  the other labels are void (ignore index 255). What models train and are scored on.
* ``"label"``: all 34 labelIds 0..33 as categories (``unlabeled`` = 0 is void).

The official evaluation scripts read predictions as labelIds, hence :func:`train_to_label_ids`
and :func:`write_semantic_result`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from omniseg.io import DataError, atomic_path, atomic_write_text, load_image, load_label_png
from omniseg.structures import VOID, Category, CategoryTable, Sample, Segments


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# cityscapesScripts/helpers/labels.py. 'license plate' (id -1) is left out: it never appears
# in gtFine label images (its polygons are skipped and the pixels stay with the car).
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(
    CityscapesLabel(*row)
    for row in [
        ("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
        ("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
        ("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
        ("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
        ("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
        ("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
        ("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
        ("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
        ("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
        ("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
        ("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
        ("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
        ("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
        ("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
        ("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
        ("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
        ("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
        ("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
        ("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
        ("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
        ("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
        ("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
        ("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
        ("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
        ("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
        ("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
        ("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
        ("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
        ("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
        ("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
        ("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
        ("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
        ("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
        ("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
    ]
)
NUM_LABEL_IDS = 34
NUM_TRAIN_IDS = 19
IGNORE_TRAIN_ID = 255
INSTANCE_OFFSET = 1000  # instanceIds = labelId * 1000 + k

_LABEL_TO_TRAIN = np.full(256, IGNORE_TRAIN_ID, dtype=np.uint8)
_TRAIN_TO_LABEL = np.zeros(256, dtype=np.uint8)  # unknown / ignore trainIds -> 0 'unlabeled'
for _label in CITYSCAPES_LABELS:
    _LABEL_TO_TRAIN[_label.id] = _label.train_id
    if _label.train_id != IGNORE_TRAIN_ID:
        _TRAIN_TO_LABEL[_label.train_id] = _label.id


def cityscapes_categories(label_space: str = "train") -> CategoryTable:
    """The 19 trainId classes (``"train"``) or the 33 labelIds 1..33 (``"label"``; 0 is void)."""
    if label_space == "train":
        labels = sorted(
            (lab for lab in CITYSCAPES_LABELS if lab.train_id != IGNORE_TRAIN_ID), key=lambda x: x.train_id
        )
        return CategoryTable(
            tuple(Category(lab.train_id, lab.name, lab.has_instances, lab.color) for lab in labels)
        )
    if label_space == "label":
        return CategoryTable(
            tuple(
                Category(lab.id, lab.name, lab.has_instances, lab.color)
                for lab in CITYSCAPES_LABELS
                if lab.id != 0
            )
        )
    raise ValueError(f"unknown label_space {label_space!r}; expected 'train' or 'label'")


def label_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """labelId map -> trainId map (``uint8``; labels not evaluated, and unknown values, -> 255)."""
    label_ids = np.asarray(label_ids)
    return _LABEL_TO_TRAIN[np.clip(label_ids, 0, 255).astype(np.intp)]


def train_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """trainId map -> labelId map (``uint8``; 255 and other unknown values -> 0 ``unlabeled``)."""
    train_ids = np.asarray(train_ids)
    return _TRAIN_TO_LABEL[np.clip(train_ids, 0, 255).astype(np.intp)]


def cityscapes_segments(
    label_ids: np.ndarray,
    instance_ids: np.ndarray | None = None,
    *,
    label_space: str = "train",
    categories: CategoryTable | None = None,
) -> Segments:
    """Segments from a labelIds map and (optionally) an instanceIds map of the same size.

    Segment ids are the Cityscapes keys themselves (``labelId * 1000 + k`` for instances, the
    labelId for stuff and crowd), so they can be traced back to the files. Without
    ``instance_ids``, every thing region is one crowd segment.
    """
    categories = categories or cityscapes_categories(label_space)
    label_ids = np.asarray(label_ids).astype(np.int64)
    if instance_ids is None:
        keys = label_ids
    else:
        instance_ids = np.asarray(instance_ids).astype(np.int64)
        # labelIds stay the semantic truth; instanceIds only split thing pixels into instances
        keys = np.where(instance_ids >= INSTANCE_OFFSET, instance_ids, label_ids)
    uniq, inverse = np.unique(keys, return_inverse=True)
    labels = np.where(uniq >= INSTANCE_OFFSET, uniq // INSTANCE_OFFSET, uniq)
    has_instances = np.array(
        [lab.has_instances for lab in CITYSCAPES_LABELS] + [False] * (256 - NUM_LABEL_IDS)
    )
    if label_space == "train":
        category = _LABEL_TO_TRAIN[np.clip(labels, 0, 255)].astype(np.int64)
        keep = category != IGNORE_TRAIN_ID
    else:
        category = labels
        keep = labels != 0
    keep &= labels < NUM_LABEL_IDS
    lut = np.where(keep, uniq, VOID).astype(np.int32)
    id_map = lut[inverse.reshape(keys.shape)]
    return Segments(
        keys.shape,
        category[keep],
        categories=categories,
        iscrowd=(uniq < INSTANCE_OFFSET)[keep] & has_instances[np.clip(labels, 0, 255)][keep],
        segment_ids=uniq[keep],
        id_map=id_map,
    )


class Cityscapes:
    """One split of Cityscapes fine annotations as a dataset of :class:`Sample`.

    Listing is driven by ``gtFine/{split}/*/*_gtFine_labelIds.png``; ``images=False`` reads
    annotations only (black images of the label's size).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        label_space: str = "train",
        images: bool = True,
        use_instances: bool = True,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.label_space = label_space
        self.categories = cityscapes_categories(label_space)
        self.ignore_index = IGNORE_TRAIN_ID if label_space == "train" else 0
        self.load_images = images
        self.use_instances = use_instances
        gt_dir = self.root / "gtFine" / split
        if not gt_dir.is_dir():
            raise DataError(
                f"{gt_dir}: Cityscapes annotation folder not found (expected root/gtFine/{split})"
            )
        self.label_files = sorted(gt_dir.glob("*/*_gtFine_labelIds.png"))
        if not self.label_files:
            raise DataError(f"{gt_dir}: no *_gtFine_labelIds.png files")

    def __len__(self) -> int:
        return len(self.label_files)

    def paths(self, index: int) -> tuple[Path, Path, Path]:
        """``(image, labelIds, instanceIds)`` paths of item ``index``."""
        label = self.label_files[index]
        stem = label.name[: -len("_gtFine_labelIds.png")]
        city = label.parent.name
        image = self.root / "leftImg8bit" / self.split / city / f"{stem}_leftImg8bit.png"
        return image, label, label.with_name(f"{stem}_gtFine_instanceIds.png")

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.root}")
        index %= len(self)
        image_path, label_path, instance_path = self.paths(index)
        image = load_image(image_path) if self.load_images else None
        size = image.shape[:2] if image is not None else None
        label_ids = load_label_png(label_path, expected_size=size)
        if int(label_ids.max(initial=0)) >= NUM_LABEL_IDS:
            bad = sorted(v for v in np.unique(label_ids).tolist() if v >= NUM_LABEL_IDS)
            raise DataError(f"{label_path}: unknown label id(s) {bad}; Cityscapes labelIds are 0..33")
        instance_ids = None
        if self.use_instances:
            instance_ids = load_label_png(instance_path, expected_size=label_ids.shape)
        segments = cityscapes_segments(
            label_ids, instance_ids, label_space=self.label_space, categories=self.categories
        )
        if image is None:
            image = np.zeros((*label_ids.shape, 3), dtype=np.uint8)
        return Sample(
            image,
            segments,
            image_id=label_path.name[: -len("_gtFine_labelIds.png")],
            file_name=image_path.name,
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def write_semantic_result(
    prediction: Segments | np.ndarray, path: str | Path, *, label_space: str = "train"
) -> Path:
    """Write a prediction as a labelIds PNG, the format the official Cityscapes evaluation reads.

    ``prediction`` is a Segments or an ``(H, W)`` map in ``label_space`` ids (trainIds by default);
    void becomes labelId 0. Written atomically.
    """
    if isinstance(prediction, Segments):
        semantic = prediction.to_semantic(void_value=IGNORE_TRAIN_ID if label_space == "train" else 0)
    else:
        semantic = np.asarray(prediction)
    if semantic.ndim != 2:
        raise ValueError(f"a semantic prediction must be (H, W), got shape {semantic.shape}")
    label_ids = (
        train_to_label_ids(semantic) if label_space == "train" else np.clip(semantic, 0, 255).astype(np.uint8)
    )
    with atomic_path(path) as tmp:
        Image.fromarray(label_ids).save(tmp, format="PNG")
    return Path(path)


def write_instance_results(
    prediction: Segments, out_dir: str | Path, stem: str, *, label_space: str = "train"
) -> Path:
    """Write instance predictions in the official format: ``{stem}.txt`` listing
    ``masks/{stem}_{i}.png labelId score`` per non-crowd thing mask (binary PNGs, 255 = on)."""
    out_dir = Path(out_dir)
    things = set(cityscapes_categories(label_space).thing_ids)
    lines = []
    for i in range(len(prediction)):
        cat = int(prediction.category_ids[i])
        if cat not in things or prediction.iscrowd[i]:  # a crowd region is not a prediction
            continue
        label_id = int(_TRAIN_TO_LABEL[cat]) if label_space == "train" else cat
        rel = f"masks/{stem}_{i}.png"
        with atomic_path(out_dir / rel) as tmp:
            Image.fromarray(prediction.mask(i).astype(np.uint8) * 255).save(tmp, format="PNG")
        lines.append(f"{rel} {label_id} {float(prediction.scores[i]):.6f}")
    txt = out_dir / f"{stem}.txt"
    return atomic_write_text(txt, "\n".join(lines) + ("\n" if lines else ""))
