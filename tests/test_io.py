"""omniseg.io: atomic writes (content, mode, no debris, old file kept on failure) and the readers'
accepted modes and error messages."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniseg import io as oio
from omniseg.errors import CheckpointError, DataError
from omniseg.structures import id_to_rgb


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------- writing
def test_atomic_writes_content_mode_and_no_debris(tmp_path: Path, umask_027) -> None:
    folder = tmp_path / "new" / "folder"  # created on demand
    assert oio.atomic_write_bytes(folder / "a.bin", b"\x00\x01") == folder / "a.bin"
    assert (folder / "a.bin").read_bytes() == b"\x00\x01"
    oio.atomic_write_text(folder / "b.txt", "héllo\n")
    assert (folder / "b.txt").read_bytes() == "héllo\n".encode()
    oio.atomic_write_json(folder / "c.json", {"a": [1, 2]})
    assert (folder / "c.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    oio.atomic_write_json(folder / "d.json", {"a": [1, 2]}, indent=None)
    assert (folder / "d.json").read_text() == '{"a": [1, 2]}\n'
    # a new file gets what open() would give under the umask, not mkstemp's 0600
    assert {_mode(p) for p in folder.iterdir()} == {0o640}
    # a replaced file keeps its own mode, as writing into it would
    (folder / "a.bin").chmod(0o600)
    oio.atomic_write_bytes(folder / "a.bin", b"new")
    assert _mode(folder / "a.bin") == 0o600 and (folder / "a.bin").read_bytes() == b"new"
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "b.txt", "c.json", "d.json"]


def test_atomic_path_keeps_suffix_and_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "curve.png"
    with oio.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".png"
        assert not target.exists()
        Image.new("RGB", (3, 2), (9, 8, 7)).save(tmp)  # the format is picked from the name
    assert np.asarray(Image.open(target))[0, 0].tolist() == [9, 8, 7]
    before = target.read_bytes()

    with pytest.raises(RuntimeError, match="writer failed"):
        with oio.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a PNG")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == before

    with oio.atomic_path(target, commit=False) as tmp:  # e.g. a rank that does not publish
        tmp.write_bytes(b"not published")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_failed_replace_leaves_no_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.json"
    oio.atomic_write_json(target, {"v": 1})

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        oio.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


# ----------------------------------------------------------------------------- reading
def test_load_json_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"x": [1, 2]}')
    assert oio.load_json(path) == {"x": [1, 2]}
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        oio.load_json(tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"nope\.json: ground-truth JSON file not found"):
        oio.load_json(tmp_path / "nope.json", "ground-truth JSON")
    with pytest.raises(DataError, match=r"sub: is a folder, not a JSON file"):
        (tmp_path / "sub").mkdir()
        oio.load_json(tmp_path / "sub")
    path.write_text('{\n  "x": [1,,]\n}')
    with pytest.raises(DataError, match=r"a\.json: malformed JSON at line 2, column 11"):
        oio.load_json(path)
    path.write_bytes(b'{"x": "\xff"}')
    with pytest.raises(DataError, match=r"a\.json: file is not UTF-8 text"):
        oio.load_json(path)


def _save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_load_label_png_accepted_modes(tmp_path: Path) -> None:
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert oio.LABEL_PNG_MODES == ("L", "P", "I;16", "I")
    out = oio.load_label_png(_save(tmp_path / "l.png", label), expected_size=(3, 4))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, label)

    palette = Image.fromarray(label, mode="L").convert("P")  # VOC style: the index is the label
    palette.putpalette([255 - (i % 256) for i in range(768)])
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(oio.load_label_png(tmp_path / "p.png"), label)  # palette not applied

    wide = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000 + 7).astype(np.uint16)  # Cityscapes ids
    _save(tmp_path / "i16.png", wide)
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    np.testing.assert_array_equal(oio.load_label_png(tmp_path / "i16.png"), wide)

    # PNG cannot store mode I (older Pillow opened 16-bit PNGs as I); a TIFF label map can
    big = wide.astype(np.int32) * 100
    Image.fromarray(big, mode="I").save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    np.testing.assert_array_equal(oio.load_label_png(tmp_path / "i32.tif"), big)


def test_load_label_png_rejections(tmp_path: Path) -> None:
    for mode, array in (
        ("RGB", np.zeros((3, 4, 3), np.uint8)),
        ("RGBA", np.zeros((3, 4, 4), np.uint8)),
        ("LA", np.zeros((3, 4, 2), np.uint8)),
    ):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(array, mode=mode).save(path)
        with pytest.raises(DataError, match=rf"{mode}\.png: label PNG must be single-channel .*got mode {mode}"):
            oio.load_label_png(path)
    Image.new("1", (4, 3)).save(tmp_path / "bits.png")
    with pytest.raises(DataError, match=r"bits\.png: label PNG must be single-channel .*got mode 1"):
        oio.load_label_png(tmp_path / "bits.png")
    _save(tmp_path / "l.png", np.zeros((3, 4), np.uint8))
    with pytest.raises(DataError, match=r"l\.png: label map size 4x3 does not match its image 5x3"):
        oio.load_label_png(tmp_path / "l.png", expected_size=(3, 5))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"bad\.png: cannot decode PNG"):
        oio.load_label_png(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"absent\.png: file not found"):
        oio.load_label_png(tmp_path / "absent.png")


@pytest.mark.parametrize("spng", [True, False], ids=["pyspng", "pillow"])
def test_panoptic_png_modes_and_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spng: bool) -> None:
    if spng:
        pytest.importorskip("pyspng")
    else:
        monkeypatch.setattr(oio, "pyspng", None)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 256**3, size=(5, 7))
    rgb = id_to_rgb(ids)
    _save(tmp_path / "rgb.png", rgb)
    _save(tmp_path / "rgba.png", np.concatenate([rgb, np.full((5, 7, 1), 3, np.uint8)], axis=-1))
    Image.fromarray(id_to_rgb(ids % 4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    for name, expected in (("rgb", ids), ("rgba", ids), ("p", ids % 4)):
        out = oio.load_panoptic_png(tmp_path / f"{name}.png", expected_size=(5, 7))
        assert out.dtype == np.int32, name
        np.testing.assert_array_equal(out, expected, err_msg=name)
        colours = oio.load_rgb_png(tmp_path / f"{name}.png")
        assert colours.shape == (5, 7, 3) and colours.dtype == np.uint8 and colours.flags.c_contiguous
    assert (oio._spng_rgb(tmp_path / "rgb.png") is not None) == spng
    _save(tmp_path / "grey.png", np.zeros((5, 7), np.uint8))
    with pytest.raises(DataError, match=r"grey\.png: panoptic PNG must be RGB \(ids as colours\), got mode L"):
        oio.load_panoptic_png(tmp_path / "grey.png")
    with pytest.raises(DataError, match=r"rgb\.png: size 7x5 does not match its image 7x6"):
        oio.load_rgb_png(tmp_path / "rgb.png", expected_size=(6, 7))
    (tmp_path / "cut.png").write_bytes((tmp_path / "rgb.png").read_bytes()[:60])
    with pytest.raises(DataError, match=r"cut\.png: cannot decode PNG"):
        oio.load_panoptic_png(tmp_path / "cut.png")


def test_load_image_modes_and_errors(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = oio.load_image(_save(tmp_path / "grey.png", grey))
    assert out.shape == (3, 4, 3) and out.flags.writeable
    np.testing.assert_array_equal(out[..., 1], grey)
    la = np.stack([np.full((3, 4), 200, np.uint8), np.full((3, 4), 0, np.uint8)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert not oio.load_image(tmp_path / "la.png").any()  # fully transparent: black
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    with pytest.raises(DataError, match=r"junk\.jpg: not a readable image"):
        oio.load_image(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match=r"absent\.jpg: file not found"):
        oio.load_image(tmp_path / "absent.jpg")


def test_list_images_skips_hidden_and_other_files(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", "c.txt", "._a.png", ".d.x1y2.tmp.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "e.png").mkdir()
    assert [p.name for p in oio.list_images(tmp_path)] == ["a.png", "b.JPG"]
    with pytest.raises(DataError, match=r"nope: folder not found"):
        oio.list_images(tmp_path / "nope")


# ----------------------------------------------------------------------------- errors
def test_one_error_class_each_and_no_torch() -> None:
    from omniseg import checkpoint, data
    from omniseg.metrics import EvaluationError

    assert data.DataError is oio.DataError is DataError
    assert checkpoint.CheckpointError is CheckpointError
    assert issubclass(EvaluationError, DataError)
    code = (
        "import sys\n"
        "import omniseg.io, omniseg.errors\n"
        "from omniseg.checkpoint import CheckpointError\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (9, 1), (33, 47), (5, 6, 3), (1, 1, 3), (17, 4, 4), (240, 321, 3)]
)
def test_encode_png_round_trips_through_pillow(shape: tuple[int, ...]) -> None:
    import io as _io

    from PIL import Image

    from omniseg.io import encode_png

    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    array[: shape[0] // 2] //= 7  # smooth and noisy rows: the Up filter's wrap-around both ways
    decoded = np.asarray(Image.open(_io.BytesIO(encode_png(array))))
    assert decoded.shape == array.shape and np.array_equal(decoded, array)


@pytest.mark.parametrize("threads", [2, 3])
def test_encode_png_on_threads_is_one_valid_zlib_stream_of_the_same_pixels(threads: int) -> None:
    import io as _io
    import zlib

    from PIL import Image

    from omniseg import io as omniseg_io

    rng = np.random.default_rng(threads)
    array = rng.integers(0, 256, (1300, 1100, 3), dtype=np.uint8)  # 4.3 MB: past the parallel threshold
    array[:700] //= 9
    assert array.nbytes >= omniseg_io._PARALLEL_BYTES
    png = omniseg_io.encode_png(array, threads=threads)
    assert png != omniseg_io.encode_png(array)  # the sliced stream really was taken
    decoded = np.asarray(Image.open(_io.BytesIO(png)))
    assert np.array_equal(decoded, array)
    # zlib itself checks the joined stream end to end: header, every slice, the Adler-32
    idat = png[png.index(b"IDAT") + 4 : png.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == array.shape[0] * (array.shape[1] * 3 + 1)


def test_encode_png_refuses_what_it_cannot_write() -> None:
    from omniseg.io import encode_png

    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="at least one pixel"):
        encode_png(np.zeros((0, 4), dtype=np.uint8))
