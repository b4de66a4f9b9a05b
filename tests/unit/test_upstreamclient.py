"""
quayfront's upstream client (quayfront.upstreamclient) in memory: the
request bytes it writes, the responses it delivers through IResponse, how
bodies stream with backpressure both ways, when a connection is reused,
closed or retried, and how every way a response can end reaches the body
protocol.  Connections are StringTransports on a MemoryReactorClock, and
iosim pumps between the client and a fake upstream protocol.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import (
    PotentialDataLoss,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from quayfront.config import UpstreamAddress, UpstreamConfig
from quayfront.http import UpstreamMisbehaved
from quayfront.twistedadapter import proxied_transport
from quayfront.upstream import UPSTREAM_AUTHORITY, upstream_agent, upstream_key, upstream_uri
from quayfront.upstreamclient import UpstreamPool

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Body(Protocol):
    """Collects a response body and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


@implementer(IBodyProducer)
class Producer:
    """A request body the test writes by hand."""

    def __init__(self, length=UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer = None
        self.done: Deferred = Deferred()
        self.state = "new"

    def startProducing(self, consumer) -> Deferred:
        self.consumer = consumer
        self.state = "producing"
        return self.done

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


class Upstream:
    """An agent on a MemoryReactorClock whose connections the test accepts one by one."""

    def __init__(self, persistent: bool = True, **settings) -> None:
        self.reactor = MemoryReactorClock()
        self.config = UpstreamConfig(**settings)
        self.agent = upstream_agent(self.reactor, self.config, persistent=persistent)
        self.accepted = 0

    #: How requests are made: "deferred" (request), "callbacks"
    #: (request_with) or "object" (request_for); every test runs each way
    #: (the fixture below).
    via = "deferred"

    def request(self, method=b"GET", target=b"/v2/", headers=None, body=None):
        outcome: list = []
        if Upstream.via == "callbacks":
            d = self.agent.request_with(
                outcome.append, outcome.append, method, upstream_uri(target), headers, body
            )
        elif Upstream.via == "object":
            d = self.agent.request_for(
                Told(outcome), method, UPSTREAM_AUTHORITY, target, headers, body
            )
        else:
            d = self.agent.request(method, upstream_uri(target), headers, body)
            d.addBoth(outcome.append)
        return d, outcome

    def accept(self):
        """The next new connection, connected to a StringTransport."""
        clients = self.reactor.unixClients if self.config.url.scheme == "unix" else self.reactor.tcpClients
        factory = clients[self.accepted][2] if self.config.url.scheme != "unix" else clients[self.accepted][1]
        self.accepted += 1
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.reactor.advance(0)
        return protocol, transport

    @property
    def connections_made(self) -> int:
        return len(self.reactor.tcpClients) + len(self.reactor.unixClients)


class Told:
    """An outcome object for request_for: what it is told, in a list."""

    def __init__(self, outcome: list) -> None:
        self.outcome = outcome

    def callback(self, response) -> None:
        self.outcome.append(response)

    def errback(self, failure) -> None:
        self.outcome.append(failure)


@pytest.fixture(autouse=True, params=["deferred", "callbacks", "object"])
def requests_made(request):
    """
    Each test with requests made by request() (a Deferred), by
    request_with() (the outcome told to two functions) and by request_for()
    (the outcome told to an object): the same outcome.
    """
    Upstream.via = request.param
    yield request.param
    Upstream.via = "deferred"


def respond(protocol, transport, answer: bytes):
    protocol.dataReceived(answer)
    return transport


def body_of(response) -> Body:
    body = Body()
    response.deliverBody(body)
    return body


# The agent as an IAgent, and what it writes.


def test_agent_and_response_provide_the_interfaces() -> None:
    """Callers keep talking to an IAgent and get an IResponse."""
    upstream = Upstream()
    verifyObject(IAgent, upstream.agent)
    d, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    [response] = outcome
    verifyObject(IResponse, response)
    assert (response.version, response.code, response.phrase, response.length) == (
        (b"HTTP", 1, 1), 200, b"OK", 2)
    assert response.request.method == b"GET"


@pytest.mark.parametrize(
    "answer, end",
    [
        (OK, "length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok", "connection closed"),
    ],
)
def test_an_exchange_that_ends_well_is_freed_without_the_garbage_collector(answer, end) -> None:
    """
    Once its response has ended well, nothing of an exchange is left in a
    reference cycle: the exchange, the response and the body protocol are
    freed by their reference counts (with the collector off), not left for
    a collection that costs every request.  (A failed response is not: the
    ResponseFailed it ends with points back at it, as Twisted's does.)
    """
    import gc
    import weakref

    from quayfront.upstreamclient import _Exchange

    upstream = Upstream()
    made = []
    original_init = _Exchange.__init__

    def recording_init(self, *args, **kwargs):
        made.append(weakref.ref(self))
        original_init(self, *args, **kwargs)

    collecting = gc.isenabled()
    gc.disable()
    try:
        _Exchange.__init__ = recording_init
        handle, outcome = upstream.request()
        protocol, transport = upstream.accept()
        protocol.dataReceived(answer)
        response = outcome[0]
        body = body_of(response)
        if end == "connection closed":
            protocol.connectionLost(Failure(ConnectionDone()))
        assert body.reason is not None and body.data == b"ok"
        freed = [weakref.ref(response), weakref.ref(body)] + made
        if Upstream.via == "object":
            # request_for answers the exchange itself (for cancel()): what
            # its caller holds, it holds.  The Deferred and the _Outcome
            # of the other ways let go of it once told.
            assert handle is made[0]()
            del handle
        del response, body, outcome[:]
        assert [ref() for ref in freed] == [None] * len(freed)
    finally:
        _Exchange.__init__ = original_init
        if collecting:
            gc.enable()


def test_request_head_as_given_with_host_from_the_headers() -> None:
    """Method, target and headers go out in order; Host is the caller's, not the URI's."""
    upstream = Upstream()
    headers = Headers()
    headers.addRawHeader(b"Host", b"registry.example")
    headers.addRawHeader(b"Accept", b"a")
    headers.addRawHeader(b"Accept", b"b")
    upstream.request(b"GET", b"/v2/x?y=1", headers)
    _, transport = upstream.accept()
    assert transport.value() == (
        b"GET /v2/x?y=1 HTTP/1.1\r\nHost: registry.example\r\nAccept: a\r\nAccept: b\r\n\r\n"
    )


def test_request_without_host_gets_the_uri_authority_and_close_when_not_persistent() -> None:
    """Without a Host header the URI's authority is sent; a non-persistent agent asks to close."""
    upstream = Upstream(persistent=False)
    upstream.request(b"POST", b"/health")
    _, transport = upstream.accept()
    assert transport.value() == (
        b"POST /health HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\nHost: upstream\r\n\r\n"
    )


def test_unsendable_method_or_target_is_refused_synchronously() -> None:
    """A method or target with whitespace or control bytes raises before anything is sent."""
    upstream = Upstream()
    with pytest.raises(ValueError):
        upstream.agent.request(b"GET", upstream_uri(b"/a b"))
    with pytest.raises(ValueError):
        upstream.agent.request(b"G\r\nET", upstream_uri(b"/"))
    assert upstream.connections_made == 0


def test_known_length_body_is_framed_with_content_length() -> None:
    """A body of known length goes with Content-Length, written as produced."""
    upstream = Upstream()
    producer = Producer(length=5)
    d, outcome = upstream.request(b"PUT", b"/b", body=producer)
    protocol, transport = upstream.accept()
    assert transport.value() == b"PUT /b HTTP/1.1\r\nContent-Length: 5\r\nHost: upstream\r\n\r\n"
    producer.consumer.write(b"abc")
    producer.consumer.write(b"de")
    producer.done.callback(None)
    assert transport.value().endswith(b"\r\n\r\nabcde")
    protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert outcome[0].code == 201
    assert not transport.disconnecting


def test_unknown_length_body_is_chunked() -> None:
    """A body of unknown length goes chunked, ended by the last chunk."""
    upstream = Upstream()
    producer = Producer()
    upstream.request(b"PATCH", b"/b", body=producer)
    _, transport = upstream.accept()
    producer.consumer.write(b"abc")
    producer.consumer.write(b"")
    producer.consumer.write(b"0123456789abcdef")
    producer.done.callback(None)
    assert transport.value() == (
        b"PATCH /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: upstream\r\n\r\n"
        b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"
    )


@pytest.mark.parametrize("written", [b"abcdef", b"ab"])
def test_a_body_of_the_wrong_length_fails_the_request(written: bytes) -> None:
    """More or fewer bytes than announced abort the connection and fail the request."""
    upstream = Upstream()
    producer = Producer(length=5)
    _, outcome = upstream.request(b"PUT", b"/b", body=producer)
    _, transport = upstream.accept()
    producer.consumer.write(written)
    if not outcome:
        producer.done.callback(None)
    [failure] = outcome
    failure.trap(RequestGenerationFailed)
    assert transport.disconnected
    assert not transport.value().endswith(written) or len(written) < 5


# Reuse.


def test_connection_is_reused_after_a_complete_exchange() -> None:
    """A complete response on a keep-alive connection puts it back; the next request takes it."""
    upstream = Upstream()
    upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 1
    transport.clear()
    _, outcome = upstream.request(target=b"/v2/again")
    assert upstream.connections_made == 1
    assert transport.value().startswith(b"GET /v2/again HTTP/1.1\r\n")
    protocol.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert outcome[0].code == 404
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 1


def test_the_connection_is_pooled_before_the_body_protocol_hears_the_end() -> None:
    """A request made when the body ends can take the connection it came on, as with Agent."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, _ = upstream.accept()
    seen = []

    class Chained(Body):
        def connectionLost(self, reason):
            seen.append(upstream.agent.pool.idle_count(upstream.agent.key))

    protocol.dataReceived(OK[:-2])
    outcome[0].deliverBody(Chained())
    protocol.dataReceived(b"ok")
    assert seen == [1]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
    ],
)
def test_no_reuse_when_either_side_closes_or_the_upstream_talks_out_of_turn(answer: bytes) -> None:
    """Connection: close, an HTTP/1.0 answer or bytes after the response close the connection."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(answer)
    assert body_of(outcome[0]).reason.check(ResponseDone)
    assert transport.disconnecting
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0
    upstream.request()
    assert upstream.connections_made == 2


def test_no_reuse_for_a_non_persistent_agent() -> None:
    """The health probe's agent asks to close and never pools."""
    upstream = Upstream(persistent=False)
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    assert transport.disconnecting
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0


def test_an_idle_connection_that_talks_is_dropped() -> None:
    """Bytes on an idle pooled connection abort it; it is not handed out again."""
    upstream = Upstream()
    upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert transport.disconnected
    protocol.connectionLost(Failure(ConnectionDone()))
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0


def test_idle_connections_expire_and_are_capped() -> None:
    """Idle connections close after idle_keepalive_s, and at most max_idle_connections stay."""
    upstream = Upstream(idle_keepalive_s=50.0, max_idle_connections=2)
    pending = [upstream.request() for _ in range(3)]
    accepted = [upstream.accept() for _ in pending]
    for protocol, _ in accepted:
        protocol.dataReceived(OK)
    # The oldest of three went over the cap.
    assert [t.disconnecting for _, t in accepted] == [True, False, False]
    upstream.reactor.advance(49)
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 2
    upstream.reactor.advance(1)
    assert all(t.disconnecting for _, t in accepted)
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0
    upstream.request()
    assert upstream.connections_made == 4


def test_an_expired_connection_is_not_taken_before_the_sweep() -> None:
    """A connection past its idle time is never handed out, even if the sweep has not run."""
    upstream = Upstream(idle_keepalive_s=10.0)
    upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    upstream.reactor.rightNow += 11  # the clock moved; no timer ran
    upstream.request()
    assert transport.disconnecting
    assert upstream.connections_made == 2


def test_pool_keys_are_the_upstream_addresses() -> None:
    """Connections are pooled by TCP host:port or by UNIX socket path."""
    assert upstream_key(UpstreamAddress("http", host="127.0.0.1", port=5000)) == "http://127.0.0.1:5000"
    assert upstream_key(UpstreamAddress("http", host="::1", port=5000)) == "http://[::1]:5000"
    assert upstream_key(UpstreamAddress("unix", path="/run/registry.sock")) == "unix:/run/registry.sock"


def test_unix_upstream_connects_to_its_socket_and_pools_by_path() -> None:
    """A UNIX-socket upstream connects to its path and reuses connections like TCP."""
    upstream = Upstream(url=UpstreamAddress("unix", path="/run/registry.sock"))
    upstream.request()
    assert upstream.reactor.unixClients[0][0] == "/run/registry.sock"
    protocol, _ = upstream.accept()
    protocol.dataReceived(OK)
    assert upstream.agent.pool.idle_count("unix:/run/registry.sock") == 1
    upstream.request()
    assert upstream.connections_made == 1


def test_agents_sharing_a_pool_share_an_upstreams_connections() -> None:
    """Two agents for one upstream (a route's own connect timeout) share its idle connections."""
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor)
    config = UpstreamConfig()
    first = upstream_agent(reactor, config, pool=pool)
    second = upstream_agent(reactor, UpstreamConfig(connect_timeout_s=2.0), pool=pool)
    first.request(b"GET", upstream_uri(b"/"))
    protocol = reactor.tcpClients[0][2].buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(OK)
    second.request(b"GET", upstream_uri(b"/"))
    assert len(reactor.tcpClients) == 1


