"""
Canaries for the private Twisted names in quayfront.twistedadapter: each
fails loudly if a Twisted release removes or changes what it relies on.
(The upstream client no longer uses any: its tests are in
test_upstreamclient.py.)
"""

from __future__ import annotations

import inspect

import pytest

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import http
from twisted.python.failure import Failure

from quayfront.twistedadapter import (
    client_gone,
    hand_back_idle_timeout,
    pull_to_push,
    release_handshake_bios,
    waiting_for_client,
)

# Canaries, one per private name.


def test_canary_request_refuses_through_its_channel() -> None:
    """twisted.web's Request still refuses a bad request through channel._respondToBadRequestAndDisconnect()."""
    source = inspect.getsource(http.Request.requestReceived)
    assert "self.channel._respondToBadRequestAndDisconnect()" in source


class _HeldRequest(http.Request):
    """A request answered by the test."""

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


def test_canary_pull_to_push(monkeypatch) -> None:
    """_PullToPush(producer, consumer) pulls on a cooperator until stopStreaming, as HTTPChannel uses it."""
    import twisted.internet._producer_helpers as helpers
    from twisted.internet.task import Cooperator

    assert "_PullToPush(producer, self)" in inspect.getsource(http.HTTPChannel.registerProducer)

    class Pull:
        calls = 0

        def resumeProducing(self):
            self.calls += 1

        def stopProducing(self):
            pass

    steps: list = []
    monkeypatch.setattr(
        helpers, "cooperate", Cooperator(scheduler=steps.append, started=True).cooperate
    )
    pull = Pull()
    push = pull_to_push(pull, StringTransport())
    push.startStreaming()
    for _ in range(3):
        steps.pop(0)()
    assert pull.calls >= 1
    push.pauseProducing()
    before = pull.calls
    while steps:
        steps.pop(0)()
    assert pull.calls == before
    push.resumeProducing()
    push.stopStreaming()
    while steps:
        steps.pop(0)()
    assert callable(push.stopProducing)


def test_idle_timeout_hand_back_and_waiting_for_client_use_the_channel() -> None:
    """forward.py's two channel helpers read and set the front channel's own state."""

    class Channel:
        waiting_for_client = True
        handed = None

        def hand_back_idle_timeout(self, timeout_s):
            self.handed = timeout_s

    channel = Channel()
    hand_back_idle_timeout(channel, 7)
    assert channel.handed == 7
    assert waiting_for_client(channel) is True
    assert waiting_for_client(None) is False


def test_canary_client_gone() -> None:
    """Request._disconnected turns true when the connection is lost."""
    channel, _ = held_channel()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    request = channel.requests[0]
    assert client_gone(request) is False
    channel.connectionLost(Failure(ConnectionDone()))
    assert client_gone(request) is True


# --- The reactor and TCP transports: per-event log context, eager writes ---

import select  # noqa: E402
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


def test_eager_transports_read_a_quarter_mebibyte_at_a_time() -> None:
    """One doRead takes up to 256 KiB waiting on the socket (Twisted reads 64 KiB)."""
    transport, peer, reactor = _eager_pair()
    try:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sent = 0
        for _ in range(64):
            try:
                sent += peer.send(b"x" * (1 << 16))
            except BlockingIOError:
                break
        assert sent >= 1 << 18, "the socket pair holds a quarter mebibyte"
        transport.doRead()
        assert len(transport.protocol.received) == 1 << 18
    finally:
        transport.socket.close()
        peer.close()


def _flush_to_peer(transport, peer: socket.socket, reactor, length: int) -> bytes:
    """What C{peer} reads while the reactor would write C{transport}'s buffer, up to C{length} bytes."""
    received = b""
    for _ in range(10_000):
        received += _read_all(peer)
        if transport in reactor.getWriters():
            transport.doWrite()
        elif len(received) == length:
            break
    return received


def test_eager_write_buffers_what_the_kernel_refuses_in_order() -> None:
    """Beyond the socket buffer, the rest is buffered and later writes queue behind it."""
    transport, peer, reactor = _eager_pair()
    try:
        big = bytes(range(256)) * 40_000  # 10 MB: more than any socket buffer
        transport.write(big)
        assert transport in reactor.getWriters()
        assert transport._tempDataLen > 0
        transport.write(b"after")
        received = _flush_to_peer(transport, peer, reactor, len(big) + 5)
        assert received == big + b"after"
        assert transport not in reactor.getWriters()
    finally:
        transport.socket.close()
        peer.close()


def test_eager_write_borrowed_copies_only_what_the_kernel_refuses() -> None:
    """A borrowed buffer is sent from where it is; the refused rest is copied, so reusing the buffer after changes nothing sent."""
    transport, peer, reactor = _eager_pair()
    try:
        big = bytes(range(256)) * 40_000  # 10 MB: more than any socket buffer
        borrowed = bytearray(big)
        transport.write_borrowed(memoryview(borrowed))
        assert transport in reactor.getWriters()
        borrowed[:] = b"\0" * len(borrowed)  # the owner reuses its buffer
        transport.write_borrowed(memoryview(b"after"))
        received = _flush_to_peer(transport, peer, reactor, len(big) + 5)
        assert received == big + b"after"
        small = bytearray(b"at once")
        transport.write_borrowed(memoryview(small))
        assert _read_all(peer) == b"at once" and transport not in reactor.getWriters()
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
        # Readable and writable: the general path, through _doReadOrWrite.
        reactor._poller.register(a.fileno(), reactor._POLL_IN | reactor._POLL_OUT)
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


