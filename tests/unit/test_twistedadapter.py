"""
Canaries for the private Twisted names in quayfront.twistedadapter: each
fails loudly if a Twisted release removes or changes what it relies on.
Then the bounded upstream client itself, end to end through a real Agent
and connection pool on an in-memory transport.
"""

from __future__ import annotations

import inspect

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import _newclient, http
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseFailed

from quayfront.config import UpstreamConfig
from quayfront.http import UpstreamMisbehaved
from quayfront.twistedadapter import (
    ChannelBadRequestHook,
    ChannelContinueHook,
    client_gone,
    hand_back_idle_timeout,
    proxied_transport,
    request_line,
    send_continue,
    waiting_for_client,
    wrap_channel,
)
from quayfront.upstream import upstream_agent, upstream_uri

# Canaries, one per private name.


def test_canary_channel_bad_request_method() -> None:
    """HTTPChannel still answers its own refusals through _respondToBadRequestAndDisconnect."""
    assert callable(getattr(http.HTTPChannel, "_respondToBadRequestAndDisconnect", None))
    assert "_respondToBadRequestAndDisconnect()" in inspect.getsource(
        http.HTTPChannel.headerReceived
    )

    class Channel(ChannelBadRequestHook, http.HTTPChannel):
        refused = 0

        def twisted_refused_request(self) -> None:
            self.refused += 1

    channel = Channel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n")
    assert channel.refused == 1


def test_canary_pool_factory() -> None:
    """HTTPConnectionPool builds protocols through _factory(quiescentCallback, metadata)."""
    assert isinstance(HTTPConnectionPool._factory, type)
    factory = HTTPConnectionPool._factory(lambda protocol: None, "metadata")
    assert callable(factory._quiescentCallback)
    source = inspect.getsource(HTTPConnectionPool._newConnection)
    assert "self._factory(quiescentCallback, repr(endpoint))" in source


def test_canary_client_parser() -> None:
    """HTTP11ClientProtocol.request() creates _parser, whose state is STATUS, then HEADER."""
    protocol = _newclient.HTTP11ClientProtocol()
    protocol.makeConnection(StringTransport())
    request = _newclient.Request(b"GET", b"/", _newclient.Headers({b"host": [b"h"]}), None)
    protocol.request(request)
    parser = protocol._parser
    assert isinstance(parser, _newclient.HTTPClientParser)
    assert parser.state == _newclient.STATUS
    parser.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert parser.state == _newclient.HEADER
    assert hasattr(parser, "MAX_LENGTH") and callable(parser.lineLengthExceeded)
    assert "self._giveUp(Failure())" in inspect.getsource(
        _newclient.HTTP11ClientProtocol.dataReceived
    )


class _HeldRequest(http.Request):
    """A request that records the request line in gotLength and is answered by the test."""

    seen: tuple[bytes, bytes, bytes] | None = None

    def gotLength(self, length):
        self.seen = request_line(self.channel)
        super().gotLength(length)

    def process(self):
        pass


def held_channel(timeout: float | None = None):
    channel = http.HTTPChannel()
    channel.requestFactory = _HeldRequest
    channel.timeOut = timeout
    channel.callLater = MemoryReactorClock().callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_canary_request_line() -> None:
    """The channel holds the request line in _command, _path, _version when gotLength runs."""
    channel, _ = held_channel()
    channel.dataReceived(b"PUT /a?b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n")
    assert channel.requests[0].seen == (b"PUT", b"/a?b", b"HTTP/1.1")


def test_canary_idle_timeout_hand_back() -> None:
    """While handling a request the channel restores _savedTimeOut when the response ends."""
    channel, _ = held_channel(timeout=60)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert channel._handlingRequest is True and channel.timeOut is None
    hand_back_idle_timeout(channel, 7)
    request = channel.requests[0]
    request.finish()
    assert channel._handlingRequest is False and channel.timeOut == 7
    hand_back_idle_timeout(channel, 9)
    assert channel.timeOut == 9


def test_canary_waiting_for_client() -> None:
    """_waitingForTransport follows the transport's pause and resume."""
    channel, _ = held_channel()
    assert waiting_for_client(channel) is False
    channel.pauseProducing()
    assert waiting_for_client(channel) is True
    channel.resumeProducing()
    assert waiting_for_client(channel) is False


def test_canary_continue_hook() -> None:
    """Expect: 100-continue goes through _send100Continue, which the hook can hold back."""

    class Channel(ChannelContinueHook, http.HTTPChannel):
        held = True

        def hold_continue(self) -> bool:
            return self.held

    channel = Channel()
    channel.requestFactory = _HeldRequest
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                         b"Expect: 100-continue\r\n\r\n")
    assert transport.value() == b""
    send_continue(channel)
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_canary_wrap_channel_and_client_gone() -> None:
    """Site's channel wrapper exists; Request._disconnected turns true when the connection is lost."""
    channel = http.HTTPChannel()
    wrapped = wrap_channel(channel)
    assert wrapped._channel is channel
    channel, _ = held_channel()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    request = channel.requests[0]
    assert client_gone(request) is False
    channel.connectionLost(Failure(ConnectionDone()))
    assert client_gone(request) is True


