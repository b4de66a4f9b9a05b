"""
The table of endings (quayfront.http._endings): every ending in it is
reached through the real site and channel, in memory, and logged with its
reason and status; quayfront's own answers carry the table's status,
registry error code and reason.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived

from quayfront.config import RateLimitConfig, RouteConfig
from quayfront.http import ENDINGS, UpstreamMisbehaved
from quayfront.http import _endings as endings
from quayfront.limits import ConcurrencyLimiter, RateLimiter
from quayfront.routing import Route, Router, Upstream
from tests.unit.test_forward import FakeAgent, RecordingLog, connect, make_site, response, site_for

GET = b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n"
PUT = b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc"


def forwarding_of(channel):
    return channel.request.forwarding


def completed():
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(GET)
    r = response(200, {}, 2)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"ok")
    r._bodyDataFinished(Failure(ResponseDone()))
    return site, client, log


def body_too_large():
    site, _, log, clock = make_site(max_body_bytes=10)
    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
    clock.advance(0)
    return site, client, log


def rate_limited():
    clock = MemoryReactorClock()
    limiter = RateLimiter(clock, RateLimitConfig(requests_per_s=0.5, burst=1))
    upstream = Upstream("default", FakeAgent(), ConcurrencyLimiter(clock, 0, 0, 1))
    log = RecordingLog()
    site = site_for(
        Router([Route(RouteConfig(prefix="/"), upstream=upstream, rate_limiter=limiter)]),
        clock,
        access_log=log,
    )
    for _ in range(2):
        channel, client = connect(site)
        channel.dataReceived(GET)
    clock.advance(0)
    return site, client, log


def queue_full():
    site, _, log, clock = make_site(max_active=1)
    for _ in range(4):
        channel, client = connect(site)
        channel.dataReceived(GET)
    clock.advance(0)
    return site, client, log


def queue_timeout():
    site, _, log, clock = make_site(max_active=1)
    for _ in range(2):
        channel, client = connect(site)
        channel.dataReceived(GET)
    clock.advance(30)
    return site, client, log


class RefusingAgent(FakeAgent):
    def request(self, method, uri, headers=None, bodyProducer=None):
        raise ValueError("bad uri")


def upstream_request_refused():
    clock = MemoryReactorClock()
    log = RecordingLog()
    upstream = Upstream("default", RefusingAgent(), ConcurrencyLimiter(clock, 0, 0, 1))
    site = site_for(Router([Route(RouteConfig(prefix="/"), upstream=upstream)]), clock, access_log=log)
    channel, client = connect(site)
    channel.dataReceived(GET)
    clock.advance(0)
    return site, client, log


def upstream_fails_with(failure):
    def scenario():
        site, agent, log, clock = make_site()
        channel, client = connect(site)
        channel.dataReceived(GET)
        agent.requests[0]["d"].errback(failure())
        clock.advance(0)
        return site, client, log

    return scenario


def misbehaving(reason):
    return upstream_fails_with(lambda: ResponseFailed([Failure(UpstreamMisbehaved(reason))]))


def response_timeout():
    site, _, log, clock = make_site(response_timeout_s=30)
    channel, client = connect(site)
    channel.dataReceived(GET)
    clock.advance(30)
    return site, client, log


def upload_idle(upstream_paused):
    def scenario():
        site, agent, log, clock = make_site(idle_timeout_s=20)
        channel, client = connect(site)
        channel.dataReceived(PUT)
        body = agent.requests[0]["body"]
        body.startProducing(StringTransport())
        if upstream_paused:
            body.pauseProducing()
        clock.advance(20)
        return site, client, log

    return scenario


def download_idle():
    site, agent, log, clock = make_site(idle_timeout_s=20)
    channel, client = connect(site)
    channel.dataReceived(GET)
    r = response(200, {}, 100)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"x")
    clock.advance(20)
    channel.connectionLost(Failure(ConnectionLost()))
    return site, client, log


def drain_timeout():
    site, agent, log, clock = make_site()
    channel, client = connect(site)
    channel.dataReceived(GET)
    forwarding_of(channel).drain_started(5.0)
    clock.advance(5)
    channel.connectionLost(Failure(ConnectionLost()))
    return site, client, log


def client_closed():
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(PUT)
    channel.connectionLost(Failure(ConnectionLost()))
    return site, client, log


def truncated():
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(GET)
    r = response(200, {}, 100)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"partial")
    r._bodyDataFinished(Failure(ResponseFailed([Failure(ConnectionLost())])))
    channel.connectionLost(Failure(ConnectionLost()))
    return site, client, log


def sent(data: bytes, advance_s: float = 0.0):
    def scenario():
        site, _, log, clock = make_site()
        site.header_timeout_s = 10.0
        channel, client = connect(site)
        channel.dataReceived(data)
        clock.advance(advance_s)
        return site, client, log

    return scenario


def twisted_refused():
    site, _, log, _ = make_site()
    channel, client = connect(site)
    channel._respondToBadRequestAndDisconnect()
    return site, client, log


def no_route():
    clock = MemoryReactorClock()
    log = RecordingLog()
    upstream = Upstream("default", FakeAgent(), ConcurrencyLimiter(clock, 0, 0, 1))
    site = site_for(Router([Route(RouteConfig(prefix="/v2/"), upstream=upstream)]), clock, access_log=log)
    channel, client = connect(site)
    channel.dataReceived(b"GET /elsewhere HTTP/1.1\r\nHost: h\r\n\r\n")
    return site, client, log


H = b"Host: h\r\n"
SCENARIOS = {
    "COMPLETED": completed,
    "BODY_TOO_LARGE": body_too_large,
    "RATE_LIMITED": rate_limited,
    "QUEUE_FULL": queue_full,
    "QUEUE_TIMEOUT": queue_timeout,
    "UPSTREAM_REQUEST_REFUSED": upstream_request_refused,
    "UPSTREAM_UNREACHABLE": upstream_fails_with(ConnectionRefusedError),
    "UPSTREAM_RESET": upstream_fails_with(lambda: ResponseNeverReceived([Failure(ConnectionLost())])),
    "UPSTREAM_ERROR": upstream_fails_with(lambda: ValueError("odd")),
    "UPSTREAM_HEAD_TOO_LARGE": misbehaving("upstream-head-too-large"),
    "UPSTREAM_TOO_MANY_HEADERS": misbehaving("upstream-too-many-headers"),
    "UPSTREAM_BAD_STATUS_LINE": misbehaving("upstream-bad-status-line"),
    "UPSTREAM_BAD_HEADER": misbehaving("upstream-bad-header"),
    "UPSTREAM_TIMEOUT": response_timeout,
    "UPSTREAM_STALLED": upload_idle(upstream_paused=True),
    "CLIENT_BODY_TIMEOUT": upload_idle(upstream_paused=False),
    "RESPONSE_IDLE_TIMEOUT": download_idle,
    "DRAIN_TIMEOUT": drain_timeout,
    "CLIENT_CLOSED": client_closed,
    "UPSTREAM_TRUNCATED": truncated,
    "BARE_LF": sent(b"GET /v2/ HTTP/1.1\nHost: h\n\n"),
    "BARE_CR": sent(b"GET /v2/ HTTP/1.1\rHost: h\r\n\r\n"),
    "BAD_REQUEST_LINE": sent(b"GET /v2/\r\n" + H + b"\r\n"),
    "BAD_REQUEST_TARGET": sent(b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n"),
    "BAD_VERSION": sent(b"GET /v2/ HTTX/1.1\r\n" + H + b"\r\n"),
    "UNSUPPORTED_VERSION": sent(b"GET /v2/ HTTP/2.0\r\n" + H + b"\r\n"),
    "REQUEST_LINE_TOO_LONG": sent(b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\n" + H + b"\r\n"),
    "HEAD_TOO_LARGE": sent(b"GET /v2/ HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 17000),
    "TOO_MANY_HEADERS": sent(b"GET /v2/ HTTP/1.1\r\n" + H + b"X-A: 1\r\n" * 101 + b"\r\n"),
    "OBS_FOLD": sent(b"GET /v2/ HTTP/1.1\r\n" + H + b"X-A: 1\r\n folded\r\n\r\n"),
    "BAD_HEADER": sent(b"GET /v2/ HTTP/1.1\r\n" + H + b"X A: 1\r\n\r\n"),
    "MISSING_HOST": sent(b"GET /v2/ HTTP/1.1\r\n\r\n"),
    "DUPLICATE_HOST": sent(b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    "BAD_HOST": sent(b"GET /v2/ HTTP/1.1\r\nHost: a b\r\n\r\n"),
    "TRANSFER_ENCODING_HTTP10": sent(b"POST /v2/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "UNSUPPORTED_TRANSFER_CODING": sent(
        b"POST /v2/ HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n"
    ),
    "TRANSFER_ENCODING_WITH_CONTENT_LENGTH": sent(
        b"POST /v2/ HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
    "BAD_CONTENT_LENGTH": sent(b"POST /v2/ HTTP/1.1\r\n" + H + b"Content-Length: 1x\r\n\r\n"),
    "BAD_CHUNK_SIZE": sent(
        b"POST /v2/ HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    ),
    "BAD_TRAILER": sent(
        b"POST /v2/ HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n"
    ),
    "TRAILER_TOO_LARGE": sent(
        b"POST /v2/ HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: "
        + b"a" * 17000
    ),
    "REQUEST_HEAD_TIMEOUT": sent(b"GET /v2/ HTTP/1.1\r\n", advance_s=10),
    "BAD_REQUEST": twisted_refused,
    "NO_ROUTE": no_route,
    "BAD_PERCENT_ENCODING": sent(b"GET /v2/%zz HTTP/1.1\r\n" + H + b"\r\n"),
    "ENCODED_SLASH": sent(b"GET /v2/a%2fb HTTP/1.1\r\n" + H + b"\r\n"),
    "DOT_SEGMENT": sent(b"GET /v2/../x HTTP/1.1\r\n" + H + b"\r\n"),
}

def test_every_ending_has_a_scenario() -> None:
    """The table and the scenarios below name the same endings."""
    assert {ending.name for ending in ENDINGS.values()} == set(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_ending_is_reached_and_logged(name: str) -> None:
    """Each ending is reached and access-logged with its reason and status; an answer carries the table's status, code and reason."""
    ending = next(e for e in ENDINGS.values() if e.name == name)
    site, client, log = SCENARIOS[name]()
    entry = log.entries[-1]
    # Answered by the upstream's exchange or by the site itself (a
    # route-less or unroutable target): the line names the reason either way.
    assert entry.outcome == ending.reason
    if ending.logged_status is not None:
        assert entry.status == ending.logged_status
    if ending.status is not None:
        head, _, body = client.value().rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")
        assert int(head.split(b" ", 1)[0]) == ending.status
        if body.startswith(b"{"):
            [error] = json.loads(body)["errors"]
            assert (error["code"], error["detail"]["reason"]) == (ending.registry_code, ending.reason)
        else:
            assert ending.reason.encode() in body
    if ending.aborts_client and name != "CLIENT_CLOSED":
        assert client.disconnected  # StringTransport's mark of abortConnection
    if ending.counter == endings.REFUSED_COUNTER:
        assert site.counters.value(endings.REFUSED_COUNTER, ending.reason) == 1


