"""
quayfront's own client channel (FrontChannel), on a StringTransport: what it
does that Twisted's HTTPChannel used to do for it (pipelining, keep-alive,
the idle timeout around a response, write-side backpressure, pull
producers) and what it does its own way (heads parsed once, a response head
leaving with its first body bytes).
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from quayfront.config import RouteConfig
from quayfront.routing import Route, Router
from quayfront.site import MAX_HELD_BYTES, FrontChannel, StaticDirectory
from tests.unit.test_forward import connect, make_site, response, site_for


def answer(agent, index: int = -1, body: bytes = b"ok") -> None:
    r = response(200, {}, len(body))
    agent.requests[index]["d"].callback(r)
    if body:
        r._bodyDataReceived(body)
    r._bodyDataFinished(Failure(ResponseDone()))


def test_site_builds_the_channel_itself() -> None:
    """The site's protocol is the front channel, with the site's idle timeout and clock."""
    site, _, _, clock = make_site()
    channel, _ = connect(site)
    assert isinstance(channel, FrontChannel)
    assert channel.site is site and channel.timeOut == 60
    assert channel in site.channels


def test_request_is_built_from_the_parsed_head() -> None:
    """Method, target, version, path, query arguments and headers (in order) come from the head."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(
        b"GET /v2/a?n=1&n=2&m= HTTP/1.1\r\nHost: h\r\nAccept: a\r\nAccept: b\r\n\r\n"
    )
    request = channel.request
    assert (request.method, request.uri, request.clientproto) == (
        b"GET", b"/v2/a?n=1&n=2&m=", b"HTTP/1.1")
    assert request.path == b"/v2/a"
    assert request.args == {b"n": [b"1", b"2"], b"m": [b""]}
    assert request.requestHeaders.getRawHeaders(b"accept") == [b"a", b"b"]


def test_pipelined_head_waits_unparsed_until_the_response_ends() -> None:
    """A second request sent with the first becomes a request only once the first is answered."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\nGET /v2/b HTTP/1.1\r\nHo")
    first = channel.request
    channel.dataReceived(b"st: h\r\n\r\n")
    assert channel.request is first and len(agent.requests) == 1
    answer(agent)
    assert channel.request is not first and len(agent.requests) == 2
    assert agent.requests[1]["uri"].endswith(b"/v2/b")
    answer(agent)
    assert client.value().count(b"HTTP/1.1 200 OK") == 2
    assert not client.disconnecting


def test_held_bytes_beyond_the_bound_stop_reading_until_the_response_ends() -> None:
    """More than MAX_HELD_BYTES of pipelined bytes pause the client; the end of the response resumes it."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    pipelined = b"GET /v2/b HTTP/1.1\r\nHost: h\r\n\r\n"
    channel.dataReceived(pipelined * (MAX_HELD_BYTES // len(pipelined)))
    assert client.producerState == "producing"
    channel.dataReceived(pipelined)
    assert client.producerState == "paused"
    answer(agent)
    assert client.producerState == "producing"
    assert len(agent.requests) == 2


def test_head_and_first_body_bytes_leave_in_one_write() -> None:
    """A proxied response's head is written together with its first body bytes."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    writes: list[bytes] = []
    write, write_sequence = client.write, client.writeSequence
    client.write = lambda data: (writes.append(data), write(data))
    client.writeSequence = lambda seq: (writes.append(b"".join(seq)), write_sequence(seq))
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    answer(agent, body=b"hello")
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert writes[0].endswith(b"\r\n\r\nhello")


def test_head_without_body_bytes_is_sent_when_written() -> None:
    """A head whose body comes later (or never, HEAD) is not held back past the write."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"HEAD /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 10)
    agent.requests[0]["d"].callback(r)
    assert client.value() == b""
    r._bodyDataFinished(Failure(ResponseDone()))
    assert client.value().startswith(b"HTTP/1.1 200 OK\r\n")
    channel2, client2 = connect(site)
    channel2.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 10)
    agent.requests[1]["d"].callback(r)
    r._bodyDataReceived(b"")
    channel2.request.write(b"")
    assert client2.value().startswith(b"HTTP/1.1 200 OK\r\n")


