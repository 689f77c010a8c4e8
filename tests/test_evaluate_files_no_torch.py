"""``omniseg evaluate`` on prediction files never imports torch (it is 1.3 s of start-up), nor,
for PQ through hotcoco, the dataset readers, Pillow or pycocotools' COCO (together ~45 ms, a
fifth of a 200-image evaluation), and still gives the official PQ."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import shared_data

# What the child process runs: the CLI's panoptic file evaluation, then the torch modules loaded.
_CHILD = textwrap.dedent(
    """
    import sys
    from omniseg.cli import main

    rc = main(sys.argv[1:])
    print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    heavy = ("omniseg.data", "omniseg.batch", "PIL", "pycocotools.coco", "pycocotools.cocoeval")
    print(sorted(m for m in sys.modules if m in heavy))
    sys.exit(rc)
    """
)


def test_panoptic_file_evaluation_through_the_cli_imports_no_torch() -> None:
    d = shared_data("panoptic_pq_fixtures")  # skips, saying why, where the fixtures are absent
    expected = json.loads((d / "EXPECTED.json").read_text())
    argv = [
        "evaluate", "--task", "panoptic", "--json",
        "--gt-json", str(d / expected["gt_json"]), "--gt-dir", str(d / expected["gt_folder"]),
        "--pred-json", str(d / expected["pred_json"]), "--pred-dir", str(d / expected["pred_folder"]),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    result_line, torch_modules, heavy_modules = proc.stdout.strip().splitlines()
    assert torch_modules == "[]", f"the file-level evaluate path imported {torch_modules}"
    if importlib.util.find_spec("hotcoco") is not None:  # the fallback engine decodes PNGs itself
        assert heavy_modules == "[]", f"PQ through hotcoco imported {heavy_modules}"
    result = json.loads(result_line)
    for group in ("All", "Things", "Stuff"):
        assert result[group]["n"] == expected[group]["n"], group
        for key in ("pq", "sq", "rq"):
            assert result[group][key] == pytest.approx(expected[group][key], abs=1e-12), (group, key)