# Failures and retries.


def test_connect_failure_is_the_connection_error() -> None:
    """A refused connection fails the request with the connect error itself."""
    upstream = Upstream()
    _, outcome = upstream.request()
    factory = upstream.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    upstream.reactor.advance(0)
    [failure] = outcome
    assert failure.check(ConnectionRefusedError)


def test_lost_before_any_response_byte_is_response_never_received() -> None:
    """A fresh connection lost with no response byte fails with ResponseNeverReceived."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, _ = upstream.accept()
    protocol.connectionLost(Failure(ConnectionLost()))
    [failure] = outcome
    failure.trap(ResponseNeverReceived)
    assert upstream.connections_made == 1  # a fresh connection is not retried


def test_lost_mid_head_is_response_failed() -> None:
    """A connection lost after part of a head fails with ResponseFailed."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, _ = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
    protocol.connectionLost(Failure(ConnectionLost()))
    [failure] = outcome
    failure.trap(ResponseFailed)


def test_lost_while_sending_the_body_is_request_transmission_failed() -> None:
    """A connection lost mid-body fails with RequestTransmissionFailed and stops the producer."""
    upstream = Upstream()
    producer = Producer(length=10)
    _, outcome = upstream.request(b"PUT", b"/b", body=producer)
    protocol, _ = upstream.accept()
    producer.consumer.write(b"abc")
    protocol.connectionLost(Failure(ConnectionLost()))
    [failure] = outcome
    failure.trap(RequestTransmissionFailed)
    assert producer.state == "stopped"