def test_canary_do_read_or_write_read_branch() -> None:
    """_doReadOrWrite's read branch is what the lean reactor's input-only path repeats."""
    from twisted.internet import posixbase

    source = inspect.getsource(posixbase._PollLikeMixin._doReadOrWrite)
    for piece in (
        "if selectable.fileno() == -1:",
        "why = _NO_FILEDESC",
        "why = selectable.doRead()",
        "inRead = True",
        "why = sys.exc_info()[1]",
        "log.err()",
        "self._disconnectSelectable(selectable, why, inRead)",
    ):
        assert piece in source, piece
    assert epollreactor.EPollReactor._POLL_IN == select.EPOLLIN


class _ReadOutcome(abstract.FileDescriptor):
    """A selectable whose doRead does what it is told: return, or raise."""

    def __init__(self, reactor, descriptor: int, outcome) -> None:
        super().__init__(reactor=reactor)
        self._descriptor = descriptor
        self._outcome = outcome
        self.reads = 0

    def fileno(self) -> int:
        return self._descriptor

    def doRead(self):
        self.reads += 1
        how, what = self._outcome
        if how == "raise":
            raise what
        return what


@pytest.mark.unhandled_errors_expected
@pytest.mark.parametrize(
    "outcome",
    [("return", None), ("return", ConnectionDone()), ("raise", RuntimeError("read failed")),
     "closed"],
    ids=["data", "end", "raises", "fd-gone"],
)
def test_lean_reactor_input_only_event_as_do_read_or_write(monkeypatch, outcome) -> None:
    """An input-only event is handled as _doReadOrWrite handles it: the same read, disconnect and log."""
    from twisted.python import log

    def run(through_poll: bool) -> tuple[int, list, int]:
        reactor = LeanEPollReactor()
        a, b = socket.socketpair()
        errors: list[dict] = []
        log.addObserver(errors.append)
        try:
            descriptor = -1 if outcome == "closed" else a.fileno()
            selectable = _ReadOutcome(
                reactor, descriptor, ("return", None) if outcome == "closed" else outcome
            )
            disconnected: list = []
            monkeypatch.setattr(
                reactor, "_disconnectSelectable",
                lambda s, why, in_read: disconnected.append((s, type(why), in_read)),
            )
            if through_poll:
                reactor._selectables[a.fileno()] = selectable
                reactor._poller.register(a.fileno(), select.EPOLLIN)
                b.send(b"x")
                reactor.doPoll(0)
                reactor._poller.unregister(a.fileno())
            else:
                reactor._doReadOrWrite(selectable, a.fileno(), select.EPOLLIN)
        finally:
            log.removeObserver(errors.append)
            reactor._poller.close()
            a.close()
            b.close()
        return (
            selectable.reads,
            [(why, in_read) for _, why, in_read in disconnected],
            len([e for e in errors if e.get("isError")]),
        )

    assert run(through_poll=True) == run(through_poll=False)


def test_canary_tcp_do_read() -> None:
    """tcp.Connection.doRead and _dataReceived still read as EagerWrite.doRead repeats them."""
    do_read = inspect.getsource(tcp.Connection.doRead)
    for piece in ("self.socket.recv(self.bufferSize)", "if se.args[0] == EWOULDBLOCK:",
                  "return main.CONNECTION_LOST", "return self._dataReceived(data)"):
        assert piece in do_read, piece
    received = inspect.getsource(tcp.Connection._dataReceived)
    for piece in ("if not data:", "return main.CONNECTION_DONE",
                  "self.protocol.dataReceived(data)", "return None"):
        assert piece in received, piece


def test_eager_do_read_reads_ends_and_waits() -> None:
    """EagerWrite.doRead hands a read to the protocol, reports the end, and waits when nothing is there."""
    from twisted.internet import main

    class Recorder(Protocol):
        def __init__(self) -> None:
            self.received: list[bytes] = []

        def dataReceived(self, data: bytes) -> None:
            self.received.append(data)

    a, b = socket.socketpair()
    protocol = Recorder()
    transport = EagerWriteServer(a, protocol, ("127.0.0.1", 1), None, 1, MemoryReactor())
    try:
        assert transport.doRead() is None and protocol.received == []
        b.send(b"hello")
        assert transport.doRead() is None and protocol.received == [b"hello"]
        b.shutdown(socket.SHUT_WR)
        assert transport.doRead() is main.CONNECTION_DONE
        a.close()
        assert transport.doRead() is main.CONNECTION_LOST
    finally:
        b.close()


def test_install_lean_reactor_keeps_an_installed_reactor(monkeypatch) -> None:
    """With a reactor installed already (twistd --reactor, tests), nothing is replaced."""
    import sys

    sentinel = object()
    monkeypatch.setitem(sys.modules, "twisted.internet.reactor", sentinel)
    assert install_lean_reactor() is False
    assert sys.modules["twisted.internet.reactor"] is sentinel


def test_canary_epoll_do_iteration_is_do_poll() -> None:
    """EPollReactor's run loop calls doIteration, an alias of its doPoll."""
    assert epollreactor.EPollReactor.doIteration is epollreactor.EPollReactor.doPoll


