"""What the latency benchmarks share: models built from a config's ``model`` section, timed
alternately so that a busy machine slows every model alike, and peak memory per model.

Not a benchmark itself: ``benchmarks/run.py`` skips files whose name starts with an underscore."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from omniseg.engine.config import load_config
from omniseg.models import build_model
from omniseg.optimize import optimize_for_inference

ROOT = Path(__file__).resolve().parents[1]


def model_from_config(config: str | Path, **overrides: Any) -> torch.nn.Module:
    """The model of a training config (ImageNet backbone, untrained heads), ready for inference."""
    section = {**load_config(ROOT / config)["model"], **overrides}
    return optimize_for_inference(build_model(section).eval())


def models_from_configs(configs: Mapping[str, tuple[str, dict]], **common: Any) -> dict[str, torch.nn.Module]:
    """``{name: model_from_config(path, **common, **options)}`` for ``{name: (path, options)}``."""
    return {name: model_from_config(path, **common, **options) for name, (path, options) in configs.items()}


def trained_model(name_or_path: str | Path) -> torch.nn.Module:
    """A trained checkpoint or zoo entry, as ``omniseg segment`` runs it (optimised for inference)."""
    from omniseg.predictor import load_predictor

    return load_predictor(name_or_path).model


def alternate(runs: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable after one warm-up each, the callables taking turns."""
    for run in runs.values():  # warm-up: caches, oneDNN primitives, Winograd plans
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(run: Callable[[], Any]) -> float | None:
    """Peak resident memory that ``run`` adds above the process's memory before it (Linux: the
    high-water mark is reset through ``/proc/self/clear_refs``); None where that is unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        run()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return None
