"""
sd_notify: what systemd is told, read from a real AF_UNIX datagram socket,
with the clock in memory.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from quayfront.config import TLSConfig
from quayfront.sdnotify import (
    STATUS_INTERVAL_S,
    Notifier,
    NotifyService,
    add_systemd_notify,
    watchdog_interval_s,
)
from quayfront.tls import CertificateReloader, ServerTLS, load_store
from tests.unit.certs import make_certificate, write_pair


class Systemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def messages(self) -> list[dict[str, str]]:
        """Every datagram received so far, each as its KEY=VALUE fields."""
        out = []
        for _ in range(1000):
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        raise AssertionError("more than 1000 datagrams")


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.setblocking(False)
    yield Systemd(sock, path)
    sock.close()


def make_service(systemd: Systemd, listening=None, watchdog_s=None, in_flight=lambda: 0):
    clock = MemoryReactorClock()
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": systemd.address})
    service = NotifyService(
        notifier,
        clock,
        listening=listening or (lambda: [succeed(None)]),
        in_flight=in_flight,
        watchdog_s=watchdog_s,
        monotonic_usec=lambda: 123456789,
    )
    return service, clock


def test_no_notify_socket_means_no_notifier() -> None:
    """Without NOTIFY_SOCKET (or with a value systemd never sets) nothing is sent."""
    assert Notifier.from_environment({}) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": ""}) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"}) is None


def test_no_notify_socket_adds_no_service() -> None:
    """The service tree is unchanged when NOTIFY_SOCKET is unset."""
    root = MultiService()
    add_systemd_notify(root, MemoryReactorClock(), environ={})
    assert list(root) == []


def test_wired_to_reloader_and_drain_controller(systemd: Systemd) -> None:
    """With NOTIFY_SOCKET, the service observes the reloader and the drain controller and comes last."""
    observed = {}

    class Observable:
        def __init__(self, name: str) -> None:
            self.name = name

        def observe(self, callback) -> None:
            observed[self.name] = callback

    class Site:
        in_flight = 4

    root = MultiService()
    root.site, root.reloader, root.drain = Site(), Observable("reloader"), Observable("drain")
    add_systemd_notify(root, MemoryReactorClock(), environ={"NOTIFY_SOCKET": systemd.address})
    [notify] = list(root)
    assert isinstance(notify, NotifyService)
    assert observed == {"reloader": notify.on_reload, "drain": notify.on_drain}
    root.startService()
    assert systemd.messages() == [{"READY": "1", "STATUS": "serving: 4 requests in flight"}]
    observed["drain"]("delay", 4)
    assert systemd.messages() == [{"STOPPING": "1", "STATUS": "draining (delay): 4 requests in flight"}]


def test_abstract_namespace_socket() -> None:
    """'@name' is sent to the abstract socket of that name."""
    name = f"quayfront-test-{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify(READY=1, STATUS="up")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        receiver.close()


def test_a_missing_socket_does_not_raise(tmp_path: Path) -> None:
    """systemd not listening is reported, never raised."""
    notifier = Notifier(str(tmp_path / "nobody"))
    assert not notifier.notify(READY=1)
    assert not notifier.notify(READY=1)


def test_ready_only_once_every_listener_is_bound(systemd: Systemd) -> None:
    """READY=1 waits for the last listener; the status line says what is served."""
    first, second = Deferred(), Deferred()
    service, _ = make_service(systemd, listening=lambda: [first, second])
    service.startService()
    first.callback(None)
    assert systemd.messages() == []
    second.callback(None)
    assert systemd.messages() == [{"READY": "1", "STATUS": "serving: 0 requests in flight"}]


def test_no_ready_when_a_listener_fails(systemd: Systemd) -> None:
    """A listener that cannot bind means no READY=1."""
    failing = Deferred()
    service, _ = make_service(systemd, listening=lambda: [succeed(None), failing])
    service.startService()
    failing.errback(OSError("address in use"))
    assert [m for m in systemd.messages() if "READY" in m] == []


def test_status_follows_requests_in_flight(systemd: Systemd) -> None:
    """STATUS= is refreshed every few seconds, only when it changed."""
    count = [0]
    service, clock = make_service(systemd, in_flight=lambda: count[0])
    service.startService()
    systemd.messages()
    clock.advance(STATUS_INTERVAL_S)
    assert systemd.messages() == []
    count[0] = 3
    clock.advance(STATUS_INTERVAL_S)
    assert systemd.messages() == [{"STATUS": "serving: 3 requests in flight"}]
    count[0] = 1
    clock.advance(STATUS_INTERVAL_S)
    assert systemd.messages() == [{"STATUS": "serving: 1 request in flight"}]


def test_reload_sends_reloading_then_ready(tmp_path: Path, systemd: Systemd) -> None:
    """A certificate reload is RELOADING=1 with MONOTONIC_USEC, then READY=1, also when it fails."""
    cert_path, key_path = write_pair(tmp_path, *make_certificate(("old.example",)))
    config = TLSConfig(cert=cert_path, key=key_path)
    reloader = CertificateReloader(ServerTLS(load_store(config, "test")), config, "test", None)
    service, _ = make_service(systemd)
    reloader.observe(service.on_reload)
    service.startService()
    systemd.messages()

    write_pair(tmp_path, *make_certificate(("new.example",)))
    assert reloader.reload("SIGHUP")
    assert systemd.messages() == [
        {"RELOADING": "1", "MONOTONIC_USEC": "123456789", "STATUS": "reloading certificates"},
        {"READY": "1", "STATUS": "serving: 0 requests in flight"},
    ]

    Path(key_path).write_text("not a key")
    assert not reloader.reload("SIGHUP")
    reloading, ready = systemd.messages()
    assert reloading["RELOADING"] == "1"
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("certificate reload failed")


def test_reloader_observers_see_each_event() -> None:
    """observe() callbacks get reloading, then reloaded or failed."""
    events: list[str] = []

    class Reloader(CertificateReloader):
        def __init__(self) -> None:
            self._observers = []
            self.outcome = True

        def _reload(self, why: str) -> bool:
            return self.outcome

    reloader = Reloader()
    reloader.observe(events.append)
    reloader.reload("test")
    reloader.outcome = False
    reloader.reload("test")
    assert events == ["reloading", "reloaded", "reloading", "failed"]


def test_drain_phases_send_stopping_once_then_status(systemd: Systemd) -> None:
    """The first drain phase sends STOPPING=1; later phases only update STATUS."""
    service, _ = make_service(systemd, in_flight=lambda: 2)
    service.startService()
    systemd.messages()
    service.on_drain("delay", 2)
    service.on_drain("closing", 2)
    service.stopService()
    assert systemd.messages() == [
        {"STOPPING": "1", "STATUS": "draining (delay): 2 requests in flight"},
        {"STATUS": "draining (closing): 2 requests in flight"},
    ]


def test_stop_without_drain_controller_sends_stopping(systemd: Systemd) -> None:
    """Without drain phases, stopping the service is the drain."""
    service, _ = make_service(systemd, in_flight=lambda: 1)
    service.startService()
    systemd.messages()
    service.stopService()
    assert systemd.messages() == [{"STOPPING": "1", "STATUS": "draining: 1 request in flight"}]


def test_no_reload_notifications_while_stopping(systemd: Systemd) -> None:
    """A reload during the drain does not claim READY=1 again."""
    service, _ = make_service(systemd)
    service.startService()
    service.stopService()
    systemd.messages()
    service.on_reload("reloading")
    service.on_reload("reloaded")
    assert systemd.messages() == []


def test_watchdog_every_half_interval(systemd: Systemd) -> None:
    """WATCHDOG=1 goes out every half of WATCHDOG_USEC, also while draining."""
    assert watchdog_interval_s({"WATCHDOG_USEC": "20000000"}, 42) == 10.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "42"}, 42) == 10.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval_s({}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}, 42) is None

    service, clock = make_service(systemd, watchdog_s=10.0)
    service.startService()
    systemd.messages()
    clock.advance(9)
    assert systemd.messages() == []
    clock.advance(1)
    assert systemd.messages() == [{"WATCHDOG": "1"}]
    service.stopService()
    systemd.messages()
    clock.advance(10)
    assert {"WATCHDOG": "1"} in systemd.messages()


def test_no_watchdog_without_watchdog_usec(systemd: Systemd) -> None:
    """Without WatchdogSec= nothing is scheduled for it."""
    service, clock = make_service(systemd)
    service.startService()
    systemd.messages()
    for _ in range(10):
        clock.advance(STATUS_INTERVAL_S)
    assert systemd.messages() == []
