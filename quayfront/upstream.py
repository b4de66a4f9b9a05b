"""
The upstream side: quayfront's own L{UpstreamAgent} over a persistent
connection pool that always connects to the configured registry
application, over TCP or a UNIX socket, whatever host the request URI
names.
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

from quayfront.config import UpstreamAddress, UpstreamConfig
from quayfront.upstreamclient import UpstreamAgent, UpstreamPool

# Requests go to this URI authority; the agent ignores it, and the client's
# own Host header is sent instead.
UPSTREAM_AUTHORITY = b"upstream"
UPSTREAM_URI_PREFIX = b"http://" + UPSTREAM_AUTHORITY


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


def upstream_key(address: UpstreamAddress) -> str:
    """
    The name idle connections to C{address} are pooled under: TCP host and
    port, or the UNIX socket path.
    """
    return str(address)


def upstream_agent(
    reactor,
    config: UpstreamConfig,
    persistent: bool = True,
    pool: UpstreamPool | None = None,
) -> UpstreamAgent:
    """
    The agent for one upstream, pooling its idle connections in C{pool}
    (shared by the agents of the same upstream, with different connect
    timeouts) or in its own.
    """
    endpoint = upstream_endpoint(reactor, config.url, config.connect_timeout_s)
    return UpstreamAgent(
        endpoint,
        UpstreamPool(reactor) if pool is None else pool,
        upstream_key(config.url),
        # Response heads bounded and checked: no upstream can grow
        # quayfront's memory with a header flood or have a malformed head
        # relayed.
        max_head_bytes=config.max_response_head_bytes,
        max_headers=config.max_response_headers,
        max_idle_connections=config.max_idle_connections,
        idle_keepalive_s=config.idle_keepalive_s,
        persistent=persistent,
    )
