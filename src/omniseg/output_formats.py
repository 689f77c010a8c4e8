"""The per-image and whole-job outputs of ``omniseg segment``, by ``--outputs`` name.

A module of its own so that the CLI can list them in ``--help`` without importing
:mod:`omniseg.batch` (and the data readers behind it) on every command.
"""

OUTPUT_FORMATS = {
    "overlay": "{stem}_overlay.png: the image with the segments drawn over it",
    "labels": "{stem}_labels.png: category id per pixel (255 = none)",
    "json": "{stem}.json: segments with RLE masks (+ {stem}_panoptic.png for a panoptic model)",
    "coco": "coco_results.json: COCO instance results (image_id, category_id, RLE, bbox, score)",
    "panoptic": "panoptic/{stem}.png + panoptic.json: COCO panoptic format",
    "cityscapes": "{stem}_labelIds.png: Cityscapes labelIds (0 = unlabeled), Cityscapes models only",
}