def test_http10_closes_after_its_response_without_a_connection_header() -> None:
    """An HTTP/1.0 request ends its connection after the response, as before."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.0\r\n\r\nGET /v2/b HTTP/1.0\r\n\r\n")
    answer(agent)
    assert client.disconnecting
    assert b"Connection:" not in client.value()
    assert len(agent.requests) == 1


def test_close_in_any_connection_token_closes_and_says_so() -> None:
    """Connection: close in a later token or a later header closes after the response, with the header."""
    for headers in (b"Connection: keep-alive, close\r\n",
                    b"Connection: keep-alive\r\nConnection: close\r\n"):
        site, agent, _, _ = make_site()
        channel, client = connect(site)
        channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n")
        answer(agent)
        assert b"Connection: close\r\n" in client.value()
        assert client.disconnecting


def test_idle_timeout_is_off_during_a_response_and_back_after_it() -> None:
    """A slow response is not cut by the idle timeout; once it ends, an idle connection is closed."""
    site, agent, _, clock = make_site(response_timeout_s=500)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(100)
    assert not client.disconnecting
    answer(agent)
    clock.advance(59)
    assert not client.disconnecting
    clock.advance(1)
    assert client.disconnecting
    clock.advance(15)
    assert client.disconnected  # it did not go: aborted


def test_idle_timeout_after_a_quick_response_runs_from_its_end() -> None:
    """The idle timer kept through a short response is moved to its end, not left where it was."""
    site, agent, _, clock = make_site()
    channel, client = connect(site)
    clock.advance(50)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(5)
    answer(agent)
    # Besides the exchanges' deadline timer, which an exchange answered at
    # once leaves where it was (quayfront.forward.DeadlineWatch).
    live = [
        call for call in clock.getDelayedCalls()
        if call.active() and call.func.__qualname__ != "DeadlineWatch._watch"
    ]
    assert len(live) == 1, "the connection's one idle timer, moved rather than made again"
    clock.advance(59)
    assert not client.disconnecting
    clock.advance(1)
    assert client.disconnecting


def test_client_not_reading_pauses_the_response_producer() -> None:
    """When the client's transport fills, the upstream (the request's producer) is paused, and resumed."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 100)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"x")
    upstream = r._transport
    channel.pauseProducing()
    assert upstream.producerState == "paused"
    channel.resumeProducing()
    assert upstream.producerState == "producing"


def test_between_requests_a_client_not_reading_is_not_read() -> None:
    """Paused by its transport with no response under way, the channel stops reading the client."""
    site, _, _, _ = make_site()
    channel, client = connect(site)
    channel.pauseProducing()
    assert client.producerState == "paused"
    channel.resumeProducing()
    assert client.producerState == "producing"


def test_connection_lost_mid_request_ends_it_and_untracks_the_channel() -> None:
    """A lost connection ends the request in progress (499) and leaves the site's connection set."""
    site, agent, log, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    assert agent.requests[0]["cancelled"] == [True]
    assert log.entries[0].status == 499
    assert channel not in site.channels and site.in_flight == 0


def test_static_file_is_served_through_its_pull_producer(tmp_path, monkeypatch) -> None:
    """A static file (a pull producer) is written through the channel and the connection stays usable."""
    import twisted.internet._producer_helpers as helpers

    steps: list = []
    monkeypatch.setattr(
        helpers, "cooperate", Cooperator(scheduler=steps.append, started=True).cooperate
    )
    (tmp_path / "app.js").write_bytes(b"console.log(1)\n")
    site, agent, _, clock = make_site()
    site = site_for(
        Router([Route(RouteConfig(prefix="/static/", directory=str(tmp_path)),
                      resource=StaticDirectory(str(tmp_path)))]),
        clock,
    )
    channel, client = connect(site)
    channel.dataReceived(b"GET /static/app.js HTTP/1.1\r\nHost: h\r\n\r\n"
                         b"GET /static/app.js HTTP/1.1\r\nHost: h\r\n\r\n")
    for _ in range(20):
        if not steps:
            break
        steps.pop(0)()
    out = client.value()
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert out.count(b"console.log(1)\n") == 2
    assert not client.disconnecting and channel.request is None


