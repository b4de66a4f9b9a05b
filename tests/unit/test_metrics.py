"""
Metrics through prometheus_client: counters keep their interface, requests
feed histograms by route and status class, TLS failures are counted by
reason.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from OpenSSL import SSL
from prometheus_client import generate_latest
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from quayfront.accesslog import AccessLogEntry
from quayfront.metrics import (
    Counters,
    MeteredAccessLog,
    MetricsResource,
    tls_failure_reason,
)


def entry(uri: bytes, status: int, outcome: str | None = None) -> AccessLogEntry:
    return AccessLogEntry(
        timestamp=0.0, socket_peer="127.0.0.1", client="192.0.2.1", method=b"GET", uri=uri,
        protocol=b"HTTP/1.1", status=status, body_bytes_sent=100, referer=None,
        user_agent=None, request_time_s=0.02, request_length=80,
        upstream_response_time_s=0.01, outcome=outcome,
    )


class Recording:
    format = "quay"

    def __init__(self) -> None:
        self.entries: list[AccessLogEntry] = []

    def write(self, entry: AccessLogEntry) -> None:
        self.entries.append(entry)


def sample(counters: Counters, name: str, labels: dict[str, str]) -> float | None:
    return counters.registry.get_sample_value(name, labels)


def test_each_logged_request_feeds_duration_bytes_and_upstream_errors() -> None:
    """An access log entry is written on and observed by route, status class and outcome."""
    counters = Counters()
    log = Recording()
    metered = MeteredAccessLog(log, counters, lambda path: "/v2/" if path.startswith(b"/v2/") else "/")
    metered.write(entry(b"/v2/x?y=1", 200))
    metered.write(entry(b"/v2/x", 502, outcome="upstream-unreachable"))
    metered.write(entry(b"/other", 404))
    assert len(log.entries) == 3
    assert metered.format == "quay"
    assert sample(counters, "quayfront_request_duration_seconds_count",
                  {"route": "/v2/", "status_class": "2xx"}) == 1
    assert sample(counters, "quayfront_request_duration_seconds_count",
                  {"route": "/v2/", "status_class": "5xx"}) == 1
    assert sample(counters, "quayfront_request_bytes_total", {"route": "/v2/"}) == 160
    assert sample(counters, "quayfront_response_bytes_total", {"route": "/"}) == 100
    assert counters.value("upstream_errors", "upstream-unreachable") == 1
    assert sample(counters, "quayfront_upstream_errors_total",
                  {"reason": "upstream-unreachable"}) == 1


def test_increment_keeps_its_interface_and_exports() -> None:
    """Counters.increment(name, label) still counts, and the value is exported."""
    counters = Counters()
    counters.increment("proxy_header_rejected", "timeout")
    counters.increment("proxy_header_rejected", "timeout", by=2)
    assert counters.value("proxy_header_rejected", "timeout") == 3
    assert counters.by_label("proxy_header_rejected") == {"timeout": 3}
    assert sample(counters, "quayfront_proxy_header_rejected_total", {"reason": "timeout"}) == 3


def test_metrics_resource_renders_extra_collectors() -> None:
    """The metrics page includes counters, gauges and extra collectors."""
    from prometheus_client.core import GaugeMetricFamily

    class Extra:
        def collect(self):
            yield GaugeMetricFamily("quayfront_extra", "Extra.", value=7)

    counters = Counters()
    counters.increment("http_responses", "200")
    resource = MetricsResource(counters, [("requests_in_flight", "In flight.", "", lambda: [("", 2)])],
                               [Extra()])

    class Request:
        def setHeader(self, name, value):
            pass

    text = resource.render_GET(Request()).decode()
    assert 'quayfront_http_responses_total{status="200"} 1.0' in text
    assert "quayfront_requests_in_flight 2.0" in text
    assert "quayfront_extra 7.0" in text


@implementer(IOpenSSLClientConnectionCreator)
class OldCiphersOnly:
    def clientConnectionForTLS(self, protocol):
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(b"AES128-SHA")
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        return connection


def test_failure_reason_labels() -> None:
    """OpenSSL's error tuples become short labels."""
    assert tls_failure_reason(SSL.Error([("SSL routines", "", "wrong version number")])) == (
        "wrong-version-number"
    )
    assert tls_failure_reason(SSL.Error()) == "error"


def test_route_label_carried_by_the_entry_is_used() -> None:
    """An entry that names its route label is counted under it, without routing its URI again."""
    counters = Counters()

    def route_of(path: bytes) -> str:
        raise AssertionError(f"routed again: {path!r}")

    metered = MeteredAccessLog(Recording(), counters, route_of)
    metered.write(dataclasses.replace(entry(b"/v2/x", 200), route_label="/v2/"))
    metered.write(dataclasses.replace(entry(b"/health", 200), route_label="-"))
    assert sample(counters, "quayfront_request_duration_seconds_count",
                  {"route": "/v2/", "status_class": "2xx"}) == 1
    assert sample(counters, "quayfront_request_bytes_total", {"route": "-"}) == 80


def without_creation_times(exposition: bytes) -> list[str]:
    # The _created samples are the wall-clock time each series was made.
    return [line for line in exposition.decode().splitlines() if "_created" not in line]


