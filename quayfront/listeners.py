"""
The listener chain, composed in code: TCP -> PROXY -> TLS -> HTTP.

Twisted's C{haproxy:ssl:} endpoint string composes the other way round
(TLS outside the PROXY parser, so the header would have to arrive inside the
encrypted stream); here the PROXY layer wraps the TCP endpoint and TLS wraps
that.
"""

from __future__ import annotations

import resource
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, wrapServerTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from quayfront.config import Config, ConfigError, ListenAddress
from quayfront.metrics import Counters
from quayfront.proxylayer import ProxyHeaderFactory, ProxyHeaderPolicy

# Generous: a load balancer opens connections in bursts, and connections
# that never send a header are closed on the header deadline anyway.  It is
# also where connections wait while a listener holds max_connections.
LISTEN_BACKLOG = 1024

# Descriptors kept free beyond the listeners' caps: listening sockets, log
# and access-log files, idle upstream connections, static files, health
# probes.
DESCRIPTOR_RESERVE = 256
# A listener logs that it stopped accepting at most this often.
PAUSE_LOG_INTERVAL_S = 60.0

_log = Logger(namespace="quayfront")


class AcceptGate:
    """
    When a listener accepts: sans-IO bookkeeping of its open connections
    against its cap.

    Over the cap the listener stops reading its listening socket, so new
    connections wait in the kernel's backlog (not accepted, not reset) and
    are accepted once a connection closes.  Overload is handled here, never
    by running out of descriptors (where Twisted's EMFILE recovery would
    accept and close each new connection).
    """

    def __init__(self, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.max_connections = max_connections
        self.open = 0
        self.paused = False

    @property
    def headroom(self) -> int:
        """
        How many more connections may be accepted now.
        """
        return max(0, self.max_connections - self.open)

    def opened(self) -> bool:
        """
        A connection was accepted.

        @return: whether the listener must stop accepting now.
        """
        self.open += 1
        if not self.paused and self.open >= self.max_connections:
            self.paused = True
            return True
        return False

    def closed(self) -> bool:
        """
        A connection closed.

        @return: whether the listener must resume accepting now.
        """
        if self.open <= 0:
            raise RuntimeError("AcceptGate.closed() without an open connection")
        self.open -= 1
        if self.paused and self.open < self.max_connections:
            self.paused = False
            return True
        return False


class CappedPort:
    """
    Applies an L{AcceptGate} to a listening TCP port.

    Pausing is C{stopReading()} on the port (it stays bound and listening).
    Twisted's port accepts up to C{numberAccepts} connections per readiness
    event, so before each event that number is lowered to the headroom:
    one burst can never take the listener past its cap.
    """

    def __init__(self, port, gate: AcceptGate, listener: str, clock: IReactorTime,
                 counters: Counters) -> None:
        self._port = port
        self._gate = gate
        self._listener = listener
        self._clock = clock
        self._counters = counters
        self._last_logged_s: float | None = None
        self._pauses_since_log = 0
        self._accepting = True
        original_do_read = port.doRead

        def do_read() -> None:
            port.numberAccepts = max(1, min(port.numberAccepts, gate.headroom))
            original_do_read()

        # The reactor calls doRead on the port object it was given; an
        # attribute on that instance is the narrowest place to bound a burst.
        port.doRead = do_read

    def opened(self) -> None:
        if self._gate.opened():
            self._pause()

    def closed(self) -> None:
        if self._gate.closed():
            self._resume()

    def _pause(self) -> None:
        self._counters.increment("listener_accept_paused", self._listener)
        self._pauses_since_log += 1
        now = self._clock.seconds()
        if self._last_logged_s is None or now - self._last_logged_s >= PAUSE_LOG_INTERVAL_S:
            _log.warn(
                "Listener {listener} holds max_connections = {max_connections}: not accepting"
                " until a connection closes; new connections wait in the backlog"
                " ({pauses} time(s) since the last such line)",
                listener=self._listener,
                max_connections=self._gate.max_connections,
                pauses=self._pauses_since_log,
            )
            self._last_logged_s = now
            self._pauses_since_log = 0
        if self._port.connected and not self._port.disconnecting:
            self._port.stopReading()
            self._accepting = False

    def _resume(self) -> None:
        if not self._accepting and self._port.connected and not self._port.disconnecting:
            self._port.startReading()
            self._accepting = True


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
        handshake_timeout_s: float | None = None,
    ) -> None:
        self._wrapped = wrapped
        self._policy = policy
        self._clock = clock
        self._counters = counters
        self._handshake_timeout_s = handshake_timeout_s
        self._factories: list[ProxyHeaderFactory] = []

    def listen(self, protocolFactory):
        factory = ProxyHeaderFactory(
            protocolFactory, self._policy, self._clock, self._counters, self._handshake_timeout_s
        )
        self._factories.append(factory)

        def cap(port: IListeningPort) -> IListeningPort:
            if hasattr(port, "stopReading") and hasattr(port, "numberAccepts"):
                factory.accept_gate = CappedPort(
                    port,
                    AcceptGate(self._policy.max_connections),
                    self._policy.listener,
                    self._clock,
                    self._counters,
                )
            return port

        return self._wrapped.listen(factory).addCallback(cap)

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
    *,
    handshake_timeout_s: float = 10.0,
) -> IStreamServerEndpoint:
    """
    TCP -> PROXY -> TLS -> HTTP, the handshake held to C{handshake_timeout_s}.
    """
    return TLSListenerEndpoint(
        ProxyHeaderServerEndpoint(
            tcp_endpoint(reactor, address), policy, reactor, counters, handshake_timeout_s
        ),
        tls,
        reactor,
    )


