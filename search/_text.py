"""How hpsearch writes numbers in what it shows: one rule for every view and chart."""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> float | None:
    """A number as a float, or None for anything that is not a finite number (NaN, inf, None)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def fmt(value: Any) -> str:
    """A value for a table or a progress line: floats to 4 significant digits."""
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return str(value)
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)