def dead_pooled_connection(upstream: Upstream):
    upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    return protocol, transport


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE"])
def test_dead_pooled_connection_is_retried_once_for_idempotent_bodiless_requests(method) -> None:
    """A pooled connection that dies with no response byte is retried once on a new one."""
    upstream = Upstream()
    protocol, _ = dead_pooled_connection(upstream)
    _, outcome = upstream.request(method)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert outcome == []
    fresh, transport = upstream.accept()
    assert transport.value().startswith(method + b" /v2/ HTTP/1.1\r\n")
    fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert outcome[0].code == 200


def test_retry_is_only_once() -> None:
    """A retried request whose new connection dies too fails."""
    upstream = Upstream()
    protocol, _ = dead_pooled_connection(upstream)
    _, outcome = upstream.request()
    protocol.connectionLost(Failure(ConnectionDone()))
    fresh, _ = upstream.accept()
    fresh.connectionLost(Failure(ConnectionDone()))
    [failure] = outcome
    failure.trap(ResponseNeverReceived)
    assert upstream.connections_made == 2


@pytest.mark.parametrize("method, body", [(b"POST", None), (b"PUT", Producer(length=0))])
def test_no_retry_for_requests_that_are_not_safe_to_repeat(method, body) -> None:
    """A POST, or any request with a body, is not retried."""
    upstream = Upstream()
    protocol, _ = dead_pooled_connection(upstream)
    if body is not None:
        body.startProducing = lambda consumer: succeed(None)
    _, outcome = upstream.request(method, body=body)
    protocol.connectionLost(Failure(ConnectionDone()))
    [failure] = outcome
    failure.trap(ResponseNeverReceived)
    assert upstream.connections_made == 1


