"""
The upstream probe behind the health resource, and Quay's JSON shape.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from quayfront.config import HealthConfig
from quayfront.health import UpstreamProbe, health_document
from tests.unit.test_forward import FakeAgent, response


def probe(**config):
    clock = MemoryReactorClock()
    agent = FakeAgent()
    return UpstreamProbe(clock, agent, b"http://upstream/", HealthConfig(**config)), agent, clock


def answer(agent, index: int, code: int) -> None:
    r = response(code, {}, 0)
    agent.requests[index]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))


def results(d: Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_up_below_500_and_cached() -> None:
    """Any status below 500 is up; the result is reused for cache_s without a new probe."""
    p, agent, clock = probe(cache_s=3.0)
    first = results(p.is_up())
    answer(agent, 0, 401)
    assert first == [True]
    clock.advance(2.9)
    assert results(p.is_up()) == [True] and len(agent.requests) == 1
    clock.advance(0.2)
    again = results(p.is_up())
    assert len(agent.requests) == 2
    answer(agent, 1, 503)
    assert again == [False]


def test_concurrent_askers_share_one_probe() -> None:
    """Health checks arriving during a probe wait for it instead of starting more."""
    p, agent, _ = probe()
    waiting = [results(p.is_up()) for _ in range(5)]
    assert len(agent.requests) == 1
    answer(agent, 0, 200)
    assert waiting == [[True]] * 5


def test_refused_probe_is_down_and_answers_everyone() -> None:
    """A refused connection marks the upstream down and still answers every waiter."""
    p, agent, clock = probe(cache_s=3.0)
    waiting = [results(p.is_up()) for _ in range(3)]
    agent.requests[0]["d"].errback(ConnectionRefusedError())
    assert waiting == [[False]] * 3
    clock.advance(3.0)
    later = results(p.is_up())
    answer(agent, 1, 200)
    assert later == [True]


def test_probe_timeout_is_down() -> None:
    """A probe that does not answer within probe_timeout_s counts as down."""
    p, agent, clock = probe(probe_timeout_s=2.0)
    waiting = results(p.is_up())
    clock.advance(2.0)
    assert waiting == [False]
    assert agent.requests[0]["cancelled"] == [True]


def test_health_document_shape() -> None:
    """Quay's shape: services map, status_code equal to the HTTP status."""
    status, body = health_document({"quayfront": True, "upstream": False})
    assert status == 503
    assert json.loads(body) == {
        "data": {"services": {"quayfront": True, "upstream": False}},
        "status_code": 503,
    }


def test_stalled_probe_body_drops_the_connection() -> None:
    """A probe whose body stalls past the timeout is down and its connection is dropped."""
    p, agent, clock = probe(probe_timeout_s=2.0)
    waiting = results(p.is_up())
    r = response(200, {}, 100)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"partial")
    clock.advance(2.0)
    assert waiting == [False]
    assert r._transport.producerState == "stopped"
