"""Dataset readers and writers, one module per file format, and :func:`open_dataset`.

Every dataset object has ``__len__``, ``__getitem__(int) -> Sample``, ``.categories``
(:class:`~omniseg.structures.CategoryTable`) and ``.ignore_index`` (the label value to leave
out of losses and metrics, or ``None`` where the files have no such value). The formats are
declared in :mod:`omniseg.data.registry`; file reading is :mod:`omniseg.io`.
"""

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
from omniseg.data.label_folder import LabelFolderDataset, camvid, camvid_categories, voc_categories
from omniseg.data.registry import (
    DATASET_FORMATS,
    FORMATS,
    ROOT_LAYOUTS,
    DatasetFormat,
    DatasetSlice,
    formats_help,
    open_dataset,
)
from omniseg.data.yolo import COCO80_NAMES, YoloSegmentation
from omniseg.io import (
    DataError,
    list_images,
    load_image,
    load_json,
    load_label_png,
    load_panoptic_png,
    load_rgb_png,
)

__all__ = [
    "CITYSCAPES_LABELS", "COCO80_NAMES", "DATASET_FORMATS", "FORMATS", "ROOT_LAYOUTS", "Cityscapes", "CocoInstances",
    "CocoPanoptic", "CocoPanopticWriter", "DataError", "DatasetFormat", "DatasetSlice", "LabelFolderDataset",
    "YoloSegmentation", "ade20k", "ade20k_categories", "camvid", "camvid_categories", "cityscapes_categories",
    "cityscapes_segments", "formats_help", "label_to_train_ids", "list_images", "load_image", "load_json",
    "load_label_png", "load_panoptic_png", "load_rgb_png", "open_dataset", "segments_to_results",
    "train_to_label_ids", "voc_categories", "write_instance_results", "write_panoptic_png", "write_results",
    "write_semantic_result",
]  # fmt: skip
