"""
The PROXY layer adapter: who must send a header, reassembly, hand-over of
the bytes after it, the header deadline, and rejection.
"""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from quayfront.metrics import Counters
from quayfront.proxylayer import (
    HandshakeWatch,
    HeaderRule,
    ProxyHeaderFactory,
    ProxyHeaderPolicy,
    origin_of,
)

V1 = b"PROXY TCP4 203.0.113.7 192.0.2.10 51000 8443\r\n"
V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"

LB = IPv4Address("TCP", "10.0.0.5", 41000)
LISTENER = IPv4Address("TCP", "10.0.0.9", 8443)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.connected = False
        self.lost = None

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


def policy(**kw) -> ProxyHeaderPolicy:
    defaults = dict(
        listener="proxy",
        required=True,
        header_timeout_s=5.0,
        trusted=(ipaddress.ip_network("10.0.0.0/8"),),
        exempt=(ipaddress.ip_network("127.0.0.1/32"),),
    )
    defaults.update(kw)
    return ProxyHeaderPolicy(**defaults)


def connect(peer=LB, **policy_kw):
    clock = MemoryReactorClock()
    counters = Counters()
    inner = Recorder()
    factory = ProxyHeaderFactory(Factory.forProtocol(lambda: inner), policy(**policy_kw), clock, counters)
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(hostAddress=LISTENER, peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport, inner, clock, counters


@pytest.fixture
def log_events():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def test_rules_by_source() -> None:
    """Exempt sources need no header (and may send none), trusted ones must send one, others are refused."""
    p = policy()
    assert p.rule_for(IPv4Address("TCP", "127.0.0.1", 1)) is HeaderRule.EXEMPT
    assert p.rule_for(IPv4Address("TCP", "10.1.2.3", 1)) is HeaderRule.EXPECT_HEADER
    assert p.rule_for(IPv6Address("TCP", "::ffff:10.1.2.3", 1)) is HeaderRule.EXPECT_HEADER
    assert p.rule_for(IPv4Address("TCP", "198.51.100.1", 1)) is HeaderRule.REFUSE
    assert policy(required=False).rule_for(IPv4Address("TCP", "198.51.100.1", 1)) is HeaderRule.NO_HEADER


def test_rules_are_remembered_per_source_within_a_bound(monkeypatch) -> None:
    """A source's rule is worked out once; the memory of sources is bounded, and what it gives never differs."""
    from quayfront import proxylayer

    p = policy()
    worked_out = []
    original = type(p)._rule_for
    monkeypatch.setattr(type(p), "_rule_for", lambda self, peer: (worked_out.append(peer.host), original(self, peer))[1])
    for _ in range(3):
        assert p.rule_for(IPv4Address("TCP", "10.1.2.3", 1)) is HeaderRule.EXPECT_HEADER
        assert p.rule_for(IPv4Address("TCP", "198.51.100.1", 2)) is HeaderRule.REFUSE
    assert worked_out == ["10.1.2.3", "198.51.100.1"]
    monkeypatch.setattr(proxylayer, "MAX_REMEMBERED_SOURCES", 4)
    for last in range(10):
        assert p.rule_for(IPv4Address("TCP", f"10.9.9.{last}", 1)) is HeaderRule.EXPECT_HEADER
        assert len(p._rules) <= 4
    assert p == policy() and hash(p) == hash(policy())


def test_per_connection_records_have_no_instance_dict() -> None:
    """
    The connection's origin and its handshake watch, which live as long as
    the connection, are slotted (about 40 bytes less each than with a dict).
    """
    protocol, _, _, _, _ = connect()
    protocol.dataReceived(V1)
    assert not hasattr(origin_of(protocol), "__dict__")
    assert not hasattr(HandshakeWatch(0.0, 1.0), "__dict__")


@pytest.mark.parametrize("handshake_timeout", [None, 10.0])
def test_a_closed_connection_lets_go_of_the_protocol_above(handshake_timeout) -> None:
    """The relay shortcut (the protocol above's dataReceived) goes with the connection: no reference cycle is left."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    protocol, _, inner, _, _ = connect()
    protocol.factory.handshake_timeout_s = handshake_timeout
    protocol.dataReceived(V1)
    assert "dataReceived" in vars(protocol)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert "dataReceived" not in vars(protocol)
    assert protocol.wrappedProtocol is None


def test_header_then_data_in_one_read() -> None:
    """Bytes after the header reach the wrapped protocol untouched, in the same read."""
    protocol, _, inner, _, _ = connect()
    protocol.dataReceived(V1 + CLIENT_HELLO)
    assert inner.connected
    assert inner.received == CLIENT_HELLO
    assert protocol.getPeer() == IPv4Address("TCP", "203.0.113.7", 51000)
    assert protocol.getHost() == IPv4Address("TCP", "192.0.2.10", 8443)
    origin = origin_of(protocol)
    assert origin.socket_peer == LB and origin.proxy_header.version == 1


@pytest.mark.parametrize("split", range(1, len(V1)))
def test_header_split_anywhere(split: int) -> None:
    """A header split across two reads at any position is reassembled; nothing leaks early."""
    protocol, _, inner, _, _ = connect()
    protocol.dataReceived(V1[:split])
    assert not inner.connected
    protocol.dataReceived(V1[split:] + b"rest")
    assert inner.connected and inner.received == b"rest"


def test_local_header_uses_socket_addresses() -> None:
    """A v2 LOCAL header (load balancer health check) keeps the socket's own addresses."""
    protocol, _, inner, _, _ = connect()
    protocol.dataReceived(V2_LOCAL + CLIENT_HELLO)
    assert inner.received == CLIENT_HELLO
    assert protocol.getPeer() == LB
    assert origin_of(protocol).client == LB


def test_second_header_is_application_data() -> None:
    """Only the first header counts; a second one is passed on as data."""
    protocol, _, inner, _, _ = connect()
    second = b"PROXY TCP4 6.6.6.6 192.0.2.10 1 8443\r\n"
    protocol.dataReceived(V1 + second)
    assert inner.received == second
    assert protocol.getPeer().host == "203.0.113.7"


def test_invalid_header_is_rejected_logged_counted(log_events) -> None:
    """A bad header closes the connection with one log line naming peer and reason, and is counted."""
    protocol, transport, inner, _, counters = connect()
    protocol.dataReceived(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n")
    assert transport.disconnecting
    assert not inner.connected
    assert counters.value("proxy_header_rejected", "v1-bad-port") == 1
    [event] = [e for e in log_events if "PROXY header rejected" in e["log_format"]]
    assert event["peer"] == "10.0.0.5:41000" and event["reason"] == "v1-bad-port"
    protocol.dataReceived(b"more")  # after rejection: ignored, no error
    protocol.connectionLost(None)
    assert inner.lost is None  # never connected, never told


def test_untrusted_source_is_refused(log_events) -> None:
    """A source outside trusted_sources is refused before it can send anything."""
    protocol, transport, inner, _, counters = connect(peer=IPv4Address("TCP", "198.51.100.1", 5))
    assert transport.disconnecting
    assert counters.value("proxy_header_rejected", "untrusted-source") == 1
    protocol.dataReceived(V1)
    assert not inner.connected


def test_exempt_source_is_served_without_header() -> None:
    """An exempt source's first bytes go straight to the wrapped protocol."""
    protocol, _, inner, _, _ = connect(peer=IPv4Address("TCP", "127.0.0.1", 5))
    assert inner.connected
    protocol.dataReceived(CLIENT_HELLO)
    assert inner.received == CLIENT_HELLO
    assert origin_of(protocol).proxy_header is None


def test_header_deadline_is_not_reset_by_a_trickle() -> None:
    """The header timeout counts from accept; sending a byte at a time does not extend it."""
    protocol, transport, inner, clock, counters = connect(header_timeout_s=5.0)
    for byte in V1[:10]:
        clock.advance(0.4)
        protocol.dataReceived(bytes([byte]))
    assert not transport.disconnecting
    clock.advance(1.0)
    assert transport.disconnecting
    assert counters.value("proxy_header_rejected", "timeout") == 1


def test_deadline_cancelled_once_header_arrives() -> None:
    """A connection that delivered its header is not timed out by the header deadline."""
    protocol, transport, _, clock, _ = connect()
    protocol.dataReceived(V1)
    clock.advance(60)
    assert not transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_connection_lost_before_header_cancels_deadline() -> None:
    """A connection that closes before its header leaves no timer behind."""
    protocol, _, _, clock, _ = connect()
    protocol.dataReceived(V1[:5])
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_pause_and_resume_reach_the_transport_without_attribute_relay(monkeypatch) -> None:
    """The protocol above stops and resumes reading through the PROXY layer's own methods, not ProtocolWrapper.__getattr__."""
    from twisted.protocols.policies import ProtocolWrapper

    protocol, transport, inner, clock, counters = connect()

    def no_relay(self, name):
        raise AssertionError(f"{name} relayed by __getattr__")

    monkeypatch.setattr(ProtocolWrapper, "__getattr__", no_relay)
    protocol.pauseProducing()
    assert transport.producerState == "paused"
    protocol.resumeProducing()
    assert transport.producerState == "producing"
