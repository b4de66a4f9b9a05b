"""
Per-route limits and timeouts, admission, early answers and local routes,
wired in memory.
"""

from __future__ import annotations

import json

import pytest

from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from quayfront.config import RateLimitConfig, RouteConfig
from quayfront.limits import ConcurrencyLimiter, RateLimiter
from quayfront.routing import Route, Router, Upstream
from quayfront.site import RegistryPing, StaticDirectory
from tests.unit.test_forward import FakeAgent, connect, make_site, response, site_for


def status_of(transport: StringTransport) -> int:
    return int(transport.value().split(b" ", 2)[1])


def body_of(transport: StringTransport) -> bytes:
    return transport.value().partition(b"\r\n\r\n")[2]


def test_content_length_over_limit_is_413_without_upstream() -> None:
    """A declared body over max_body_bytes is refused 413 in registry JSON; the upstream never hears of it."""
    site, agent, log, _ = make_site(max_body_bytes=100)
    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/x/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n")
    site.clock.advance(0)
    assert agent.requests == []
    assert status_of(client) == 413
    assert json.loads(body_of(client))["errors"][0]["code"] == "SIZE_INVALID"
    assert client.disconnecting
    assert log.entries[0].outcome == "body-too-large"


def test_chunked_body_over_limit_stops_before_the_excess() -> None:
    """A chunked body crossing the limit is cut: the upstream gets no byte past it and is aborted."""
    site, agent, _, clock = make_site(max_body_bytes=10)
    channel, client = connect(site)
    channel.dataReceived(b"PATCH /v2/u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    sent = agent.requests[0]
    upstream = StringTransport()
    sent["body"].startProducing(upstream)
    channel.dataReceived(b"8\r\n12345678\r\n")
    # The crossing chunk and the end of the body in one read: the channel
    # finishes parsing before the 413 goes out (no error inside it).
    channel.dataReceived(b"8\r\nabcdefgh\r\n0\r\n\r\n")
    clock.advance(0)
    assert upstream.value() == b"12345678"
    assert sent["cancelled"] == [True]
    assert status_of(client) == 413


def test_rate_limit_answers_429_with_retry_after() -> None:
    """Over its bucket a client gets 429 TOOMANYREQUESTS and Retry-After; another client does not."""
    clock = MemoryReactorClock()
    agent = FakeAgent()
    limiter = RateLimiter(clock, RateLimitConfig(requests_per_s=0.5, burst=1))
    upstream = Upstream("default", agent, ConcurrencyLimiter(clock, 0, 0, 1))
    site = site_for(
        Router([Route(RouteConfig(prefix="/v2/"), upstream=upstream, rate_limiter=limiter)]), clock
    )
    first, _ = connect(site)
    first.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    second, client = connect(site)
    second.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(0)
    assert len(agent.requests) == 1
    assert status_of(client) == 429
    assert b"Retry-After: 2" in client.value()
    assert json.loads(body_of(client))["errors"][0]["code"] == "TOOMANYREQUESTS"


def test_concurrency_cap_queues_then_overflows_to_503() -> None:
    """Beyond max_connections requests wait; past the queue they get 503; a finished one admits the next."""
    site, agent, _, _ = make_site(max_active=1)
    clients = []
    for _ in range(4):
        channel, client = connect(site)
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
        clients.append(client)
    site.clock.advance(0)
    assert len(agent.requests) == 1  # one active, two queued (queue_size 2), one refused
    assert status_of(clients[3]) == 503
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    assert len(agent.requests) == 2


def test_response_timeout_is_504() -> None:
    """No response head within response_timeout_s: 504 in registry JSON, upstream request cancelled."""
    site, agent, log, clock = make_site(response_timeout_s=30)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/slow HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(29)
    assert client.value() == b""
    clock.advance(1)
    assert status_of(client) == 504
    assert agent.requests[0]["cancelled"] == [True]
    assert log.entries[0].outcome == "upstream-timeout"


def test_stalled_upstream_during_upload_is_504_and_stalled_client_408() -> None:
    """While a body streams, an upstream that stops reading gives 504; a client that stops sending gives 408."""
    site, agent, _, clock = make_site(idle_timeout_s=20)
    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    body = agent.requests[0]["body"]
    body.startProducing(StringTransport())
    body.pauseProducing()
    clock.advance(20)
    assert status_of(client) == 504
    assert agent.requests[0]["cancelled"] == [True]

    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    agent.requests[1]["body"].startProducing(StringTransport())
    clock.advance(10)
    channel.dataReceived(b"def")  # activity resets the idle clock
    clock.advance(15)
    assert client.value() == b""
    clock.advance(5)
    assert status_of(client) == 408


def test_early_answer_is_relayed_and_the_rest_of_the_body_ignored() -> None:
    """An upstream answer before the body ends reaches the client at once, with Connection: close."""
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\nabc")
    agent.requests[0]["body"].startProducing(StringTransport())
    r = response(401, {b"WWW-Authenticate": [b'Bearer realm="x"']}, 2)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"{}")
    r._bodyDataFinished(Failure(ResponseDone()))
    head = client.value()
    assert head.startswith(b"HTTP/1.1 401")
    assert b"Connection: close" in head
    assert client.disconnecting
    channel.dataReceived(b"x" * 100_000)  # the rest of the upload: dropped, no error
    assert log.entries[0].status == 401


