"""
Listener limits: the accept gate behind max_connections, the descriptor
budget checked at startup, and the route table logged at startup.
"""

from __future__ import annotations

import dataclasses
import resource

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from quayfront.config import DEFAULT_ROUTES, Config, ConfigError, RouteConfig
from quayfront.listeners import (
    DESCRIPTOR_RESERVE,
    AcceptGate,
    CappedPort,
    check_descriptor_budget,
    descriptors_needed,
    raise_descriptor_limit,
)
from quayfront.metrics import Counters
from quayfront.proxylayer import ProxyHeaderFactory, ProxyHeaderPolicy
from quayfront.routing import log_route_table


@pytest.fixture
def log_events():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


# --- The accept gate ----------------------------------------------------------------


def test_gate_pauses_at_the_cap_and_resumes_below_it() -> None:
    """The gate says pause when the cap is reached and resume when one closes."""
    gate = AcceptGate(2)
    assert gate.opened() is False and gate.headroom == 1
    assert gate.opened() is True and gate.paused and gate.headroom == 0
    assert gate.closed() is True and not gate.paused
    assert gate.opened() is True
    assert gate.closed() is True
    assert gate.closed() is False and gate.open == 0


def test_gate_misuse_raises() -> None:
    """A close without an open connection, or a cap below 1, is a programming error."""
    with pytest.raises(RuntimeError):
        AcceptGate(1).closed()
    with pytest.raises(ValueError):
        AcceptGate(0)


class FakePort:
    """
    The parts of twisted.internet.tcp.Port the cap uses; each doRead accepts
    numberAccepts connections from a queue of waiting ones.
    """

    def __init__(self, factory, waiting: int) -> None:
        self.factory = factory
        self.waiting = waiting
        self.numberAccepts = 100
        self.reading = True
        self.connected = True
        self.disconnecting = False
        self.protocols: list[Protocol] = []

    def doRead(self) -> None:
        for _ in range(self.numberAccepts):
            if not self.waiting:
                break
            self.waiting -= 1
            protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1000))
            protocol.makeConnection(
                StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1000))
            )
            self.protocols.append(protocol)
        self.numberAccepts += 20

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def capped(max_connections: int, waiting: int):
    clock = MemoryReactorClock()
    counters = Counters()
    policy = ProxyHeaderPolicy(listener="tls", required=False, max_connections=max_connections)
    factory = ProxyHeaderFactory(Factory.forProtocol(Protocol), policy, clock, counters)
    port = FakePort(factory, waiting)
    factory.accept_gate = CappedPort(port, AcceptGate(max_connections), "tls", clock, counters)
    return port, factory, counters, clock


def test_port_stops_reading_at_the_cap_and_a_burst_never_exceeds_it(log_events) -> None:
    """A burst of 10 against a cap of 3: 3 accepted, reading stopped, the rest left waiting."""
    port, factory, counters, _ = capped(3, 10)
    port.doRead()
    assert len(factory.protocols) == 3
    assert port.waiting == 7
    assert not port.reading
    assert counters.value("listener_accept_paused", "tls") == 1
    [event] = [e for e in log_events if "max_connections" in e["log_format"]]
    assert event["listener"] == "tls" and event["max_connections"] == 3


def test_port_resumes_when_a_connection_closes() -> None:
    """One close below the cap resumes accepting, and the next burst takes one connection."""
    port, factory, _, _ = capped(3, 10)
    port.doRead()
    port.protocols[0].connectionLost(None)
    assert port.reading
    port.doRead()
    assert len(factory.protocols) == 3 and port.waiting == 6 and not port.reading


def test_pause_log_is_rate_limited(log_events) -> None:
    """Oscillating at the cap logs one line a minute, while every pause is counted."""
    port, _, counters, clock = capped(1, 10)
    for _ in range(5):
        port.doRead()
        port.protocols[-1].connectionLost(None)
        clock.advance(1)
    assert counters.value("listener_accept_paused", "tls") == 5
    assert len([e for e in log_events if "max_connections" in e["log_format"]]) == 1
    clock.advance(60)
    port.doRead()
    assert len([e for e in log_events if "max_connections" in e["log_format"]]) == 2


