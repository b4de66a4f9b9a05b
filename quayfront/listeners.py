"""
The listener chain, composed in code: TCP -> PROXY -> TLS -> HTTP.

Twisted's C{haproxy:ssl:} endpoint string composes the other way round
(TLS outside the PROXY parser, so the header would have to arrive inside the
encrypted stream); here the PROXY layer wraps the TCP endpoint and TLS wraps
that.
"""

from __future__ import annotations

import os
import resource
import socket
from typing import Mapping

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from quayfront.config import Config, ConfigError, ListenAddress
from quayfront.metrics import Counters
from quayfront.proxylayer import ProxyHeaderFactory, ProxyHeaderPolicy
from quayfront.twistedadapter import BatchedReceiveTLS

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
    reactor,
    address: ListenAddress,
    policy: ProxyHeaderPolicy,
    counters: Counters,
    socket_endpoint: IStreamServerEndpoint | None = None,
) -> IStreamServerEndpoint:
    """
    TCP -> PROXY -> HTTP, without TLS (the redirect listener).

    @param socket_endpoint: an inherited socket to use instead of binding
        C{address} (L{InheritedSockets.endpoint}).
    """
    tcp = socket_endpoint or tcp_endpoint(reactor, address)
    return ProxyHeaderServerEndpoint(tcp, policy, reactor, counters)