def test_lean_reactor_run_loop_polls_without_log_context(monkeypatch) -> None:
    """An iteration of the lean reactor's run loop dispatches without callWithLogger."""
    from twisted.python import log as legacy_log

    from quayfront.twistedadapter import LeanEPollReactor

    assert LeanEPollReactor.doIteration is LeanEPollReactor.doPoll
    reactor = LeanEPollReactor()
    reader, writer = socket.socketpair()
    try:
        reads: list[bytes] = []

        class Reader(abstract.FileDescriptor):
            def fileno(self):
                return reader.fileno()

            def doRead(self):
                reads.append(reader.recv(16))

        def no_context(*args, **kwargs):
            raise AssertionError("callWithLogger used")

        monkeypatch.setattr(legacy_log, "callWithLogger", no_context)
        selectable = Reader(reactor=reactor)
        reactor.addReader(selectable)
        writer.send(b"x")
        reactor.doIteration(0)
        reactor.removeReader(selectable)
        assert reads == [b"x"]
    finally:
        reader.close()
        writer.close()


# --- Under Twisted's TLS: pyOpenSSL's memory BIOs of an idle connection ---


def _tls_pair():
    """A server and a client C{OpenSSL.SSL.Connection} on memory BIOs, handshake done."""
    from OpenSSL import SSL

    from tests.unit.certs import make_certificate

    cert, key = make_certificate()
    server_context = SSL.Context(SSL.TLS_SERVER_METHOD)
    server_context.use_certificate(cert)
    server_context.use_privatekey(key)
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        for one in (client, server):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
        _pump(client, server)
        if server.get_peer_finished() is not None and client.get_finished() is not None:
            break
    assert server.get_peer_finished() is not None
    return server, client


def _pump(a, b) -> None:
    from OpenSSL import SSL

    for source, sink in ((a, b), (b, a)):
        try:
            sink.bio_write(source.bio_read(65536))
        except SSL.WantReadError:
            pass


def test_canary_pyopenssl_connection_bios() -> None:
    """pyOpenSSL's Connection still keeps its SSL object and memory BIOs as _ssl, _into_ssl, _from_ssl, and bio_write/bio_read use them."""
    from quayfront import twistedadapter

    assert twistedadapter._BIO_BINDINGS
    server, _ = _tls_pair()
    for name in ("_ssl", "_into_ssl", "_from_ssl"):
        assert getattr(server, name) is not None, name
    server.bio_write(b"\x17\x03\x03")
    assert twistedadapter._bio_pending(server._into_ssl) == 3
    assert twistedadapter._bio_pending(server._from_ssl) == 0


def test_release_handshake_bios_keeps_the_connection_working() -> None:
    """Fresh BIOs replace the handshake's, and application data flows both ways after."""
    server, client = _tls_pair()
    _pump(client, server)  # session tickets, if any
    old = (server._into_ssl, server._from_ssl)
    assert release_handshake_bios(server)
    assert server._into_ssl not in old and server._from_ssl not in old
    client.send(b"ping")
    _pump(client, server)
    assert server.recv(16) == b"ping"
    server.send(b"pong")
    _pump(server, client)
    assert client.recv(16) == b"pong"


def test_release_handshake_bios_leaves_pending_bytes_alone() -> None:
    """With bytes waiting in either BIO nothing is swapped, so nothing is lost."""
    server, client = _tls_pair()
    client.send(b"ping")
    server.bio_write(client.bio_read(65536))
    old = (server._into_ssl, server._from_ssl)
    assert not release_handshake_bios(server)
    assert (server._into_ssl, server._from_ssl) == old
    assert server.recv(16) == b"ping"
    server.send(b"pong")
    assert not release_handshake_bios(server)
    _pump(server, client)
    assert client.recv(16) == b"pong"


def test_canary_checked_fields_are_what_add_raw_header_makes() -> None:
    """Headers keeps its fields in _rawHeaders under _nameEncoder's names."""
    from twisted.web.http_headers import Headers, _nameEncoder

    from quayfront.twistedadapter import add_checked_fields

    assert _nameEncoder.encode(b"content-TYPE") == b"Content-Type"
    assert isinstance(Headers()._rawHeaders, dict)
    fields = [
        (b"content-type", b"text/plain"),
        (b"X-Custom", b"a"),
        (b"Set-Cookie", b"a=1"),
        (b"x-custom", b"b, c"),
        (b"Docker-Content-Digest", b"sha256:" + b"0" * 64),
        (b"Empty", b""),
    ]
    fast, slow = Headers({b"Connection": [b"close"]}), Headers({b"Connection": [b"close"]})
    add_checked_fields(fast, fields)
    for name, value in fields:
        slow.addRawHeader(name, value)
    assert list(fast.getAllRawHeaders()) == list(slow.getAllRawHeaders())
    assert fast.getRawHeaders(b"x-custom") == [b"a", b"b, c"]


