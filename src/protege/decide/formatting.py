"""How decide writes numbers in sentences and tables: money, counts, durations, signed
points. Shared by the verdict's reasons and the reports so both say a figure the same way;
None always reads "unknown" and an infinite count or duration reads "never".
"""

from __future__ import annotations

import math


def pct(x) -> str:
    """A quality as a percentage (0.925 -> 92.5%)."""
    return "unknown" if x is None else f"{100 * x:.1f}%"


def usd(x) -> str:
    if x is None:
        return "unknown"
    if x >= 100:
        return f"${x:,.0f}"
    return f"${x:,.2f}" if x >= 0.01 else f"${x:.4f}"


def count(x) -> str:
    if x is None:
        return "unknown"
    if isinstance(x, float) and math.isinf(x):
        return "never"
    return f"{x:,.0f}"


def signed(x) -> str:
    """A difference in quality as signed metric points (0.012 -> +1.2)."""
    return "unknown" if x is None else f"{100 * x:+.1f}"


def months(x) -> str:
    """A duration given in months, in the unit a reader grasps (hours, days or months)."""
    if x is None:
        return "unknown"
    if math.isinf(x):
        return "never"
    hours = x * 30.4 * 24
    if hours < 1:
        return "under an hour"
    if hours < 48:
        return f"{hours:.0f} hours"
    return f"{x * 30.4:.1f} days" if x < 1 else f"{x:.1f} months"
