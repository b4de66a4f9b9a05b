"""
In-process counters.  Kept deliberately small: a later metrics endpoint
renders them; until then tests and logs read them directly.
"""

from __future__ import annotations

from collections import Counter


class Counters:
    """
    Named counters with one optional label each, e.g.
    C{proxy_rejected{reason="v1-bad-port"}}.
    """

    def __init__(self) -> None:
        self._values: Counter[tuple[str, str]] = Counter()

    def increment(self, name: str, label: str = "", by: int = 1) -> None:
        self._values[(name, label)] += by

    def value(self, name: str, label: str = "") -> int:
        return self._values[(name, label)]

    def by_label(self, name: str) -> dict[str, int]:
        return {label: n for (counter, label), n in self._values.items() if counter == name}
