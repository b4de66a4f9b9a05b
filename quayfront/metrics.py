"""
Counters, histograms and gauges in Prometheus' text format
(C{prometheus_client}), served on a separate plain-HTTP listener (loopback by
default).

With one process every metric lives in that process's registry.  With
worker processes, C{prometheus_client}'s multiprocess mode keeps each
worker's values in files under C{PROMETHEUS_MULTIPROC_DIR} and the main
process serves their sum: the rest of the code keeps calling
L{Counters.increment} either way.  With one process, what requests add is
folded into C{prometheus_client}'s values when the registry is collected
(see L{Counters.folds}), not added to them (taking their locks) one at a
time.  Gauges that read live objects (requests in
flight, open connections) are then sampled by each worker every second and
summed over the living workers.
"""

from __future__ import annotations

import functools
import os
from bisect import bisect_left
from collections import Counter
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge as PromGauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily
from twisted.web.resource import Resource

from quayfront.http._endings import UPSTREAM_COUNTER, ending_for

# Counter name -> (label, help text).  Each is exported as
# quayfront_<name>_total.
COUNTERS = {
    "proxy_header_rejected": ("reason", "Connections closed for their PROXY header, by reason."),
    "http_responses": ("status", "Requests ended, by HTTP status (499: client left first)."),
    "rate_limit_store_errors": (
        "zone",
        "Rate-limit decisions made without the shared store (down or slow), by zone.",
    ),
    "rate_limit_store_transitions": (
        "to",
        "Rate-limit zones finding the shared store failing (down) or answering again (up).",
    ),
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
    "upstream_errors": ("reason", "Requests that failed at the upstream, by reason."),
    "tls_handshake_failures": ("reason", "TLS handshakes that failed, by reason."),
}

# Request durations from the first byte of the request to the last of the
# response; registry pulls of large blobs reach minutes.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 2000)


