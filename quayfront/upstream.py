"""
The upstream side: an L{Agent} over a persistent connection pool that
always connects to the configured registry application, over TCP or a UNIX
socket, whatever host the request URI names.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from quayfront.config import UpstreamAddress, UpstreamConfig
from quayfront.twistedadapter import bounded_connection_pool

# Requests go to this URI authority; the endpoint factory below ignores it,
# and the client's own Host header is sent instead.
UPSTREAM_URI_PREFIX = b"http://upstream"


def upstream_uri(target: bytes) -> bytes:
    """
    The URI the agent is asked for, for a client's origin-form C{target}.
    """
    return UPSTREAM_URI_PREFIX + target


def upstream_endpoint(reactor, address: UpstreamAddress, timeout_s: float) -> IStreamClientEndpoint:
    if address.scheme == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=timeout_s)
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return HostnameEndpoint(reactor, address.host, address.port, timeout=timeout_s)
    endpoint_type = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
    return endpoint_type(reactor, address.host, address.port, timeout=timeout_s)


@implementer(IAgentEndpointFactory)
class _NoDelayEndpointFactory:
    """
    Every URI maps to the one upstream endpoint; TCP connections get
    TCP_NODELAY, since request heads and bodies are separate writes and Nagle
    plus delayed ACKs would add tens of milliseconds to each small request.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        return _NoDelayEndpoint(self._endpoint)


@implementer(IStreamClientEndpoint)
class _NoDelayEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory):
        def no_delay(protocol):
            set_no_delay = getattr(protocol.transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
            return protocol

        return self._endpoint.connect(protocolFactory).addCallback(no_delay)


def upstream_agent(reactor, config: UpstreamConfig, persistent: bool = True) -> Agent:
    # Response heads bounded and checked: no upstream can grow quayfront's
    # memory with a header flood or have a malformed head relayed.
    pool = bounded_connection_pool(
        reactor,
        persistent=persistent,
        max_head_bytes=config.max_response_head_bytes,
        max_headers=config.max_response_headers,
    )
    pool.maxPersistentPerHost = config.max_idle_connections
    pool.cachedConnectionTimeout = config.idle_keepalive_s
    endpoint = upstream_endpoint(reactor, config.url, config.connect_timeout_s)
    return Agent.usingEndpointFactory(reactor, _NoDelayEndpointFactory(endpoint), pool=pool)
