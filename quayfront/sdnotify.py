"""
systemd's readiness protocol (C{sd_notify(3)}): one datagram of
C{KEY=VALUE} lines to the C{AF_UNIX} socket named by C{NOTIFY_SOCKET}.

quayfront tells systemd:
  - C{READY=1} once every listener is bound (certificates are loaded before
    the service tree exists), so C{Type=notify} units start their
    dependents only when quayfront accepts connections;
  - C{RELOADING=1} with C{MONOTONIC_USEC=} when certificates are being
    reloaded, then C{READY=1} again (also when the reload failed: the old
    certificates keep serving);
  - C{STOPPING=1} when a drain starts;
  - C{STATUS=} lines for C{systemctl status}: requests in flight, draining;
  - C{WATCHDOG=1} every half of C{WATCHDOG_USEC} when C{WatchdogSec=} is
    set, from the reactor loop, so a wedged loop stops the keep-alives.

Without C{NOTIFY_SOCKET} nothing is sent and nothing is scheduled.  The
protocol is a dozen lines of stdlib socket code; a dependency (C{sdnotify},
C{python3-systemd}) would add nothing but an import (neither handles the
watchdog timing or the reactor integration, which is the part that matters).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Iterable, Mapping

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Seconds between C{STATUS=} refreshes (only sent when the text changed).
STATUS_INTERVAL_S = 5.0


def _monotonic_usec() -> int:
    # CLOCK_MONOTONIC, the clock systemd compares MONOTONIC_USEC with.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """
    Sends notifications to one C{NOTIFY_SOCKET} address.  Never raises:
    systemd not listening must not take the server down.
    """

    _log = Logger()

    def __init__(self, address: str) -> None:
        # "@name" is Linux's abstract namespace: a leading NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """
        A notifier for C{NOTIFY_SOCKET}, or C{None} when it is unset (not
        started by systemd, or C{Type=} is not C{notify}).
        """
        address = environ.get("NOTIFY_SOCKET", "")
        if not address or not (address.startswith("/") or address.startswith("@")):
            return None
        return cls(address)

    def notify(self, **fields: object) -> bool:
        """
        Send C{fields} as C{KEY=VALUE} lines in one datagram.  Keyword names
        are the protocol's keys (C{READY=1}: C{notify(READY=1)}).
        """
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as e:
            # Logged once: a notify socket that went away stays away.
            if not self._failed:
                self._failed = True
                self._log.warn(
                    "cannot notify systemd at {address}: {error}",
                    address=self.address.replace("\0", "@"),
                    error=e.strerror or str(e),
                )
            return False
        return True

    def close(self) -> None:
        self._socket.close()


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Half the watchdog timeout in seconds when C{WATCHDOG_USEC} is set for
    this process (C{WATCHDOG_PID} unset or ours), else C{None}.
    """
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class NotifyService(Service):
    """
    Reports quayfront's state to systemd.  Add it to the service tree last:
    twistd binds every listener in C{privilegedStartService}, before any
    C{startService}, and a parent stops its children in reverse order, so
    this one sees the start last and the stop first.

    @param listening: Deferreds that fire when each listener is bound.
    @param in_flight: returns the number of requests being served.
    """

    _log = Logger()

    def __init__(
        self,
        notifier: Notifier,
        clock: IReactorTime,
        listening: Callable[[], Iterable[Deferred]],
        in_flight: Callable[[], int],
        watchdog_s: float | None = None,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        self._notifier = notifier
        self._clock = clock
        self._listening = listening
        self._in_flight = in_flight
        self._watchdog_s = watchdog_s
        self._monotonic_usec = monotonic_usec
        self._loops: list[LoopingCall] = []
        self._ready = False
        self._stopping = False
        self._drain_phase = ""
        self._last_status = ""

    def startService(self) -> None:
        super().startService()
        if self._watchdog_s is not None:
            self._loop(lambda: self._notifier.notify(WATCHDOG=1), self._watchdog_s)
        gatherResults(list(self._listening()), consumeErrors=True).addCallbacks(
            lambda _: self._on_listening(), self._on_listen_failed
        )

    def _on_listening(self) -> None:
        if self._stopping:
            return
        self._ready = True
        self._notifier.notify(READY=1, STATUS=self.status_text())
        self._last_status = self.status_text()
        self._loop(self._refresh_status, STATUS_INTERVAL_S)

    def _on_listen_failed(self, failure) -> None:
        # The listener already reported it and twistd exits; no READY=1.
        self._notifier.notify(STATUS="failed to listen")

    def _loop(self, function: Callable[[], object], interval_s: float) -> None:
        loop = LoopingCall(function)
        loop.clock = self._clock
        loop.start(interval_s, now=False)
        self._loops.append(loop)

    def status_text(self) -> str:
        in_flight = self._in_flight()
        requests = f"{in_flight} request{'' if in_flight == 1 else 's'} in flight"
        if self._stopping:
            phase = f" ({self._drain_phase})" if self._drain_phase else ""
            return f"draining{phase}: {requests}"
        return f"serving: {requests}"

    def _refresh_status(self) -> None:
        text = self.status_text()
        if text != self._last_status:
            self._last_status = text
            self._notifier.notify(STATUS=text)

    def on_reload(self, event: str) -> None:
        """
        A L{quayfront.tls.CertificateReloader} observer.
        """
        if self._stopping or not self._ready:
            return
        if event == "reloading":
            self._notifier.notify(
                RELOADING=1,
                MONOTONIC_USEC=self._monotonic_usec(),
                STATUS="reloading certificates",
            )
        elif event == "reloaded":
            self._notifier.notify(READY=1, STATUS=self.status_text())
        elif event == "failed":
            self._notifier.notify(
                READY=1,
                STATUS="certificate reload failed (see the log); the previous"
                f" certificates keep serving; {self.status_text()}",
            )

    def on_drain(self, phase: str, in_flight: int) -> None:
        """
        A drain-controller observer: C{phase} is C{"delay"}, C{"closing"},
        C{"finishing"} or C{"done"}.
        """
        self._drain_phase = phase
        first = not self._stopping
        self._stopping = True
        text = self.status_text()
        self._last_status = text
        if first:
            self._notifier.notify(STOPPING=1, STATUS=text)
        else:
            self._notifier.notify(STATUS=text)

    def stopService(self) -> None:
        super().stopService()
        # Without a drain controller to observe, the stop itself is the drain.
        if not self._stopping:
            self.on_drain("", self._in_flight())
        # The watchdog and status loops keep running while the drain lasts;
        # they end with the reactor.


def add_systemd_notify(root: MultiService, reactor, environ: Mapping[str, str] = os.environ) -> None:
    """
    Under systemd (C{NOTIFY_SOCKET} set), report readiness, reloads, the
    drain and the watchdog for the service tree C{root}; otherwise change
    nothing.  Call it once the tree is complete: the service is added last
    (see L{NotifyService}).
    """
    notifier = Notifier.from_environment(environ)
    if notifier is None:
        return
    from quayfront.listeners import ListenerService

    def listener_services(parent) -> list[ListenerService]:
        # The listeners sit under the drain controller, which closes them.
        found = []
        for service in parent:
            if isinstance(service, ListenerService):
                found.append(service)
            elif isinstance(service, MultiService):
                found.extend(listener_services(service))
        return found

    listeners = listener_services(root)
    notify = NotifyService(
        notifier,
        reactor,
        listening=lambda: [s.listening() for s in listeners],
        in_flight=lambda: root.site.in_flight,
        watchdog_s=watchdog_interval_s(environ, os.getpid()),
    )
    root.reloader.observe(notify.on_reload)
    # The drain controller tells of each drain phase; without one,
    # NotifyService reports the stop itself.
    drain = getattr(root, "drain", None)
    if drain is not None and hasattr(drain, "observe"):
        drain.observe(notify.on_drain)
    notify.setServiceParent(root)