def test_closing_port_is_not_restarted() -> None:
    """A port being closed (drain) is not made to read again when connections close."""
    port, _, _, _ = capped(1, 2)
    port.doRead()
    port.disconnecting = True
    port.protocols[0].connectionLost(None)
    assert not port.reading


# --- Descriptor budget ----------------------------------------------------------------


def test_default_caps_fit_common_descriptor_limits() -> None:
    """The defaults fit the 20000 descriptors of a container here, with room to spare."""
    assert descriptors_needed(Config()) <= 20000 // 2
    check_descriptor_budget(Config(), 20000, "test")


def test_caps_over_the_limit_refuse_to_start() -> None:
    """Caps the descriptor limit cannot hold are a configuration error naming the keys."""
    config = Config()
    needed = descriptors_needed(config)
    assert needed == 2 * 2 * config.proxy_listener.max_connections + DESCRIPTOR_RESERVE
    with pytest.raises(ConfigError) as caught:
        check_descriptor_budget(config, needed - 1, "quayfront.toml")
    assert caught.value.source == "quayfront.toml"
    assert "proxy_listener.max_connections + tls_listener.max_connections" in caught.value.reason
    assert str(needed - 1) in caught.value.reason
    check_descriptor_budget(config, needed, "quayfront.toml")


def test_single_listener_error_names_its_key() -> None:
    """With one listener enabled the error's key is that listener's max_connections."""
    config = dataclasses.replace(
        Config(), tls_listener=dataclasses.replace(Config().tls_listener, enabled=False)
    )
    with pytest.raises(ConfigError) as caught:
        check_descriptor_budget(config, 10, "x")
    assert caught.value.key == "proxy_listener.max_connections"


def test_soft_descriptor_limit_raised_to_hard(log_events) -> None:
    """At start the soft RLIMIT_NOFILE becomes the hard limit, and the log says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft == hard and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard - 1, hard))
        lowered = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = raise_descriptor_limit()
        expected = hard if hard != resource.RLIM_INFINITY else lowered
        assert limit == expected == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        [event] = [e for e in log_events if "RLIMIT_NOFILE" in e["log_format"]]
        assert event["limit"] == expected and event["soft"] == lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- Route table ------------------------------------------------------------------------


def test_route_table_is_logged_longest_prefix_first(log_events) -> None:
    """One line per route, in matching order, with the destination and limits."""
    lines = log_route_table(DEFAULT_ROUTES)
    assert [line.split(" ")[0] for line in lines] == ["/v2/", "/v1/", "/"]
    assert lines[0].startswith("/v2/ -> upstream default (max_body_bytes=unlimited,")
    assert "response_timeout_s=2000" in lines[0] and "rate_limit=none" in lines[0]
    assert [e["route"] for e in log_events if e["log_format"] == "Route: {route}"] == lines
    assert not [e for e in log_events if "No route covers /v2/" in e["log_format"]]


def test_missing_v2_route_is_warned(log_events) -> None:
    """Routes that leave /v2/ unrouted (defaults replaced) give a warning."""
    routes = (
        RouteConfig(prefix="/api/", upstream="web", max_body_bytes=1000, rate_limit="api"),
        RouteConfig(prefix="/static/", directory="/srv/static", keepalive=False),
    )
    lines = log_route_table(routes)
    assert lines[0].startswith("/static/ -> directory /srv/static (")
    assert "keepalive=off" in lines[0]
    assert "max_body_bytes=1000" in lines[1] and "rate_limit=api" in lines[1]
    [warning] = [e for e in log_events if "No route covers /v2/" in e["log_format"]]
    assert warning["log_level"].name == "warn"


def test_tls_listener_endpoint_reports_the_proxy_layers_open_connections() -> None:
    """The open-connections gauge reads the TLS endpoint, which asks the PROXY layer under it."""
    from twisted.internet.testing import MemoryReactorClock

    from quayfront.listeners import TLSListenerEndpoint

    class Layer:
        def open_connections(self) -> int:
            return 7

    assert TLSListenerEndpoint(Layer(), None, MemoryReactorClock()).open_connections() == 7
