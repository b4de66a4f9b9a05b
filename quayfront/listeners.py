"""
The listener chain, composed in code: TCP -> PROXY -> TLS -> HTTP.

Twisted's C{haproxy:ssl:} endpoint string composes the other way round
(TLS outside the PROXY parser, so the header would have to arrive inside the
encrypted stream); here the PROXY layer wraps the TCP endpoint and TLS wraps
that.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, wrapServerTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from zope.interface import implementer

from quayfront.config import ConfigError, ListenAddress
from quayfront.metrics import Counters
from quayfront.proxylayer import ProxyHeaderFactory, ProxyHeaderPolicy

# Generous: a load balancer opens connections in bursts, and connections
# that never send a header are closed on the header deadline anyway.
LISTEN_BACKLOG = 1024


@implementer(IStreamServerEndpoint)
class ProxyHeaderServerEndpoint:
    """
    An endpoint whose connections go through the PROXY layer before they
    reach the factory given to C{listen}.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        policy: ProxyHeaderPolicy,
        clock,
        counters: Counters,
    ) -> None:
        self._wrapped = wrapped
        self._policy = policy
        self._clock = clock
        self._counters = counters
        self._factories: list[ProxyHeaderFactory] = []

    def listen(self, protocolFactory):
        factory = ProxyHeaderFactory(protocolFactory, self._policy, self._clock, self._counters)
        self._factories.append(factory)
        return self._wrapped.listen(factory)

    def open_connections(self) -> int:
        return sum(len(factory.protocols) for factory in self._factories)


def tcp_endpoint(reactor, address: ListenAddress) -> IStreamServerEndpoint:
    endpoint_type = TCP6ServerEndpoint if address.is_ipv6 else TCP4ServerEndpoint
    return endpoint_type(reactor, address.port, backlog=LISTEN_BACKLOG, interface=address.host)


def plain_endpoint(
    reactor, address: ListenAddress, policy: ProxyHeaderPolicy, counters: Counters
) -> IStreamServerEndpoint:
    """
    TCP -> PROXY -> HTTP, without TLS (the redirect listener).
    """
    return ProxyHeaderServerEndpoint(tcp_endpoint(reactor, address), policy, reactor, counters)


def listener_endpoint(
    reactor,
    address: ListenAddress,
    policy: ProxyHeaderPolicy,
    tls: IOpenSSLServerConnectionCreator,
    counters: Counters,
) -> IStreamServerEndpoint:
    return TLSListenerEndpoint(
        ProxyHeaderServerEndpoint(tcp_endpoint(reactor, address), policy, reactor, counters),
        tls,
        reactor,
    )


@implementer(IStreamServerEndpoint)
class TLSListenerEndpoint:
    """
    TLS around the PROXY layer, keeping the PROXY layer reachable for its
    connection count.
    """

    def __init__(self, proxy_layer: ProxyHeaderServerEndpoint, tls, reactor) -> None:
        self.proxy_layer = proxy_layer
        self._endpoint = wrapServerTLS(tls, proxy_layer, clock=reactor)

    def listen(self, protocolFactory):
        return self._endpoint.listen(protocolFactory)

    def open_connections(self) -> int:
        return self.proxy_layer.open_connections()


class ListenerService(StreamServerEndpointService):
    """
    Listens when the application starts (before twistd drops privileges),
    and turns a failure to listen into one line naming the setting, and a
    non-zero exit, instead of a traceback.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory, setting: str, address) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self._setting = setting
        self._address = address

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = e.socketError.strerror if e.socketError is not None else str(e)
            # The root service reports it like any other startup error, with
            # the source that set the address.
            raise ConfigError(
                "-", self._setting, f"cannot listen on {self._address}: {reason}"
            ) from None
