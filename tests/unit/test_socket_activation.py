"""
systemd socket activation: named inherited sockets are adopted, wrapped in
their listener's chain, and every mismatch is a startup error.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Iterator

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site
from twisted.web.resource import Resource

from quayfront.config import TLSConfig
from quayfront.listeners import (
    InheritedSockets,
    SocketActivationError,
    listener_endpoint,
    plain_endpoint,
)
from quayfront.metrics import Counters
from quayfront.proxylayer import ProxyHeaderFactory, ProxyHeaderPolicy
from quayfront.tls import load_server_tls
from tests.unit.certs import make_certificate, write_pair

PID = 4242


def environ(names: str, count: int | None = None) -> dict[str, str]:
    n = len(names.split(":")) if count is None else count
    return {"LISTEN_PID": str(PID), "LISTEN_FDS": str(n), "LISTEN_FDNAMES": names}


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


def handed_over(sock: socket.socket) -> None:
    """Assert the descriptor of C{sock} was closed by its new owner; forget it."""
    fd = sock.detach()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_no_sockets_when_not_activated() -> None:
    """Without LISTEN_PID, or with another process's, quayfront binds itself."""
    reactor = MemoryReactorClock()
    assert InheritedSockets.from_environment(reactor, {}, pid=PID) is None
    other = {**environ("proxy:tls"), "LISTEN_PID": "1"}
    assert InheritedSockets.from_environment(reactor, other, pid=PID) is None


def test_named_descriptors_count_from_three() -> None:
    """The n-th name belongs to descriptor 3 + n."""
    inherited = InheritedSockets.from_environment(
        MemoryReactorClock(), environ("tls:proxy:metrics"), pid=PID
    )
    assert inherited.descriptors == {"tls": 3, "proxy": 4, "metrics": 5}


@pytest.mark.parametrize(
    "env, reason",
    [
        (environ("proxy:nonsense"), "passed a socket named 'nonsense'; quayfront knows proxy, tls"),
        (environ("proxy:proxy"), "two sockets named 'proxy'"),
        (environ("proxy", count=2), "LISTEN_FDS=2 but LISTEN_FDNAMES names 1"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2"}, "LISTEN_FDS=2 but LISTEN_FDNAMES names 1"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "x"}, "LISTEN_FDS='x' is not a count"),
    ],
)
def test_inconsistent_environment_is_an_error(env: dict[str, str], reason: str) -> None:
    """Unknown or repeated names, or names that do not match the count, stop startup."""
    with pytest.raises(SocketActivationError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        InheritedSockets.from_environment(MemoryReactorClock(), env, pid=PID)


def test_configured_listener_without_socket_is_an_error() -> None:
    """An enabled listener that systemd passed no socket for names the setting and the fix."""
    inherited = InheritedSockets(MemoryReactorClock(), {"proxy": 3})
    with pytest.raises(SocketActivationError) as e:
        inherited.endpoint("tls", "tls_listener.address")
    assert str(e.value) == (
        "tls_listener.address is enabled but no socket named 'tls' was passed (passed: proxy);"
        " add a socket unit with FileDescriptorName=tls, or disable the listener"
    )


def test_socket_for_a_disabled_listener_is_an_error(listening_socket: socket.socket) -> None:
    """A socket passed for a listener the configuration does not enable is not silently left open."""
    inherited = InheritedSockets(
        MemoryReactorClock(), {"proxy": listening_socket.fileno(), "redirect": 99}
    )
    inherited.endpoint("proxy", "proxy_listener.address")
    with pytest.raises(SocketActivationError, match="'redirect' but that listener is not enabled"):
        inherited.check_all_taken()


def test_a_socket_that_is_not_listening_is_an_error() -> None:
    """A passed descriptor must be a listening TCP socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unbound:
        inherited = InheritedSockets(MemoryReactorClock(), {"proxy": unbound.fileno()})
        with pytest.raises(SocketActivationError, match="is not listening"):
            inherited.endpoint("proxy", "proxy_listener.address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        inherited = InheritedSockets(MemoryReactorClock(), {"proxy": unix.fileno()})
        with pytest.raises(SocketActivationError, match="is not a TCP socket"):
            inherited.endpoint("proxy", "proxy_listener.address")


def test_adopted_socket_gets_the_proxy_tls_http_chain(
    tmp_path: Path, listening_socket: socket.socket
) -> None:
    """The 'proxy' socket is adopted, not bound, and its connections go PROXY -> TLS -> HTTP."""
    reactor = MemoryReactorClock()
    fd = listening_socket.fileno()
    inherited = InheritedSockets(reactor, {"proxy": fd})
    cert_path, key_path = write_pair(tmp_path, *make_certificate())
    tls = load_server_tls(TLSConfig(cert=cert_path, key=key_path), "test")
    policy = ProxyHeaderPolicy(
        listener="proxy", required=True, trusted=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    site = Site(Resource())
    endpoint = listener_endpoint(
        reactor,
        None,
        policy,
        tls,
        Counters(),
        inherited.endpoint("proxy", "proxy_listener.address"),
    )
    endpoint.listen(site)
    # The endpoint closed the inherited descriptor once the reactor had its copy.
    handed_over(listening_socket)
    assert reactor.tcpServers == []
    [(adopted_fd, family, factory)] = reactor.adoptedPorts
    assert (adopted_fd, family) == (fd, socket.AF_INET)
    # Outermost first: the PROXY layer reads the cleartext header, then TLS.
    assert isinstance(factory, ProxyHeaderFactory)
    assert isinstance(factory.wrappedFactory, TLSMemoryBIOFactory)
    assert factory.wrappedFactory.wrappedFactory is site


def test_adopted_plain_socket_has_no_tls(listening_socket: socket.socket) -> None:
    """The 'redirect' socket gets PROXY -> HTTP, without TLS."""
    reactor = MemoryReactorClock()
    inherited = InheritedSockets(reactor, {"redirect": listening_socket.fileno()})
    site = Site(Resource())
    plain_endpoint(
        reactor,
        None,
        ProxyHeaderPolicy("redirect", required=False),
        Counters(),
        inherited.endpoint("redirect", "redirect_listener.address"),
    ).listen(site)
    handed_over(listening_socket)
    [(_, _, factory)] = reactor.adoptedPorts
    assert isinstance(factory, ProxyHeaderFactory)
    assert factory.wrappedFactory is site


def test_initial_environment_survives_twisted_consuming_it() -> None:
    """LISTEN_* deleted from os.environ (as Twisted's endpoints module does on import) are still found."""
    import subprocess
    import sys

    code = (
        "import os, twisted.internet.endpoints\n"
        "from quayfront.listeners import initial_environment\n"
        "print('LISTEN_PID' in os.environ, initial_environment().get('LISTEN_PID'))\n"
    )
    env = {**os.environ, "LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    # Only the child's own pid makes Twisted consume them: pass it through exec.
    done = subprocess.run(
        [sys.executable, "-c", f"import os; os.environ['LISTEN_PID'] = str(os.getpid()); "
         f"os.execv({sys.executable!r}, [{sys.executable!r}, '-c', {code!r}])"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    pid_line = done.stdout.split()
    assert done.returncode == 0, done.stderr
    assert pid_line[0] == "False", "Twisted no longer consumes LISTEN_PID; simplify initial_environment"
    assert pid_line[1].isdigit()