def enable_multiprocess(directory: str) -> None:
    """
    Switch C{prometheus_client} to multiprocess values in C{directory}, for
    metrics created from now on (in this process and in processes forked
    from it).
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    prometheus_values.ValueClass = prometheus_values.get_value_class()


def multiprocess_enabled() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


class Counters:
    """
    Named counters with one optional label each, e.g.
    C{proxy_header_rejected{reason="v1-bad-port"}}, plus the per-request
    metrics fed by L{observe_request}.
    """

    def __init__(self) -> None:
        self._values: Counter[tuple[str, str]] = Counter()
        #: Whether what requests add is kept in plain numbers here and folded
        #: into prometheus_client's values when the registry is collected
        #: (a scrape), rather than added to them at once: each addition to
        #: a value takes its lock, five times per request.  Only in one
        #: process: with workers the values live in files that the main
        #: process reads, never collecting this registry.  Decided here,
        #: before anything is counted, and never changed after.
        self.folds = not multiprocess_enabled() and _can_fold()
        self.registry = _FoldingRegistry(self._fold, auto_describe=True)
        self._exported = {
            name: PromCounter(
                f"quayfront_{name}", help_text, [label] if label else [], registry=self.registry
            )
            for name, (label, help_text) in COUNTERS.items()
        }
        self.request_duration = Histogram(
            "quayfront_request_duration_seconds",
            "Requests by route prefix and status class, from request to last response byte.",
            ["route", "status_class"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.request_bytes = PromCounter(
            "quayfront_request_bytes",
            "Request bytes received (head and body), by route prefix.",
            ["route"],
            registry=self.registry,
        )
        self.response_bytes = PromCounter(
            "quayfront_response_bytes",
            "Response body bytes sent, by route prefix.",
            ["route"],
            registry=self.registry,
        )
        # The prometheus_client children each request adds to, by label
        # values: labels() takes a lock and re-checks its arguments on every
        # call, a dict lookup does not.  They hold as many entries as the
        # metrics hold children (a label value per route, status class and
        # counter reason), and stay valid because no child is ever removed.
        # What is kept is the adder of each child (_adder), not the child.
        self._exported_children: dict[tuple[str, str], Callable[[float], None] | None] = {}
        self._request_children: dict[
            tuple[str, int],
            tuple[Callable[[float], None], Callable[[float], None], Callable[[float], None]],
        ] = {}
        # Folding (see folds): the counts of each exported counter already
        # added to its child; and the running totals of the request
        # metrics' children, by route and status class.  A child's value
        # is set to its running total, so that a scrape reads exactly the
        # sums and counts the children's own inc and observe would have
        # made, in the same order.
        self._folded: dict[tuple[str, str], int] = {}
        self._request_totals: dict[tuple[str, int], tuple[list, list]] = {}
        self._byte_totals: dict[str, list] = {}
        self._duration_totals: list[list] = []

    def increment(self, name: str, label: str = "", by: int = 1) -> None:
        if by < 0:
            raise ValueError(f"{name}: a counter only goes up (by {by})")
        key = (name, label)
        values = self._values
        if self.folds and key in values:
            # Counted before: its child (if exported) exists, and is
            # brought up to date when scraped.
            values[key] += by
            return
        values[key] += by
        add = self._exported_children.get(key, _NOT_MADE)
        if add is _NOT_MADE:
            # The child is made at the first increment either way (its
            # _created time is then).
            exported = self._exported_child(name, label)
            add = self._exported_children[key] = None if exported is None else _adder(exported)
        if add is not None and not self.folds:
            add(by)

    def _exported_child(self, name: str, label: str):
        """
        The prometheus_client counter (the child of its label, if it has
        one) that C{increment(name, label)} adds to, or None for a name
        that is counted but not exported.
        """
        exported = self._exported.get(name)
        if exported is None:
            return None
        return exported.labels(label) if COUNTERS[name][0] else exported

    def value(self, name: str, label: str = "") -> int:
        return self._values[(name, label)]

    def by_label(self, name: str) -> dict[str, int]:
        return {label: n for (counter, label), n in self._values.items() if counter == name}

    def observe_request(
        self,
        route: str,
        status: int,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        outcome: str | None,
    ) -> None:
        status_class = status // 100
        if self.folds:
            totals = self._request_totals.get((route, status_class))
            if totals is None:
                totals = self._new_request_totals(route, status_class)
            byte_totals, duration_totals = totals
            byte_totals[0] += request_bytes
            byte_totals[1] += response_bytes
            # What Histogram.observe adds: the amount to the sum, one to
            # the first bucket whose bound is not below it (none for NaN).
            duration_totals[0] += duration_s
            if duration_s == duration_s:
                duration_totals[1 + bisect_left(_DURATION_BOUNDS, duration_s)] += 1
            if outcome and ending_for(outcome).counter == UPSTREAM_COUNTER:
                self.increment(UPSTREAM_COUNTER, outcome)
            return
        children = self._request_children.get((route, status_class))
        if children is None:
            children = self._request_children[(route, status_class)] = (
                _observer(self.request_duration.labels(route, f"{status_class}xx")),
                _adder(self.request_bytes.labels(route)),
                _adder(self.response_bytes.labels(route)),
            )
        observe_duration, add_request_bytes, add_response_bytes = children
        observe_duration(duration_s)
        add_request_bytes(request_bytes)
        add_response_bytes(response_bytes)
        if outcome and ending_for(outcome).counter == UPSTREAM_COUNTER:
            self.increment(UPSTREAM_COUNTER, outcome)

    def _new_request_totals(self, route: str, status_class: int) -> tuple[list, list]:
        """
        The running totals of the children C{observe_request(route, status)}
        adds to, made with the children (their _created time is the first
        request's), from the values they hold.
        """
        byte_totals = self._byte_totals.get(route)
        if byte_totals is None:
            values = (
                self.request_bytes.labels(route)._value,
                self.response_bytes.labels(route)._value,
            )
            byte_totals = self._byte_totals[route] = [*(value.get() for value in values), values]
        histogram = self.request_duration.labels(route, f"{status_class}xx")
        duration_totals = [
            histogram._sum.get(),
            *(bucket.get() for bucket in histogram._buckets),
            (histogram._sum, *histogram._buckets),
        ]
        self._duration_totals.append(duration_totals)
        totals = self._request_totals[(route, status_class)] = (byte_totals, duration_totals)
        return totals

    def _fold(self) -> None:
        """
        Bring prometheus_client's values up to what has been counted (see
        C{folds}); the registry does it before every collection.
        """
        if not self.folds:
            return
        values = self._values
        folded = self._folded
        for key, add in self._exported_children.items():
            if add is not None:
                count = values[key]
                added = folded.get(key, 0)
                if count != added:
                    add(count - added)
                    folded[key] = count
        for byte_totals in self._byte_totals.values():
            request_value, response_value = byte_totals[2]
            request_value.set(byte_totals[0])
            response_value.set(byte_totals[1])
        for duration_totals in self._duration_totals:
            for value, total in zip(duration_totals[-1], duration_totals):
                value.set(total)


class _FoldingRegistry(CollectorRegistry):
    """
    A registry that folds the counted values into its metrics (L{Counters})
    before each collection.
    """

    def __init__(self, fold: Callable[[], None], **kwargs) -> None:
        super().__init__(**kwargs)
        self._fold_counted = fold

    def collect(self):
        self._fold_counted()
        yield from super().collect()


#: The duration histogram's bucket bounds, +Inf last, as Histogram keeps them.
_DURATION_BOUNDS = [*DURATION_BUCKETS_S, float("inf")]


@functools.lru_cache(maxsize=None)
def _can_fold() -> bool:
    """
    Whether this prometheus_client keeps counter and histogram values as
    L{Counters} folding expects (a value object with get and set per
    counter child, per histogram sum and bucket, the histogram's bounds):
    else every addition goes through the children's own methods.
    """
    registry = CollectorRegistry(auto_describe=False)
    counter = PromCounter("probe", "", ["label"], registry=registry).labels("x")
    histogram = Histogram(
        "probe_seconds", "", ["label"], buckets=DURATION_BUCKETS_S, registry=registry
    ).labels("x")
    values = [getattr(counter, "_value", None), getattr(histogram, "_sum", None)]
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if not isinstance(buckets, list) or bounds != _DURATION_BOUNDS:
        return False
    values += buckets
    return all(
        callable(getattr(value, "get", None)) and callable(getattr(value, "set", None))
        for value in values
    ) and _observable(counter) and _observable(histogram)


_NOT_MADE = object()


# Each request adds to a few prometheus_client children.  Their public inc
# and observe check, on every call, what holds here (a child, not a parent;
# an amount that is not negative) before adding to the child's value
# objects (single- or multiprocess, with their own lock): the functions
# below add to those objects directly, one Python call fewer per addition,
# and fall back to the public methods if a prometheus_client version keeps
# its values otherwise.


def _observable(metric) -> bool:
    """Whether C{metric} is a child with values (not a labelled parent)."""
    is_observable = getattr(metric, "_is_observable", None)
    return is_observable is not None and bool(is_observable())


def _adder(counter: PromCounter) -> Callable[[float], None]:
    """
    What adds an amount (never negative: the callers count requests and
    bytes) to the counter child C{counter}.
    """
    value = getattr(counter, "_value", None)
    if _observable(counter) and hasattr(value, "inc"):
        return value.inc
    return counter.inc


def _observer(histogram: Histogram) -> Callable[[float], None]:
    """
    What observes an amount in the histogram child C{histogram}: add it to
    the sum and count it in the first bucket whose upper bound is not below
    it, as Histogram.observe does.
    """
    total = getattr(histogram, "_sum", None)
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if not (
        _observable(histogram)
        and hasattr(total, "inc")
        and isinstance(buckets, list)
        and isinstance(bounds, list)
        and len(buckets) == len(bounds)
        and bounds[-1] == float("inf")
    ):
        return histogram.observe
    add_to_sum = total.inc
    bucket_adders = [bucket.inc for bucket in buckets]

    def observe(amount: float) -> None:
        add_to_sum(amount)
        if amount == amount:
            # bisect_left: the first bound >= amount (never past +Inf).
            bucket_adders[bisect_left(bounds, amount)](1)

    return observe


# A gauge: name, help, label name, and a function giving (label, value) pairs.
Gauge = tuple[str, str, str, Callable[[], Iterable[tuple[str, float]]]]


class GaugeCollector:
    """
    Reads gauges from live objects at scrape time (one process only:
    multiprocess mode has no custom collectors in workers).
    """

    def __init__(self, gauges: Iterable[Gauge]) -> None:
        self._gauges = list(gauges)

    def collect(self):
        for name, help_text, label, read in self._gauges:
            family = GaugeMetricFamily(
                f"quayfront_{name}", help_text, labels=[label] if label else []
            )
            for value, amount in read():
                family.add_metric([value] if label else [], amount)
            yield family


class GaugeSampler:
    """
    Copies gauges read from live objects into multiprocess gauges (summed
    over living workers), on each call of L{sample}.
    """

    def __init__(self, gauges: Iterable[Gauge], registry: CollectorRegistry) -> None:
        self._gauges = []
        for name, help_text, label, read in gauges:
            exported = PromGauge(
                f"quayfront_{name}",
                help_text,
                [label] if label else [],
                registry=registry,
                multiprocess_mode="livesum",
            )
            self._gauges.append((exported, label, read))

    def sample(self) -> None:
        for exported, label, read in self._gauges:
            for value, amount in read():
                (exported.labels(value) if label else exported).set(amount)


def render_prometheus(counters: Counters, gauges: Iterable[Gauge]) -> bytes:
    """
    One process's metrics in the text format.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Both(counters.registry, GaugeCollector(gauges)))
    return generate_latest(registry)


class _Both:
    def __init__(self, *collectors) -> None:
        self._collectors = collectors

    def collect(self):
        for collector in self._collectors:
            yield from collector.collect()


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, counters: Counters, gauges: list[Gauge], extra=()) -> None:
        super().__init__()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Both(counters.registry, GaugeCollector(gauges), *extra))

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self._registry)


