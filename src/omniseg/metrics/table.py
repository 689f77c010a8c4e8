"""Plain-text (markdown) tables of evaluation results, for the CLI and reports."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from omniseg.structures import CategoryTable

Names = CategoryTable | Mapping[int, str] | Sequence[str] | None


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value < 0:  # COCOeval's -1: nothing to score
        return "-"
    return f"{100 * value:.1f}"


def _name_lookup(categories: Names) -> dict[int, str]:
    if categories is None:
        return {}
    if isinstance(categories, CategoryTable):
        return {c.id: c.name for c in categories}
    if isinstance(categories, Mapping):
        return {int(k): str(v) for k, v in categories.items()}
    return dict(enumerate(str(n) for n in categories))


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]], align_left: int = 1) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                str(c).ljust(w) if i < align_left else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i < align_left else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _panoptic_table(result: dict, categories: Names) -> str:
    names = _name_lookup(categories)
    summary = _markdown(
        ["", "PQ", "SQ", "RQ", "n"],
        [
            [g, _pct(result[g]["pq"]), _pct(result[g]["sq"]), _pct(result[g]["rq"]), str(result[g]["n"])]
            for g in ("All", "Things", "Stuff")
            if g in result
        ],
    )
    per_class = result.get("per_class") or {}
    if not per_class:
        return summary
    rows = []
    for key, vals in per_class.items():
        cat_id = int(key)
        label = f"{names[cat_id]} ({cat_id})" if cat_id in names else str(cat_id)
        rows.append([label, _pct(vals["pq"]), _pct(vals["sq"]), _pct(vals["rq"])])
    return summary + "\n\n" + _markdown(["category", "PQ", "SQ", "RQ"], rows)


def _semantic_table(result: dict, categories: Names) -> str:
    summary = _markdown(
        ["mIoU", "pixel acc", "mean acc", "fwIoU"],
        [[_pct(result.get(k)) for k in ("miou", "pixel_accuracy", "mean_accuracy", "fwiou")]],
        align_left=0,
    )
    # per_class_iou is indexed by contiguous class index, not by category id
    if isinstance(categories, CategoryTable):
        names = dict(enumerate(categories.names))
    else:
        names = _name_lookup(categories)
        if not names and result.get("class_names"):
            names = dict(enumerate(result["class_names"]))
    rows = [[names.get(i, str(i)), _pct(v)] for i, v in enumerate(result.get("per_class_iou", []))]
    return summary + ("\n\n" + _markdown(["class", "IoU"], rows) if rows else "")


def _instance_table(result: dict, categories: Names) -> str:
    stats = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    rows = [[kind, *(_pct(result[kind].get(s)) for s in stats)] for kind in ("segm", "bbox") if kind in result]
    return _markdown(["", *stats], rows)


LAYOUTS = {"panoptic": _panoptic_table, "semantic": _semantic_table, "instance": _instance_table}


def format_table(result: dict, layout: str, categories: Names = None) -> str:
    """A markdown table of ``result`` in ``layout`` (``panoptic``, ``semantic`` or ``instance``:
    the shape of the metric's result, see :mod:`omniseg.metrics.task_metrics`).

    ``categories`` (a :class:`CategoryTable`, ``{id: name}`` or a list of names by index)
    labels the per-class rows (semantic rows are by class index, so a table's order is used);
    values are shown in percent, ``-`` where undefined.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown table layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](result, categories)