def test_exposition_is_that_of_labelled_prometheus_metrics() -> None:
    """Repeated requests and increments export exactly what labels() calls on the metrics would."""
    counters = Counters()
    reference = Counters()
    metered = MeteredAccessLog(Recording(), counters, lambda path: path.decode()[:4])
    requests = [
        (b"/v2/a", 200, None, 0.004),
        (b"/v2/b", 201, None, 0.3),
        (b"/v1/c", 404, None, 2000.0),
        (b"/v2/a", 502, "upstream-unreachable", 0.05),
        (b"/v2/a", 200, "client-closed", 7.0),
        (b"/v2/a", 200, None, 0.004),
        (b"/xyz", 99, "upstream-truncated", 0.0),
    ] * 3
    for uri, status, outcome, duration_s in requests:
        logged = dataclasses.replace(entry(uri, status, outcome), request_time_s=duration_s)
        counters.increment("http_responses", str(status))
        metered.write(logged)
        route = uri.decode()[:4]
        reference._exported["http_responses"].labels(str(status)).inc()
        reference.request_duration.labels(route, f"{status // 100}xx").observe(duration_s)
        reference.request_bytes.labels(route).inc(logged.request_length)
        reference.response_bytes.labels(route).inc(logged.body_bytes_sent)
        if outcome and outcome.startswith("upstream-"):
            reference._exported["upstream_errors"].labels(outcome).inc()
    increments = [
        ("proxy_header_rejected", "timeout", 1),
        ("tls_handshake_failed", "timeout", 2),
        ("proxy_header_rejected", "timeout", 3),
        ("not_exported", "x", 1),
    ]
    for name, label, by in increments:
        counters.increment(name, label, by)
        if name != "not_exported":
            reference._exported[name].labels(label).inc(by)
    assert without_creation_times(generate_latest(counters.registry)) == without_creation_times(
        generate_latest(reference.registry)
    )
    assert counters.value("http_responses", "200") == 9
    assert counters.value("not_exported", "x") == 1
    assert counters.by_label("upstream_errors") == {
        "upstream-unreachable": 3,
        "upstream-truncated": 3,
    }


def test_requests_are_counted_as_through_prometheus_clients_own_methods() -> None:
    """
    Counters adds to the children's values directly: the exported samples
    are those prometheus_client's own observe and inc give, at bucket
    bounds, between them, past the last finite one, for zero and for NaN.
    """
    from prometheus_client import CollectorRegistry, Counter as PromCounter, Histogram

    from quayfront.metrics import DURATION_BUCKETS_S

    counters = Counters()
    reference = CollectorRegistry(auto_describe=True)
    duration = Histogram(
        "quayfront_request_duration_seconds", "", ["route", "status_class"],
        buckets=DURATION_BUCKETS_S, registry=reference,
    )
    request_bytes = PromCounter("quayfront_request_bytes", "", ["route"], registry=reference)
    response_bytes = PromCounter("quayfront_response_bytes", "", ["route"], registry=reference)
    responses = PromCounter("quayfront_http_responses", "", ["status"], registry=reference)
    amounts = [0.0, float("nan"), 2500.0, *DURATION_BUCKETS_S]
    amounts += [bound * 1.5 for bound in DURATION_BUCKETS_S]
    for index, amount in enumerate(amounts):
        route, status = ("/v2/", 200) if index % 2 else ("-", 404)
        counters.observe_request(route, status, amount, index, 10 * index, None)
        counters.increment("http_responses", str(status))
        duration.labels(route, f"{status // 100}xx").observe(amount)
        request_bytes.labels(route).inc(index)
        response_bytes.labels(route).inc(10 * index)
        responses.labels(str(status)).inc()

    def samples(registry, names):
        return sorted(
            (sample.name, tuple(sorted(sample.labels.items())), repr(sample.value))
            for metric in registry.collect()
            for sample in metric.samples
            if metric.name in names and not sample.name.endswith("_created")
        )

    names = {
        "quayfront_request_duration_seconds", "quayfront_request_bytes",
        "quayfront_response_bytes", "quayfront_http_responses",
    }
    assert samples(counters.registry, names) == samples(reference, names)
    assert len(samples(reference, names)) > 40


_REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(["/v2/", "/", "-"]),
        st.sampled_from([200, 201, 304, 404, 499, 502, 99]),
        st.one_of(
            st.floats(min_value=0.0, max_value=3000.0),
            st.sampled_from([float("nan"), float("inf"), 0.005, 0.0050000001, 300.0]),
        ),
        st.integers(0, 2**40),
        st.integers(0, 2**40),
        st.sampled_from([None, "upstream-unreachable", "client-closed"]),
        # Whether a scrape (which folds) follows this request.
        st.booleans(),
    ),
    max_size=40,
)


@given(_REQUESTS)
def test_folded_counts_scrape_as_counts_added_at_once(requests) -> None:
    """
    In one process, what requests add is folded into prometheus_client's
    values only when scraped: every scrape, whenever it comes, reads what
    adding each request at once (the workers' way) gives.
    """
    folded = Counters()
    at_once = Counters()
    at_once.folds = False
    assert folded.folds
    for route, status, duration_s, request_bytes, response_bytes, outcome, scrape in requests:
        for counters in (folded, at_once):
            counters.increment("http_responses", str(status))
            counters.observe_request(
                route, status, duration_s, request_bytes, response_bytes, outcome
            )
        if scrape:
            assert without_creation_times(generate_latest(folded.registry)) == (
                without_creation_times(generate_latest(at_once.registry))
            )
        assert folded.value("http_responses", str(status)) == at_once.value(
            "http_responses", str(status)
        )
    assert without_creation_times(generate_latest(folded.registry)) == without_creation_times(
        generate_latest(at_once.registry)
    )
    # The series exist from the first request on, not from the first scrape.
    assert sorted(sample.name for metric in folded.registry.collect()
                  for sample in metric.samples) == sorted(
        sample.name for metric in at_once.registry.collect() for sample in metric.samples
    )


def test_counters_add_at_once_with_workers(monkeypatch) -> None:
    """With workers (multiprocess values in files) nothing waits for a scrape."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "unused")
    assert Counters().folds is False