class MultiProcessMetricsResource(Resource):
    """
    The sum of every worker's metrics (read from the multiprocess
    directory) plus the main process's own collectors.
    """

    isLeaf = True

    def __init__(self, directory: str, collectors=()) -> None:
        super().__init__()
        from prometheus_client import multiprocess

        self._registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(self._registry, path=directory)
        for collector in collectors:
            self._registry.register(collector)

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self._registry)


class MeteredAccessLog:
    """
    The access log, observed: each entry also feeds the request metrics
    (duration by route and status class, bytes, upstream errors).  Every
    other attribute is the wrapped log's.
    """

    def __init__(self, access_log, counters: Counters, route_of: Callable[[bytes], str]) -> None:
        self._access_log = access_log
        self._counters = counters
        self._route_of = route_of

    def __getattr__(self, name: str):
        return getattr(self._access_log, name)

    def write(self, entry) -> None:
        route = entry.route_label
        if route is None:
            route = self._route_of(entry.uri.split(b"?", 1)[0])
        self._counters.observe_request(
            route,
            entry.status,
            entry.request_time_s,
            entry.request_length,
            entry.body_bytes_sent,
            entry.outcome,
        )
        self._access_log.write(entry)


def route_label(router, path: bytes) -> str:
    """The route prefix a path takes, as a metric label ("-" for none)."""
    route = router.route_for(path)
    return "-" if route is None else route.config.prefix


class MetricsOfTLS:
    """
    Certificate expiry times and failed reloads, read at scrape time.
    """

    def __init__(self, tls, reloader) -> None:
        self._tls = tls
        self._reloader = reloader

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = GaugeMetricFamily(
            "quayfront_certificate_expiry_timestamp_seconds",
            "When each served certificate expires (Unix time).",
            labels=["certificate"],
        )
        for certificate in self._tls.store.certificates:
            family.add_metric([certificate.label], certificate.not_after.timestamp())
        yield family
        yield CounterMetricFamily(
            "quayfront_certificate_reload_failures",
            "Certificate reloads refused (the old certificates kept serving).",
            value=self._reloader.failures,
        )


def tls_failure_reason(error: Exception) -> str:
    """
    OpenSSL's reason, as a label: C{no shared cipher} -> C{no-shared-cipher}.
    """
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        text = str(details[-1][-1])
    else:
        text = type(error).__name__
    return "-".join(text.lower().split()) or "unknown"


