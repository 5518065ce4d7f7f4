"""How the report shows values: table cells as text and as fixed-decimal numbers, method labels,
method order, section slugs, and any DataFrame as a table of escaped cells."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from audit.protocol import BASELINE_NAMES, HIT_THRESHOLDS, METHOD_LABELS, METHOD_NAMES, method_kind
from audit.store.files import float_or_nan

DECIMALS = 3
#: Sections and rows resting on fewer images than this are labelled illustrative.
ILLUSTRATIVE_BELOW = 5
#: Paired differences on fewer pairs than this show no p-value and no "CI excludes 0" (a
#: bootstrap over so few pairs has only a handful of distinct resamples).
MIN_PAIRS_FOR_P = 10
#: p-values below this print as "< 0.001".
P_FLOOR = 0.001
#: The hit thresholds as they appear in column names (``iobb_hit_0.1_rate``).
THRESHOLDS: tuple[str, ...] = tuple(f"{t:g}" for t in HIT_THRESHOLDS)


def as_text(v: Any) -> str:
    """A table cell as text ('' for None / NaN)."""
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    try:
        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    return str(v)


def fmt(v: Any, decimals: int = DECIMALS) -> str:
    f = float_or_nan(v)
    return "–" if not math.isfinite(f) else f"{f:.{decimals}f}"


def num_cell(v: Any, decimals: int = DECIMALS, integer: bool = False) -> dict:
    """A number for a table: exact value (for data-value) and its fixed-decimal text."""
    f = float_or_nan(v)
    if not math.isfinite(f):
        return {"value": "nan", "text": "–"}
    if integer:
        return {"value": str(int(round(f))), "text": str(int(round(f)))}
    return {"value": repr(f), "text": f"{f:.{decimals}f}"}


def with_count(cell: dict, rate: Any, n: Any) -> dict:
    """A rate cell with its count: ``0.543`` becomes ``0.543 (38/70)`` (``count`` key)."""
    r, total = float_or_nan(rate), float_or_nan(n)
    if math.isfinite(r) and math.isfinite(total) and total > 0:
        cell = {**cell, "count": f"{int(round(r * total))}/{int(round(total))}"}
    return cell


def p_value(p: Any, n: Any) -> dict:
    """A p-value as shown: ``{"text", "value", "reason"}``; "< 0.001" below `P_FLOOR`, and no
    number (with the reason) on fewer than `MIN_PAIRS_FOR_P` pairs."""
    f, count = float_or_nan(p), float_or_nan(n)
    if not math.isfinite(count) or count < MIN_PAIRS_FOR_P:
        shown = "?" if not math.isfinite(count) else str(int(count))
        return {"text": "not shown", "value": "nan",
                "reason": f"n = {shown} < {MIN_PAIRS_FOR_P}"}
    if not math.isfinite(f):
        return {"text": "–", "value": "nan", "reason": ""}
    text = f"< {P_FLOOR:g}" if f < P_FLOOR else f"{f:.3f}"
    return {"text": text, "value": repr(f), "reason": ""}


def timestamp(value: Any) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM:SS`` and its zone (``UTC`` or ``+hh:mm``); text that
    is not an ISO time is returned as it is, empty stays empty."""
    import datetime as _dt

    text = as_text(value)
    if not text:
        return ""
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        return text
    if t.tzinfo is None:
        return t.strftime("%Y-%m-%d %H:%M:%S") + " (time zone not recorded)"
    offset = t.utcoffset()
    zone = "UTC" if offset == _dt.timedelta(0) else t.strftime("%z")[:3] + ":" + \
        t.strftime("%z")[3:]
    return t.strftime("%Y-%m-%d %H:%M:%S ") + zone


def arrow(delta: float) -> tuple[str, str]:
    """(symbol, CSS class) of a change."""
    if not math.isfinite(delta):
        return ("", "")
    if delta > 0:
        return ("▲", "up")
    if delta < 0:
        return ("▼", "down")
    return ("=", "same")


def slugify(name: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "x"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def method_label(m: str) -> str:
    """Display name of a method; a baseline's says so."""
    label = METHOD_LABELS.get(m, m)
    return f"{label} (baseline)" if method_kind(m) == "baseline" else label


def method_labels(methods) -> dict[str, str]:
    return {m: method_label(m) for m in methods}


def order_methods(methods, kinds: dict[str, str] | None = None) -> list[str]:
    """Methods first, then baselines; known names in the protocol's order, others as seen."""
    kinds = kinds or {}
    methods = list(dict.fromkeys(str(m) for m in methods))

    def is_baseline(m):
        return kinds.get(m, method_kind(m)) == "baseline"

    main = [m for m in METHOD_NAMES if m in methods and not is_baseline(m)]
    main += [m for m in methods if m not in main and not is_baseline(m)]
    base = [m for m in BASELINE_NAMES if m in methods and is_baseline(m)]
    base += [m for m in methods if m not in main and m not in base]
    return main + base


def generic_table(df: pd.DataFrame, arrows: bool = False) -> dict:
    """Any DataFrame as escaped cells (numbers with fixed decimals and an exact data-value)."""
    cols = [str(c) for c in df.columns]
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for c, v in zip(cols, rec, strict=True):
            if isinstance(v, (bool, np.bool_)):
                cells.append({"text": str(bool(v)), "num": False})
            elif isinstance(v, (int, float, np.integer, np.floating)):
                cell = num_cell(v, integer=isinstance(v, (int, np.integer)))
                cell["num"] = True
                if arrows and c in ("diff", "delta", "change"):
                    cell["arrow"], cell["cls"] = arrow(float_or_nan(v))
                cells.append(cell)
            else:
                cells.append({"text": as_text(v), "num": False})
        rows.append(cells)
    return {"cols": cols, "rows": rows}
