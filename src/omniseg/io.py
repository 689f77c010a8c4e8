"""Reading and writing files, with one set of rules for the whole library.

Writes are atomic. The data goes to a temporary file next to the target (a hidden name that
keeps the target's suffix, so that writers which pick the format from the name still work),
is flushed to disk, gets the mode a plain ``open()`` would give it (the replaced file's mode,
else ``0o666`` minus the umask), and is moved onto the target with ``os.replace``. If
anything fails, the temporary file is removed and whatever was at the target stays as it
was: a crash never leaves a half-written checkpoint, PNG or JSON behind.

* :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`;
* :func:`atomic_path` for writers that need a file name (safetensors, matplotlib, Lightning).

Reads raise :class:`~omniseg.errors.DataError` with a message ``PATH: what is wrong``:

* :func:`load_image`: a photo as RGB ``uint8``, EXIF rotation applied;
* :func:`load_label_png`: a single-channel label map (modes in :data:`LABEL_PNG_MODES`);
* :func:`load_rgb_png` / :func:`load_panoptic_png`: a COCO panoptic PNG as colours / segment ids;
* :func:`load_json`, :func:`list_images`.

This module needs numpy and Pillow only (pyspng if installed), never torch.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from omniseg.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

try:  # libspng decodes COCO panoptic PNGs ~1.9x faster than Pillow; Pillow remains the fallback
    import pyspng
except ImportError:  # pragma: no cover - pyspng is a dependency, but optional at run time
    pyspng = None

__all__ = [
    "IMAGE_SUFFIXES", "LABEL_PNG_MODES", "RGB_PNG_MODES", "DataError", "atomic_path", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_text", "list_images", "load_image", "load_json", "load_label_png",
    "load_panoptic_png", "load_rgb_png",
]  # fmt: skip

PathLike = str | os.PathLike

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Label maps: 8-bit grey, palette (the index is the label, as in Pascal VOC; the palette is not
# applied), 16-bit grey, 32-bit integer. Anything with colour or alpha channels is refused.
LABEL_PNG_MODES = ("L", "P", "I;16", "I")
# Panoptic id PNGs: colours are ids; alpha is dropped and a palette is applied, as Pillow's
# convert("RGB") does.
RGB_PNG_MODES = ("RGB", "RGBA", "P")


# ----------------------------------------------------------------------------- writing
@contextmanager
def atomic_path(path: PathLike, *, commit: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is moved onto ``path``.

    For writers that take a file name, e.g. ``with atomic_path(out) as tmp: fig.savefig(tmp)``.
    The temporary name ends with ``path``'s suffix. An exception inside the block removes the
    temporary file and leaves ``path`` untouched. ``commit=False`` removes the temporary file
    without publishing it (e.g. on the ranks of a distributed run that do not write).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if commit:
            _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDWR)  # a writable descriptor: fsync needs one on some platforms
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, _new_file_mode(path))
    os.replace(tmp, path)


def _new_file_mode(path: Path) -> int:
    """mkstemp makes 0600 files; give the result the mode a plain ``open(path, "w")`` would."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def encode_png(array: np.ndarray, *, level: int = 1, threads: int = 1) -> bytes:
    """A PNG of an ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA uint8 array.

    Written here rather than by Pillow because at 12 MP Pillow's encoder took 0.7 s (it tries
    every row filter per row): every row gets PNG's "Up" filter (the difference from the row
    above, one numpy subtraction) and zlib ``level`` (1: fast). On a 12-MP photo: 0.35 s and
    7.0 MB, against Pillow's 0.7 s and 7.7 MB at level 1. Any PNG reader reads them (tests decode
    them with Pillow). ``threads`` > 1 compresses that many slices of a large image at once
    (:func:`_deflate_in_parallel`).
    """
    import struct
    import zlib

    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"encode_png needs a uint8 (H, W), (H, W, 3) or (H, W, 4) array, got {array.dtype} {array.shape}")
    h, w = array.shape[:2]
    if not h or not w:
        raise ValueError(f"a PNG needs at least one pixel, got shape {array.shape}")
    rows = np.ascontiguousarray(array).reshape(h, -1)
    raw = np.empty((h, rows.shape[1] + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type "Up"; the first row's "above" is zeros, i.e. itself
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[channels]  # grey, RGB, RGBA
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    if threads > 1 and raw.nbytes >= _PARALLEL_BYTES:
        data = _deflate_in_parallel(raw.data, level, threads)
    else:
        data = zlib.compress(raw.data, level)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


_PARALLEL_BYTES = 1 << 22  # below ~4 MB one zlib call is as fast as starting threads


def _deflate_in_parallel(data: memoryview, level: int, threads: int) -> bytes:
    """One zlib stream of ``data``, its slices compressed in ``threads`` threads (zlib lets go of
    the GIL), joined as pigz joins them: each slice a raw deflate stream ended by a sync flush
    (byte-aligned, not final) but the last, under one zlib header and the whole data's Adler-32.
    Each slice starts without its predecessor's window: a few hundred bytes more in all."""
    import struct
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    step = -(-len(data) // threads)
    slices = [data[i : i + step] for i in range(0, len(data), step)]

    def deflate(k: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: no header or checksum
        last = k == len(slices) - 1
        return compressor.compress(slices[k]) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    with ThreadPoolExecutor(len(slices)) as pool:
        bodies = list(pool.map(deflate, range(len(slices))))
    # header 0x78 0x01: deflate with a 32 KB window, no dictionary (the level bits are advisory)
    return b"\x78\x01" + b"".join(bodies) + struct.pack(">I", zlib.adler32(data))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, newline-terminated) atomically; ``indent=None`` is compact."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# ----------------------------------------------------------------------------- reading
def load_json(path: PathLike, what: str = "") -> Any:
    """The parsed content of a UTF-8 JSON file; ``what`` (e.g. "ground-truth JSON") names it in errors.

    Parsed by orjson where it is installed (a dependency: 2-3x faster than the standard parser on
    COCO results files, which is most of evaluation start-up) and the file is strict JSON; anything
    orjson refuses goes to the standard parser, which names the problem (and takes what Python's
    ``json`` takes: NaN, integers beyond 64 bits).
    """
    path = Path(path)
    label = f"{what} " if what else ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {label}file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a {what or 'JSON'} file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what or 'file'} ({exc.strerror or exc})") from None
    fast = _orjson()
    if fast is not None:
        try:
            return fast.loads(data)
        except fast.JSONDecodeError:
            pass
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {what or 'file'} is not UTF-8 text ({exc.reason})") from None


def _orjson() -> Any:
    try:
        import orjson
    except ImportError:
        return None
    return orjson


_UNREADABLE = {"image": "not a readable image", "PNG": "cannot decode PNG"}


def _open(path: Path, kind: str) -> Image.Image:
    """Open and fully decode ``path``; every failure is a DataError (``kind``: "image" or "PNG")."""
    from PIL import Image  # lazily: Pillow's import is ~10 ms of `omniseg evaluate` start-up, unused there

    if not path.is_file():
        raise DataError(f"{path}: {'should be a file but is a folder' if path.is_dir() else 'file not found'}")
    try:
        image = Image.open(path)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad files
        raise DataError(f"{path}: {_UNREADABLE[kind]} ({type(exc).__name__}: {exc})") from None
    try:
        image.load()
    except MemoryError:
        image.close()
        raise
    except Exception as exc:
        image.close()
        raise DataError(f"{path}: {_UNREADABLE[kind]} ({type(exc).__name__}: {exc})") from None
    return image


def _check_size(path: Path, shape: tuple[int, ...], expected: tuple[int, int] | None, what: str) -> None:
    if expected is not None and tuple(shape[:2]) != tuple(expected):
        raise DataError(
            f"{path}: {what}{shape[1]}x{shape[0]} does not match its image {expected[1]}x{expected[0]}"
        )


def load_image(path: PathLike) -> np.ndarray:
    """A photo as a writable RGB ``(H, W, 3) uint8`` array, EXIF rotation applied.

    Grey images are expanded to RGB; transparent ones (RGBA, LA, palette) are composed on black.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    with _open(path, "image") as image:
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block must not make a readable image unreadable
            oriented = image
        if oriented.mode in ("RGBA", "LA", "P"):
            rgba = oriented.convert("RGBA")
            oriented = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        return np.array(oriented.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays


def load_label_png(path: PathLike, *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A single-channel label PNG as a read-only ``(H, W)`` integer array, pixel value = label.

    Modes :data:`LABEL_PNG_MODES` give ``uint8`` (L, P: palette indices, palette not applied),
    ``uint16`` (I;16) or ``int32`` (I); no EXIF rotation. ``expected_size`` is ``(H, W)`` of
    the matching image; a mismatch is an error.
    """
    path = Path(path)
    with _open(path, "PNG") as image:
        if image.mode not in LABEL_PNG_MODES:
            raise DataError(
                f"{path}: label PNG must be single-channel (class indices, mode "
                f"{', '.join(LABEL_PNG_MODES)}), got mode {image.mode}"
            )
        array = np.asarray(image)
    _check_size(path, array.shape, expected_size, "label map size ")
    return array


def _spng_rgb(path: Path) -> np.ndarray | None:
    """``(H, W, 3) uint8`` pixels of an 8-bit RGB/RGBA PNG decoded by pyspng, else ``None``.

    Only 8-bit truecolour PNGs (IHDR colour type 2 or 6) take this path, where pyspng's pixels
    are Pillow's (alpha dropped, as ``convert("RGB")`` does). Anything else (palette, grey,
    16-bit, missing, corrupt or non-PNG files) returns ``None`` so that Pillow reads it, with
    the same conversions and error messages as without pyspng.
    """
    if pyspng is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    # signature (8) + chunk length (4) + b"IHDR" + width (4) + height (4) + bit depth + colour type
    if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    if data[24] != 8 or data[25] not in (2, 6):
        return None
    try:
        rgb = pyspng.load(data, format="RGB")
    except Exception:  # pyspng raises RuntimeError on corrupt data: let Pillow report it
        return None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        return None
    return np.ascontiguousarray(rgb)


def load_rgb_png(path: PathLike, *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A COCO panoptic PNG (ids as colours) as a C-contiguous ``(H, W, 3) uint8`` array.

    Modes :data:`RGB_PNG_MODES`; 8-bit RGB/RGBA files are decoded by pyspng when it is
    installed (same pixels, ~1.9x faster), everything else and every error by Pillow.
    ``expected_size`` is ``(H, W)`` of the matching image; a mismatch is an error.
    """
    path = Path(path)
    rgb = _spng_rgb(path)
    if rgb is None:
        with _open(path, "PNG") as image:
            if image.mode not in RGB_PNG_MODES:
                raise DataError(f"{path}: panoptic PNG must be RGB (ids as colours), got mode {image.mode}")
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    _check_size(path, rgb.shape, expected_size, "size ")
    return rgb


def load_panoptic_png(path: PathLike, *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """``(H, W) int32`` segment ids ``R + 256 G + 256^2 B`` of a COCO panoptic PNG (see :func:`load_rgb_png`).

    Instead of per-channel arithmetic, the packed RGB bytes are viewed as little-endian uint32
    at a 3-byte stride (an unaligned view: each pixel's R, G, B plus the next pixel's R) and the
    fourth byte is masked off: one pass, measured ~3x faster than ``rgb_to_id`` on the
    ``(H, W, 3)`` array.
    """
    rgb = load_rgb_png(path, expected_size=expected_size)
    h, w = rgb.shape[:2]
    buf = memoryview(rgb).cast("B")
    n = h * w
    ids = np.empty(n, dtype=np.uint32)
    if n:
        # the last pixel has no next byte to read, so it is assembled by hand
        packed = np.ndarray(shape=(n - 1,), dtype="<u4", buffer=buf, strides=(3,))
        np.bitwise_and(packed, np.uint32(0xFFFFFF), out=ids[:-1])
        ids[-1] = buf[-3] | buf[-2] << 8 | buf[-1] << 16
    return ids.view(np.int32).reshape(h, w)


def list_images(folder: PathLike) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`, any case) directly in ``folder``, sorted by name.

    Hidden files are left out: macOS ``._*`` resource forks and the temporary files of
    interrupted atomic writes are not images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )  # fmt: skip
