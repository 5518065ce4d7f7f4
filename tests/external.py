"""What a test needs from outside the repository, and what happens when it is missing.

A test that needs ``../shared/data``, Debian's Chromium or a PostgreSQL server calls
``missing(group, reason)`` when the thing is absent. On a user's machine that is a skip whose
reason starts with ``[group]``; the run then ends with one line per skipped group (conftest.py).
Under ``CXR_AUDIT_STRICT=1`` (set by ``.ci/run``) it is a failure that names what is missing, so
CI cannot pass by silently skipping what it must check.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

STRICT_ENV = "CXR_AUDIT_STRICT"
GROUPS = ("shared-data", "chromium", "postgresql")


def strict() -> bool:
    """True when missing requirements must fail the run (CI)."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


def missing(group: str, reason: str) -> NoReturn:
    """Skip (or, under CXR_AUDIT_STRICT=1, fail) because ``group`` is not available."""
    if group not in GROUPS:
        raise ValueError(f"unknown requirement group {group!r}; known: {', '.join(GROUPS)}")
    if strict():
        pytest.fail(f"[{group}] required under {STRICT_ENV}=1 but missing: {reason}",
                    pytrace=False)
    pytest.skip(f"[{group}] {reason}")