def test_no_retry_once_a_response_byte_arrived() -> None:
    """A request the upstream had started answering is not retried."""
    upstream = Upstream()
    protocol, _ = dead_pooled_connection(upstream)
    _, outcome = upstream.request()
    protocol.dataReceived(b"HTTP/1.1")
    protocol.connectionLost(Failure(ConnectionDone()))
    [failure] = outcome
    failure.trap(ResponseFailed)


# Response bodies and how they end.


def test_body_bytes_before_deliver_body_are_kept_and_reading_pauses() -> None:
    """Body bytes that arrive before deliverBody are kept; the connection stops reading until then."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    assert transport.producerState == "paused"
    body = body_of(outcome[0])
    assert transport.producerState == "producing"
    assert body.data == b"abc" and body.reason is None
    protocol.dataReceived(b"def")
    assert body.data == b"abcdef"
    body.reason.trap(ResponseDone)


def test_a_complete_response_before_deliver_body_is_delivered_whole() -> None:
    """A response that ended before deliverBody still reaches the protocol, then its end."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    body = body_of(outcome[0])
    assert body.data == b"ok"
    body.reason.trap(ResponseDone)
    assert transport.producerState == "producing"  # back in the pool, reading


def handled_by(upstream: Upstream, on_response, on_failure) -> None:
    """A GET whose outcome goes to the two functions, made the way the test runs."""
    if Upstream.via == "callbacks":
        upstream.agent.request_with(on_response, on_failure, b"GET", upstream_uri(b"/v2/"))
    else:
        upstream.agent.request(b"GET", upstream_uri(b"/v2/")).addCallbacks(on_response, on_failure)