def test_expect_continue_waits_for_the_upstream() -> None:
    """100 Continue is sent only once the upstream is ready for the body."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(
        b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    assert client.value() == b""
    assert not agent.requests[0]["headers"].hasHeader(b"expect")
    agent.requests[0]["body"].startProducing(StringTransport())
    assert client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_expect_continue_never_sent_when_refused() -> None:
    """A request refused before the upstream is ready gets its answer without a 100 Continue."""
    site, _, _, _ = make_site(max_body_bytes=2)
    channel, client = connect(site)
    channel.dataReceived(
        b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    site.clock.advance(0)
    assert client.value().startswith(b"HTTP/1.1 413")


def test_keepalive_off_closes_after_response() -> None:
    """A route with keepalive = false answers with Connection: close and closes."""
    site, agent, _, _ = make_site(keepalive=False)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    assert b"Connection: close" in client.value()
    assert client.disconnecting


def test_slot_released_when_client_leaves_mid_response() -> None:
    """A client that disconnects mid-download frees the upstream slot and stops the upstream."""
    site, agent, _, _ = make_site(max_active=1)
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/big HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 1000)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"x" * 10)
    channel.connectionLost(Failure(ConnectionLost()))
    assert r._transport.producerState == "stopped"
    other, _ = connect(site)
    other.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(agent.requests) == 2


def test_longest_prefix_wins_and_local_routes(tmp_path) -> None:
    """Routes match by longest prefix; /v1/_ping and static directories are answered locally."""
    (tmp_path / "app.js").write_text("console.log(1)")
    clock = MemoryReactorClock()
    registry, web = FakeAgent(), FakeAgent()
    site = site_for(
        Router(
            [
                Route(RouteConfig(prefix="/"), upstream=Upstream("web", web, ConcurrencyLimiter(clock, 0, 0, 1))),
                Route(
                    RouteConfig(prefix="/v2/"),
                    upstream=Upstream("registry", registry, ConcurrencyLimiter(clock, 0, 0, 1)),
                ),
                Route(RouteConfig(prefix="/static/", directory=str(tmp_path)), resource=StaticDirectory(str(tmp_path))),
            ]
        ),
        clock,
        local_resources={b"/v1/_ping": RegistryPing()},
    )
    for path in (b"/v2/x", b"/api/v1/user", b"/v2"):
        channel, _ = connect(site)
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [r["uri"][-5:] for r in registry.requests] == [b"/v2/x"]
    assert [r["uri"][-7:] for r in web.requests] == [b"v1/user", b"ream/v2"]
    channel, client = connect(site)
    channel.dataReceived(b"GET /v1/_ping HTTP/1.1\r\nHost: h\r\n\r\n")
    assert b"X-Docker-Registry-Version: 0.6.0" in client.value() and body_of(client) == b"true"
    channel, client = connect(site)
    channel.dataReceived(b"GET /static/app.js HTTP/1.1\r\nHost: h\r\n\r\n")
    # File's bytes (and head) follow through Twisted's global cooperator,
    # which does not run here; the file route must not reach an upstream.
    assert len(web.requests) == 2 and len(registry.requests) == 1
    channel, client = connect(site)
    channel.dataReceived(b"GET /static/../../etc/passwd HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status_of(client) in (400, 403, 404)
    channel, client = connect(site)
    channel.dataReceived(b"GET /static/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status_of(client) == 403


def test_no_timer_outlives_its_exchange() -> None:
    """After a completed GET, PUT or failed request no timer is left pending in the reactor."""
    from twisted.internet.error import ConnectionRefusedError

    site, agent, _, clock = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
    agent.requests[1]["body"].startProducing(StringTransport())
    r = response(201, {}, 0)
    agent.requests[1]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    channel.dataReceived(b"GET /v2/c HTTP/1.1\r\nHost: h\r\n\r\n")
    agent.requests[2]["d"].errback(ConnectionRefusedError())
    # The 502 is written on the next reactor turn.
    clock.advance(0)
    assert b"502" in channel.transport.value()
    from quayfront.forward import deadline_watch

    # No exchange is watched any more: the clock's one deadline timer, if
    # left where it was, finds nothing to do when it fires.
    assert deadline_watch(clock).live == 0
    pending = [
        call for call in clock.getDelayedCalls()
        if call.active() and call.func.__qualname__ != "DeadlineWatch._watch"
    ]
    # Only the channel's own idle timeout may remain.
    assert len(pending) <= 1, pending
    clock.advance(60)
    assert not [
        call for call in clock.getDelayedCalls()
        if call.active() and call.func.__qualname__ == "DeadlineWatch._watch"
    ]


class PooledAgent(FakeAgent):
    """
    Like the real agent with an idle pooled connection: the returned Deferred
    has already fired with the connection and waits on the request itself,
    and the body producer starts at once.
    """

    def request(self, method, uri, headers=None, bodyProducer=None):
        from twisted.internet.defer import Deferred, succeed

        inner_cancelled = []
        inner = Deferred(lambda d: inner_cancelled.append(True))
        if bodyProducer is not None:
            bodyProducer.startProducing(StringTransport())
        outer = succeed(None)
        outer.addCallback(lambda _: inner)
        self.requests.append(
            dict(method=method, uri=uri, headers=headers, body=bodyProducer, d=inner, cancelled=inner_cancelled)
        )
        return outer


def pooled_site(**route_settings):
    from tests.unit.test_forward import make_router

    clock = MemoryReactorClock()
    agent = PooledAgent()
    return site_for(make_router(agent, clock, **route_settings), clock), agent, clock


def test_timeout_cancels_a_request_on_a_pooled_connection() -> None:
    """The response timeout aborts the upstream request even once its connection was handed out; 504, once."""
    site, agent, clock = pooled_site(response_timeout_s=5)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/stall HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(5)
    assert agent.requests[0]["cancelled"] == [True]
    assert status_of(client) == 504
    assert client.value().count(b"HTTP/1.1 ") == 1


def test_client_abort_cancels_a_request_on_a_pooled_connection() -> None:
    """A client leaving mid-upload aborts the upstream request on a pooled connection."""
    site, agent, _ = pooled_site()
    channel, _ = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    channel.connectionLost(Failure(ConnectionLost()))
    assert agent.requests[0]["cancelled"] == [True]


def test_expect_continue_on_a_pooled_connection() -> None:
    """When the upstream is ready before the channel asks for the 100, it is sent at once."""
    site, agent, _ = pooled_site()
    channel, client = connect(site)
    channel.dataReceived(
        b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    assert client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_early_answer_then_upstream_drains_is_quiet_and_aborts_upstream() -> None:
    """After an early answer, the upstream resuming the body producer raises nothing and its socket is aborted."""
    from quayfront.upstreamclient import UpstreamBodyTransport, UpstreamConnection, UpstreamPool

    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\nabc")
    body = agent.requests[0]["body"]
    body.startProducing(StringTransport())
    body.pauseProducing()
    upstream_socket = StringTransport()
    r = response(401, {}, 2)
    connection = UpstreamConnection(UpstreamPool(MemoryReactorClock()), "upstream")
    connection.makeConnection(upstream_socket)
    r._transport = UpstreamBodyTransport(connection)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"{}")
    r._bodyDataFinished(Failure(ResponseDone()))
    assert client.value().startswith(b"HTTP/1.1 401")
    assert upstream_socket.disconnecting  # aborted: the request body never finished
    body.resumeProducing()  # the upstream's send buffer drained: nothing to do, no error
    body.pauseProducing()


def test_idle_timeout_survives_a_pause_at_the_end_of_the_body() -> None:
    """A body that completes while the upstream has the client paused leaves the keep-alive timeout in place."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    inner = channel
    assert inner.timeOut == 60
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nabc")
    body = agent.requests[0]["body"]
    body.startProducing(StringTransport())
    body.pauseProducing()
    channel.dataReceived(b"def")
    r = response(201, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    assert inner.timeOut == 60


def test_idle_timeout_restored_after_answering_a_paused_client() -> None:
    """An answer given while the client is paused (upstream stalled) gives the connection its timeout back."""
    site, agent, _, clock = make_site(idle_timeout_s=20)
    channel, _ = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    body = agent.requests[0]["body"]
    body.startProducing(StringTransport())
    body.pauseProducing()
    clock.advance(20)
    assert channel.timeOut == 60


def test_pipelined_response_starts_paused_when_client_is_not_reading() -> None:
    """A pipelined response whose client has not read the previous one starts with its upstream paused."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\nGET /v2/b HTTP/1.1\r\nHost: h\r\n\r\n")
    first = response(200, {}, 3)
    agent.requests[0]["d"].callback(first)
    first._bodyDataReceived(b"abc")
    channel.pauseProducing()  # the client's socket buffer is full
    first._bodyDataFinished(Failure(ResponseDone()))
    second = response(200, {}, 10)
    agent.requests[1]["d"].callback(second)
    assert second._transport.producerState == "paused"


def test_client_abort_mid_download_logs_its_outcome() -> None:
    """A client leaving mid-download is logged with the outcome client-closed."""
    site, agent, log, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/big HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 100)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"x" * 10)
    channel.connectionLost(Failure(ConnectionLost()))
    [entry] = log.entries
    assert (entry.status, entry.body_bytes_sent, entry.outcome) == (200, 10, "client-closed")


@pytest.mark.parametrize("path", [b"/x/../v2/b", b"/v2/./b", b"/x/%2e%2e/v2/b", b"/v2/.."])
def test_dot_segments_are_refused(path) -> None:
    """Paths with dot segments are answered 400 and never routed, so no route's limits can be dodged."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert agent.requests == []
    assert status_of(client) == 400


def test_413_does_not_spend_a_rate_token() -> None:
    """A request refused for its size does not count against the client's rate."""
    clock = MemoryReactorClock()
    agent = FakeAgent()
    limiter = RateLimiter(clock, RateLimitConfig(requests_per_s=0.1, burst=1))
    upstream = Upstream("default", agent, ConcurrencyLimiter(clock, 0, 0, 1))
    site = site_for(
        Router([Route(RouteConfig(prefix="/", max_body_bytes=5), upstream=upstream, rate_limiter=limiter)]),
        clock,
    )
    big, _ = connect(site)
    big.dataReceived(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\n")
    small, _ = connect(site)
    small.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(agent.requests) == 1


def test_idle_abort_is_not_logged_as_complete_when_upstream_closes_first() -> None:
    """After an idle-timeout abort, an upstream close processed first does not finish the request."""
    site, agent, log, clock = make_site(idle_timeout_s=20)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/big HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, UNKNOWN_LENGTH)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"x" * 10)
    clock.advance(20)
    # The upstream's close (no length: "potential data loss") arrives before
    # the client's abort has completed.
    r._bodyDataFinished(Failure(PotentialDataLoss()))
    assert not client.value().endswith(b"0\r\n\r\n")
    channel.connectionLost(Failure(ConnectionLost()))
    [entry] = log.entries
    assert entry.outcome == "response-idle-timeout"