def test_canary_tls_receive_path() -> None:
    """The names BatchedReceiveTLS uses and replaces are Twisted's TLS protocol's, as it reads."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    for name in ("_flushReceiveBIO", "_flushSendBIO", "_shutdownTLS", "_tlsShutdownFinished"):
        assert callable(getattr(TLSMemoryBIOProtocol, name)), name
    # What each replaced method does, as BatchedReceiveTLS relies on it.
    relied_on = {
        TLSMemoryBIOProtocol._flushReceiveBIO: (
            "self._lostTLSConnection",
            "self._tlsConnection.recv(2**15)",
            "except WantReadError",
            "except ZeroReturnError",
            "self._tlsShutdownFinished(None)",
            "self._aborted",
            "ProtocolWrapper.dataReceived(self, bytes)",
            "self._flushSendBIO()",
        ),
        TLSMemoryBIOProtocol._write: (
            "if self._lostTLSConnection:",
            "self._tlsConnection.send(",
            "except WantReadError:",
            "self._bufferedWrite(",
            "self._tlsShutdownFinished(Failure())",
            "self._flushSendBIO()",
        ),
        TLSMemoryBIOProtocol.dataReceived: ("self._flushReceiveBIO()",),
    }
    for method, pieces in relied_on.items():
        source = inspect.getsource(method)
        for piece in pieces:
            assert piece in source, (method.__name__, piece)
    assert callable(TLSMemoryBIOProtocol._bufferedWrite)
    assert "self._write(" in inspect.getsource(TLSMemoryBIOProtocol.write)
    # BatchedReceiveTLS.writeSequence is these two in one call.
    assert "if self.disconnecting and self._producer is None:" in inspect.getsource(
        TLSMemoryBIOProtocol.write)
    assert 'self.write(b"".join(iovec))' in inspect.getsource(
        TLSMemoryBIOProtocol.writeSequence)


def test_batched_tls_lets_go_of_its_producer_when_the_connection_is_lost() -> None:
    """The protocol above, registered as producer and never unregistered, is let go of: no reference cycle is left."""
    from twisted.internet.error import ConnectionDone

    app = _Recorder()
    server, _, _, _, _ = _batched_tls_pair(app)
    server.registerProducer(app, True)
    assert server._producer is not None
    server.connectionLost(Failure(ConnectionDone()))
    assert server._producer is None and app.lost is not None


def test_canary_tls_make_connection() -> None:
    """BatchedReceiveTLS.makeConnection repeats Twisted's steps: these are still what its makeConnection and ProtocolWrapper's do."""
    from twisted.protocols.policies import ProtocolWrapper
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    pieces = {
        TLSMemoryBIOProtocol.makeConnection: (
            "self._tlsConnection = self.factory._creatorCallable(self)",
            "self._appSendBuffer = []",
            "directlyProvides(self, interface)",
            "Protocol.makeConnection(self, transport)",
            "self.factory.registerProtocol(self)",
            "if self._connectWrapped:",
            "ProtocolWrapper.makeConnection(self, transport)",
            "self._checkHandshakeStatus()",
        ),
        ProtocolWrapper.makeConnection: (
            "directlyProvides(self, providedBy(transport))",
            "Protocol.makeConnection(self, transport)",
            "self.factory.registerProtocol(self)",
            "self.wrappedProtocol.makeConnection(self)",
        ),
    }
    for method, expected in pieces.items():
        source = inspect.getsource(method)
        for piece in expected:
            assert piece in source, (method.__qualname__, piece)
    # Calling Protocol.makeConnection once instead of twice is the same only
    # while neither class has a connectionMade of its own.
    for cls in (TLSMemoryBIOProtocol, ProtocolWrapper):
        assert "connectionMade" not in vars(cls), cls


def test_batched_tls_provides_what_twisted_tls_provides(monkeypatch) -> None:
    """The same interfaces as Twisted's TLS protocol over the same transport, declared with one directlyProvides instead of eleven."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol
    from zope.interface import providedBy

    from quayfront import twistedadapter

    calls = []
    declare = twistedadapter._directlyProvides
    monkeypatch.setattr(
        twistedadapter, "_directlyProvides", lambda *args: (calls.append(args), declare(*args))
    )
    ours = _batched_tls_pair(_Recorder())[0]
    twisteds = _batched_tls_pair(_Recorder(), protocol=TLSMemoryBIOProtocol)[0]
    assert len(calls) == 1
    assert set(providedBy(ours)) == set(providedBy(twisteds))
    assert type(ours).__name__ == "BatchedReceiveTLS"


def test_provide_what_transport_provides_is_directly_provides() -> None:
    """The same declaration as directlyProvides(wrapper, providedBy(transport)), the first time and from the cache."""
    from twisted.internet.interfaces import IPushProducer, ITCPTransport
    from twisted.protocols.policies import ProtocolWrapper
    from zope.interface import directlyProvides, providedBy

    from quayfront.twistedadapter import provide_what_transport_provides

    for _ in range(2):
        transport = StringTransport()
        directlyProvides(transport, ITCPTransport)
        ours, stock = ProtocolWrapper(None, None), ProtocolWrapper(None, None)
        provide_what_transport_provides(ours, transport)
        directlyProvides(stock, providedBy(transport))
        assert set(providedBy(ours)) == set(providedBy(stock))
        assert ITCPTransport.providedBy(ours) and IPushProducer.providedBy(ours)
        assert list(providedBy(ours).flattened()) == list(providedBy(stock).flattened())


def _batched_tls_pair(server_app, tls_version=None, protocol=None):
    """
    A quayfront TLS server (L{BatchedReceiveTLS}, or C{protocol}) for
    C{server_app} and a Twisted TLS client, connected in memory, handshake
    done: (server, client, client's protocol, pump, clock).
    """
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test.iosim import FakeTransport, connect

    from quayfront.config import TLSConfig
    from quayfront.tls import load_server_tls
    from quayfront.twistedadapter import BatchedReceiveTLS

    class Factory_(TLSMemoryBIOFactory):
        pass

    Factory_.protocol = protocol or BatchedReceiveTLS

    clock = MemoryReactorClock()
    tls = load_server_tls(TLSConfig(cert="", self_signed_dev=True), "test")
    server = Factory_(tls, False, Factory.forProtocol(lambda: server_app), clock=clock).buildProtocol(None)
    client_app = Protocol()
    from twisted.internet import ssl

    options = ssl.CertificateOptions(
        verify=False,
        **({} if tls_version is None else {"lowerMaximumSecurityTo": tls_version}),
    )
    client = TLSMemoryBIOFactory(
        options, True, Factory.forProtocol(lambda: client_app), clock=clock
    ).buildProtocol(None)
    pump = connect(server, FakeTransport(server, False), client, FakeTransport(client, True))
    for _ in range(10):
        pump.flush()
        clock.advance(0)
    return server, client, client_app, pump, clock


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.lost = None
        self.transport = None

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)

    def connectionLost(self, reason) -> None:
        self.lost = (reason, len(self.calls))


