"""
The whole listener chain in memory: a PROXY header in cleartext, then a
real TLS handshake, then HTTP, reaching the site with the header's client.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import FakeTransport, connect

from quayfront.config import TLSConfig
from quayfront.metrics import Counters
from quayfront.proxylayer import ProxyHeaderFactory, ProxyHeaderPolicy
from quayfront.site import FrontSite
from quayfront.tls import load_server_tls
from tests.unit.certs import make_certificate, write_pair
from tests.unit.test_forward import FakeAgent, RecordingLog

LB = IPv4Address("TCP", "10.0.0.5", 41000)
LISTENER = IPv4Address("TCP", "10.0.0.9", 8443)


class HeaderFirst(ProtocolWrapper):
    """A client that writes a PROXY header in cleartext before its TLS bytes."""

    header = b""

    def makeConnection(self, transport):
        transport.write(self.factory.header)
        super().makeConnection(transport)


class RawHTTPClient(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def run_chain(tmp_path: Path, header: bytes, request: bytes, tls_factory=TLSMemoryBIOFactory):
    cert, key = make_certificate()
    cert_path, key_path = write_pair(tmp_path, cert, key)
    clock = MemoryReactorClock()
    agent = FakeAgent()
    from tests.unit.test_forward import make_router

    site = FrontSite(
        clock=clock,
        router=make_router(agent, clock),
        local_resources={},
        access_log=RecordingLog(),
        counters=Counters(),
        idle_timeout_s=60.0,
    )
    policy = ProxyHeaderPolicy(
        listener="proxy", required=True, trusted=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    tls = load_server_tls(TLSConfig(cert=cert_path, key=key_path), "test")
    server_factory = ProxyHeaderFactory(
        tls_factory(tls, False, site, clock=clock), policy, clock, Counters()
    )
    server = server_factory.buildProtocol(LB)

    http_client = RawHTTPClient(request)
    trust = ssl.Certificate.loadPEM(Path(cert_path).read_bytes())
    client_tls = TLSMemoryBIOFactory(
        ssl.optionsForClientTLS("localhost", trustRoot=trust),
        True,
        Factory.forProtocol(lambda: http_client),
        clock=clock,
    )
    client_factory = WrappingFactory(client_tls)
    client_factory.protocol = HeaderFirst
    client_factory.header = header
    client = client_factory.buildProtocol(LISTENER)

    pump = connect(
        server,
        FakeTransport(server, True, hostAddress=LISTENER, peerAddress=LB),
        client,
        FakeTransport(client, False, hostAddress=LB, peerAddress=LISTENER),
        greet=False,
    )
    # TLS coalesces writes on the clock: pump and tick until both sides are
    # quiet (bounded; a handshake takes a handful of rounds).
    for _ in range(20):
        pump.flush()
        clock.advance(0)
    run_chain.pump = pump
    return agent, http_client, server


def test_proxy_then_tls_then_http(tmp_path: Path) -> None:
    """The header is read before TLS, the handshake succeeds, and HTTP sees the header's client."""
    agent, _, server = run_chain(
        tmp_path,
        b"PROXY TCP4 203.0.113.7 10.0.0.9 51000 8443\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: localhost:8443\r\n\r\n",
    )
    [sent] = agent.requests
    assert sent["headers"].getRawHeaders(b"x-forwarded-for") == [b"203.0.113.7"]
    tls_connection = server.wrappedProtocol.getHandle()
    assert tls_connection.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")
    assert tls_connection.get_alpn_proto_negotiated() in (b"", b"http/1.1")


def test_header_inside_tls_is_not_accepted(tmp_path: Path) -> None:
    """Without a cleartext header the TLS ClientHello is rejected as not PROXY protocol."""
    agent, http_client, _ = run_chain(
        tmp_path, b"", b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    assert agent.requests == []
    assert http_client.received == b""


def test_listener_tls_sends_a_response_without_waiting_for_a_reactor_turn(tmp_path: Path) -> None:
    """The listener's TLS (UnbufferedTLSFactory) encrypts and sends a write at once: no timer, no copy."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from quayfront.listeners import UnbufferedTLSFactory
    from tests.unit.test_forward import response

    agent, http_client, server = run_chain(
        tmp_path,
        b"PROXY TCP4 203.0.113.7 10.0.0.9 51000 8443\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: localhost:8443\r\n\r\n",
        tls_factory=UnbufferedTLSFactory,
    )
    assert isinstance(server.wrappedProtocol, TLSMemoryBIOProtocol)
    assert type(server.wrappedProtocol).__name__ == "BatchedReceiveTLS"
    r = response(200, {}, 2)
    agent.requests[0]["d"].callback(r)
    r._bodyDataReceived(b"ok")
    # Pumped, the clock not advanced: a buffering TLS transport would hold
    # the response until the next reactor turn.
    run_chain.pump.flush()
    assert http_client.received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert http_client.received.endswith(b"\r\n\r\nok")