def taking_whole(taken: list):
    """An outcome handler that takes the whole body, with the pool's state then."""

    def take(response) -> None:
        offered = response.whole_body
        body = response.take_whole_body()
        taken.append((offered, body, response.whole_body))

    return take


@pytest.mark.parametrize(
    "answer, body",
    [
        (OK, b"ok"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n1\r\n!\r\n0\r\n\r\n", b"ok!"),
    ],
)
def test_a_response_read_in_one_piece_is_offered_whole(answer: bytes, body: bytes) -> None:
    """
    A response whose head, body and end arrive in one read is told with its
    whole body; taking it ends the response (the connection back in the
    pool at once), and deliverBody afterwards tells only its end.
    """
    upstream = Upstream()
    taken: list = []
    handled_by(upstream, taking_whole(taken), taken.append)
    protocol, transport = upstream.accept()
    respond(protocol, transport, answer)
    assert taken == [(body, body, None)]
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 1
    assert not transport.disconnecting


def test_a_whole_body_not_taken_is_delivered_as_ever() -> None:
    """A response offered whole but not taken is delivered through deliverBody, and the offer ends."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    [response] = outcome
    assert response.whole_body is None
    with pytest.raises(RuntimeError):
        response.take_whole_body()
    body = body_of(response)
    assert body.data == b"ok"
    body.reason.trap(ResponseDone)
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 1


def test_no_whole_body_is_offered_for_a_body_still_coming() -> None:
    """A response whose body is not all there with its head is not offered whole."""
    upstream = Upstream()
    offered: list = []
    handled_by(upstream, lambda response: offered.append(response.whole_body), offered.append)
    protocol, transport = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    assert offered == [None]


def test_close_delimited_body_ends_with_potential_data_loss() -> None:
    """A body delimited by the close ends with PotentialDataLoss, and its connection is not reused."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    body = body_of(outcome[0])
    assert outcome[0].length is UNKNOWN_LENGTH
    protocol.connectionLost(Failure(ConnectionDone()))
    assert body.data == b"all of it"
    body.reason.trap(PotentialDataLoss)
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n",
    ],
)
def test_truncated_body_is_response_failed(answer: bytes) -> None:
    """A length or chunked body cut off by the connection is ResponseFailed, never ResponseDone."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, _ = upstream.accept()
    protocol.dataReceived(answer)
    body = body_of(outcome[0])
    protocol.connectionLost(Failure(ConnectionLost()))
    assert body.data == b"partial"
    body.reason.trap(ResponseFailed)
    assert body.reason.value.reasons[0].check(ConnectionLost)


def test_misbehaving_body_fails_the_body_and_closes() -> None:
    """A bad chunk size after the head fails the body with the UpstreamMisbehaved reason and closes."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    body = body_of(outcome[0])
    assert body.data == b"abc"
    body.reason.trap(ResponseFailed)
    [reason] = body.reason.value.reasons
    assert reason.value.reason == "upstream-bad-chunk-size"
    assert transport.disconnecting
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0


