"""A 12-MP photo through ``omniseg segment`` with the shipped CamVid model: wall time and peak memory.

    python benchmarks/large_photo.py [--size 3000x4000] [--model camvid-deeplabv3plus-lite0] [--native]

The photo is the CamVid street frame in ``assets/`` scaled up to ``--size`` (a JPEG, as a camera
writes it). ``omniseg segment`` runs in a child process, as a user runs it -- interpreter start,
imports, model load, decoding, inference, the overlay, label PNG and JSON written -- and its peak
resident memory is the child's ``ru_maxrss``. The default size policy runs the model at the
checkpoint's reference size (CamVid: 480x360) and maps the result back
(:func:`omniseg.inference.working_size`); ``--native`` also times ``--native-size``, the model on
all 12 MP (the former behaviour: tens of seconds and several GB).

Last line: ``result: seconds=<reference policy> peak_rss_mb=<...>`` (and ``native_seconds``,
``native_peak_rss_mb`` with ``--native``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process (``os.wait4``: that child's own usage)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="3000x4000", help="HxW of the photo")
    parser.add_argument("--model", default="camvid-deeplabv3plus-lite0")
    parser.add_argument("--native", action="store_true", help="also run the model on the photo as it is")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    rows, result = [], {}
    with tempfile.TemporaryDirectory() as folder:
        photo = Path(folder) / "street.jpg"
        Image.open(ROOT / "assets" / "camvid_0016E5_07959.png").convert("RGB").resize((w, h), Image.BICUBIC).save(
            photo, quality=92
        )
        base = [sys.executable, "-m", "omniseg", "segment", str(photo), "--model", args.model]
        runs = [("reference size (default)", "", [])]
        if args.native:
            runs.append(("native size", "native_", ["--native-size"]))
        for label, key, extra in runs:
            out = Path(folder) / f"out_{key or 'ref'}"
            seconds, peak = run([*base, "--out", str(out), *extra])
            written = sorted(p.name for p in out.iterdir())
            rows.append(f"| {label} | {seconds:.1f} | {peak:.0f} | {', '.join(written)} |")
            result[f"{key}seconds"] = round(seconds, 2)
            result[f"{key}peak_rss_mb"] = round(peak)
    print(f"\n`omniseg segment` on a {w}x{h} JPEG, model {args.model}, child process (start-up included)\n")
    print("| policy | wall (s) | peak RSS (MB) | written |")
    print("|---|---:|---:|---|")
    print("\n".join(rows))
    print("\nresult: " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
