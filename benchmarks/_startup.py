"""Start-up as an installed omniseg has it, for the end-to-end CLI timings.

Not a benchmark itself: ``benchmarks/run.py`` skips files whose name starts with an underscore."""

from __future__ import annotations

import compileall
import importlib.util
from pathlib import Path


def compile_package() -> Path:
    """Compile omniseg's modules to bytecode, as ``pip install`` (non-editable) does at install time
    and as any first run does unless ``PYTHONDONTWRITEBYTECODE`` is set. An editable install in an
    environment that sets it (this machine does) recompiles every omniseg module at every start,
    about 30 ms per CLI run that a user's installed copy never pays. Returns the package folder."""
    package = Path(importlib.util.find_spec("omniseg").origin).parent
    compileall.compile_dir(package, quiet=1)
    return package