def test_reasons_are_unique_and_statuses_are_errors() -> None:
    """Each reason names one ending; every status quayfront answers itself is 4xx or 5xx."""
    reasons = [e.reason for e in ENDINGS.values()]
    assert len(reasons) == len(set(reasons))
    assert all(400 <= e.status < 600 for e in ENDINGS.values() if e.status is not None)


def test_an_unknown_reason_keeps_its_status_and_counts_as_upstream_error() -> None:
    """A reason the table does not list still ends with the status given; an upstream one counts as such."""
    ending = endings.ending_for("upstream-something-new", 502)
    assert (ending.status, ending.reason, ending.counter) == (502, "upstream-something-new", "upstream_errors")
    assert endings.ending_for("body-too-large") is endings.BODY_TOO_LARGE


def test_pause_before_the_upstream_asks_for_the_body_holds_the_client() -> None:
    """An upstream connection pushing back before startProducing leaves the client paused after it, until resumed."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    body = agent.requests[0]["body"]
    body.pauseProducing()
    upstream = StringTransport()
    body.startProducing(upstream)
    assert upstream.value() == b"abc"
    assert client.producerState == "paused"
    body.resumeProducing()
    assert client.producerState == "producing"


def test_misuse_through_forwarding_is_loud() -> None:
    """A body chunk for a request announced without a body raises, naming state and event, rather than vanish."""
    from quayfront.http import ExchangeMisused

    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(GET)
    with pytest.raises(ExchangeMisused, match="BODY_CHUNK .* BodyState.NONE"):
        forwarding_of(channel).body_chunk(b"x")
