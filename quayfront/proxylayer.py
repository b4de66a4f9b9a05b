"""
The PROXY layer of the connection chain: a thin Twisted adapter between the
TCP transport and TLS that feeds the sans-IO L{ProxyHeaderParser}.

Whether a connection must send a header is decided by the listener's
configuration and the socket peer's address, never by looking at the bytes
(proxy-protocol.txt section 1: a receiver must not guess).  Until the header
is complete the wrapped protocol (TLS) is not even connected, so nothing it
does can run on unauthenticated address data; bytes after the header are
handed to it untouched.

On TLS listeners the same layer, sitting right under TLS, also holds the
TLS handshake to its deadline (L{HandshakeWatch}): from the moment TLS is
connected (accept, or the end of the PROXY header) until the client's
Finished message has arrived.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from quayfront.config import (
    DEFAULT_MAX_CONNECTIONS,
    IPNetwork,
    ProxyListenerConfig,
    RedirectListenerConfig,
    host_ip,
)
from quayfront.metrics import Counters
from quayfront.twistedadapter import provide_what_transport_provides, release_handshake_bios
from quayfront.proxyprotocol import (
    Address,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    starts_with_header,
)


class HeaderRule(enum.Enum):
    """
    What a listener asks of one connection, decided by its source address.
    """

    EXPECT_HEADER = "expect-header"
    NO_HEADER = "no-header"
    # No header, and one that arrives anyway is refused: a load balancer
    # whose address is exempt by mistake would otherwise fail in TLS with
    # nothing in the log.
    EXEMPT = "exempt"
    REFUSE = "refuse"


#: Source addresses whose rule a listener remembers (see rule_for).
MAX_REMEMBERED_SOURCES = 1024


@dataclass(frozen=True)
class ProxyHeaderPolicy:
    """
    Who must, may and may not send a PROXY header on one listener.

    @ivar listener: the listener's name, for logs and counters.
    @ivar required: C{False} on listeners that never take a header.
    @ivar trusted: sources allowed to send a header (the load balancers).
    @ivar exempt: sources served without a header (e.g. the registry
        probing itself over loopback); checked before C{trusted}.
    @ivar max_connections: connections the listener holds at once; beyond
        it, it stops accepting (see L{quayfront.listeners.AcceptGate}).
    """

    listener: str
    required: bool
    header_timeout_s: float = 5.0
    max_v2_header_bytes: int = 4096
    trusted: tuple[IPNetwork, ...] = ()
    exempt: tuple[IPNetwork, ...] = ()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Each source address's rule, as found: a listener's sources are its
    #: few load balancers, and parsing an address and matching it against
    #: the networks is most of the cost of a connection's first step.
    _rules: dict[str, HeaderRule] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_config(
        cls, listener: str, config: ProxyListenerConfig | RedirectListenerConfig
    ) -> ProxyHeaderPolicy:
        return cls(
            listener=listener,
            required=config.proxy_protocol == "required",
            header_timeout_s=config.header_timeout_s,
            max_v2_header_bytes=getattr(config, "max_v2_header_bytes", cls.max_v2_header_bytes),
            trusted=config.trusted_sources,
            exempt=config.exempt_sources,
            max_connections=config.max_connections,
        )

    def rule_for(self, peer: IAddress) -> HeaderRule:
        if not self.required:
            return HeaderRule.NO_HEADER
        host = getattr(peer, "host", None)
        rule = self._rules.get(host) if isinstance(host, str) else None
        if rule is None:
            rule = self._rule_for(peer)
            if isinstance(host, str):
                if len(self._rules) >= MAX_REMEMBERED_SOURCES:
                    # Sources beyond the load balancers (refused ones, say)
                    # must not grow it without bound.
                    self._rules.clear()
                self._rules[host] = rule
        return rule

    def _rule_for(self, peer: IAddress) -> HeaderRule:
        ip = _peer_ip(peer)
        if ip is None:
            return HeaderRule.REFUSE
        if any(ip in network for network in self.exempt):
            return HeaderRule.EXEMPT
        if any(ip in network for network in self.trusted):
            return HeaderRule.EXPECT_HEADER
        return HeaderRule.REFUSE


def _peer_ip(peer: IAddress) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = getattr(peer, "host", None)
    return host_ip(host) if isinstance(host, str) else None


# Slots: one of these lives as long as each connection.
@dataclass(frozen=True, slots=True)
class ConnectionOrigin:
    """
    Where a connection really comes from.

    @ivar socket_peer: the TCP peer: a load balancer on the PROXY listener.
    @ivar client: the client the load balancer speaks for (the PROXY source),
        or C{socket_peer} when there was no header or it carried no address.
    @ivar destination: the address the client connected to.
    @ivar proxy_header: the parsed header, if one was sent.
    """

    listener: str
    socket_peer: IAddress
    client: IAddress
    destination: IAddress
    proxy_header: ProxyHeader | None


def origin_of(transport: object) -> ConnectionOrigin | None:
    """
    Find the L{ConnectionOrigin} of the connection under C{transport}, which
    may be several wrappers (TLS) above the PROXY layer.
    """
    # ProtocolWrapper (and so TLSMemoryBIOProtocol) delegates unknown
    # attributes to the transport below it.
    return getattr(transport, "quayfront_origin", None)


def _twisted_address(address: Address) -> IAddress:
    if ":" in address.host:
        return IPv6Address("TCP", address.host, address.port)
    return IPv4Address("TCP", address.host, address.port)


class HandshakeState(enum.Enum):
    __hash__ = object.__hash__  # see quayfront.proxyprotocol.Family

    HANDSHAKING = "handshaking"
    DONE = "done"
    FAILED = "failed"


_HANDSHAKE_TRANSITIONS = {
    HandshakeState.HANDSHAKING: frozenset({HandshakeState.DONE, HandshakeState.FAILED}),
    HandshakeState.DONE: frozenset(),
    HandshakeState.FAILED: frozenset(),
}
# The first byte of a TLS handshake record (RFC 8446 section 5.1).
_TLS_HANDSHAKE_RECORD = 0x16


class HandshakeWatch:
    """
    The TLS handshake of one connection, held to a deadline: sans-IO, the
    adapter reports what happened and schedules the deadline on its clock.

    A handshake fails for one of these reasons (the C{tls_handshake_failed}
    counter's labels):
      - C{timeout}: not complete within the deadline (silence, part of a
        ClientHello, or a client that stopped answering the server's flight);
      - C{client-closed}: the client closed the connection first;
      - C{not-tls}: TLS gave up on bytes that do not start a TLS handshake
        record (plain HTTP, or a PROXY header sent to a listener that expects
        none);
      - C{tls-error}: TLS gave up on a handshake record (no shared version
        or cipher, a bad record, an alert from the client).
    A connection quayfront itself closes mid-handshake (a drain) is not
    counted.
    """

    # One per connection, for as long as it lives: no instance dict.
    __slots__ = ("state", "deadline_s", "timeout_s", "bytes_received", "_first_byte")

    def __init__(self, started_s: float, timeout_s: float) -> None:
        self.state = HandshakeState.HANDSHAKING
        self.deadline_s = started_s + timeout_s
        self.timeout_s = timeout_s
        self.bytes_received = 0
        self._first_byte: int | None = None

    def data_received(self, data: bytes) -> None:
        if self._first_byte is None and data:
            self._first_byte = data[0]
        self.bytes_received += len(data)

    def completed(self) -> None:
        self._move_to(HandshakeState.DONE, "handshake completed")

    def tls_gave_up(self) -> str:
        """
        TLS closed the connection during the handshake: why.
        """
        self._move_to(HandshakeState.FAILED, "TLS closed the connection")
        return "tls-error" if self._first_byte == _TLS_HANDSHAKE_RECORD else "not-tls"

    def deadline_passed(self) -> str:
        self._move_to(HandshakeState.FAILED, "deadline")
        return "timeout"

    def closed_by_server(self) -> None:
        self._move_to(HandshakeState.FAILED, "closed by quayfront")

    def connection_lost(self) -> str | None:
        """
        The connection is gone: the reason to count, if the handshake was
        still in progress (the client left first).
        """
        if self.state is HandshakeState.HANDSHAKING:
            self._move_to(HandshakeState.FAILED, "connection lost")
            return "client-closed"
        return None

    def _move_to(self, state: HandshakeState, event: str) -> None:
        if state not in _HANDSHAKE_TRANSITIONS[self.state]:
            raise RuntimeError(f"handshake event {event!r} in state {self.state.value!r}")
        self.state = state


def handshake_complete(tls_protocol: object) -> bool:
    """
    Whether the TLS handshake under C{tls_protocol} has completed: the
    client's Finished message, the last of the handshake, has been received
    (pyOpenSSL's public C{get_peer_finished}).
    """
    connection = getattr(tls_protocol, "getHandle", lambda: None)()
    return connection is not None and connection.get_peer_finished() is not None


class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads the PROXY header, if this connection must send one, then becomes a
    transparent pass-through between the transport and the wrapped protocol.
    On TLS listeners it holds the handshake to its deadline before that.
    """

    _log = Logger()
    factory: ProxyHeaderFactory
    quayfront_origin: ConnectionOrigin | None = None
    _parser: ProxyHeaderParser | None = None
    _deadline: IDelayedCall | None = None
    _wrapped_connected = False
    # The first bytes of an exempt source, until they show whether a PROXY
    # header starts there.
    _exempt_prefix: bytearray | None = None
    _handshake: HandshakeWatch | None = None
    _handshake_deadline: IDelayedCall | None = None

    def makeConnection(self, transport):
        # Unlike ProtocolWrapper, the wrapped protocol is connected only once
        # the header is known: see _connect_wrapped.
        provide_what_transport_provides(self, transport)
        Protocol.makeConnection(self, transport)

    # What ProtocolWrapper.__getattr__ would find on the transport, without
    # a failed lookup first: the protocols above resume reading at the end
    # of every response.
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    #: Pausing and resuming only relay to the transport below: the TLS layer
    #: above may resume the socket itself (twistedadapter.epoll_socket_below).
    relays_production = True

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        policy = self.factory.policy
        rule = policy.rule_for(self.transport.getPeer())
        if rule is HeaderRule.NO_HEADER:
            self._connect_wrapped(None, b"")
        elif rule is HeaderRule.EXEMPT:
            # Connected at once, as NO_HEADER (TLS says nothing before the
            # ClientHello, and its deadline runs from here), but the first
            # bytes are looked at before they reach it.
            self._exempt_prefix = bytearray()
            self._connect_wrapped(None, b"")
        elif rule is HeaderRule.EXPECT_HEADER:
            self._parser = ProxyHeaderParser(max_v2_length=policy.max_v2_header_bytes)
            self._deadline = self.factory.clock.callLater(
                policy.header_timeout_s, self._header_timed_out
            )
        else:
            self._reject("untrusted-source", "source is not in trusted_sources")

    def dataReceived(self, data: bytes) -> None:
        if self._exempt_prefix is not None:
            self._exempt_data_received(data)
            return
        parser = self._parser
        if parser is None:
            # Rejected already; the connection is going away.
            return
        try:
            result = parser.feed(data)
        except ProxyHeaderError as e:
            self._reject(e.reason, e.detail)
            return
        if result is not None:
            header, leftover = result
            self._parser = None
            self._deadline.cancel()
            self._deadline = None
            self._connect_wrapped(header, leftover)

    def _exempt_data_received(self, data: bytes) -> None:
        prefix = self._exempt_prefix
        prefix += data
        verdict = starts_with_header(prefix)
        if verdict is None:
            return
        self._exempt_prefix = None
        if verdict:
            if self._handshake is not None:
                self._handshake.closed_by_server()
                self._cancel_handshake_deadline()
            self._reject(
                "header-from-exempt-source",
                "source is in exempt_sources but sent a PROXY header; a load balancer's"
                " address belongs in trusted_sources only",
            )
            return
        self._relay_from_now_on()
        self.dataReceived(bytes(prefix))

    def _connect_wrapped(self, header: ProxyHeader | None, leftover: bytes) -> None:
        socket_peer = self.transport.getPeer()
        socket_host = self.transport.getHost()
        client, destination = socket_peer, socket_host
        if header is not None and header.source is not None:
            client = _twisted_address(header.source)
            destination = _twisted_address(header.destination)
        self.quayfront_origin = ConnectionOrigin(
            listener=self.factory.policy.listener,
            socket_peer=socket_peer,
            client=client,
            destination=destination,
            proxy_header=header,
        )
        self._wrapped_connected = True
        timeout_s = self.factory.handshake_timeout_s
        if timeout_s is not None:
            clock = self.factory.clock
            self._handshake = HandshakeWatch(clock.seconds(), timeout_s)
            self._handshake_deadline = clock.callLater(timeout_s, self._handshake_timed_out)
        if self._exempt_prefix is None:
            self._relay_from_now_on()
        self.wrappedProtocol.makeConnection(self)
        if leftover and self.wrappedProtocol is not None:
            self.dataReceived(leftover)

    def _relay_from_now_on(self) -> None:
        if self._handshake is not None:
            self.dataReceived = self._handshake_data_received  # type: ignore[method-assign]
        else:
            # From here on this layer only relays; skip the method hop per read.
            self.dataReceived = self.wrappedProtocol.dataReceived  # type: ignore[method-assign]

    def _handshake_data_received(self, data: bytes) -> None:
        watch = self._handshake
        if watch is None or watch.state is not HandshakeState.HANDSHAKING:
            # Failed already; the connection is going away.
            return
        watch.data_received(data)
        wrapped = self.wrappedProtocol
        wrapped.dataReceived(data)
        if watch.state is HandshakeState.HANDSHAKING and handshake_complete(wrapped):
            watch.completed()
            self._cancel_handshake_deadline()
            # The memory BIOs keep the size of the largest flight (the
            # ClientHello, the server's certificates and tickets) for the
            # connection's life; an idle connection needs none of it.
            release_handshake_bios(wrapped.getHandle())
            # Done: relay directly from now on, as without a handshake watch.
            self.dataReceived = wrapped.dataReceived  # type: ignore[method-assign]

    def _cancel_handshake_deadline(self) -> None:
        if self._handshake_deadline is not None:
            if self._handshake_deadline.active():
                self._handshake_deadline.cancel()
            self._handshake_deadline = None

    def _handshake_timed_out(self) -> None:
        self._handshake_deadline = None
        watch = self._handshake
        reason = watch.deadline_passed()
        self._handshake_failed(
            reason,
            f"no complete TLS handshake within {watch.timeout_s:g}s"
            f" ({watch.bytes_received} bytes received)",
        )
        self.transport.abortConnection()

    def _handshake_failed(self, reason: str, detail: str) -> None:
        self._cancel_handshake_deadline()
        self.factory.counters.increment("tls_handshake_failed", reason)
        origin = self.quayfront_origin
        peer = _format_peer(self.transport.getPeer())
        if origin is not None and origin.client is not origin.socket_peer:
            peer = f"{peer} (client {_format_peer(origin.client)})"
        self._log.warn(
            "TLS handshake failed on {listener} from {peer}: {reason}: {detail}",
            listener=self.factory.policy.listener,
            peer=peer,
            reason=reason,
            detail=detail,
        )

    def _tls_closing(self) -> None:
        """
        TLS (above) closes the connection: during the handshake, because the
        handshake failed.
        """
        watch = self._handshake
        if watch is not None and watch.state is HandshakeState.HANDSHAKING:
            reason = watch.tls_gave_up()
            self._handshake_failed(
                reason,
                "the TLS handshake failed"
                if reason == "tls-error"
                else "the first bytes are not a TLS handshake record",
            )

    def loseConnection(self) -> None:
        # TLS ends a failed handshake with loseConnection (after queueing
        # its alert); anything above it that closes mid-handshake aborts.
        self._tls_closing()
        ProtocolWrapper.loseConnection(self)

    def abortConnection(self) -> None:
        watch = self._handshake
        if watch is not None and watch.state is HandshakeState.HANDSHAKING:
            watch.closed_by_server()
            self._cancel_handshake_deadline()
        self.transport.abortConnection()

    def _header_timed_out(self) -> None:
        self._deadline = None
        self._reject("timeout", "no complete PROXY header within %gs" % (
            self.factory.policy.header_timeout_s,))

    def _reject(self, reason: str, detail: str) -> None:
        self._parser = None
        self._exempt_prefix = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.factory.counters.increment("proxy_header_rejected", reason)
        self._log.warn(
            "PROXY header rejected on {listener} from {peer}: {reason}: {detail}",
            listener=self.factory.policy.listener,
            peer=_format_peer(self.transport.getPeer()),
            reason=reason,
            detail=detail,
        )
        self.transport.abortConnection()

    def getPeer(self) -> IAddress:
        if self.quayfront_origin is not None:
            return self.quayfront_origin.client
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self.quayfront_origin is not None:
            return self.quayfront_origin.destination
        return self.transport.getHost()

    def connectionLost(self, reason) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._handshake is not None:
            lost_reason = self._handshake.connection_lost()
            if lost_reason is not None:
                self._handshake_failed(
                    lost_reason,
                    f"the client closed the connection during the TLS handshake"
                    f" ({self._handshake.bytes_received} bytes received)",
                )
            self._cancel_handshake_deadline()
        if self._wrapped_connected:
            ProtocolWrapper.connectionLost(self, reason)
        else:
            self.factory.unregisterProtocol(self)
            self.wrappedProtocol = None
        # The relay shortcut (the protocol above's own dataReceived) would
        # keep the two in a reference cycle, left to the garbage collector.
        self.__dict__.pop("dataReceived", None)


def _format_peer(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ProxyHeaderFactory(WrappingFactory):
    """
    Wraps every connection of C{wrappedFactory} in a L{ProxyHeaderProtocol}.
    """

    protocol = ProxyHeaderProtocol
    # Set by the endpoint once listening (quayfront.listeners.CappedPort).
    accept_gate = None
    # quayfront logs each listener's address and role itself; no "Starting
    # factory <...object at 0x...>" lines.
    noisy = False

    def __init__(
        self,
        wrappedFactory,
        policy: ProxyHeaderPolicy,
        clock: IReactorTime,
        counters: Counters,
        handshake_timeout_s: float | None = None,
    ) -> None:
        """
        @param handshake_timeout_s: on a TLS listener (C{wrappedFactory}
            builds TLS protocols), the TLS handshake deadline; C{None} when
            what is wrapped is not TLS.
        """
        super().__init__(wrappedFactory)
        self.policy = policy
        self.clock = clock
        self.counters = counters
        self.handshake_timeout_s = handshake_timeout_s

    def registerProtocol(self, p) -> None:
        super().registerProtocol(p)
        if self.accept_gate is not None:
            self.accept_gate.opened()

    def unregisterProtocol(self, p) -> None:
        registered = p in self.protocols
        super().unregisterProtocol(p)
        if registered and self.accept_gate is not None:
            self.accept_gate.closed()

    def logPrefix(self) -> str:
        return f"quayfront-{self.policy.listener}"
