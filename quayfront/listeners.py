"""
The listener chain, composed in code: TCP -> PROXY -> TLS -> HTTP.

Twisted's C{haproxy:ssl:} endpoint string composes the other way round
(TLS outside the PROXY parser, so the header would have to arrive inside the
encrypted stream); here the PROXY layer wraps the TCP endpoint and TLS wraps
that.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    wrapServerTLS,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.python.failure import Failure
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
) -> IStreamServerEndpoint:
    tcp = socket_endpoint or tcp_endpoint(reactor, address)
    return TLSListenerEndpoint(
        ProxyHeaderServerEndpoint(tcp, policy, reactor, counters),
        tls,
        reactor,
    )


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
