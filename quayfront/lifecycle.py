"""
The process lifecycle: a drain in the order load balancers need, signals,
log reopening and config re-reading.

On SIGTERM (or SIGINT) the drain runs four phases, each announced to
observers and logged in one C{draining: ...} line:

  - C{delay}: health checks answer 503 on every listener while quayfront
    keeps accepting and serving, for C{http.drain_delay_s}, so load
    balancers see it go down and stop sending to it;
  - C{closing}: the listeners close (a second SIGTERM or SIGINT starts
    this phase at once);
  - C{finishing}: requests in flight get up to C{http.drain_timeout_s};
    a request counts as finished once its connection has closed, i.e. its
    last byte has left quayfront (TLS and socket buffers flushed); the
    exchanges still under way L{cut_off_lead_s} before the end are cut off
    by their own drain deadline (both connections aborted, logged as
    C{drain-timeout}) while the access log is still open;
  - C{done}: the access log closes and the process exits 0.

twistd stops every service of the application at once, so the listeners and
the access log are children of the L{DrainController}, which stops them in
that order itself.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import signal
import socket
import sys
from typing import Any, Callable

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from quayfront.config import ConfigError


class Phase(str, enum.Enum):
    """
    The drain's phases, in order; observers get their string values.
    """

    DELAY = "delay"
    CLOSING = "closing"
    FINISHING = "finishing"
    DONE = "done"


PHASES = tuple(phase.value for phase in Phase)

# Each phase follows exactly one other; anything else is a bug.
_NEXT_PHASE: dict[Phase | None, Phase] = {
    None: Phase.DELAY,
    Phase.DELAY: Phase.CLOSING,
    Phase.CLOSING: Phase.FINISHING,
    Phase.FINISHING: Phase.DONE,
}

DrainObserver = Callable[[str, int], None]

#: How long before the end of a drain the exchanges still under way are cut
#: off (at most a tenth of the drain's timeout).
CUT_OFF_LEAD_S = 1.0


def cut_off_lead_s(timeout_s: float) -> float:
    """
    How long before the end of a drain of C{timeout_s} the exchanges still
    under way are cut off: time for their aborted connections to close and
    their lines to be logged.
    """
    return min(CUT_OFF_LEAD_S, timeout_s / 10)


class DrainController(MultiService):
    """
    Owns the listener services (closed in phase C{closing}) and the services
    that must outlive the drain (the access log, metrics: stopped at
    C{done}).

    @ivar phase: C{None} until the drain starts, then one of L{PHASES}.
    """

    _log = Logger()

    def __init__(self, site, clock: IReactorTime, delay_s: float, timeout_s: float) -> None:
        super().__init__()
        self._site = site
        self._clock = clock
        self._delay_s = delay_s
        self._timeout_s = timeout_s
        self._listeners: list[IService] = []
        self._observers: list[DrainObserver] = []
        self._delay_call = None
        self._stopped: Deferred | None = None
        self.phase: Phase | None = None

    def set_delay(self, delay_s: float) -> None:
        self._delay_s = delay_s

    def set_timeout(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    def add_listener(self, listener: IService) -> None:
        """
        A service that accepts connections: closed in phase C{closing}.
        """
        listener.setServiceParent(self)
        self._listeners.append(listener)

    def observe(self, callback: DrainObserver) -> None:
        """
        Call C{callback(phase, in_flight)} as each phase starts.
        """
        self._observers.append(callback)

    def _enter(self, phase: Phase, message: str, **fields: Any) -> None:
        if _NEXT_PHASE.get(self.phase) is not phase:
            raise RuntimeError(f"drain: phase {phase.value} cannot follow {self.phase}")
        self.phase = phase
        in_flight = self._site.in_flight
        self._log.info(
            "draining: " + message,
            in_flight=in_flight,
            connections=len(self._site.channels),
            **fields,
        )
        for callback in list(self._observers):
            try:
                callback(phase.value, in_flight)
            except Exception:
                self._log.failure("drain observer failed in phase {phase}", phase=phase.value)

    def stopService(self) -> Deferred:
        # Not MultiService.stopService: that would stop every child at once.
        Service.stopService(self)
        self._stopped = stopped = Deferred()
        self._site.drain()
        self._enter(
            Phase.DELAY,
            "health checks answer 503; still accepting for {delay_s}s"
            " ({in_flight} requests in flight, {connections} connections open;"
            " a second SIGTERM or SIGINT skips the delay)",
            delay_s=self._delay_s,
        )
        if self._delay_s > 0:
            self._delay_call = self._clock.callLater(self._delay_s, self._close_listeners)
        else:
            self._close_listeners()
        return stopped

    def skip_delay(self) -> None:
        """
        End the delay phase now (a second SIGTERM or SIGINT).
        """
        if self.phase is Phase.DELAY and self._delay_call is not None and self._delay_call.active():
            self._delay_call.cancel()
            self._log.info("draining: delay skipped by a second signal")
            self._close_listeners()

    def _close_listeners(self) -> None:
        self._delay_call = None
        listeners = [listener for listener in self._listeners if listener.running]
        self._enter(
            Phase.CLOSING,
            "closing {count} listeners ({in_flight} requests in flight,"
            " {connections} connections open)",
            count=len(listeners),
        )
        closed = [maybeDeferred(listener.stopService) for listener in listeners]
        DeferredList(closed, consumeErrors=True).addCallback(lambda _: self._finish())

    def _finish(self) -> None:
        idle = self._site.close_idle_connections()
        self._enter(
            Phase.FINISHING,
            "waiting up to {timeout_s}s for {in_flight} requests in flight and"
            " {connections} connections ({idle} idle ones closing)",
            timeout_s=self._timeout_s,
            idle=idle,
        )
        finished = self._site.drain()
        if not finished.called:
            # The exchanges still under way by then are cut off a little
            # before the drain's end, each by its own deadline, so that
            # their aborts and access-log lines are written before the
            # access log closes.
            self._site.cut_off_exchanges_in(self._timeout_s - cut_off_lead_s(self._timeout_s))
            finished.addTimeout(self._timeout_s, self._clock)
        finished.addBoth(self._finished)

    def _finished(self, result: object) -> None:
        if isinstance(result, Failure):
            self._log.warn(
                "draining: timeout after {timeout_s}s: cutting off {in_flight} requests"
                " in flight and {connections} connections",
                timeout_s=self._timeout_s,
                in_flight=self._site.in_flight,
                connections=len(self._site.channels),
            )
        others = [s for s in self if s not in self._listeners and s.running]
        stopped = [maybeDeferred(s.stopService) for s in reversed(others)]
        DeferredList(stopped, consumeErrors=True).addCallback(lambda _: self._done())

    def _done(self) -> None:
        self._enter(
            Phase.DONE,
            "done ({in_flight} requests in flight, {connections} connections open)",
        )
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)


class StopSignals:
    """
    SIGTERM and SIGINT: the first stops the reactor (which starts the
    drain), a later one skips the drain's delay.  Unlike the reactor's own
    handlers these leave no exit signal behind, so a drained quayfront
    exits 0.
    """

    _log = Logger()

    def __init__(self, reactor, drain: DrainController) -> None:
        self._reactor = reactor
        self._drain = drain
        self._received = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Signal handlers run between any two bytecodes; hand the work to
        # the reactor loop.
        self._reactor.callFromThread(self.received, signal.Signals(signum).name)

    def received(self, name: str) -> None:
        self._received += 1
        if self._received == 1:
            self._log.info("received {signal}: draining", signal=name)
            self._reactor.stop()
        else:
            self._log.info("received {signal} again", signal=name)
            self._drain.skip_delay()


def chain_signal(reactor, signum: int, handler: Callable[[], None]) -> None:
    """
    Make C{signum} call C{handler} in the reactor loop after whatever
    handler was installed before (twistd's log rotation on SIGUSR1, the
    certificate reload on SIGHUP), which keeps working.
    """
    previous = signal.getsignal(signum)

    def on_signal(number: int, frame: object) -> None:
        if callable(previous):
            previous(number, frame)
        reactor.callFromThread(handler)

    signal.signal(signum, on_signal)


def flatten(config: object, prefix: str = "") -> dict[str, object]:
    """
    Dotted key -> value for every setting of a config dataclass.
    """
    values: dict[str, object] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            values.update(flatten(value, key + "."))
        elif isinstance(value, dict) and value and all(
            dataclasses.is_dataclass(v) for v in value.values()
        ):
            for name, section in value.items():
                values.update(flatten(section, f"{key}.{name}."))
            values.setdefault(key, tuple(sorted(value)))
        else:
            values[key] = value
    return values


def changed_keys(running: object, edited: object) -> list[str]:
    """
    The dotted keys whose values differ between two configs.
    """
    before, after = flatten(running), flatten(edited)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


class Reopener(Service):
    """
    SIGUSR1 and SIGHUP reopen the access log (as nginx does on SIGUSR1);
    SIGHUP also reads the configuration again, applies the edited keys it
    can (those in C{live}: key -> function taking the new value) and says
    plainly which take effect only after a restart (certificate files are
    reloaded by the certificate reloader on the same signal).
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        access_log,
        running_config,
        load: Callable[[], object] | None,
        live: dict[str, Callable[[Any], None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._access_log = access_log
        self._running_config = running_config
        self._load = load
        self._live = live or {}

    def startService(self) -> None:
        super().startService()
        chain_signal(self._reactor, signal.SIGUSR1, lambda: self._access_log.reopen("SIGUSR1"))
        chain_signal(self._reactor, signal.SIGHUP, self.on_sighup)

    def on_sighup(self) -> None:
        self._access_log.reopen("SIGHUP")
        if self._load is None:
            return
        try:
            edited = self._load()
        except Exception as e:  # ConfigError: the same line as at startup
            self._log.error(
                "SIGHUP: configuration not re-read, the running one stays: {error}", error=str(e)
            )
            return
        changed = changed_keys(self._running_config, edited)
        if not changed:
            self._log.info("SIGHUP: configuration unchanged")
            return
        values = flatten(edited)
        applied = [key for key in changed if key in self._live]
        for key in applied:
            self._live[key](values[key])
        if applied:
            self._log.info("SIGHUP: applied {keys}", keys=", ".join(applied))
        restart = [key for key in changed if key not in self._live]
        if restart:
            self._log.warn(
                "SIGHUP: these edited keys take effect only after a restart: {keys}"
                " (certificate files and the access log are reopened now)",
                keys=", ".join(restart),
            )
        # What now runs: applied keys take their new values, the others
        # stay as they were (and are named again on the next SIGHUP).
        self._running_config = _with_values(
            self._running_config, {key: values[key] for key in applied}
        )


def _with_values(config: Any, values: dict[str, object]) -> Any:
    """
    C{config} with the dotted keys of C{values} replaced (sections only).
    """
    for key, value in values.items():
        section_name, _, name = key.partition(".")
        section = getattr(config, section_name)
        config = dataclasses.replace(
            config, **{section_name: dataclasses.replace(section, **{name: value})}
        )
    return config


class Root(MultiService):
    """
    The application's root service.  A L{ConfigError} while it starts (a
    port in use, a log file that cannot be opened) goes to
    C{on_startup_error} (by default it is raised), after which nothing is
    left running; once listening, each listener's address and role is
    logged in one line.

    @ivar listening: C{(key, address, role)} of each listener, for the log.
    """

    _log = Logger(namespace="quayfront")

    def __init__(self) -> None:
        super().__init__()
        self.listening: list[tuple[str, object, str]] = []
        self.on_startup_error: Callable[[Exception], None] | None = None
        self.on_started: Callable[[], None] | None = None

    def _failed(self, error: Exception) -> None:
        if self.on_startup_error is None:
            raise error
        self.on_startup_error(error)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ConfigError as e:
            self._failed(e)
            return
        for key, address, role in self.listening:
            self._log.info("listening on {address}: {role} ({key})", address=str(address),
                           role=role, key=key)

    def startService(self) -> None:
        try:
            super().startService()
        except ConfigError as e:
            self._failed(e)
            return
        except OSError as e:  # the access log, opened as the unprivileged user
            self._failed(
                ConfigError("-", "access_log.path", f"cannot open: {e.strerror}")
            )
            return
        if self.on_started is not None:
            self.on_started()


class StartupFailure:
    """
    Reports an error found after twistd has set up the process (port taken
    since the check, log path) in the same single line as any other startup
    error, removes the pid file and exits non-zero.

    Daemonised, standard error is C{/dev/null}: the line goes to the
    terminal that started twistd through C{terminal_fd} (kept before the
    fork), and twistd's waiting parent is told through its status pipe, so
    it exits at once (with status 1) instead of waiting forever.
    """

    _log = Logger(namespace="quayfront")

    def __init__(self, describe: Callable[[Exception], str], twistd, terminal_fd: int | None,
                 exit_status: int) -> None:
        self._describe = describe
        self._twistd = twistd
        self._terminal_fd = terminal_fd
        self._exit_status = exit_status

    def started(self) -> None:
        """
        Startup is over: let go of the terminal (a caller reading it through
        a pipe sees its end).
        """
        if self._terminal_fd is not None:
            os.close(self._terminal_fd)
            self._terminal_fd = None

    def __call__(self, error: Exception) -> None:

        line = f"quayfront: {self._describe(error)}\n"
        self._log.error("{line}", line=line.rstrip("\n"))
        pidfile = self._twistd.get("pidfile") if self._twistd is not None else None
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        status_pipe = self._twistd.get("statusPipe") if self._twistd is not None else None
        if self._terminal_fd is None or status_pipe is None:
            # In the foreground twistd has redirected sys.stderr into its log.
            sys.__stderr__.write(line)
            sys.__stderr__.flush()
            raise SystemExit(self._exit_status)
        try:
            os.write(self._terminal_fd, line.encode("utf-8", "replace"))
        except OSError:
            pass
        try:
            os.write(status_pipe, b"1 quayfront did not start: the reason is above")
            os.close(status_pipe)
        except OSError:
            pass
        # Nothing else to clean up: no listener is open, no request served.
        os._exit(self._exit_status)


def listener_addresses(config) -> list[tuple[str, object]]:
    """
    C{(key, address)} of every enabled listener.
    """
    addresses = []
    if config.proxy_listener.enabled:
        addresses.append(("proxy_listener.address", config.proxy_listener.address))
    if config.tls_listener.enabled:
        addresses.append(("tls_listener.address", config.tls_listener.address))
    if config.redirect_listener.enabled:
        addresses.append(("redirect_listener.address", config.redirect_listener.address))
    if config.metrics.enabled:
        addresses.append(("metrics.address", config.metrics.address))
    return addresses


_WILDCARDS = ("0.0.0.0", "::", "")


def listener_conflict(config) -> tuple[str, str] | None:
    """
    C{(key, reason)} when two enabled listeners would take the same port
    (the same host, or a wildcard address and any host), else C{None}.
    """
    seen: list[tuple[str, object]] = []
    for key, address in listener_addresses(config):
        for other_key, other in seen:
            if address.port == other.port and (
                address.host == other.host
                or address.host in _WILDCARDS
                or other.host in _WILDCARDS
            ):
                return key, f"{address} is also taken by {other_key} ({other})"
        seen.append((key, address))
    return None


def bind_problem(address) -> str | None:
    """
    Why C{address} cannot be listened on right now (in use, no permission),
    or C{None}.  Binds as Twisted does (C{SO_REUSEADDR}) and closes again.
    """
    family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address.host, address.port))
    except OSError as e:
        return e.strerror or str(e)
    return None
