"""Deterministic stratified sampling (e.g. N images per pathology for a quick audit).

``stratified_sample`` draws, per group, up to ``per_group`` units without replacement with a
``numpy.random.Generator`` seeded from ``(seed, crc32(str(group)))`` -- so a group's draw does
not depend on which other groups exist. It is independent of the input's row order: groups are
visited in sorted order and units are sorted (by ``unit_col`` or, without it, by
``sort_by``/the index) before drawing. What was drawn is recorded in the result's columns
(``sample_group``, ``sample_rank``, ``sample_group_size``) and in
``result.attrs["sampling"]`` (seed, per_group, group_col, unit_col, group sizes, numbers drawn).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["stratified_sample"]


def stratified_sample(
    df: pd.DataFrame,
    per_group: int,
    group_col: str,
    seed: int = 0,
    unit_col: str | None = None,
    sort_by: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Up to ``per_group`` units per value of ``group_col``.

    ``unit_col`` (e.g. "image_key"): sample distinct units and keep all their rows in that
    group (an image with two boxes of a finding stays whole); otherwise rows are the units.
    ``sort_by``: columns that put rows in a canonical order before drawing (default: the
    index for row units). Rows with a missing group value are never sampled. Output rows are
    ordered by group, then by draw rank.
    """
    if per_group < 0:
        raise ValueError("per_group must be >= 0")
    parts = []
    record = {
        "seed": int(seed),
        "per_group": int(per_group),
        "group_col": group_col,
        "unit_col": unit_col,
        "groups": {},
    }
    present = df[df[group_col].notna()]
    for g in sorted(present[group_col].unique(), key=lambda v: str(v)):
        sub = present[present[group_col] == g]
        if sort_by:
            sub = sub.sort_values(list(sort_by), kind="stable")
        else:
            sub = sub.sort_index(kind="stable")
        if unit_col:
            units = np.array(sorted(sub[unit_col].unique(), key=lambda v: str(v)), dtype=object)
        else:
            units = np.arange(len(sub))
        take = min(per_group, len(units))
        rng = np.random.default_rng([int(seed), zlib.crc32(str(g).encode())])
        chosen = rng.permutation(len(units))[:take]
        picked = []
        for rank, u in enumerate(chosen):
            if unit_col:
                rows = sub[sub[unit_col] == units[u]].copy()
            else:
                rows = sub.iloc[[int(u)]].copy()
            rows["sample_rank"] = rank
            picked.append(rows)
        record["groups"][str(g)] = {"size": int(len(units)), "sampled": int(take)}
        if picked:
            part = pd.concat(picked)
            part["sample_group"] = g
            part["sample_group_size"] = int(len(units))
            parts.append(part)
    out = (
        pd.concat(parts)
        if parts
        else df.iloc[0:0].assign(
            sample_rank=pd.Series(dtype=int),
            sample_group=pd.Series(dtype=object),
            sample_group_size=pd.Series(dtype=int),
        )
    )
    record["n_rows"] = int(len(out))
    out.attrs["sampling"] = record
    return out
