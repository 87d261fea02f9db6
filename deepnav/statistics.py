"""The spread of a list of numbers as every report and benchmark writes it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def spread(values: Iterable[float]) -> dict:
    """n, mean, median, p90, p95, min and max (None for an empty list), as plain floats for JSON."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"n": 0, **dict.fromkeys(("mean", "median", "p90", "p95", "min", "max"))}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "p95": float(np.percentile(v, 95)),
            "min": float(v.min()), "max": float(v.max())}
