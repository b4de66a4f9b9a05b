"""
The PROXY layer of the connection chain: a thin Twisted adapter between the
TCP transport and TLS that feeds the sans-IO L{ProxyHeaderParser}.

Whether a connection must send a header is decided by the listener's
configuration and the socket peer's address, never by looking at the bytes
(proxy-protocol.txt section 1: a receiver must not guess).  Until the header
is complete the wrapped protocol (TLS) is not even connected, so nothing it
does can run on unauthenticated address data; bytes after the header are
handed to it untouched.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from quayfront.config import IPNetwork, ProxyListenerConfig, RedirectListenerConfig, host_ip
from quayfront.metrics import Counters
from quayfront.proxyprotocol import Address, ProxyHeader, ProxyHeaderError, ProxyHeaderParser


class HeaderRule(enum.Enum):
    """
    What a listener asks of one connection, decided by its source address.
    """

    EXPECT_HEADER = "expect-header"
    NO_HEADER = "no-header"
    REFUSE = "refuse"


@dataclass(frozen=True)
class ProxyHeaderPolicy:
    """
    Who must, may and may not send a PROXY header on one listener.

    @ivar listener: the listener's name, for logs and counters.
    @ivar required: C{False} on listeners that never take a header.
    @ivar trusted: sources allowed to send a header (the load balancers).
    @ivar exempt: sources served without a header (e.g. the registry
        probing itself over loopback); checked before C{trusted}.
    """

    listener: str
    required: bool
    header_timeout_s: float = 5.0
    max_v2_header_bytes: int = 4096
    trusted: tuple[IPNetwork, ...] = ()
    exempt: tuple[IPNetwork, ...] = ()

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
        )

    def rule_for(self, peer: IAddress) -> HeaderRule:
        if not self.required:
            return HeaderRule.NO_HEADER
        ip = _peer_ip(peer)
        if ip is None:
            return HeaderRule.REFUSE
        if any(ip in network for network in self.exempt):
            return HeaderRule.NO_HEADER
        if any(ip in network for network in self.trusted):
            return HeaderRule.EXPECT_HEADER
        return HeaderRule.REFUSE


def _peer_ip(peer: IAddress) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = getattr(peer, "host", None)
    return host_ip(host) if isinstance(host, str) else None


@dataclass(frozen=True)
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


class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads the PROXY header, if this connection must send one, then becomes a
    transparent pass-through between the transport and the wrapped protocol.
    """

    _log = Logger()
    factory: ProxyHeaderFactory
    quayfront_origin: ConnectionOrigin | None = None
    _parser: ProxyHeaderParser | None = None
    _deadline: IDelayedCall | None = None
    _wrapped_connected = False

    def makeConnection(self, transport):
        # Unlike ProtocolWrapper, the wrapped protocol is connected only once
        # the header is known: see _connect_wrapped.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        policy = self.factory.policy
        rule = policy.rule_for(self.transport.getPeer())
        if rule is HeaderRule.NO_HEADER:
            self._connect_wrapped(None, b"")
        elif rule is HeaderRule.EXPECT_HEADER:
            self._parser = ProxyHeaderParser(max_v2_length=policy.max_v2_header_bytes)
            self._deadline = self.factory.clock.callLater(
                policy.header_timeout_s, self._header_timed_out
            )
        else:
            self._reject("untrusted-source", "source is not in trusted_sources")

    def dataReceived(self, data: bytes) -> None:
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
        wrapped = self.wrappedProtocol
        # From here on this layer only relays; skip the method hop per read.
        self.dataReceived = wrapped.dataReceived  # type: ignore[method-assign]
        wrapped.makeConnection(self)
        if leftover and self.wrappedProtocol is not None:
            wrapped.dataReceived(leftover)

    def _header_timed_out(self) -> None:
        self._deadline = None
        self._reject("timeout", "no complete PROXY header within %gs" % (
            self.factory.policy.header_timeout_s,))

    def _reject(self, reason: str, detail: str) -> None:
        self._parser = None
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
        if self._wrapped_connected:
            ProtocolWrapper.connectionLost(self, reason)
        else:
            self.factory.unregisterProtocol(self)
            self.wrappedProtocol = None


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
    # quayfront logs each listener's address and role itself; no "Starting
    # factory <...object at 0x...>" lines.
    noisy = False

    def __init__(
        self,
        wrappedFactory,
        policy: ProxyHeaderPolicy,
        clock: IReactorTime,
        counters: Counters,
    ) -> None:
        super().__init__(wrappedFactory)
        self.policy = policy
        self.clock = clock
        self.counters = counters

    def logPrefix(self) -> str:
        return f"quayfront-{self.policy.listener}"
