"""Parsing memory budgets: ``3.0bpw`` (bits per weight) or ``70MB`` / ``64MiB`` / ``500KB`` / bytes."""

from __future__ import annotations

import math
import re

from evaluators.errors import UserError

__all__ = ["parse_budget"]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bpw|b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)


def parse_budget(text: str, numel: int) -> int:
    """Budget in bytes for ``numel`` weights. ``3.0bpw`` means ``3.0 * numel / 8`` bytes."""
    text = str(text)
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    match = _PATTERN.match(text)
    if not match:
        raise UserError(f"malformed budget {shown}: use bits per weight like 3.0bpw, or a size like 70MB")
    value, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if not math.isfinite(value) or value > 1e18:  # 400 digits parse to inf; no model is an exabyte
        raise UserError(f"malformed budget {shown}: the number is too large; use bits per weight like 3.0bpw, "
                        "or a size like 70MB")
    if unit == "bpw":
        return int(value * numel / 8)
    return int(value * _UNITS[unit])
