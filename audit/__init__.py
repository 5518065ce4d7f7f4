"""cxr-audit: a saliency audit instrument for chest X-ray classifiers.

`audit` is a plain library (no Prefect import); `flows/` wires it into Prefect flows.
"""

from __future__ import annotations

__version__ = "0.1.0"