def test_canary_request_done_replays_through_data_received() -> None:
    """requestDone replays the bytes buffered behind a handled request through self.dataReceived."""
    replayed: list[bytes] = []

    class Channel(http.HTTPChannel):
        in_request_done = False

        def dataReceived(self, data):
            if self.in_request_done:
                replayed.append(data)
            super().dataReceived(data)

        def requestDone(self, request):
            self.in_request_done = True
            try:
                super().requestDone(request)
            finally:
                self.in_request_done = False

    channel = Channel()
    channel.requestFactory = _HeldRequest
    channel.callLater = MemoryReactorClock().callLater
    channel.makeConnection(StringTransport())
    second = b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n" + second)
    channel.requests[0].finish()
    assert replayed == [second]


def test_canary_proxied_transport() -> None:
    """TransportProxyProducer keeps the transport in _producer until stopProxying."""
    inner = StringTransport()
    proxy = _newclient.TransportProxyProducer(inner)
    assert proxied_transport(proxy) is inner
    proxy.stopProxying()
    assert proxied_transport(proxy) is None


# The bounded upstream client through a real Agent.


def exchange(answer: bytes, **limits):
    """A GET through upstream_agent; the upstream answers C{answer}."""
    reactor = MemoryReactorClock()
    agent = upstream_agent(reactor, UpstreamConfig(**limits))
    result = agent.request(b"GET", upstream_uri(b"/v2/"))
    host, port, factory, timeout, bind = reactor.tcpClients[0]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    outcome = []
    result.addBoth(outcome.append)
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


# --- The reactor and TCP transports: per-event log context, eager writes ---

import socket  # noqa: E402

from twisted.internet import abstract, epollreactor, tcp  # noqa: E402
from twisted.internet.protocol import ClientFactory, Factory, Protocol  # noqa: E402
from twisted.internet.testing import MemoryReactor  # noqa: E402

from quayfront.twistedadapter import (  # noqa: E402
    EagerWriteClient,
    EagerWriteConnector,
    EagerWritePort,
    EagerWriteServer,
    LeanEPollReactor,
    install_lean_reactor,
)


def test_canary_epoll_do_poll() -> None:
    """EPollReactor.doPoll still polls _poller, looks up _selectables and wraps _doReadOrWrite in callWithLogger."""
    source = inspect.getsource(epollreactor.EPollReactor.doPoll)
    for name in ("self._poller.poll(", "self._selectables", "self._doReadOrWrite",
                 "callWithLogger"):
        assert name in source, name
    reactor = epollreactor.EPollReactor()
    try:
        assert isinstance(reactor._selectables, dict)
        assert list(inspect.signature(reactor._doReadOrWrite).parameters) == [
            "selectable", "fd", "event"]
    finally:
        reactor._poller.close()


def test_canary_write_buffer_names() -> None:
    """FileDescriptor still buffers writes in _tempDataBuffer, then dataBuffer from offset."""
    write = inspect.getsource(abstract.FileDescriptor.write)
    assert "self._tempDataBuffer.append(data)" in write
    assert "self._writeDisconnected" in write
    assert "self.startWriting()" in write
    do_write = inspect.getsource(abstract.FileDescriptor.doWrite)
    assert "len(self.dataBuffer) - self.offset" in do_write
    descriptor = abstract.FileDescriptor(MemoryReactor())
    assert descriptor.dataBuffer == b"" and descriptor.offset == 0
    assert descriptor._tempDataBuffer == [] and descriptor._writeDisconnected is False
    assert tcp.Connection.TLS is False


def test_canary_tcp_transport_construction() -> None:
    """tcp.Port builds its transport from .transport; Connector from _makeTransport(); adopting from _fromListeningDescriptor."""
    assert tcp.Port.transport is tcp.Server
    assert "self.transport(" in inspect.getsource(tcp.Port.doRead)
    assert "Client(self.host, self.port, self.bindAddress, self, self.reactor)" in (
        inspect.getsource(tcp.Connector._makeTransport))
    assert list(inspect.signature(tcp.Port._fromListeningDescriptor).parameters) == [
        "reactor", "fd", "addressFamily", "factory"]
    assert issubclass(EagerWritePort, tcp.Port)
    assert EagerWritePort.transport is EagerWriteServer


