"""
Graceful drain and the metrics rendering.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from quayfront.lifecycle import DrainController
from quayfront.metrics import Counters, render_prometheus
from tests.unit.test_forward import connect, make_site, response


def test_drain_waits_for_requests_in_flight_and_closes_keepalive() -> None:
    """Stopping waits for the request in flight, whose response then closes its connection."""
    site, agent, _, clock = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/slow HTTP/1.1\r\nHost: h\r\n\r\n")
    service = DrainController(site, clock, delay_s=0, timeout_s=30)
    service.startService()
    stopped = service.stopService()
    assert not stopped.called
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    assert b"Connection: close" in client.value()
    assert client.disconnecting
    # Finished only once the connection is closed: its last byte has left.
    assert not stopped.called
    channel.connectionLost(Failure(ResponseDone()))
    assert stopped.called


def test_drain_gives_up_after_its_timeout() -> None:
    """A request that never ends does not hold shutdown past drain_timeout_s."""
    site, _, _, clock = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/stuck HTTP/1.1\r\nHost: h\r\n\r\n")
    service = DrainController(site, clock, delay_s=0, timeout_s=30)
    service.startService()
    stopped = service.stopService()
    clock.advance(29)
    assert not stopped.called
    clock.advance(1)
    assert stopped.called


def test_drain_with_nothing_in_flight_is_immediate() -> None:
    """With no request in flight and no delay, stopping does not wait."""
    site, _, _, clock = make_site()
    service = DrainController(site, clock, delay_s=0, timeout_s=30)
    service.startService()
    assert service.stopService().called


def test_prometheus_text() -> None:
    """Counters render with their labels and TYPE lines; gauges with theirs."""
    counters = Counters()
    counters.increment("proxy_header_rejected", "v1-bad-port")
    counters.increment("proxy_header_rejected", "v1-bad-port")
    counters.increment("http_responses", "200")
    text = render_prometheus(
        counters, [("requests_in_flight", "In flight.", "", lambda: [("", 3)])]
    ).decode()
    assert '# TYPE quayfront_proxy_header_rejected_total counter' in text
    assert 'quayfront_proxy_header_rejected_total{reason="v1-bad-port"} 2' in text
    assert 'quayfront_http_responses_total{status="200"} 1' in text
    assert "quayfront_requests_in_flight 3" in text



def test_serving_processes_collect_young_garbage_less_often() -> None:
    """A serving process raises the young-generation GC threshold (most per-request garbage is refcounted)."""
    import gc

    from quayfront.workers import GC_YOUNG_THRESHOLD, tune_garbage_collector

    saved = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > 700
    finally:
        gc.set_threshold(*saved)