def test_batched_tls_hands_on_the_records_of_one_read_in_one_call() -> None:
    """100 KiB (seven TLS records) sent at once reach the protocol above whole, in order, in one call."""
    app = _Recorder()
    server, client, client_app, pump, clock = _batched_tls_pair(app)
    payload = bytes(range(256)) * 400
    client_app.transport.write(payload)
    clock.advance(0)
    pump.flush()
    assert b"".join(app.calls) == payload
    assert len(app.calls) == 1


def test_batched_tls_delivers_the_data_before_the_end_of_the_stream() -> None:
    """Data and the peer's close_notify in one read: the data first, then a clean connectionLost."""
    from twisted.internet.error import ConnectionDone

    app = _Recorder()
    server, client, client_app, pump, clock = _batched_tls_pair(app)
    client_app.transport.write(b"last words")
    client_app.transport.loseConnection()
    for _ in range(10):
        clock.advance(0)
        pump.flush()
    assert b"".join(app.calls) == b"last words"
    reason, calls_before = app.lost
    assert calls_before == len(app.calls) and reason.check(ConnectionDone)


def _pair_recording_writes():
    """
    A L{_batched_tls_pair} whose server's transport writes are recorded
    (their sizes) and whose client's received bytes are kept: (the app
    above the server, the server, pump, clock, received, writes).
    """
    app = _Recorder()
    server, client, client_app, pump, clock = _batched_tls_pair(app)
    received: list[bytes] = []
    client_app.dataReceived = received.append
    writes: list[int] = []
    underlying = server.transport.write
    server.transport.write = lambda data: (writes.append(len(data)), underlying(data))
    return app, server, pump, clock, received, writes


def test_batched_tls_sends_the_records_of_one_write_in_one_transport_write() -> None:
    """A 300 KiB write leaves as one transport write of its records, and arrives whole and in order."""
    app, server, pump, clock, received, writes = _pair_recording_writes()
    payload = bytes(range(256)) * 1200
    app.transport.write(payload)
    assert len(writes) == 1 and writes[0] > len(payload)
    for _ in range(10):
        pump.flush()
        clock.advance(0)
    assert b"".join(received) == payload


def test_batched_tls_pause_and_resume_reach_the_transport_without_attribute_relay(monkeypatch) -> None:
    """The protocol above stops and resumes reading through BatchedReceiveTLS's own methods, not ProtocolWrapper.__getattr__."""
    from twisted.protocols.policies import ProtocolWrapper

    app = _Recorder()
    server, client, client_app, pump, clock = _batched_tls_pair(app)
    calls = []
    server.transport.pauseProducing = lambda: calls.append("pause")
    server.transport.resumeProducing = lambda: calls.append("resume")

    def no_relay(self, name):
        raise AssertionError(f"{name} relayed by __getattr__")

    monkeypatch.setattr(ProtocolWrapper, "__getattr__", no_relay)
    app.transport.pauseProducing()
    app.transport.resumeProducing()
    assert calls == ["pause", "resume"]


def test_batched_tls_write_sequence_is_one_write_and_none_after_close() -> None:
    """writeSequence sends its pieces as one write, in order; once the connection is closing (no producer) it sends nothing, as Twisted's does."""
    app, server, pump, clock, received, writes = _pair_recording_writes()
    app.transport.writeSequence([b"HTTP/1.1 200 OK\r\n\r\n", b"body", b""])
    assert len(writes) == 1
    pump.flush()
    assert b"".join(received) == b"HTTP/1.1 200 OK\r\n\r\nbody"
    # Closing with no producer: dropped before it reaches OpenSSL (the
    # state loseConnection leaves while a close waits for writes).
    server.disconnecting = True
    writes.clear()
    app.transport.writeSequence([b"late"])
    assert writes == []
    # A registered producer may still write, as with Twisted's.
    server._producer = object()
    app.transport.writeSequence([b"still", b" flowing"])
    server._producer = None
    server.disconnecting = False
    pump.flush()
    assert b"".join(received).endswith(b"body" + b"still flowing")


