"""
The streaming reverse proxy, wired in memory: a real HTTP channel on a
StringTransport, a fake agent standing in for the upstream.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import Response
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web import server
from twisted.web.resource import Resource

from quayfront.accesslog import AccessLog
from quayfront.config import RouteConfig
from quayfront.forward import DeadlineWatch, deadline_watch
from quayfront.limits import ConcurrencyLimiter
from quayfront.metrics import Counters
from quayfront.routing import Route, Router, Upstream
from quayfront.headers import HOP_BY_HOP
from quayfront.relayedfields import relayed_lines
from quayfront.site import REQUEST_IDS, FrontRequest, FrontSite, RequestIds


class FakeAgent:
    """
    Records each request and returns a Deferred the test fires.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        cancelled = []
        d = Deferred(lambda d: cancelled.append(True))
        self.requests.append(
            dict(method=method, uri=uri, headers=headers, body=bodyProducer, d=d, cancelled=cancelled)
        )
        return d


class RecordingLog(AccessLog):
    def __init__(self) -> None:
        super().__init__("-")
        self.entries = []

    def write(self, entry) -> None:
        self.entries.append(entry)


class Local(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"local"


def make_router(agent, clock, max_active=0, **route_settings):
    upstream = Upstream("default", agent, ConcurrencyLimiter(clock, max_active, 2, 30.0))
    return Router([Route(RouteConfig(prefix="/", **route_settings), upstream=upstream)])


def site_for(router, clock, **site_settings) -> FrontSite:
    """A FrontSite on C{router} with a recording access log and test defaults."""
    settings = dict(local_resources={}, access_log=RecordingLog(), counters=Counters(), idle_timeout_s=60.0)
    settings.update(site_settings)
    return FrontSite(clock=clock, router=router, **settings)


def make_site(**route_settings):
    clock = MemoryReactorClock()
    agent = FakeAgent()
    log = RecordingLog()
    site = site_for(
        make_router(agent, clock, **route_settings),
        clock,
        local_resources={b"/health": Local()},
        access_log=log,
    )
    return site, agent, log, clock


def connect(site):
    channel = site.buildProtocol(IPv4Address("TCP", "198.51.100.4", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.4", 40000))
    channel.makeConnection(transport)
    return channel, transport


def response(code=200, headers=None, length=UNKNOWN_LENGTH):
    r = Response._construct(
        (b"HTTP", 1, 1), code, b"OK", Headers(headers or {}), StringTransport(), None
    )
    r.length = length
    return r


def _assert_freed_without_the_collector(answer) -> None:
    """
    Forward a GET with the garbage collector off, let C{answer(agent)}
    answer it (returning the extra objects that must be freed and the
    response), and check that the request, its forwarding and those objects
    are freed by their reference counts once the request is over and
    logged: no reference cycle is left for a collection that would cost
    every request.
    """
    import gc
    import weakref

    collecting = gc.isenabled()
    gc.disable()
    try:
        site, agent, log, _ = make_site()
        channel, client = connect(site)
        channel.dataReceived(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n")
        forwarding = channel.request.forwarding
        freed = [weakref.ref(channel.request), weakref.ref(forwarding)]
        extra, r = answer(agent, forwarding)
        freed += [weakref.ref(thing) for thing in extra]
        del extra
        assert client.value().endswith(b"\r\n\r\nok") and len(log.entries) == 1
        # What the test itself holds: the agent's record of the request (its
        # Deferred and body producer), the response, the forwarding.
        del forwarding, r, agent.requests[:]
        assert channel.request is None
        assert [ref() for ref in freed] == [None] * len(freed)
    finally:
        if collecting:
            gc.enable()


def test_a_forwarded_request_is_freed_without_the_garbage_collector() -> None:
    """
    Once a forwarded request is over and logged, the request, its forwarding
    and the relay of its response are freed by their reference counts (with
    the collector off).
    """

    def answer(agent, forwarding):
        r = response(200, {}, 2)
        agent.requests[0]["d"].callback(r)
        relay = forwarding._relay
        r._bodyDataReceived(b"ok")
        r._bodyDataFinished(Failure(ResponseDone()))
        return [relay], r

    _assert_freed_without_the_collector(answer)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
    ],
    ids=["whole", "head-then-body"],
)
def test_a_request_through_quayfronts_own_agent_is_freed_without_the_garbage_collector(answer) -> None:
    """
    Through quayfront's own agent (its outcome told to the forwarding, the
    upstream exchange what the forwarding can cancel), a GET answered whole
    or head first leaves no reference cycle: the request, its forwarding and
    the upstream exchange are freed by their reference counts.
    """
    import gc
    import weakref

    from quayfront.config import UpstreamConfig
    from quayfront.upstream import upstream_agent

    collecting = gc.isenabled()
    gc.disable()
    try:
        clock = MemoryReactorClock()
        agent = upstream_agent(clock, UpstreamConfig())
        log = RecordingLog()
        site = site_for(make_router(agent, clock), clock, access_log=log)
        channel, client = connect(site)
        channel.dataReceived(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n")
        factory = clock.tcpClients[0][2]
        upstream = factory.buildProtocol(None)
        upstream_socket = StringTransport()
        upstream.makeConnection(upstream_socket)
        clock.advance(0)
        assert upstream_socket.value().startswith(b"GET /v2/x HTTP/1.1\r\n")
        forwarding = channel.request.forwarding
        exchange = forwarding._upstream
        assert exchange.result is forwarding  # told to the forwarding itself
        freed = [weakref.ref(channel.request), weakref.ref(forwarding), weakref.ref(exchange)]
        del forwarding, exchange
        upstream.dataReceived(answer)
        if not answer.endswith(b"ok"):
            upstream.dataReceived(b"ok")
        assert client.value().endswith(b"\r\n\r\nok") and len(log.entries) == 1
        assert agent.pool.idle_count(agent.key) == 1
        assert channel.request is None
        assert [ref() for ref in freed] == [None] * len(freed)
    finally:
        if collecting:
            gc.enable()


def test_a_request_answered_whole_is_freed_without_the_garbage_collector() -> None:
    """
    A forwarded request whose response was relayed whole leaves no
    reference cycle either (with the collector off, its request and
    forwarding are freed by their reference counts).
    """

    def answer(agent, forwarding):
        r = WholePairsResponse(200, b"OK", [], 2, b"ok")
        agent.requests[0]["d"].callback(r)
        return [], r

    _assert_freed_without_the_collector(answer)


def test_upstream_request_starts_before_the_body_arrives() -> None:
    """The upstream request is made once the head is parsed, with the body still to come."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(
        b"PUT /v2/x/blobs/uploads/u?digest=sha256:ab HTTP/1.1\r\nHost: reg.example:8443\r\n"
        b"Content-Length: 10\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    [sent] = agent.requests
    assert sent["method"] == b"PUT"
    assert sent["uri"].endswith(b"/v2/x/blobs/uploads/u?digest=sha256:ab")
    assert sent["body"].length == 10
    headers = sent["headers"]
    assert headers.getRawHeaders(b"host") == [b"reg.example:8443"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"198.51.100.4"]
    assert headers.getRawHeaders(b"x-forwarded-proto") == [b"https"]
    assert not headers.hasHeader(b"content-length")


def test_body_streams_with_backpressure() -> None:
    """Chunks go upstream as they arrive; an upstream pause stops reading from the client."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    body = agent.requests[0]["body"]
    # Bytes before the upstream connection exists wait, and the client is paused.
    assert client.producerState == "paused"
    upstream = StringTransport()
    finished = body.startProducing(upstream)
    assert upstream.value() == b"abc"
    assert client.producerState == "producing"
    body.pauseProducing()
    assert client.producerState == "paused"
    client.producerState = "producing"  # the channel resumes on its own schedule...
    channel.dataReceived(b"defg")
    assert upstream.value() == b"abcdefg"
    assert client.producerState == "paused"  # ...and the pause is asserted again.
    body.resumeProducing()
    assert client.producerState == "producing"
    assert not finished.called
    channel.dataReceived(b"hij")
    assert upstream.value() == b"abcdefghij"
    assert finished.called


def test_chunked_upload_is_streamed_without_a_length() -> None:
    """A chunked request body goes upstream as an unknown-length (chunked) body, de-framed."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(
        b"PATCH /v2/x/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = agent.requests[0]["body"]
    assert body.length is UNKNOWN_LENGTH
    upstream = StringTransport()
    finished = body.startProducing(upstream)
    channel.dataReceived(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert upstream.value() == b"abcde"
    assert finished.called


def test_request_without_body_sends_none() -> None:
    """A GET without body headers is sent without a body producer."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert agent.requests[0]["body"] is None


def test_response_streams_back_with_upstream_as_producer() -> None:
    """The response status, headers and body reach the client; the upstream is the producer."""
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/x/blobs/sha256:ab HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {b"Docker-Content-Digest": [b"sha256:ab"], b"Connection": [b"close"]}, 6)
    agent.requests[0]["d"].callback(r)
    # The upstream transport (behind the agent's proxy producer) drives the download.
    assert channel._request_producer is r._transport
    r._bodyDataReceived(b"abc")
    r._bodyDataReceived(b"def")
    r._bodyDataFinished(Failure(ResponseDone()))
    out = client.value()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Docker-Content-Digest: sha256:ab" in head
    assert b"Content-Length: 6" in head
    assert b"Connection: close" not in head
    assert body == b"abcdef"
    [entry] = log.entries
    assert (entry.status, entry.body_bytes_sent, entry.client) == (200, 6, "198.51.100.4")


def test_truncated_response_aborts_the_client() -> None:
    """An upstream body that ends early aborts the client connection instead of finishing."""
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/x/blobs/sha256:ab HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 100)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"partial")
    r._bodyDataFinished(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert client.disconnected  # StringTransport's mark of abortConnection
    channel.connectionLost(Failure(ConnectionLost()))
    [entry] = log.entries
    assert entry.body_bytes_sent == 7


def test_client_abort_mid_upload_cancels_upstream() -> None:
    """A client that goes away mid-body cancels the upstream request and is logged."""
    site, agent, log, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    channel.connectionLost(Failure(ConnectionLost()))
    sent = agent.requests[0]
    assert sent["cancelled"] == [True]
    [entry] = log.entries
    assert entry.status == 499


def test_upstream_unreachable_is_502_registry_json() -> None:
    """A refused upstream connection answers 502 in the registry's error shape on /v2/."""
    site, agent, log, clock = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    agent.requests[0]["d"].errback(ConnectionRefusedError())
    clock.advance(0)
    head, _, body = client.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ")
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert log.entries[0].status == 502
    assert not client.disconnecting  # the request was complete; keep-alive stays


def test_failure_mid_upload_answers_and_closes() -> None:
    """An upstream failure while the client still sends answers 502 and closes the connection."""
    site, agent, _, clock = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    agent.requests[0]["d"].errback(ConnectionRefusedError())
    clock.advance(0)
    assert client.value().startswith(b"HTTP/1.1 502 ")
    assert b"Connection: close" in client.value()
    assert client.disconnecting
    channel.dataReceived(b"x" * 97)  # the rest of the body is ignored, no traceback


def test_local_resources_are_not_forwarded() -> None:
    """Health paths are answered locally; their bodies are dropped, not spooled."""
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
    assert agent.requests == []
    assert client.value().endswith(b"local")
    assert log.entries[0].upstream_response_time_s is None


def test_the_access_log_entry_carries_the_route_it_took() -> None:
    """A routed request names its route's prefix for the metrics; a local answer leaves it to the path."""
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
    channel.dataReceived(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    assert [entry.route_label for entry in log.entries] == [None, "/"]


def test_absolute_form_target_is_refused() -> None:
    """A request target that is not origin-form is answered 400 and never forwarded."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET http://elsewhere/v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert agent.requests == []
    assert client.value().startswith(b"HTTP/1.1 400 ")


def test_pipelined_requests_are_forwarded_in_turn() -> None:
    """A second request on a kept-alive connection is forwarded after the first completes."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\nGET /v2/b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(agent.requests) == 1
    r = response(200, {}, 1)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"a")
    r._bodyDataFinished(Failure(ResponseDone()))
    assert [req["uri"][-5:] for req in agent.requests] == [b"/v2/a", b"/v2/b"]


def connect_with_origin(site, proxy_header):
    from quayfront.proxylayer import ConnectionOrigin

    channel, transport = connect(site)
    transport.quayfront_origin = ConnectionOrigin(
        listener="proxy",
        socket_peer=IPv4Address("TCP", "10.0.0.5", 41000),
        client=IPv4Address("TCP", "203.0.113.7", 51000),
        destination=IPv4Address("TCP", "192.0.2.10", 8443),
        proxy_header=proxy_header,
    )
    return channel, transport


def test_proxy_client_and_tlvs_reach_upstream_and_log() -> None:
    """The PROXY source is X-Forwarded-For; UNIQUE_ID is the request id; chosen TLVs become headers."""
    from quayfront.proxyprotocol import Address, Command, Family, ProxyHeader

    clock = MemoryReactorClock()
    agent = FakeAgent()
    log = RecordingLog()
    site = site_for(
        make_router(agent, clock),
        clock,
        access_log=log,
        tlv_headers=(("authority", "X-Proxy-Authority"), ("aws_vpce_id", "X-Amzn-Vpce-Id")),
    )
    proxy_header = ProxyHeader(
        version=2,
        command=Command.PROXY,
        family=Family.TCP4,
        source=Address("203.0.113.7", 51000),
        destination=Address("192.0.2.10", 8443),
        authority=b"reg\r\nInjected: 1",
        unique_id=b"lb-req-42",
        length=60,
    )
    channel, _ = connect_with_origin(site, proxy_header)
    channel.dataReceived(
        b"GET /v2/ HTTP/1.1\r\nHost: h\r\nX-Request-ID: forged\r\n"
        b"X-Amzn-Vpce-Id: vpce-forged\r\nX-Proxy-Authority: forged\r\n\r\n"
    )
    headers = agent.requests[0]["headers"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"203.0.113.7"]
    assert headers.getRawHeaders(b"x-request-id") == [b"lb-req-42"]
    assert headers.getRawHeaders(b"x-proxy-authority") == [b"reg\\x0D\\x0AInjected: 1"]
    # Absent from the PROXY header, so absent upstream, and never the client's.
    assert not headers.hasHeader(b"x-amzn-vpce-id")
    agent.requests[0]["d"].errback(ConnectionRefusedError())
    clock.advance(0)
    [entry] = log.entries
    assert (entry.socket_peer, entry.client, entry.client_port) == ("10.0.0.5", "203.0.113.7", 51000)
    assert entry.request_id == "lb-req-42"
    assert entry.proxy_version == 2
    assert entry.outcome == "upstream-unreachable"


def test_request_ids_are_made_up_without_unique_id() -> None:
    """Without a UNIQUE_ID TLV each request gets its own random id."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    channel.dataReceived(b"GET /v2/b HTTP/1.1\r\nHost: h\r\n\r\n")
    ids = [req["headers"].getRawHeaders(b"x-request-id")[0] for req in agent.requests]
    assert len(ids) == 2 and ids[0] != ids[1] and len(ids[0]) == 32


def test_request_ids_are_a_prefix_per_process_and_a_counter() -> None:
    """
    32 lower-case hex digits: a random prefix drawn once (not per request)
    and a counter; a new prefix when the counter runs out or after a fork.
    """
    draws = []

    def urandom(n):
        draws.append(n)
        return bytes([len(draws)]) * n

    ids = RequestIds(urandom)
    first = [ids.next_id() for _ in range(3)]
    assert first == ["01" * 10 + "%012x" % n for n in (1, 2, 3)]
    assert draws == [10]
    ids.start_over()
    assert ids.next_id() == "02" * 10 + "000000000001"
    ids._count = (1 << 48) - 2
    assert ids.next_id() == "02" * 10 + "ffffffffffff"
    assert ids.next_id() == "03" * 10 + "000000000001"
    assert len(draws) == 3


def test_a_forked_process_draws_its_own_request_id_prefix() -> None:
    """Workers forked from one process do not share a prefix (and so ids)."""
    parent = REQUEST_IDS.next_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, REQUEST_IDS.next_id().encode("ascii"))
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64).decode("ascii")
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert len(child) == 32 and int(child, 16) >= 0 and child == child.lower()
    assert child[:20] != parent[:20]
    assert REQUEST_IDS.next_id()[:20] == parent[:20]


def test_http10_without_host_gets_the_connected_address() -> None:
    """An HTTP/1.0 request without Host goes upstream with the address the client connected to."""
    site, agent, _, _ = make_site()
    channel, transport = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.0\r\n\r\n")
    host = transport.getHost()
    assert agent.requests[0]["headers"].getRawHeaders(b"host") == [f"{host.host}:{host.port}".encode()]


def forwarding_timers(clock) -> list:
    """The active timers of exchanges (their deadlines' watchdogs)."""
    return [
        call for call in clock.getDelayedCalls()
        if call.active() and getattr(call.func, "__name__", "") == "_watch"
    ]


@pytest.mark.parametrize(
    "response_timeout_s, idle_timeout_s",
    [(30.0, 10.0), (10.0, 30.0), (10.0, 10.0)],
)
def test_one_timer_serves_the_deadlines_of_a_request(response_timeout_s, idle_timeout_s) -> None:
    """
    The response deadline and then the download idle deadline are served
    by one timer, moved sooner when it must be; each still falls due at
    its time, and nothing is left behind when the exchange ends.
    """
    site, agent, log, clock = make_site(
        response_timeout_s=response_timeout_s, idle_timeout_s=idle_timeout_s
    )
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    [watchdog] = forwarding_timers(clock)
    assert watchdog.getTime() == response_timeout_s
    clock.advance(5)
    r = response(200, {}, 10)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"abc")
    assert forwarding_timers(clock) == [watchdog]
    assert watchdog.getTime() == min(response_timeout_s, 5 + idle_timeout_s)
    # Idle from 5 s: the download idle deadline falls due at 5 + idle.
    clock.advance(idle_timeout_s - 0.5)
    assert not client.disconnected
    clock.advance(0.5)
    assert client.disconnected  # aborted
    channel.connectionLost(Failure(ConnectionLost()))
    [entry] = log.entries
    assert entry.outcome == "response-idle-timeout"
    assert forwarding_timers(clock) == []


def test_the_timer_stops_with_the_exchange() -> None:
    """
    A completed exchange leaves nothing to time: the clock's one deadline
    timer is neither made nor cancelled for it, and when it fires it finds
    nothing due and is not set again.
    """
    site, agent, log, clock = make_site(response_timeout_s=30.0, idle_timeout_s=10.0)
    channel, client = connect(site)
    watch = deadline_watch(clock)
    for path in (b"/v2/a", b"/v2/b"):
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        assert len(forwarding_timers(clock)) == 1
        assert watch.live == 1
        r = response(200, {}, 3)
        agent.requests[-1]["d"].callback(r)
        r._bodyDataReceived(b"abc")
        r._bodyDataFinished(Failure(ResponseDone()))
        assert watch.live == 0
        assert len(forwarding_timers(clock)) == 1
    clock.advance(30)
    assert forwarding_timers(clock) == []
    assert not client.disconnecting
    assert [entry.outcome for entry in log.entries] == [None, None]


def _status(client) -> int:
    return int(client.value().split(b" ", 2)[1])


def test_the_deadlines_of_many_exchanges_share_one_timer_and_keep_their_times() -> None:
    """
    Exchanges under way at once are watched by one timer; one that ends
    early changes nothing for the others, each of which times out exactly
    at its own deadline.
    """
    site, agent, log, clock = make_site(response_timeout_s=30.0)
    clients = []
    for path, later_s in ((b"/v2/a", 10), (b"/v2/b", 10), (b"/v2/c", 5)):
        channel, client = connect(site)
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        clients.append(client)
        clock.advance(later_s)
    # Armed at 0, 10 and 20 (each due 30 later); the first answered at 25.
    assert len(forwarding_timers(clock)) == 1
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    assert _status(clients[0]) == 200
    assert len(forwarding_timers(clock)) == 1
    clock.advance(14.5)
    assert not clients[1].value()
    clock.advance(0.5)  # 40: the second's deadline
    assert _status(clients[1]) == 504 and not clients[2].value()
    clock.advance(9.5)
    assert not clients[2].value()
    clock.advance(0.5)  # 50: the third's
    assert _status(clients[2]) == 504
    assert [entry.outcome for entry in log.entries] == [None, "upstream-timeout", "upstream-timeout"]
    assert forwarding_timers(clock) == [] and deadline_watch(clock).live == 0


@pytest.mark.unhandled_errors_expected
def test_an_error_watching_one_exchange_stops_none_of_the_others(monkeypatch) -> None:
    """An exchange whose deadline check fails is logged; the others due with it still time out."""
    from quayfront.forward import Forwarding

    site, agent, log, clock = make_site(response_timeout_s=30.0)
    clients = []
    for _ in range(3):
        channel, client = connect(site)
        channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
        clients.append(client)
    first = clients[0]
    watch = Forwarding._watch
    broken = []

    def failing_once(forwarding) -> None:
        if not broken:
            broken.append(forwarding)
            raise RuntimeError("a bug")
        watch(forwarding)

    monkeypatch.setattr(Forwarding, "_watch", failing_once)
    from twisted.logger import globalLogPublisher

    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        clock.advance(30)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert [event.get("log_failure").value.args for event in logged if "log_failure" in event] == [
        ("a bug",)
    ]
    assert not first.value()
    assert [_status(client) for client in clients[1:]] == [504, 504]


def test_a_deadline_timer_cancelled_by_someone_else_is_made_anew() -> None:
    """Should anything cancel the clock's deadline timer, the next exchange still times out on time."""
    site, agent, log, clock = make_site(response_timeout_s=30.0)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    [timer] = forwarding_timers(clock)
    timer.cancel()
    clock.advance(10)
    channel.dataReceived(b"GET /v2/b HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(29)
    assert _status(client) == 200 and client.value().count(b"HTTP/1.1 ") == 1
    clock.advance(1)  # 40: armed at 10
    clock.advance(0)  # the 504 is written on the next reactor turn
    assert client.value().count(b"HTTP/1.1 504 ") == 1
    assert [entry.outcome for entry in log.entries] == [None, "upstream-timeout"]


def test_the_deadline_watch_lets_go_of_ended_exchanges_and_stays_bounded() -> None:
    """
    An exchange that ends is let go of by the deadline watch at once, and
    the entries of ended exchanges do not pile up while another stays under
    way (the heap is rebuilt without them), whatever the number of requests.
    """
    site, agent, log, clock = make_site(response_timeout_s=30.0)
    slow, slow_client = connect(site)
    slow.dataReceived(b"GET /v2/slow HTTP/1.1\r\nHost: h\r\n\r\n")
    watch = deadline_watch(clock)
    channel, client = connect(site)
    for _ in range(500):
        channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
        assert watch.live == 2
        r = response(200, {}, 0)
        agent.requests[-1]["d"].callback(r)
        r._bodyDataFinished(Failure(ResponseDone()))
        assert watch.live == 1
        # Only the slow exchange is held; the rest are dropped entries.
        assert len([entry for entry in watch._heap if entry[2] is not None]) == 1
        assert len(watch._heap) <= 1 + 2 * DeadlineWatch.MAX_DROPPED
    assert len(log.entries) == 500
    assert len(forwarding_timers(clock)) == 1
    clock.advance(30)
    assert _status(slow_client) == 504
    assert log.entries[-1].outcome == "upstream-timeout"
    assert watch.live == 0 and watch._heap == []
    assert forwarding_timers(clock) == []


class PairsResponse:
    """
    An upstream response as quayfront's agent hands it over: its fields as
    received (C{header_pairs}), any case, repeats and hop-by-hop included.
    """

    version = (b"HTTP", 1, 1)

    def __init__(self, code, phrase, pairs, length) -> None:
        self.code = code
        self.phrase = phrase
        self.header_pairs = pairs
        self.length = length
        self.protocol = None

    @property
    def headers(self) -> Headers:
        headers = Headers()
        for name, value in self.header_pairs:
            headers.addRawHeader(name, value)
        return headers

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(StringTransport())


class WholePairsResponse(PairsResponse):
    """
    A PairsResponse whose body came with its head, offered whole as
    quayfront's agent offers it (C{whole_body}, C{take_whole_body}).
    """

    def __init__(self, code, phrase, pairs, length, body: bytes) -> None:
        super().__init__(code, phrase, pairs, length)
        self.whole_body = body
        self.taken = 0

    def take_whole_body(self) -> bytes:
        body, self.whole_body = self.whole_body, None
        self.taken += 1
        return body


class TwistedWayRequest(FrontRequest):
    """FrontRequest with the relayed head taken twisted.web's way (Headers, Request.write), finished by twisted.web's Request.finish."""

    relay_response_head = None
    finish = server.Request.finish


_FIELD_NAMES = [
    b"content-type", b"Content-Type", b"CONTENT-TYPE", b"etag", b"ETag", b"Set-Cookie",
    b"set-cookie", b"x-a", b"X-A", b"Connection", b"connection", b"Keep-Alive", b"TE",
    b"Transfer-Encoding", b"strict-transport-security", b"Strict-Transport-Security",
    b"Content-Length", b"content-length", b"x-secret", b"Upgrade", b"www-authenticate",
    b"Docker-Distribution-API-Version", b"Date", b"Server",
]
_FIELD_VALUES = [b"1", b"close", b"keep-alive, x-secret", b"x-A", b"a b", b"", b"X-A, close", b"5, 5"]

relayed_cases = st.fixed_dictionaries(
    dict(
        pairs=st.lists(
            st.tuples(st.sampled_from(_FIELD_NAMES), st.sampled_from(_FIELD_VALUES)), max_size=12
        ),
        code=st.sampled_from([200, 201, 204, 304, 404]),
        phrase=st.sampled_from([b"OK", b"Anything At All", b""]),
        length=st.sampled_from([UNKNOWN_LENGTH, 0, 5]),
        method=st.sampled_from([b"GET", b"HEAD"]),
        version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
        client_closes=st.booleans(),
        hsts=st.sampled_from(["", "max-age=63072000"]),
        drain=st.sampled_from([None, "before", "after-head"]),
        keepalive=st.booleans(),
        early=st.booleans(),
        chunks=st.sampled_from([[], [b"hello"], [b"he", b"llo"]]),
    )
)


def relay_once(request_factory, case, whole: bool = False) -> tuple:
    clock = MemoryReactorClock()
    agent = FakeAgent()
    log = RecordingLog()
    site = site_for(
        make_router(agent, clock, keepalive=case["keepalive"]),
        clock,
        access_log=log,
        hsts=case["hsts"],
    )
    site.requestFactory = request_factory
    channel, client = connect(site)
    connection = b""
    if case["client_closes"] and case["version"] == b"HTTP/1.1":
        connection = b"Connection: close\r\n"
    elif not case["client_closes"] and case["version"] == b"HTTP/1.0":
        connection = b"Connection: keep-alive\r\n"
    if case["early"]:
        head = b"PUT /v2/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n" + connection + b"\r\nabc"
    else:
        head = case["method"] + b" /v2/x " + case["version"] + b"\r\nHost: h\r\n" + connection + b"\r\n"
    if case["drain"] == "before":
        site.drain()
    channel.dataReceived(head)
    request = channel.request
    if whole:
        r = WholePairsResponse(
            case["code"], case["phrase"], list(case["pairs"]), case["length"],
            b"".join(case["chunks"]),
        )
        agent.requests[0]["d"].callback(r)
        assert (r.taken, r.protocol) == (1, None)
    else:
        r = PairsResponse(case["code"], case["phrase"], list(case["pairs"]), case["length"])
        agent.requests[0]["d"].callback(r)
        if case["drain"] == "after-head":
            site.drain()
        for chunk in case["chunks"]:
            r.protocol.dataReceived(chunk)
        r.protocol.connectionLost(Failure(ResponseDone()))
    [entry] = log.entries
    return (
        client.value(),
        client.disconnecting,
        (entry.status, entry.body_bytes_sent),
        [(name, list(values)) for name, values in request.responseHeaders.getAllRawHeaders()],
    )


@given(relayed_cases)
@example(
    dict(
        pairs=[(b"Connection", b"x-A"), (b"x-a", b"1"), (b"etag", b"e"), (b"Set-Cookie", b"1"),
               (b"Date", b"d"), (b"set-cookie", b"2")],
        code=200, phrase=b"OK", length=UNKNOWN_LENGTH, method=b"GET", version=b"HTTP/1.1",
        client_closes=False, hsts="max-age=1", drain="after-head", keepalive=True, early=False,
        chunks=[b"he", b"llo"],
    )
)
def test_a_relayed_head_is_written_as_twisted_web_writes_it(case) -> None:
    """
    A proxied response's head, built from the upstream's fields, is byte for
    byte the one Headers and twisted.web's Request.write make: names in
    Headers' case, repeats grouped, hop-by-hop and Connection-named fields
    dropped, Content-Length, HSTS, Connection: close (asked, route without
    keep-alive, answered early, draining), chunked framing, HEAD, 204 and
    304; so is what responseHeaders holds afterwards.
    """
    assert relay_once(FrontRequest, case) == relay_once(TwistedWayRequest, case)


# Fields whose Content-Length can be the length relayed (0 or 5), so that
# heads are also joined as they came with one.
_JOINED_VALUES = [b"1", b"close", b"keep-alive", b"KEEP-ALIVE", b"x-A", b"", b"0", b"5", b"05"]
_JOINED_PAIR = st.tuples(st.sampled_from(_FIELD_NAMES), st.sampled_from(_JOINED_VALUES))


@st.composite
def joined_cases(draw) -> dict:
    case = draw(relayed_cases)
    pairs = draw(
        st.one_of(
            # Mostly sections without a repeated name, which can be joined.
            st.lists(_JOINED_PAIR, max_size=12, unique_by=lambda pair: pair[0].lower()),
            st.lists(_JOINED_PAIR, max_size=12),
        )
    )
    if case["length"] is not UNKNOWN_LENGTH and draw(st.booleans()):
        # The Content-Length of the length relayed, as an upstream writes it.
        pairs = [pair for pair in pairs if pair[0].lower() != b"content-length"]
        at = draw(st.integers(0, len(pairs)))
        name = draw(st.sampled_from([b"Content-Length", b"content-length"]))
        pairs.insert(at, (name, b"%d" % case["length"]))
    return dict(case, pairs=pairs)


@given(joined_cases())
@example(
    dict(
        pairs=[(b"Server", b"s"), (b"content-length", b"5"), (b"Connection", b"keep-alive"),
               (b"etag", b"e")],
        code=200, phrase=b"OK", length=5, method=b"GET", version=b"HTTP/1.1",
        client_closes=False, hsts="max-age=1", drain="after-head", keepalive=True, early=False,
        chunks=[b"he", b"llo"],
    )
)
def test_a_head_joined_as_its_lines_came_is_the_one_twisted_web_writes(case) -> None:
    """
    A head whose field lines are joined from the upstream's pairs as they
    came (no name repeated, a Connection that names no field, the
    Content-Length relayed written as the length is) is byte for byte the
    head Headers and twisted.web's Request.write make, with what is added
    to it (HSTS, chunked framing, Connection: close when draining), and so
    is what responseHeaders holds afterwards.
    """
    from unittest import mock

    from quayfront import site as site_module

    joined = []

    def recording(pairs, length):
        lines = relayed_lines(pairs, length)
        joined.append(lines is not None)
        return lines

    with mock.patch.object(site_module, "relayed_lines", recording):
        front = relay_once(FrontRequest, case)
    assert front == relay_once(TwistedWayRequest, case)
    length = None if case["length"] is UNKNOWN_LENGTH else case["length"]
    if (case["method"] == b"HEAD" and not case["early"]) or case["code"] in (204, 304):
        length = None
    lowered = [name.lower() for name, _ in case["pairs"]]
    connection = [value.lower() for name, value in case["pairs"] if name.lower() == b"connection"]
    kept = [name for name in lowered if name not in HOP_BY_HOP]
    expected = (
        len(set(lowered)) == len(lowered)
        and all(value in (b"keep-alive", b"close") for value in connection)
        and len(kept) >= 2
        and (
            length is None
            or [value for name, value in case["pairs"] if name.lower() == b"content-length"]
            == [b"%d" % length]
        )
    )
    # Asked once, unless headers were set before the response came (a
    # drain's Connection: close), when the head goes the general way.
    event(f"joined as it came: {joined}")
    assert joined in ([expected], [])


def test_a_usual_head_is_joined_as_it_came() -> None:
    """
    A usual head (nginx's fields) is written from its lines joined as they
    came: neither the fields dict nor Headers is made for it.
    """
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n")
    request = channel.request
    pairs = [
        (b"Server", b"nginx"), (b"Date", b"d"), (b"Content-Type", b"a/b"),
        (b"Content-Length", b"2"), (b"Connection", b"keep-alive"), (b"ETag", b'"e"'),
    ]
    r = PairsResponse(200, b"OK", pairs, 2)
    agent.requests[0]["d"].callback(r)
    r.protocol.dataReceived(b"ok")
    r.protocol.connectionLost(Failure(ResponseDone()))
    assert client.value() == (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: d\r\nContent-Type: a/b\r\n"
        b"Content-Length: 2\r\nETag: \"e\"\r\n\r\nok"
    )
    assert request._relayed is None and request._response_headers is None
    assert request._relayed_lines is not None


@given(relayed_cases.filter(lambda case: case["drain"] != "after-head"))
def test_a_whole_response_is_relayed_as_a_streamed_one(case) -> None:
    """
    A response offered whole (its body read with its head) and relayed in
    one event gives the client the same bytes, close, access log entry and
    responseHeaders as the same response streamed through the body
    protocol in one piece, answered early or not.
    """
    body = b"".join(case["chunks"])
    in_one_piece = dict(case, chunks=[body] if body else [])
    assert relay_once(FrontRequest, case, whole=True) == relay_once(FrontRequest, in_one_piece)


@given(relayed_cases.filter(lambda case: case["drain"] != "after-head"))
def test_the_usual_actions_carried_out_directly_agree_with_the_action_loop(case) -> None:
    """
    Forwarding carries out the usual start (START_UPSTREAM_REQUEST, Arm)
    and the usual whole response (RELAY_WHOLE_RESPONSE, RELEASE_SLOT,
    FINISH_RESPONSE, Disarm) itself: the client, the access log and the
    response headers are what the general action loop gives.
    """
    from unittest import mock

    from quayfront import forward

    def run() -> tuple:
        # With what is done to the slots and the deadlines, in order.
        done = []

        def recorded(cls, name):
            method = getattr(cls, name)

            def recording(self, *args):
                done.append(name)
                return method(self, *args)

            return mock.patch.object(cls, name, recording)

        with recorded(ConcurrencyLimiter, "release"), recorded(
            DeadlineWatch, "add"
        ), recorded(DeadlineWatch, "drop"):
            outputs = (
                relay_once(FrontRequest, case, whole=True),
                relay_once(FrontRequest, case),
            )
        return outputs, done

    direct = run()
    # Action lists that no exchange answers: every list goes the general way.
    with mock.patch.object(forward, "ADMITTED_WITHOUT_BODY", ()), mock.patch.object(
        forward, "WHOLE_WITHOUT_BODY", ()
    ):
        general = run()
    assert direct == general


def test_a_whole_response_goes_out_in_one_write() -> None:
    """A response offered whole reaches the client's transport as one write: head and body."""
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n")
    writes = []
    client.write = writes.append
    client.writeSequence = lambda seq: writes.append(b"".join(seq))
    r = WholePairsResponse(200, b"OK", [(b"content-type", b"a/b")], 2, b"ok")
    agent.requests[0]["d"].callback(r)
    assert writes == [b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nContent-Length: 2\r\n\r\nok"]
    assert [(e.status, e.body_bytes_sent, e.outcome) for e in log.entries] == [(200, 2, None)]
    assert channel.request is None


def test_a_relayed_head_is_built_without_headers() -> None:
    """A proxied response's head is written without filling responseHeaders."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n")
    request = channel.request
    r = PairsResponse(
        200, b"OK", [(b"content-type", b"a/b"), (b"Connection", b"keep-alive"), (b"x-a", b"1")], 2
    )
    agent.requests[0]["d"].callback(r)
    r.protocol.dataReceived(b"ok")
    r.protocol.connectionLost(Failure(ResponseDone()))
    assert client.value() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"
    )
    assert request._response_headers is None


def test_a_request_is_made_as_twisted_web_makes_one() -> None:
    """
    FrontRequest's own __init__ sets what twisted.web's Request.__init__
    sets (a Twisted that sets more fails here), to the same values; its
    Headers are made when read.
    """
    site, _, _, _ = make_site()
    channel, _ = connect(site)
    plain = server.Request(channel)
    assert set(vars(plain)) == FrontRequest.MIRRORED_ATTRIBUTES
    front = FrontRequest(channel)
    assert front._request_headers is None and front._response_headers is None
    assert {name: getattr(front, name) for name in FrontRequest.MIRRORED_ATTRIBUTES} == vars(plain)
    front.setHeader(b"x-a", b"1")
    assert front.responseHeaders.getRawHeaders(b"X-A") == [b"1"]
    queued = FrontRequest(channel, True)
    assert queued.queued is True and queued.responseHeaders == Headers()


def test_what_requests_and_exchanges_set_as_their_own_is_what_their_classes_say() -> None:
    """
    Class attributes set on each FrontRequest and Exchange (read on every
    request, faster as an instance's own) keep the classes' values.
    """
    from quayfront.http import Exchange

    site, _, _, _ = make_site()
    channel, _ = connect(site)
    request = FrontRequest(channel)
    for name in ("defaultContentType", "lean_channel_type", "_response_headers", "_relayed",
                 "_relayed_lines", "_target_refused"):
        assert name in vars(request) and getattr(request, name) is getattr(FrontRequest, name)
    exchange = Exchange(has_body=False)
    for name in ("draining", "ending", "body_bytes"):
        assert name in vars(exchange) and getattr(exchange, name) == getattr(Exchange, name)


def test_a_proxied_request_keeps_its_dictionary_within_shared_keys() -> None:
    """
    What a proxied request sets on itself goes into slots or at most 30
    dictionary keys: CPython 3.11 then shares the keys between requests
    (and specialises reading, writing and method lookups on them).
    """
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n")
    request = channel.request
    r = PairsResponse(200, b"OK", [(b"Server", b"s"), (b"Content-Length", b"2"), (b"ETag", b"e")], 2)
    agent.requests[0]["d"].callback(r)
    r.protocol.dataReceived(b"ok")
    r.protocol.connectionLost(Failure(ResponseDone()))
    assert request.finished and request.code == 200
    assert len(vars(request)) <= 30


@pytest.mark.parametrize("twisted_way", [False, True])
def test_a_requests_slots_start_as_twisted_webs_class_attributes(twisted_way) -> None:
    """
    The slots FrontRequest stands in front of twisted.web's class
    attributes start with twisted.web's values, made either way.
    """
    site, _, _, _ = make_site()
    channel, _ = connect(site)
    request = FrontRequest(channel, False) if twisted_way else FrontRequest(channel)
    for name in ("finished", "startedWriting", "chunked", "sentLength", "producer", "etag",
                 "lastModified", "content", "_encoder", "_disconnected", "_inFakeHead",
                 "method", "uri", "clientproto", "path", "args", "site", "code",
                 "code_message"):
        assert name in FrontRequest.__slots__
        expected = getattr(server.Request, name)
        assert getattr(request, name) == expected and type(getattr(request, name)) is type(
            expected
        ), name