def test_tls_errors_that_end_a_connection_are_counted_by_reason() -> None:
    """The channel under TLS counts a failed handshake by OpenSSL's reason (no wrapper in between)."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test.iosim import FakeTransport
    from twisted.test.iosim import connect as pump_between

    from quayfront.config import TLSConfig
    from quayfront.tls import load_server_tls
    from tests.unit.test_metrics import OldCiphersOnly

    site = make_site()[0]
    tls = load_server_tls(TLSConfig(cert="", self_signed_dev=True), "test")
    server = TLSMemoryBIOFactory(tls, False, site).buildProtocol(None)
    assert isinstance(server.wrappedProtocol, FrontChannel)
    client = TLSMemoryBIOFactory(OldCiphersOnly(), True, Factory.forProtocol(Protocol)).buildProtocol(
        None
    )
    pump = pump_between(server, FakeTransport(server, False), client, FakeTransport(client, True))
    pump.flush()
    assert site.counters.by_label("tls_handshake_failures") == {"no-shared-cipher": 1}


def test_a_clean_close_counts_no_tls_failure() -> None:
    """A connection that ends without a TLS error is not counted."""
    site = make_site()[0]
    channel, transport = connect(site)
    channel.connectionLost(Failure(ConnectionDone()))
    assert site.counters.by_label("tls_handshake_failures") == {}


def test_the_connections_addresses_are_read_once() -> None:
    """getPeer, getHost and isSecure ask the transport once per connection, not once per request."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    asked = []
    for name in ("getPeer", "getHost"):
        original = getattr(client, name)
        setattr(client, name, lambda _n=name, _o=original: (asked.append(_n), _o())[1])
    counts = []
    for path in (b"/v2/a", b"/v2/b", b"/v2/c"):
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        answer(agent)
        counts.append(len(asked))
    assert counts[0] > 0 and counts[0] == counts[1] == counts[2], counts
    assert channel.getPeer().host == "198.51.100.4"
    assert channel.isSecure() is False


@pytest.mark.unhandled_errors_expected  # the one logged below, on purpose
def test_an_error_ending_a_request_is_logged_not_raised(fail_on_unhandled_errors):
    """
    The request's end (its access-log line) is told by a stand-in for
    notifyFinish's Deferred: it is told once, with what twisted.web passes,
    and an error in it is logged as a Deferred would log it, not raised
    into twisted.web's finish or connectionLost.
    """
    from quayfront.site import FrontRequest

    def request_over_with(over) -> FrontRequest:
        # A request whose end is told to `over`, as the request's own end is.
        request = FrontRequest.__new__(FrontRequest)
        request._request_over = over
        return request

    told: list[object] = []
    request_over_with(told.append).callback(None)
    lost = Failure(ConnectionDone())
    request_over_with(told.append).errback(lost)
    assert told == [None, lost]

    def broken(result: object) -> None:
        raise ValueError("broken access log")

    request_over_with(broken).callback(None)
    [event] = fail_on_unhandled_errors
    assert event["log_failure"].check(ValueError)


def test_an_idle_connection_keeps_its_attributes_few_enough_to_share_keys() -> None:
    """A connected, idle channel has at most 30 instance attributes: CPython then keeps its __dict__ key-sharing (296 bytes, not 1,584)."""
    import sys

    from twisted.internet.testing import StringTransport

    site = make_site()
    site = site[0] if isinstance(site, tuple) else site
    channels = []
    for _ in range(3):
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        channels.append(channel)
    attributes = vars(channels[-1])
    assert len(attributes) <= 30, sorted(attributes)
    if sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11):
        assert sys.getsizeof(attributes) < 600