class _Sink(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _eager_pair() -> tuple[EagerWriteServer, socket.socket, MemoryReactor]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
    protocol = _Sink()
    transport = EagerWriteServer(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)
    protocol.makeConnection(transport)
    return transport, theirs, reactor


def _read_all(sock: socket.socket) -> bytes:
    received = b""
    for _ in range(10_000):
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError("peer kept sending")


def test_eager_write_sends_at_once() -> None:
    """A write with nothing buffered leaves at once, without registering for writability."""
    transport, peer, reactor = _eager_pair()
    try:
        transport.write(b"GET / HTTP/1.1\r\n")
        transport.writeSequence([b"Host: a\r\n", b"\r\n"])
        assert _read_all(peer) == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        assert transport not in reactor.getWriters()
        assert transport.dataBuffer == b"" and transport._tempDataBuffer == []
    finally:
        transport.socket.close()
        peer.close()


def test_eager_write_buffers_what_the_kernel_refuses_in_order() -> None:
    """Beyond the socket buffer, the rest is buffered and later writes queue behind it."""
    transport, peer, reactor = _eager_pair()
    try:
        big = bytes(range(256)) * 40_000  # 10 MB: more than any socket buffer
        transport.write(big)
        assert transport in reactor.getWriters()
        assert transport._tempDataLen > 0
        transport.write(b"after")
        received = b""
        for _ in range(10_000):
            received += _read_all(peer)
            if transport in reactor.getWriters():
                transport.doWrite()
            elif len(received) == len(big) + 5:
                break
        assert received == big + b"after"
        assert transport not in reactor.getWriters()
    finally:
        transport.socket.close()
        peer.close()


def test_eager_write_after_lose_connection_is_buffered() -> None:
    """Once closing, writes take Twisted's own path (the close follows the flush)."""
    transport, peer, reactor = _eager_pair()
    try:
        transport.loseConnection()
        transport.write(b"late")
        assert transport._tempDataBuffer == [b"late"]
    finally:
        transport.socket.close()
        peer.close()


def test_lean_reactor_serves_and_connects_with_eager_transports() -> None:
    """The lean reactor accepts, connects and relays bytes with eager transports, over 127.0.0.1."""
    reactor = LeanEPollReactor()
    seen: dict[str, object] = {}

    class Echo(Protocol):
        def connectionMade(self) -> None:
            seen["server"] = type(self.transport)

        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    class Client(Protocol):
        def connectionMade(self) -> None:
            seen["client"] = type(self.transport)
            self.transport.write(b"ping")

        def dataReceived(self, data: bytes) -> None:
            seen["echo"] = data
            self.transport.loseConnection()
            reactor.stop()

    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    connector = reactor.connectTCP("127.0.0.1", port.getHost().port,
                                   ClientFactory.forProtocol(Client))
    reactor.callLater(10, reactor.stop)
    reactor.run(installSignalHandlers=False)
    port.stopListening()
    connector.disconnect()
    assert seen == {"server": EagerWriteServer, "client": EagerWriteClient, "echo": b"ping"}
    assert isinstance(connector, EagerWriteConnector)


@pytest.mark.unhandled_errors_expected
def test_lean_reactor_logs_an_escaped_error_and_goes_on() -> None:
    """An exception escaping an event handler is logged with the selectable's prefix; the loop goes on."""
    from twisted.python import log

    reactor = LeanEPollReactor()
    errors: list[dict] = []
    log.addObserver(errors.append)
    a, b = socket.socketpair()

    class Broken:
        def fileno(self) -> int:
            return a.fileno()

        def logPrefix(self) -> str:
            return "broken-thing"

    try:
        reactor._selectables[a.fileno()] = Broken()
        original = reactor._doReadOrWrite

        def explode(selectable, fd, event):
            raise RuntimeError("boom")

        reactor._doReadOrWrite = explode
        reactor._poller.register(a.fileno(), reactor._POLL_IN)
        b.send(b"x")
        reactor.doPoll(0)
        reactor._doReadOrWrite = original
    finally:
        log.removeObserver(errors.append)
        reactor._poller.unregister(a.fileno())
        del reactor._selectables[a.fileno()]
        reactor._poller.close()
        a.close()
        b.close()
    failures = [e for e in errors if e.get("isError")]
    assert len(failures) == 1
    assert failures[0]["system"] == "broken-thing"
    assert failures[0]["failure"].check(RuntimeError)


def test_install_lean_reactor_keeps_an_installed_reactor(monkeypatch) -> None:
    """With a reactor installed already (twistd --reactor, tests), nothing is replaced."""
    import sys

    sentinel = object()
    monkeypatch.setitem(sys.modules, "twisted.internet.reactor", sentinel)
    assert install_lean_reactor() is False
    assert sys.modules["twisted.internet.reactor"] is sentinel