def raise_descriptor_limit() -> int:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit and log it.

    @return: the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite soft limit for descriptors; keep soft.
        target = soft
    else:
        target = hard
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            _log.warn(
                "Cannot raise the descriptor limit from {soft} to {hard}: {error}",
                soft=soft,
                hard=hard,
                error=e,
            )
            target = soft
    _log.info(
        "Descriptor limit (RLIMIT_NOFILE): {limit} (was {soft}, hard limit {hard})",
        limit=target,
        soft=soft,
        hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
    )
    return target


def descriptors_needed(config: Config) -> int:
    """
    The descriptors the enabled listeners may hold at their caps: one per
    client connection, one more per TLS listener connection for the
    upstream connection its request may hold, and L{DESCRIPTOR_RESERVE}.
    """
    needed = DESCRIPTOR_RESERVE
    if config.proxy_listener.enabled:
        needed += 2 * config.proxy_listener.max_connections
    if config.tls_listener.enabled:
        needed += 2 * config.tls_listener.max_connections
    if config.redirect_listener.enabled:
        needed += config.redirect_listener.max_connections
    return needed


def check_descriptor_budget(config: Config, limit: int, source: str) -> None:
    """
    Refuse caps that the descriptor limit cannot hold, so that overload
    always meets a cap, never EMFILE.

    @raise ConfigError: naming the listeners' max_connections keys.
    """
    needed = descriptors_needed(config)
    if needed <= limit:
        return
    keys = [
        f"{name}.max_connections"
        for name in ("proxy_listener", "tls_listener", "redirect_listener")
        if getattr(config, name).enabled
    ]
    raise ConfigError(
        source,
        keys[0] if len(keys) == 1 else "max_connections",
        f"{' + '.join(keys)} need about {needed} file descriptors (two per TLS connection,"
        f" one per redirect connection, {DESCRIPTOR_RESERVE} in reserve), but the descriptor"
        f" limit (RLIMIT_NOFILE) is {limit}: lower them or raise the limit (LimitNOFILE= in"
        " the systemd unit, ulimit -n, --ulimit nofile= for containers)",
    )


def prepare_descriptors(config: Config, source: str) -> int:
    """
    At startup: raise the descriptor limit and check the caps against it.

    @raise ConfigError: if the caps do not fit.
    """
    limit = raise_descriptor_limit()
    check_descriptor_budget(config, limit, source)
    return limit


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
            # twistd has redirected sys.stderr into its log by now.
            sys.__stderr__.write(
                f"quayfront: cannot listen on {self._address} ({self._setting}): {reason}\n"
            )
            raise SystemExit(1)
