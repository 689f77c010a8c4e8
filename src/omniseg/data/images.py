"""Moved to :mod:`omniseg.io`; these names stay importable from here for older imports
(``omniseg.engine.config`` takes ``DataError`` from here). New code imports :mod:`omniseg.io`."""

from omniseg.io import (
    IMAGE_SUFFIXES,
    DataError,
    list_images,
    load_image,
    load_json,
    load_label_png,
    load_panoptic_png,
    load_rgb_png,
)

__all__ = [
    "IMAGE_SUFFIXES", "DataError", "list_images", "load_image", "load_json", "load_label_png",
    "load_panoptic_png", "load_rgb_png",
]  # fmt: skip
