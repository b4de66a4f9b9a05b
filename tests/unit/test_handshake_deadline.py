"""
The TLS handshake deadline of the PROXY layer, under a fake clock: real TLS
on the server side, a Python C{ssl} client driven by hand through memory
BIOs, so each step of the handshake can be withheld.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from quayfront.config import TLSConfig
from quayfront.metrics import Counters
from quayfront.proxylayer import (
    HandshakeState,
    HandshakeWatch,
    ProxyHeaderFactory,
    ProxyHeaderPolicy,
)
from quayfront.tls import load_server_tls
from tests.unit.certs import make_certificate, write_pair

LB = IPv4Address("TCP", "10.0.0.5", 41000)
EXEMPT_PEER = IPv4Address("TCP", "127.0.0.1", 41001)
LISTENER = IPv4Address("TCP", "10.0.0.9", 8443)
V1 = b"PROXY TCP4 203.0.113.7 10.0.0.9 51000 8443\r\n"
TIMEOUT_S = 10.0


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


class MemoryTLSClient:
    """
    A TLS client that runs only when told, through memory BIOs.
    """

    def __init__(self, max_version: ssl.TLSVersion | None = None, ciphers: str | None = None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if max_version is not None:
            context.maximum_version = max_version
        if ciphers is not None:
            context.set_ciphers(ciphers)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.done = False

    def step(self, received: bytes = b"") -> bytes:
        """
        Take the server's bytes, advance the handshake, return what to send.
        """
        if received:
            self.incoming.write(received)
        try:
            self.tls.do_handshake()
            self.done = True
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory):
    directory: Path = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate()
    cert_path, key_path = write_pair(directory, cert, key)
    return load_server_tls(TLSConfig(cert=cert_path, key=key_path), "test")


@pytest.fixture
def log_events():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


class Server:
    """
    One server connection: PROXY layer, then TLS, then a recorder.
    """

    def __init__(self, server_tls, required: bool = True, peer=LB) -> None:
        self.clock = MemoryReactorClock()
        self.counters = Counters()
        self.app = Recorder()
        policy = ProxyHeaderPolicy(
            listener="proxy" if required else "tls",
            required=required,
            trusted=(ipaddress.ip_network("10.0.0.0/8"),),
            exempt=(ipaddress.ip_network("127.0.0.1/32"),),
        )
        tls_factory = TLSMemoryBIOFactory(
            server_tls, False, Factory.forProtocol(lambda: self.app), clock=self.clock
        )
        factory = ProxyHeaderFactory(
            tls_factory, policy, self.clock, self.counters, handshake_timeout_s=TIMEOUT_S
        )
        self.protocol = factory.buildProtocol(peer)
        self.transport = StringTransport(hostAddress=LISTENER, peerAddress=peer)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        """
        Deliver C{data} from the client; return what the server wrote back.
        """
        self.protocol.dataReceived(data)
        # TLS coalesces its writes on the clock.
        self.clock.advance(0)
        written = self.transport.value()
        self.transport.clear()
        return written

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def failures(self) -> dict[str, int]:
        return self.counters.by_label("tls_handshake_failed")


def client_hello() -> bytes:
    return MemoryTLSClient().step()


# --- The state machine on its own -------------------------------------------------


def test_watch_transitions() -> None:
    """Each event is legal only while handshaking; the deadline is start plus timeout."""
    watch = HandshakeWatch(100.0, 10.0)
    assert watch.deadline_s == 110.0
    watch.data_received(b"\x16\x03\x01")
    watch.completed()
    assert watch.state is HandshakeState.DONE
    assert watch.connection_lost() is None
    with pytest.raises(RuntimeError, match="deadline.*'done'"):
        watch.deadline_passed()


@pytest.mark.parametrize(
    "first, reason", [(b"\x16\x03\x01", "tls-error"), (b"GET / HTTP/1.1", "not-tls"), (b"", "not-tls")]
)
def test_watch_tells_tls_errors_from_other_protocols(first: bytes, reason: str) -> None:
    """TLS giving up on a handshake record is a TLS error; on anything else, not TLS."""
    watch = HandshakeWatch(0.0, 10.0)
    watch.data_received(first)
    assert watch.tls_gave_up() == reason
    assert watch.connection_lost() is None


def test_watch_client_leaving_and_server_closing() -> None:
    """A client leaving mid-handshake is counted; quayfront closing one is not."""
    watch = HandshakeWatch(0.0, 10.0)
    assert watch.connection_lost() == "client-closed"
    watch = HandshakeWatch(0.0, 10.0)
    watch.closed_by_server()
    assert watch.connection_lost() is None


# --- Through the PROXY layer and real TLS ---------------------------------------------


@pytest.mark.parametrize("required", [True, False], ids=["proxy-listener", "tls-listener"])
def test_complete_handshake_cancels_the_deadline(server_tls, required: bool) -> None:
    """A handshake that completes leaves no deadline behind and data flows on."""
    server = Server(server_tls, required=required)
    client = MemoryTLSClient()
    flight = server.send((V1 if required else b"") + client.step())
    finished = client.step(flight)
    assert client.done
    server.send(finished)
    assert server.protocol._handshake.state is HandshakeState.DONE
    server.clock.advance(TIMEOUT_S * 2)
    assert not server.closed
    assert server.failures() == {}
    client.tls.write(b"GET / HTTP/1.1\r\n\r\n")
    server.send(client.outgoing.read())
    assert server.app.received == b"GET / HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize("required", [True, False], ids=["proxy-listener", "tls-listener"])
@pytest.mark.parametrize("stage", ["silence", "half-client-hello", "stall-after-server-flight"])
def test_incomplete_handshake_closed_at_the_deadline(
    server_tls, log_events, required: bool, stage: str
) -> None:
    """Silence, half a ClientHello or no answer to the server's flight: closed at the deadline."""
    server = Server(server_tls, required=required)
    if required:
        # The deadline counts from the end of the PROXY header.
        server.clock.advance(3.0)
        server.send(V1)
    hello = client_hello()
    if stage == "half-client-hello":
        server.send(hello[: len(hello) // 2])
    elif stage == "stall-after-server-flight":
        assert server.send(hello)  # the server answered with its flight
    server.clock.advance(TIMEOUT_S - 0.01)
    assert not server.closed
    server.clock.advance(0.01)
    assert server.transport.disconnected  # aborted, not a graceful close
    assert server.failures() == {"timeout": 1}
    [event] = [e for e in log_events if "TLS handshake failed" in e["log_format"]]
    assert event["reason"] == "timeout"
    assert event["peer"].startswith("10.0.0.5:41000")
    if required:
        assert "(client 203.0.113.7:51000)" in event["peer"]
    server.protocol.connectionLost(None)
    assert server.failures() == {"timeout": 1}
    assert server.clock.getDelayedCalls() == []


def test_plain_http_on_a_tls_listener_is_not_tls(server_tls, log_events) -> None:
    """Plain HTTP where a ClientHello should be: counted as not-tls, at once."""
    server = Server(server_tls, required=False)
    server.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert server.closed
    assert server.failures() == {"not-tls": 1}
    server.protocol.connectionLost(None)
    assert server.failures() == {"not-tls": 1}


def test_no_shared_cipher_is_a_tls_error(server_tls) -> None:
    """A ClientHello the server cannot agree to is a TLS error, counted at once."""
    server = Server(server_tls, required=False)
    client = MemoryTLSClient(max_version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA")
    server.send(client.step())
    assert server.closed
    assert server.failures() == {"tls-error": 1}


def test_client_closing_mid_handshake_is_counted(server_tls) -> None:
    """A client that leaves halfway through its ClientHello is counted as client-closed."""
    server = Server(server_tls, required=False)
    server.send(client_hello()[:20])
    server.protocol.connectionLost(None)
    assert server.failures() == {"client-closed": 1}
    assert server.clock.getDelayedCalls() == []


def test_quayfront_closing_mid_handshake_is_not_counted(server_tls) -> None:
    """A connection closed from above during the handshake (a drain) is no handshake failure."""
    server = Server(server_tls, required=False)
    server.send(client_hello()[:20])
    server.protocol.wrappedProtocol.loseConnection()
    server.protocol.connectionLost(None)
    assert server.failures() == {}


# --- A PROXY header from an exempt source ---------------------------------------------


@pytest.mark.parametrize(
    "header, known_at",
    [(V1, len(b"PROXY ")), (b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00", 12)],
    ids=["v1", "v2"],
)
def test_header_from_exempt_source_is_refused(
    server_tls, log_events, header: bytes, known_at: int
) -> None:
    """An exempt source that sends a PROXY header anyway is logged, counted and closed."""
    server = Server(server_tls, peer=EXEMPT_PEER)
    for offset in range(known_at):
        assert not server.closed
        server.send(header[offset : offset + 1])
    assert server.closed
    server.send(header[known_at:])
    assert server.app.received == b""
    assert server.counters.by_label("proxy_header_rejected") == {"header-from-exempt-source": 1}
    [event] = [e for e in log_events if "PROXY header rejected" in e["log_format"]]
    assert event["reason"] == "header-from-exempt-source"
    assert event["peer"] == "127.0.0.1:41001"
    server.protocol.connectionLost(None)
    assert server.failures() == {}


@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_complete_handshake_frees_the_handshake_bios(server_tls, max_version) -> None:
    """
    Once the handshake is complete the TLS connection gets fresh, empty
    memory BIOs in place of those the handshake grew, and data still flows
    both ways (session tickets sent with the last flight included).
    """
    server = Server(server_tls, required=True)
    client = MemoryTLSClient(max_version=max_version)
    flight = server.send(V1 + client.step())
    connection = server.protocol.wrappedProtocol.getHandle()
    grown = (connection._into_ssl, connection._from_ssl)
    # TLS 1.3 completes in one round trip, 1.2 in two.
    for _ in range(3):
        if server.protocol._handshake.state is HandshakeState.DONE:
            break
        flight = server.send(client.step(flight))
    assert server.protocol._handshake.state is HandshakeState.DONE
    assert connection._into_ssl not in grown and connection._from_ssl not in grown
    client.step(flight)
    assert client.done
    client.tls.write(b"GET / HTTP/1.1\r\n\r\n")
    server.send(client.outgoing.read())
    assert server.app.received == b"GET / HTTP/1.1\r\n\r\n"
    server.app.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    server.clock.advance(0)
    client.incoming.write(server.transport.value())
    assert client.tls.read(1024) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_exempt_source_speaking_tls_is_served(server_tls) -> None:
    """An exempt source's ClientHello reaches TLS, split or whole, and the handshake completes."""
    server = Server(server_tls, peer=EXEMPT_PEER)
    client = MemoryTLSClient()
    hello = client.step()
    server.send(hello[:1])
    flight = server.send(hello[1:])
    server.send(client.step(flight))
    assert client.done
    assert server.protocol._handshake.state is HandshakeState.DONE
    assert server.counters.by_label("proxy_header_rejected") == {}