def test_batched_tls_reads_a_request_without_failing_calls(monkeypatch) -> None:
    """A small read calls OpenSSL directly: no pyOpenSSL recv() or bio_read(), nothing raised to find the end."""
    from OpenSSL import SSL

    app = _Recorder()
    server, client, client_app, pump, clock = _batched_tls_pair(app)
    calls = {"recv": 0, "bio_read": 0, "_raise_ssl_error": 0}
    for name in calls:
        original = getattr(SSL.Connection, name)

        def counting(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(SSL.Connection, name, counting)
    client_app.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(0)
    for name in calls:
        calls[name] = 0
    pump.flush()
    assert b"".join(app.calls) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert calls == {"recv": 0, "bio_read": 0, "_raise_ssl_error": 0}


def test_canary_pyopenssl_direct_calls() -> None:
    """pyOpenSSL still has the bindings and the error check BatchedReceiveTLS calls, and they behave as it expects."""
    from OpenSSL import SSL
    from OpenSSL._util import ffi, lib

    from quayfront import twistedadapter

    assert twistedadapter._RAW_TLS
    server, client = _tls_pair()
    _pump(client, server)
    buffer = ffi.new("char[]", 64)
    # Nothing to read: -1, and SSL_get_error says it needs more bytes.
    count = lib.SSL_read(server._ssl, buffer, 64)
    assert count <= 0 and lib.SSL_get_error(server._ssl, count) == lib.SSL_ERROR_WANT_READ
    with pytest.raises(SSL.WantReadError):
        server._raise_ssl_error(server._ssl, count)
    client.send(b"ping")
    _pump(client, server)
    assert lib.SSL_read(server._ssl, buffer, 64) == 4 and ffi.buffer(buffer, 4)[:] == b"ping"
    assert lib.SSL_write(server._ssl, ffi.from_buffer(b"pong"), 4) == 4
    record = ffi.new("char[]", 256)
    length = lib.BIO_read(server._from_ssl, record, 256)
    assert length > 4 and lib.BIO_read(server._from_ssl, record, 256) <= 0
    client.bio_write(ffi.buffer(record, length)[:])
    assert client.recv(16) == b"pong"
    client.shutdown()
    _pump(client, server)
    count = lib.SSL_read(server._ssl, buffer, 64)
    assert lib.SSL_get_error(server._ssl, count) == lib.SSL_ERROR_ZERO_RETURN
    with pytest.raises(SSL.ZeroReturnError):
        server._raise_ssl_error(server._ssl, count)


@pytest.mark.parametrize("tls_version", ["TLSv1_3", "TLSv1_2"])
def test_batched_tls_reads_and_writes_more_than_its_buffers(tls_version, monkeypatch) -> None:
    """1.2 MiB each way, more than the process's buffers hold: whole and in order, in a few calls (TLS 1.3 and 1.2 records)."""
    from twisted.internet.ssl import TLSVersion

    from quayfront import twistedadapter

    app = _Recorder()
    server, client, client_app, pump, clock = _batched_tls_pair(app, getattr(TLSVersion, tls_version))
    assert server._tlsConnection.get_protocol_version_name() == tls_version.replace("_", ".")
    payload = bytes(range(251)) * 5000
    assert len(payload) > 2 * twistedadapter._SCRATCH_BYTES
    fed = []
    bindings = twistedadapter._ssl_lib

    class RecordingBindings:
        def __getattr__(self, name):
            return getattr(bindings, name)

        def BIO_write(self, bio, data, length):
            fed.append(length)
            return bindings.BIO_write(bio, data, length)

    monkeypatch.setattr(twistedadapter, "_ssl_lib", RecordingBindings())
    client_app.transport.write(payload)
    clock.advance(0)
    pump.flush()
    assert b"".join(app.calls) == payload
    assert len(app.calls) == 3
    # The read was decrypted where it lay: nothing was copied into the
    # memory BIO, and no BIO is left pointing at it.
    assert fed == []
    assert server._view_bio is None or bindings.BIO_get_mem_data(
        server._tlsConnection._into_ssl, twistedadapter._MEM_DATA_START) == 0
    received = []
    client_app.dataReceived = received.append
    writes = []
    underlying = server.transport.write
    server.transport.write = lambda data: (writes.append(len(data)), underlying(data))
    app.transport.write(payload[::-1])
    assert len(writes) == 3
    # Everything the write encrypted left with it: nothing waits in the
    # memory BIO for a later flush.
    assert bindings.BIO_get_mem_data(
        server._tlsConnection._from_ssl, twistedadapter._MEM_DATA_START) == 0
    for _ in range(20):
        pump.flush()
        clock.advance(0)
    assert b"".join(received) == payload[::-1]


def test_batched_tls_hands_on_what_came_before_a_broken_record() -> None:
    """A read of a good record and one that fails to decrypt: the good data first, then connectionLost with the TLS error."""
    from OpenSSL import SSL

    app = _Recorder()
    server, client, client_app, pump, clock = _batched_tls_pair(app)
    client_tls = client._tlsConnection
    client_tls.send(b"good")
    good = client_tls.bio_read(65536)
    client_tls.send(b"bad")
    bad = bytearray(client_tls.bio_read(65536))
    bad[-1] ^= 0xFF  # breaks the record's authentication tag
    server.dataReceived(good + bytes(bad))
    for _ in range(10):
        pump.flush()
        clock.advance(0)
    assert app.calls == [b"good"]
    reason, calls_before = app.lost
    assert calls_before == 1 and reason.check(SSL.Error)


def test_canary_lean_request_does_what_twisted_web_does() -> None:
    """What LeanRequest does in one call is still what twisted.web's Request does there, with the private names it reads."""
    from twisted.web import http, server

    from quayfront.twistedadapter import LeanRequest

    write = inspect.getsource(http.Request.write)
    for piece in ("if self._disconnected:", "self.startedWriting = 1", "self.chunked = 1",
                  "self.code not in NO_BODY_CODES", "self.lastModified is not None",
                  "self.etag is not None", "if self.cookies:", 'if self.method == b"HEAD":',
                  "self.sentLength = self.sentLength + len(data)", "toChunk(data)"):
        assert piece in write, piece
    server_write = inspect.getsource(server.Request.write)
    for piece in ("self._inFakeHead", "self._encoder", "self.defaultContentType"):
        assert piece in server_write, piece
    finish = inspect.getsource(http.Request.finish)
    for piece in ("if self._disconnected:", "if self.finished:", "if not self.startedWriting:",
                  'self.channel.write(b"0\\r\\n\\r\\n")', "self.channel.factory.log(self)",
                  "self.finished = 1", "if not self.queued:", "self._cleanup()"):
        assert piece in finish, piece
    cleanup = inspect.getsource(http.Request._cleanup)
    for piece in ("if self.producer:", "self.channel.requestDone(self)", "del self.channel",
                  "if self.content is not None:", "d.callback(None)", "self.notifications = []"):
        assert piece in cleanup, piece
    assert "if self._encoder:" in inspect.getsource(server.Request.finish)
    # Class defaults, which LeanRequest's __init__ leaves as they are (a
    # test in test_forward.py holds it to what twisted.web's __init__ sets).
    for name in ("_disconnected", "_inFakeHead", "_encoder"):
        assert hasattr(server.Request, name), name
    assert "_parsePOSTFormSubmission" in LeanRequest.MIRRORED_ATTRIBUTES


def test_canary_epoll_reads_table() -> None:
    """EPollReactor's addReader does nothing for a descriptor in _reads; FileDescriptor resumes by startReading, which is addReader."""
    add = inspect.getsource(epollreactor.EPollReactor._add)
    assert "fd = xer.fileno()" in add and "if fd not in primary:" in add
    assert "self._reads, self._writes" in inspect.getsource(epollreactor.EPollReactor.addReader)
    assert "self.startReading()" in inspect.getsource(abstract.FileDescriptor.resumeProducing)
    assert "self.connected and not self.disconnecting" in inspect.getsource(
        abstract.FileDescriptor.resumeProducing)
    assert "self.reactor.addReader(self)" in inspect.getsource(abstract.FileDescriptor.startReading)
    reactor = LeanEPollReactor()
    ours, theirs = socket.socketpair()
    try:
        transport = EagerWriteServer(ours, _Sink(), ("127.0.0.1", 1), None, 1, reactor)
        # A server connection starts reading as it is made.
        assert ours.fileno() in reactor._reads
        transport.stopReading()
        assert ours.fileno() not in reactor._reads
        transport.startReading()
        assert ours.fileno() in reactor._reads
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()


class _Relay:
    """A layer marked as relaying pause and resume to its transport."""

    relays_production = True

    def __init__(self, transport) -> None:
        self.transport = transport


def test_epoll_socket_below_finds_the_socket_through_relaying_layers_only() -> None:
    """The socket is found under relaying layers on an epoll reactor; anything else takes the general way."""
    from quayfront.twistedadapter import epoll_socket_below

    reactor = LeanEPollReactor()
    ours, theirs = socket.socketpair()
    try:
        transport = EagerWriteServer(ours, _Sink(), ("127.0.0.1", 1), None, 1, reactor)
        assert epoll_socket_below(transport) is transport
        assert epoll_socket_below(_Relay(_Relay(transport))) is transport
        # A layer not marked may do more than relay.
        assert epoll_socket_below(StringTransport()) is None
        memory, _, _ = _eager_pair()
        try:
            assert epoll_socket_below(memory) is None  # not an epoll reactor
        finally:
            memory.socket.close()

        class Resumes(EagerWriteServer):
            def resumeProducing(self) -> None:
                pass

        assert epoll_socket_below(Resumes(ours, _Sink(), ("127.0.0.1", 1), None, 1, reactor)) is None
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()


def test_batched_tls_resumes_the_socket_below_as_twisted_would(monkeypatch) -> None:
    """Resuming through the TLS layer reads again after a pause, and costs no call while reading already."""
    from quayfront.proxylayer import ProxyHeaderProtocol
    from quayfront.twistedadapter import BatchedReceiveTLS

    reactor = LeanEPollReactor()
    ours, theirs = socket.socketpair()
    try:
        transport = EagerWriteServer(ours, _Sink(), ("127.0.0.1", 1), None, 1, reactor)
        # The PROXY layer between, as on 8443, is only a relay.
        proxy = ProxyHeaderProtocol.__new__(ProxyHeaderProtocol)
        proxy.transport = transport
        tls = BatchedReceiveTLS.__new__(BatchedReceiveTLS)
        tls.transport = proxy
        transport.connected = 1
        transport.startReading()
        calls = []
        original_add = epollreactor.EPollReactor._add
        monkeypatch.setattr(epollreactor.EPollReactor, "_add",
                            lambda self, *args: calls.append(args) or original_add(self, *args))
        tls.resumeProducing()
        assert calls == [] and ours.fileno() in reactor._reads
        tls.pauseProducing()
        assert ours.fileno() not in reactor._reads
        tls.resumeProducing()
        assert len(calls) == 1 and ours.fileno() in reactor._reads
        # A connection being closed is not read again, as Twisted's.
        tls.pauseProducing()
        transport.disconnecting = True
        tls.resumeProducing()
        assert ours.fileno() not in reactor._reads
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()



def _records_for(payload: bytes, tls_version=None) -> tuple[object, bytes]:
    """A handshaken BatchedReceiveTLS server (its app a _Recorder) and the TLS records of C{payload} from its client."""
    app = _Recorder()
    server, client, client_app, pump, clock = _batched_tls_pair(app, tls_version)
    sent = []
    client.transport.write = sent.append
    client.transport.writeSequence = lambda parts: sent.extend(parts)
    client_app.transport.write(payload)
    clock.advance(0)
    return server, app, b"".join(sent)


@pytest.mark.parametrize("seed", range(6))
def test_batched_tls_reads_of_any_size_in_place_or_copied_give_the_stream(seed) -> None:
    """Records cut anywhere across reads small (copied into the BIO) and large (decrypted in place) arrive whole and in order."""
    import random

    from quayfront import twistedadapter

    rng = random.Random(seed)
    payload = rng.randbytes(700_000)
    server, app, records = _records_for(payload)
    offset = 0
    in_place = copied = 0
    for _ in range(10_000):
        if offset == len(records):
            break
        size = rng.choice([1, 5, 100, 16_000, 40_000, 70_000, 262_144])
        read = records[offset : offset + size]
        offset += len(read)
        if len(read) >= twistedadapter._IN_PLACE_READ_BYTES:
            in_place += 1
        else:
            copied += 1
        server.dataReceived(read)
    assert offset == len(records) and in_place and copied
    assert b"".join(app.calls) == payload


def test_batched_tls_keeps_what_a_read_in_place_left_unread() -> None:
    """An error from the protocol above mid-read: what was not decrypted yet is copied out of the read and decrypted with the next."""
    from quayfront import twistedadapter

    payload = bytes(range(256)) * 4096  # 1 MiB: more than the buffer a read is decrypted into
    server, app, records = _records_for(payload)
    calls = []

    def fail_once(data: bytes) -> None:
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("the protocol above failed")

    app.dataReceived = fail_once
    with pytest.raises(RuntimeError):
        server.dataReceived(records[:900_000])
    # The first bufferful went up; the rest of the read now lies in a
    # memory BIO of its own, not in the read's bytes.
    assert len(calls[0]) == twistedadapter._SCRATCH_BYTES
    into_ssl = server._tlsConnection._into_ssl
    assert server._view_bio is None
    assert twistedadapter._bio_pending(into_ssl) > 0
    server.dataReceived(records[900_000:])
    assert b"".join(calls) == payload


def test_canary_pyopenssl_read_only_bio() -> None:
    """pyOpenSSL's bindings make a read-only BIO over bytes; drained, with eof_return -1, it asks for more; a record cut short waits inside OpenSSL."""
    from OpenSSL._util import ffi, lib

    from quayfront import twistedadapter

    assert twistedadapter._IN_PLACE
    server, client = _tls_pair()
    _pump(client, server)
    client.send(b"x" * 1000)
    record = client.bio_read(4096)
    buffer = ffi.new("char[]", 2048)
    for part in (record[:500], record[500:]):
        with ffi.from_buffer(part) as pointer:
            view = lib.BIO_new_mem_buf(pointer, len(part))
            lib.BIO_set_mem_eof_return(view, -1)
            lib.SSL_set_bio(server._ssl, view, server._from_ssl)
            server._into_ssl = view
            count = lib.SSL_read(server._ssl, buffer, 2048)
            # Every byte of the view taken, whether the record is whole yet or not.
            assert twistedadapter._bio_pending(view) == 0
    assert count == 1000 and ffi.buffer(buffer, 1000)[:] == b"x" * 1000
    count = lib.SSL_read(server._ssl, buffer, 2048)
    assert count <= 0 and lib.SSL_get_error(server._ssl, count) == lib.SSL_ERROR_WANT_READ


def test_each_eager_transport_runs_its_own_code_of_the_shared_methods() -> None:
    """
    The server's and the client's TCP transports each have their own code
    objects for EagerWrite's methods (so CPython specialises each for its
    own type), with EagerWrite's very bytecode, names and defaults.
    """
    from quayfront.twistedadapter import _EAGER_WRITE_METHODS, EagerWrite, EagerWriteClient

    for name in _EAGER_WRITE_METHODS:
        shared = EagerWrite.__dict__[name]
        server = EagerWriteServer.__dict__[name]
        client = EagerWriteClient.__dict__[name]
        assert len({id(shared.__code__), id(server.__code__), id(client.__code__)}) == 3
        for own in (server, client):
            assert own.__code__.co_code == shared.__code__.co_code
            assert own.__code__.co_names == shared.__code__.co_names
            assert own.__defaults__ == shared.__defaults__
            assert own.__closure__ == shared.__closure__
            assert own.__doc__ == shared.__doc__


def test_eager_transports_hold_their_class_defaults_as_their_own() -> None:
    """What EagerWrite sets on each transport is what the classes it copies say."""
    transport, peer, _ = _eager_pair()
    try:
        for name in ("bufferSize", "offset", "dataBuffer", "disconnecting",
                     "_writeDisconnected", "TLS"):
            assert name in vars(transport)
            assert getattr(transport, name) == getattr(EagerWriteServer, name)
    finally:
        transport.socket.close()
        peer.close()


def test_a_lean_request_holds_twisted_webs_class_defaults_as_its_own() -> None:
    """
    The class attributes LeanRequest sets on each request (read through the
    instance on every response) are twisted.web's Request's, value for value.
    """
    from twisted.web import server

    from quayfront.twistedadapter import LeanRequest

    class Channel:
        transport = StringTransport()
        site = server.Site(None)

        def getPeer(self):
            return self.transport.getPeer()

        def getHost(self):
            return self.transport.getHost()

    request = LeanRequest(Channel())
    own = {
        name: value for name, value in vars(request).items()
        if name not in LeanRequest.MIRRORED_ATTRIBUTES
    }
    assert set(own) == {
        "finished", "startedWriting", "chunked", "sentLength", "producer", "etag",
        "lastModified", "content", "_encoder", "_disconnected", "_inFakeHead",
    }
    for name, value in own.items():
        assert getattr(server.Request, name) == value and type(value) is type(
            getattr(server.Request, name)
        ), name
