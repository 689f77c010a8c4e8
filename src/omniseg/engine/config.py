"""Training configs: one readable YAML file (model, data, schedule) plus ``key.sub=value`` overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from omniseg.errors import DataError


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: malformed YAML ({exc})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: a config must be a mapping with model/data/train sections")
    return apply_overrides(config, overrides or [])


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``train.epochs=10`` style overrides; values are parsed as YAML (numbers, lists, booleans)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node: Any = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return config
