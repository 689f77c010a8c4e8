"""Reading images and label maps with clear errors.

Every reader in omniseg goes through these functions, so a corrupt file, a wrong channel
count or a size mismatch is reported once, in one voice, naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent. The message names the file."""


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    return image


def load_image(path: str | Path) -> np.ndarray:
    """An RGB ``(H, W, 3) uint8`` array; grayscale and RGBA are converted, EXIF rotation applied."""
    image = _open(path)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        pass
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.array(image.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays


def load_label_map(path: str | Path, *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A single-channel label PNG as an ``(H, W)`` integer array (no EXIF rotation, no palette mapping).

    ``expected_size`` is ``(H, W)`` of the matching image; a mismatch is an error.
    """
    image = _open(path)
    if image.mode in ("RGB", "RGBA"):
        raise DataError(f"{path}: label map must have one channel, got {image.mode} (3 or 4 channels)")
    array = np.asarray(image)
    if array.ndim != 2:
        raise DataError(f"{path}: label map must be 2-D, got shape {array.shape}")
    if expected_size is not None and array.shape != tuple(expected_size):
        raise DataError(
            f"{path}: label map size {array.shape[1]}x{array.shape[0]} does not match its image "
            f"{expected_size[1]}x{expected_size[0]}"
        )
    return array


def load_rgb_png(path: str | Path, *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A 3-channel PNG (panoptic id images) as ``(H, W, 3) uint8``."""
    image = _open(path)
    if image.mode not in ("RGB", "RGBA"):
        raise DataError(f"{path}: expected an RGB panoptic PNG, got mode {image.mode}")
    array = np.asarray(image.convert("RGB"))
    if expected_size is not None and array.shape[:2] != tuple(expected_size):
        raise DataError(
            f"{path}: size {array.shape[1]}x{array.shape[0]} does not match its image "
            f"{expected_size[1]}x{expected_size[0]}"
        )
    return array


def load_json(path: str | Path) -> dict | list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