def test_body_transport_is_a_push_producer_onto_the_connection() -> None:
    """The body protocol's transport pauses and resumes reading from the upstream socket."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    body = body_of(outcome[0])
    verifyObject(IPushProducer, body.transport)
    body.transport.pauseProducing()
    assert transport.producerState == "paused"
    body.transport.resumeProducing()
    assert transport.producerState == "producing"


def test_proxied_transport_until_the_connection_goes_back_to_the_pool() -> None:
    """proxied_transport gives the upstream socket while the response runs, None once pooled."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    body = body_of(outcome[0])
    assert proxied_transport(body.transport) is transport
    protocol.dataReceived(b"ok")
    assert proxied_transport(body.transport) is None
    body.transport.stopProducing()  # after the end: reaches nothing
    body.transport.pauseProducing()
    assert not transport.disconnecting and transport.producerState == "producing"


def test_a_body_delivered_after_its_end_gets_a_transport_that_reaches_nothing() -> None:
    """A body protocol given a response that already ended (its connection pooled) gets a transport holding no connection."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    # Told with the head, before anyone delivers the body; the body's end
    # is read at once, and the connection goes back to the pool.
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 1
    body = body_of(outcome[0])
    assert body.data == b"ok"
    body.reason.trap(ResponseDone)
    assert proxied_transport(body.transport) is None
    body.transport.pauseProducing()
    body.transport.stopProducing()
    assert not transport.disconnecting and transport.producerState == "producing"


def test_stopping_the_body_transport_aborts_the_connection() -> None:
    """stopProducing mid-body aborts the upstream connection; the body ends failed."""
    upstream = Upstream()
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    body = body_of(outcome[0])
    body.transport.stopProducing()
    assert transport.disconnected
    protocol.connectionLost(Failure(ConnectionLost()))
    body.reason.trap(ResponseFailed)
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0


def test_stopped_while_handling_the_head_delivers_nothing_more() -> None:
    """A body transport stopped on the head gets no more data, and the loss ends it failed, never done."""
    upstream = Upstream()
    body = Body()

    def stop_at_once(response):
        response.deliverBody(body)
        body.transport.stopProducing()

    upstream.agent.request(b"GET", upstream_uri(b"/v2/")).addCallback(stop_at_once)
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    assert transport.disconnected
    assert (body.data, body.reason) == (b"", None)
    protocol.connectionLost(Failure(ConnectionLost()))
    body.reason.trap(ResponseFailed)
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0


# Head limits (moved from the tests of the Agent-based client).


def exchange(answer: bytes, **limits):
    """A GET through upstream_agent; the upstream answers C{answer}."""
    upstream = Upstream(**limits)
    _, outcome = upstream.request()
    protocol, transport = upstream.accept()
    protocol.dataReceived(answer)
    return outcome, transport


def misbehaved(outcome) -> UpstreamMisbehaved:
    [failure] = outcome
    failure.trap(ResponseFailed)
    [reason] = failure.value.reasons
    return reason.value


def test_normal_response_passes() -> None:
    """A well-formed head within the limits is relayed, body included."""
    outcome, transport = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok")
    [response] = outcome
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-a") == [b"b"]
    assert response.length == 2
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"HTTX/1.1 200 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "upstream-bad-header"),
        (b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n", "upstream-bad-header"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", "upstream-too-many-headers"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: " + b"a" * 1000 + b"\r\n" * 1, None),
        (b"HTTP/1.1 200 OK\r\n" + (b"X-A: " + b"a" * 1000 + b"\r\n") * 40,
         "upstream-head-too-large"),
        (b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 100_000, "upstream-head-too-large"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 2000, "upstream-head-too-large"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "upstream-switching-protocols"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
         "upstream-bad-content-length"),
    ],
)
def test_misbehaving_heads_fail_and_close(answer: bytes, reason: str | None) -> None:
    """A malformed or oversized head fails the request with its reason and closes the connection."""
    outcome, transport = exchange(answer)
    if reason is None:
        assert outcome == [] and not transport.disconnecting
        return
    assert misbehaved(outcome).reason == reason
    assert transport.disconnecting


def test_limits_are_per_upstream() -> None:
    """max_response_head_bytes and max_response_headers come from the upstream's config."""
    answer = b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n"
    outcome, _ = exchange(answer, max_response_headers=2)
    assert misbehaved(outcome).reason == "upstream-too-many-headers"
    outcome, _ = exchange(answer, max_response_head_bytes=40)
    assert misbehaved(outcome).reason == "upstream-head-too-large"
    outcome, _ = exchange(answer)
    assert outcome[0].code == 204


