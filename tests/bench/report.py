"""
Plain-text tables for the benchmark report.
"""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> str:
    """
    Format C{rows} under C{header} as aligned columns separated by " | ".

    @param right_from: columns from this index on are right-aligned
        (numbers); the ones before it are left-aligned (labels).
    """
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i >= right_from else cell.ljust(widths[i]))
        return " | ".join(out).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def fmt(value: float | None, digits: int = 1) -> str:
    """A number with C{digits} decimals, or "n/a"."""
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    """C{a / b} as "1.23x", or "n/a" when either side is missing or b is 0."""
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{digits}f}x"