def listener_endpoint(
    reactor,
    address: ListenAddress,
    policy: ProxyHeaderPolicy,
    tls: IOpenSSLServerConnectionCreator,
    counters: Counters,
    socket_endpoint: IStreamServerEndpoint | None = None,
    *,
    handshake_timeout_s: float = 10.0,
) -> IStreamServerEndpoint:
    """
    TCP -> PROXY -> TLS -> HTTP, the handshake held to C{handshake_timeout_s}.

    @param socket_endpoint: an inherited socket to use instead of binding
        C{address} (L{InheritedSockets.endpoint}).
    """
    tcp = socket_endpoint or tcp_endpoint(reactor, address)
    return TLSListenerEndpoint(
        ProxyHeaderServerEndpoint(tcp, policy, reactor, counters, handshake_timeout_s),
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
        keys[0],
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


#: The names quayfront gives its listeners, which are also the
#: C{FileDescriptorName=} of the systemd socket units that pass them.
LISTENER_NAMES = ("proxy", "tls", "redirect", "metrics")


class SocketActivationError(Exception):
    """
    The sockets systemd passed do not match the configured listeners.
    """


def initial_environment() -> Mapping[str, str]:
    """
    The environment this process was started with.

    Importing C{twisted.internet.endpoints} deletes C{LISTEN_PID} and
    C{LISTEN_FDS} from C{os.environ} (its C{systemd:} endpoint parser reads
    them once, at import, before twistd loads any plugin).  The kernel keeps
    the environment the process was executed with in C{/proc/self/environ}
    (proc(5)), which unsetenv does not touch; socket activation is Linux-only
    anyway.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return os.environ
    environ = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            environ[os.fsdecode(key)] = os.fsdecode(value)
    return environ


class InheritedSockets:
    """
    Listening sockets passed by systemd socket activation (C{sd_listen_fds(3)}):
    C{LISTEN_PID} names this process, C{LISTEN_FDS} counts the descriptors
    from 3 up and C{LISTEN_FDNAMES} names them, colon-separated.

    quayfront adopts each named socket instead of binding, and wraps it in
    the chain of the listener of that name.  Twisted's own
    C{twisted.python.systemd.ListenFDs} drops every descriptor without a word
    when the names and the count disagree; here that is a startup error.
    """

    def __init__(self, reactor, descriptors: Mapping[str, int]) -> None:
        self._reactor = reactor
        self.descriptors = dict(descriptors)
        self._taken: set[str] = set()

    @classmethod
    def from_environment(
        cls, reactor, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> InheritedSockets | None:
        """
        The sockets passed to this process, or C{None} when there are none
        (C{LISTEN_PID} unset or another process's: quayfront binds).

        @param environ: by default, the environment this process started
            with (L{initial_environment}).

        @raise SocketActivationError: when the variables are inconsistent or
            a name is unknown or repeated.
        """
        environ = initial_environment() if environ is None else environ
        pid = os.getpid() if pid is None else pid
        if environ.get("LISTEN_PID", "") != str(pid):
            return None
        count_text = environ.get("LISTEN_FDS", "")
        if not count_text.isdigit():
            raise SocketActivationError(f"LISTEN_FDS={count_text!r} is not a count")
        count = int(count_text)
        names = environ.get("LISTEN_FDNAMES", "").split(":") if count else []
        if len(names) != count:
            raise SocketActivationError(
                f"LISTEN_FDS={count} but LISTEN_FDNAMES names {len(names)}"
                f" ({environ.get('LISTEN_FDNAMES', '')!r}): give every socket unit a"
                f" FileDescriptorName= out of {', '.join(LISTENER_NAMES)}"
            )
        descriptors: dict[str, int] = {}
        for offset, name in enumerate(names):
            if name not in LISTENER_NAMES:
                raise SocketActivationError(
                    f"passed a socket named {name!r}; quayfront knows"
                    f" {', '.join(LISTENER_NAMES)} (FileDescriptorName= of the socket unit)"
                )
            if name in descriptors:
                raise SocketActivationError(f"passed two sockets named {name!r}")
            descriptors[name] = 3 + offset
        return cls(reactor, descriptors)

    def endpoint(self, name: str, setting: str) -> IStreamServerEndpoint:
        """
        An endpoint adopting the socket named C{name}, for the listener
        configured at C{setting}.

        @raise SocketActivationError: no socket of that name was passed, or it
            is not a listening TCP socket.
        """
        if name not in self.descriptors:
            raise SocketActivationError(
                f"{setting} is enabled but no socket named {name!r} was passed"
                f" (passed: {', '.join(self.descriptors) or 'none'}); add a socket unit with"
                f" FileDescriptorName={name}, or disable the listener"
            )
        fd = self.descriptors[name]
        try:
            # fileno= only inspects the descriptor; detach() leaves it open.
            probe = socket.socket(fileno=fd)
        except OSError as e:
            raise SocketActivationError(f"socket {name!r} (fd {fd}): {e.strerror}") from None
        try:
            family, kind = probe.family, probe.type
            accepting = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        finally:
            probe.detach()
        if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
            raise SocketActivationError(f"socket {name!r} (fd {fd}) is not a TCP socket")
        if not accepting:
            raise SocketActivationError(f"socket {name!r} (fd {fd}) is not listening")
        self._taken.add(name)
        return AdoptedStreamServerEndpoint(self._reactor, fd, family)

    def check_all_taken(self) -> None:
        """
        @raise SocketActivationError: a socket was passed for a listener that
            is not enabled.
        """
        unused = [name for name in self.descriptors if name not in self._taken]
        if unused:
            raise SocketActivationError(
                f"passed a socket named {unused[0]!r} but that listener is not enabled"
                " in the configuration"
            )


@implementer(IStreamServerEndpoint)
class TLSListenerEndpoint:
    """
    TLS around the PROXY layer, keeping the PROXY layer reachable for its
    connection count.
    """

    def __init__(self, proxy_layer: ProxyHeaderServerEndpoint, tls, reactor) -> None:
        self.proxy_layer = proxy_layer
        self._tls = tls
        self._clock = reactor

    def listen(self, protocolFactory):
        return self.proxy_layer.listen(
            UnbufferedTLSFactory(self._tls, False, protocolFactory, clock=self._clock)
        )


class UnbufferedTLSFactory(TLSMemoryBIOFactory):
    """
    TLS whose writes are encrypted and sent when made.  Twisted's default
    (C{BufferingTLSTransport}) copies every write and sends them together
    on the next reactor turn, which saves records for protocols that write
    in small pieces; quayfront's channel writes a response head together
    with its first body bytes and bodies in whole upstream reads, so the
    buffering only cost a timer, a copy and a reactor turn per response.
    The records one read brings are handed on in one call
    (L{BatchedReceiveTLS}).
    """

    protocol = BatchedReceiveTLS

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

    def listening(self) -> Deferred:
        """
        Fires with C{None} once the port is bound (or adopted); call after
        C{privilegedStartService}.
        """
        result: Deferred = Deferred()

        def relay(port_or_failure):
            if isinstance(port_or_failure, Failure):
                result.errback(port_or_failure)
            else:
                result.callback(None)
            return port_or_failure

        self._waitingForPort.addBoth(relay)
        return result

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
