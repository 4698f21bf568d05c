"""Number formatting shared by the report and the plan: parameters, bytes, percentages,
ratios, rates, dollars and durations; a dash for a missing value."""

from __future__ import annotations

import math

__all__ = ["DASH", "fmt_params", "fmt_bytes", "fmt_pct", "fmt_ratio", "fmt_rate", "fmt_usd", "fmt_seconds"]

DASH = "—"


def fmt_params(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
    """Decimal units (1 MB = 10⁶ bytes), as disk sizes are usually quoted."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


def fmt_pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def fmt_ratio(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}×"


def fmt_rate(x: float | None) -> str:
    return DASH if x is None else f"{x:,.1f}"


def fmt_usd(x: float | None) -> str:
    """Three significant digits, never in scientific notation."""
    if x is None:
        return DASH
    if x <= 0:
        return "$0"
    decimals = max(2, 2 - math.floor(math.log10(x)))
    return f"${x:,.{decimals}f}"


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