# Early answers, cancelling and request body backpressure.


def test_early_answer_fires_at_once_stops_the_body_and_is_never_reused() -> None:
    """A head that arrives mid-body is delivered at once; the body stops; the connection is dropped."""
    upstream = Upstream()
    producer = Producer(length=1_000_000)
    _, outcome = upstream.request(b"PUT", b"/b", body=producer)
    protocol, transport = upstream.accept()
    producer.consumer.write(b"abc")
    protocol.dataReceived(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n")
    [response] = outcome
    assert response.code == 401
    assert producer.state == "stopped"
    assert transport.producer is None  # the body is no longer paced by the socket
    producer.consumer.write(b"late")  # a producer that writes anyway reaches nothing
    assert not transport.value().endswith(b"late")
    body = body_of(response)
    assert proxied_transport(body.transport) is transport
    protocol.dataReceived(b"{}")
    body.reason.trap(ResponseDone)
    assert transport.disconnected
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0
    producer.done.callback(None)  # finishing later changes nothing
    assert not transport.value().endswith(b"0\r\n\r\n")


def test_interim_100_continue_is_not_an_answer() -> None:
    """A 100 Continue mid-body is skipped; the body goes on and the final answer follows."""
    upstream = Upstream()
    producer = Producer(length=3)
    _, outcome = upstream.request(b"PUT", b"/b", body=producer)
    protocol, transport = upstream.accept()
    protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert outcome == [] and producer.state == "producing"
    producer.consumer.write(b"abc")
    producer.done.callback(None)
    protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert outcome[0].code == 201
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 1


def test_request_body_is_paced_by_the_upstream_socket() -> None:
    """The socket's full buffer pauses the body producer; draining resumes it; the end unregisters."""
    upstream = Upstream()
    producer = Producer(length=3)
    upstream.request(b"PUT", b"/b", body=producer)
    _, transport = upstream.accept()
    assert transport.streaming
    transport.producer.pauseProducing()
    assert producer.state == "paused"
    transport.producer.resumeProducing()
    assert producer.state == "producing"
    producer.consumer.write(b"abc")
    producer.done.callback(None)
    assert transport.producer is None


def test_cancel_while_connecting_cancels_the_connection_attempt() -> None:
    """Cancelling before the connection exists fails with CancelledError and drops the attempt."""
    upstream = Upstream()
    d, outcome = upstream.request()
    d.cancel()
    [failure] = outcome
    failure.trap(CancelledError)
    assert upstream.reactor.tcpClients[0][2]  # the attempt was made...
    assert upstream.reactor.connectors[0].stoppedConnecting  # ...and stopped


@pytest.mark.parametrize("with_body", [False, True])
def test_cancel_after_sending_aborts_the_connection(with_body: bool) -> None:
    """Cancelling a sent request aborts its connection and stops its body."""
    upstream = Upstream()
    producer = Producer(length=10) if with_body else None
    d, outcome = upstream.request(b"PUT" if with_body else b"GET", b"/b", body=producer)
    protocol, transport = upstream.accept()
    d.cancel()
    [failure] = outcome
    failure.trap(CancelledError)
    assert transport.disconnected
    if with_body:
        assert producer.state == "stopped"
    protocol.connectionLost(Failure(ConnectionLost()))  # no second outcome
    assert len(outcome) == 1
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 0


# Real transports in memory: iosim between the client and a fake upstream.


class FakeUpstream(Protocol):
    """Answers each complete request head with C{answers}, one per request, and records what came."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = list(answers)
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        while self.received.count(b"\r\n\r\n") > 0 and self.answers:
            _, _, self.received = self.received.partition(b"\r\n\r\n")
            self.transport.write(self.answers.pop(0))


def test_iosim_keep_alive_exchanges_on_one_connection() -> None:
    """Through real in-memory transports, three GETs share one connection and each body completes."""
    upstream = Upstream()
    server = FakeUpstream([OK, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", OK])
    bodies = []
    pump = None
    for index in range(3):
        _, outcome = upstream.request(target=b"/v2/%d" % index)
        if pump is None:
            factory = upstream.reactor.tcpClients[0][2]
            client = factory.buildProtocol(None)
            server_transport = iosim.makeFakeServer(server)
            client_transport = iosim.makeFakeClient(client)
            pump = iosim.connect(server, server_transport, client, client_transport, greet=False)
            upstream.reactor.advance(0)
        pump.flush()
        bodies.append(body_of(outcome[0]))
        pump.flush()
    assert [b.data for b in bodies] == [b"ok", b"hi", b"ok"]
    assert all(b.reason.check(ResponseDone) for b in bodies)
    assert len(upstream.reactor.tcpClients) == 1


def test_iosim_streamed_upload_then_answer() -> None:
    """Through real in-memory transports, a chunked upload reaches the upstream whole before its answer."""
    upstream = Upstream()
    server = FakeUpstream([])
    producer = Producer()
    _, outcome = upstream.request(b"PUT", b"/b", body=producer)
    client = upstream.reactor.tcpClients[0][2].buildProtocol(None)
    server_transport = iosim.makeFakeServer(server)
    client_transport = iosim.makeFakeClient(client)
    pump = iosim.connect(server, server_transport, client, client_transport, greet=False)
    upstream.reactor.advance(0)
    for piece in (b"abc", b"defgh"):
        producer.consumer.write(piece)
        pump.flush()
    producer.done.callback(None)
    pump.flush()
    assert server.received.endswith(b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n")
    assert outcome == []
    server.transport.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    pump.flush()
    assert outcome[0].code == 201
    body_of(outcome[0]).reason.trap(ResponseDone)
    assert upstream.agent.pool.idle_count(upstream.agent.key) == 1


@pytest.mark.unhandled_errors_expected  # the one logged below, on purpose
def test_an_error_in_the_response_function_is_logged(fail_on_unhandled_errors, requests_made) -> None:
    """
    request_with's functions are called as a Deferred's callbacks would be:
    once, and an error in one is logged, not raised into the connection.
    """
    upstream = Upstream()
    failures: list = []

    def broken(response) -> None:
        raise ValueError("broken response handler")

    outcome = upstream.agent.request_with(broken, failures.append, b"GET", upstream_uri(b"/"))
    protocol, transport = upstream.accept()
    protocol.dataReceived(OK)
    [event] = fail_on_unhandled_errors
    assert event["log_failure"].check(ValueError)
    assert failures == []
    outcome.cancel()  # told already: nothing more happens
    assert failures == [] and not transport.disconnecting
