"""
In-process counters and their Prometheus text rendering, served on a
separate plain-HTTP listener (loopback by default).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from twisted.web.resource import Resource

# Counter name -> (label name, help text) for rendering.
COUNTERS = {
    "proxy_header_rejected": ("reason", "Connections closed for their PROXY header, by reason."),
    "http_responses": ("status", "Requests ended, by HTTP status (499: client left first)."),
    "tls_handshake_failed": (
        "reason",
        "TLS handshakes that did not complete, by reason (timeout, client-closed, not-tls,"
        " tls-error).",
    ),
    "listener_accept_paused": (
        "listener",
        "Times a listener stopped accepting because it held max_connections.",
    ),
    "http_requests_refused": (
        "reason",
        "Requests refused for their framing, target or head deadline, by reason.",
    ),
    "http_headers_dropped": ("reason", "Client request headers dropped, by reason."),
}


class Counters:
    """
    Named counters with one optional label each, e.g.
    C{proxy_header_rejected{reason="v1-bad-port"}}.
    """

    def __init__(self) -> None:
        self._values: Counter[tuple[str, str]] = Counter()

    def increment(self, name: str, label: str = "", by: int = 1) -> None:
        self._values[(name, label)] += by

    def value(self, name: str, label: str = "") -> int:
        return self._values[(name, label)]

    def by_label(self, name: str) -> dict[str, int]:
        return {label: n for (counter, label), n in self._values.items() if counter == name}


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# A gauge: name, help, label name, and a function giving (label, value) pairs.
Gauge = tuple[str, str, str, Callable[[], Iterable[tuple[str, float]]]]


def render_prometheus(counters: Counters, gauges: Iterable[Gauge]) -> bytes:
    lines = []
    for name, (label, help_text) in COUNTERS.items():
        metric = f"quayfront_{name}_total"
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} counter")
        for value, count in sorted(counters.by_label(name).items()):
            lines.append(f'{metric}{{{label}="{_escape_label(value)}"}} {count}')
    for name, help_text, label, read in gauges:
        metric = f"quayfront_{name}"
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} gauge")
        for value, amount in read():
            labels = f'{{{label}="{_escape_label(value)}"}}' if label else ""
            lines.append(f"{metric}{labels} {amount:g}")
    return ("\n".join(lines) + "\n").encode("utf-8")


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, counters: Counters, gauges: list[Gauge]) -> None:
        super().__init__()
        self._counters = counters
        self._gauges = gauges

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return render_prometheus(self._counters, self._gauges)
