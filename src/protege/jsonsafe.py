"""Figures as JSON: what every `--json` output and stored metric goes through."""

from __future__ import annotations

import math


def json_safe(value):
    """JSON has no NaN or Infinity: a figure that is undefined (NaN) or never arrives (an
    infinite payback) becomes null, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
