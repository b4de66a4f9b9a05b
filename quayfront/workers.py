"""
Worker processes: the main process binds every listener once (before twistd
drops privileges), then forks C{[process] workers} workers that each serve
the same listening sockets through the same chains (PROXY -> TLS -> HTTP),
and supervises them (L{quayfront.supervisor}).

Why fork and not spawn a fresh interpreter: the TLS contexts are created in
the main process, so every worker holds the same session ticket keys and a
session issued by one worker resumes on any other (pyOpenSSL cannot set
ticket keys: the OpenSSL inside C{cryptography} exposes no call for it);
and the certificate keys were read before the privilege drop, as with one
process.  Each worker starts with every inherited descriptor but its
listening sockets and standard streams pointed at C{/dev/null}, and a fresh
reactor.

What must not multiply by the number of workers is shared through the main
process's private runtime directory (L{quayfront.sharedstate}): rate-limit
buckets, upstream in-flight counts and C{prometheus_client}'s multiprocess
files, summed by the main process's C{/metrics}.

The main process forwards SIGHUP (after checking that the certificates
load: a reload that would fail is refused everywhere), SIGUSR1, and SIGTERM
(every worker drains; the main process exits once all have, non-zero when
any drain failed).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import signal
import socket
import sys
import tempfile
import traceback
from typing import Callable

from twisted.internet import process as twisted_process
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from quayfront.config import Config, ListenAddress, RateLimitConfig, UpstreamConfig
from quayfront.lifecycle import Reopener, Root, StopSignals
from quayfront.limits import ConcurrencyLimiter
from quayfront.metrics import MetricsOfTLS
from quayfront.listeners import LISTEN_BACKLOG
from quayfront.sharedstate import SharedConcurrencyLimiter, SharedRateLimiter, SharedSlotCounts
from quayfront.supervisor import (
    ExitStatus,
    SupervisorMachine,
    SupervisorPolicy,
    SupervisorService,
)
from quayfront.tls import CertificateReloader, ServerTLS
from quayfront.ticketkeys import install_ticket_keys
from quayfront.twistedadapter import EagerWritePort, adopt_port, install_lean_reactor

# "reuseport" gives each worker a SO_REUSEPORT socket of its own instead of
# the one shared socket; kept for comparing the two (tests/bench/spread.py).
ACCEPT_MODE_VARIABLE = "QUAYFRONT_ACCEPT_MODE"

# How often a worker copies its live gauges into the shared metrics, and
# checks that the main process is still there.
SAMPLE_INTERVAL_S = 1.0

#: Allocations between two young-generation garbage collections, in each
#: process that serves (Python's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """
    For a process that serves: a request makes and drops a thousand-odd
    objects, nearly all freed by their reference counts, so a young
    collection every L{GC_YOUNG_THRESHOLD} allocations instead of every 700
    walks the live ones far less often (3 % fewer instructions per proxied
    request, measured under callgrind).
    """
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


def worker_count(configured: int) -> int:
    """
    C{[process] workers}: 0 ("auto") is one per core this process may run on.
    """
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def listened_addresses(config: Config) -> list[tuple[str, ListenAddress]]:
    """
    The (setting, address) of every listener the workers serve, in order.
    """
    listeners = []
    if config.proxy_listener.enabled:
        listeners.append(("proxy_listener.address", config.proxy_listener.address))
    if config.tls_listener.enabled:
        listeners.append(("tls_listener.address", config.tls_listener.address))
    if config.redirect_listener.enabled:
        listeners.append(("redirect_listener.address", config.redirect_listener.address))
    return listeners


def bind_listener(setting: str, address: ListenAddress, reuse_port: bool = False) -> socket.socket:
    """
    A listening, non-blocking socket on C{address}; a failure is one line
    naming the setting and a non-zero exit, as with one process.
    """
    family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        sys.__stderr__.write(
            f"quayfront: cannot listen on {address} ({setting}): {e.strerror or e}\n"
        )
        raise SystemExit(1)
    sock.setblocking(False)
    return sock


class SharedRuntime:
    """
    The main process's private runtime directory (mode 0700) and the shared
    tables in it; created before the workers start, removed at exit.
    """

    def __init__(self, config: Config, workers: int, parent: str | None = None) -> None:
        self.workers = workers
        # Under systemd, RuntimeDirectory= (private, cleaned up) is the parent.
        self.directory = tempfile.mkdtemp(prefix="quayfront-", dir=parent or None)
        self.metrics_directory = os.path.join(self.directory, "metrics")
        # Wiped at start: counts of a previous run must not add up.
        shutil.rmtree(self.metrics_directory, ignore_errors=True)
        os.mkdir(self.metrics_directory, 0o700)
        self._zones = dict(config.rate_limits)
        upstreams = {"default": config.upstream, **config.upstreams}
        self._upstream_slots = {
            name: SharedSlotCounts(self._slots_path(name), workers, create=True)
            for name, upstream in upstreams.items()
            if upstream.max_connections
        }
        for name, zone in self._zones.items():
            # Created (sized, zeroed) once here; workers map the same file.
            SharedRateLimiter(_NoClock(), zone, self._zone_path(name), create=True)

    def _zone_path(self, name: str) -> str:
        return os.path.join(self.directory, f"ratelimit-{name.encode().hex()}")

    def _slots_path(self, name: str) -> str:
        return os.path.join(self.directory, f"upstream-{name.encode().hex()}")

    def rate_limiter(self, clock, name: str, zone: RateLimitConfig) -> SharedRateLimiter:
        return SharedRateLimiter(clock, zone, self._zone_path(name))

    def concurrency_limiter(
        self, clock, name: str, upstream: UpstreamConfig, worker: int
    ) -> ConcurrencyLimiter:
        if not upstream.max_connections:
            return ConcurrencyLimiter(
                clock, 0, upstream.queue_size, upstream.queue_timeout_s
            )
        counts = SharedSlotCounts(self._slots_path(name), self.workers)
        return SharedConcurrencyLimiter(
            clock,
            upstream.max_connections,
            upstream.queue_size,
            upstream.queue_timeout_s,
            counts,
            worker,
        )

    def worker_gone(self, index: int) -> None:
        """Give back whatever upstream slots worker C{index} held."""
        for counts in self._upstream_slots.values():
            counts.clear(index)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class _NoClock:
    def seconds(self) -> float:
        return 0.0


class OneAcceptPort(EagerWritePort):
    """
    Accepts one connection per wake-up, like nginx's default (multi_accept
    off).  Every worker waits on the same socket; Twisted's default of up
    to 100 accepts per wake-up lets the first worker to wake take a whole
    burst of connections, and with keep-alive clients that worker then
    serves all of them while the others idle.
    """

    def doRead(self) -> None:
        self.numberAccepts = 1
        super().doRead()


class AdoptingReactor:
    """
    The reactor, except that C{listenTCP} adopts the inherited listening
    socket of that address instead of binding; so the listener chains are
    built by the same code as with one process.
    """

    def __init__(self, reactor, sockets: dict[tuple[str, int], socket.socket]) -> None:
        self._reactor = reactor
        self._sockets = sockets

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory, backlog: int = 50, interface: str = ""):
        sock = self._sockets.pop((interface, port))
        try:
            # As reactor.adoptStreamPort does, with one accept per wake-up.
            adopted = adopt_port(OneAcceptPort, self._reactor, sock.fileno(), sock.family, factory)
            adopted.startListening()
            return adopted
        finally:
            # adoptStreamPort holds its own duplicate: with this one closed,
            # closing the port (drain) really stops this worker accepting.
            sock.close()


@dataclasses.dataclass
class WorkerContext:
    """
    What a worker's service tree needs beyond the configuration.
    """

    index: int
    listen_reactor: object
    runtime: SharedRuntime

    def rate_limiter(self, clock, name: str, zone: RateLimitConfig):
        return self.runtime.rate_limiter(clock, name, zone)

    def concurrency_limiter(self, clock, name: str, upstream: UpstreamConfig):
        return self.runtime.concurrency_limiter(clock, name, upstream, self.index)


# --------------------------------------------------------------------------
# Forking


def socket_activation_fds() -> dict[str, int]:
    """
    Listener name -> descriptor passed by systemd socket activation to this
    process, when there are any (and quayfront can read them).
    """
    from quayfront.listeners import InheritedSockets, SocketActivationError

    try:
        inherited = InheritedSockets.from_environment(None)
    except SocketActivationError as e:
        # The same line and exit status as the single-process start.
        sys.__stderr__.write(f"quayfront: socket activation: {e}\n")
        raise SystemExit(1)
    return {} if inherited is None else dict(inherited.descriptors)


class _Reaper:
    """
    Twisted's SIGCHLD handling calls C{reapProcess} on what is registered
    with C{registerReapProcessHandler}.
    """

    def __init__(self, pid: int, exited: Callable[[int, ExitStatus], None]) -> None:
        self.pid = pid
        self._exited = exited

    def reapProcess(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 1 << 8
        if pid:
            twisted_process.unregisterReapProcessHandler(self.pid, self)
            self._exited(self.pid, ExitStatus.from_wait_status(status))

    def processEnded(self, status: int) -> None:
        # Called by registerReapProcessHandler when the child is already gone.
        self._exited(self.pid, ExitStatus.from_wait_status(status))


class ForkSpawner:
    """
    Starts a worker by forking; the child runs C{run_worker(index)} and
    exits with its result, never returning into the main process's code.
    """

    def __init__(self, run_worker: Callable[[int], int]) -> None:
        self._run_worker = run_worker

    def spawn(self, index: int) -> int:
        for stream in (sys.__stdout__, sys.__stderr__, sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        pid = os.fork()
        if pid:
            return pid
        status = 1
        try:
            status = self._run_worker(index)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            try:
                traceback.print_exc(file=sys.__stderr__)
            except BaseException:
                pass
        finally:
            os._exit(status)

    def kill(self, pid: int, signum: int) -> None:
        os.kill(pid, signum)

    def watch(self, pid: int, exited: Callable[[int, ExitStatus], None]) -> None:
        twisted_process.registerReapProcessHandler(pid, _Reaper(pid, exited))


# Objects of the main process that a worker must never free: freeing them
# would close descriptor numbers the worker may since have reused.
_inherited: list[object] = []


def _point_inherited_fds_at_devnull(keep: set[int]) -> None:
    """
    Every descriptor but C{keep} now refers to C{/dev/null}: the worker lets
    go of the main process's sockets, pipes and epoll set, while the numbers
    stay taken (stale objects closing them cannot hit a new descriptor).
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd == devnull:
            continue
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


def _fresh_reactor():
    """
    Replace the main process's reactor, inherited half-alive, by a new one.
    """
    twisted_process.reapProcessHandlers.clear()
    _inherited.append(sys.modules.pop("twisted.internet.reactor", None))
    # The same reactor as a single process runs (see makeService).
    install_lean_reactor()
    from twisted.internet import reactor

    return reactor


def _worker_logging(index: int) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogPublisher,
        textFileLogObserver,
    )

    for observer in list(getattr(globalLogPublisher, "_observers", ())):
        _inherited.append(observer)
        globalLogPublisher.removeObserver(observer)
    # The level twistd's own log keeps.
    text = FilteringLogObserver(
        textFileLogObserver(sys.__stderr__), [LogLevelFilterPredicate(LogLevel.info)]
    )

    def tagged(event: dict) -> None:
        event.setdefault("log_system", f"worker {index}")
        text(event)

    globalLogPublisher.addObserver(tagged)


def run_worker(
    index: int,
    config: Config,
    tls: ServerTLS,
    sockets: dict[tuple[str, int], socket.socket],
    runtime: SharedRuntime,
    source: str,
    main_pid: int,
) -> int:
    """
    The body of a forked worker: serve until SIGTERM (drain) or the main
    process is gone.
    """
    from quayfront.metrics import enable_multiprocess

    _point_inherited_fds_at_devnull({0, 1, 2, *(s.fileno() for s in sockets.values())})
    for variable in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        # The main process talks to systemd and owns what it passed.
        os.environ.pop(variable, None)
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        # Until this worker's services install their own handlers.
        signal.signal(signum, signal.SIG_IGN)
    reactor = _fresh_reactor()
    _worker_logging(index)
    enable_multiprocess(runtime.metrics_directory)
    from quayfront.tap import make_service

    worker_config = dataclasses.replace(
        config,
        # The main process serves the sum of every worker's metrics, and
        # decides when certificate files changed (then sends SIGHUP).
        metrics=dataclasses.replace(config.metrics, enabled=False),
        tls=dataclasses.replace(config.tls, reload_check_s=0.0),
    )
    context = WorkerContext(index, AdoptingReactor(reactor, dict(sockets)), runtime)
    root = make_service(worker_config, tls, reactor, source, worker=context)
    # As makeService does for one process: SIGUSR1 and SIGHUP (forwarded by
    # the main process) reopen the access log; SIGTERM drains.
    Reopener(
        reactor,
        root.access_log,
        worker_config,
        None,
        live={"http.drain_delay_s": root.drain.set_delay, "http.drain_timeout_s": root.drain.set_timeout},
    ).setServiceParent(root)
    reactor.callWhenRunning(StopSignals(reactor, root.drain).install)

    def orphaned() -> None:
        if os.getppid() != main_pid and reactor.running:
            Logger().warn("the main process is gone; stopping")
            reactor.stop()

    watch = LoopingCall(orphaned)
    watch.clock = reactor
    reactor.callWhenRunning(watch.start, SAMPLE_INTERVAL_S, False)
    reactor.callWhenRunning(root.startService)
    tune_garbage_collector()
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    return 0


# --------------------------------------------------------------------------
# The main process's service tree


class SharedSessionTLS(ServerTLS):
    """
    Every connection starts on one long-lived context, created in the main
    process before the workers fork, so its session ticket keys are the same
    in every worker and stay the same across certificate reloads (OpenSSL
    takes ticket keys from the context a connection started on).  The
    certificate is chosen from the current store during the handshake, SNI
    or not, as L{ServerTLS} does.
    """

    def __init__(self, store) -> None:
        self.session_context = store.default_context
        super().__init__(store)
        self.session_context.set_tlsext_servername_callback(self._choose_certificate)

    @property
    def store(self):
        return self._store

    @store.setter
    def store(self, store) -> None:
        # A reload brings the operator's current ticket keys (a rotation):
        # the context every connection starts on must take them, or tickets
        # of a retired key would keep resuming.
        self._store = store
        if store.shared_ticket_keys and store.default_context is not self.session_context:
            install_ticket_keys(self.session_context, store.ticket_keys)

    def _choose_certificate(self, connection) -> None:
        context = self.store.context_for(connection.get_servername())
        if context is not self.session_context:
            connection.set_context(context)

    def serverConnectionForTLS(self, protocol):
        from OpenSSL import SSL

        return SSL.Connection(self.session_context, None)


class _MainReloader(CertificateReloader):
    """
    The main process checks a reload (SIGHUP or changed files) itself; only
    when the certificates load does every worker get SIGHUP to reload them.
    """

    def __init__(self, *args, fan_out: Callable[[int], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fan_out = fan_out

    def reload(self, why: str) -> bool:
        ok = super().reload(why)
        if ok:
            self._fan_out(signal.SIGHUP)
        return ok


class MainCollector:
    """
    Metrics only the main process knows (one process: no multiprocess
    files needed).
    """

    def __init__(self, supervisor: SupervisorService, reloader: CertificateReloader, tls) -> None:
        self._supervisor = supervisor
        self._tls_metrics = MetricsOfTLS(tls, reloader)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "quayfront_workers_alive",
            "Worker processes running.",
            value=len(self._supervisor.machine.alive()),
        )
        yield CounterMetricFamily(
            "quayfront_worker_restarts",
            "Workers started again after one ended.",
            value=self._supervisor.machine.restarts,
        )
        yield from self._tls_metrics.collect()


class WorkersDrain:
    """
    The main process's view of the drain, for whoever reports it (sd_notify):
    C{"delay"} when SIGTERM reaches the workers (each runs its own drain
    phases), C{"done"} when the last worker has exited.
    """

    def __init__(self, skip_delay: Callable[[], None]) -> None:
        self._observers: list[Callable[[str, int], None]] = []
        self._skip_delay = skip_delay

    def set_delay(self, delay_s: float) -> None:
        """Each worker reads its own configuration; nothing to do here."""

    def set_timeout(self, timeout_s: float) -> None:
        """Each worker reads its own configuration; nothing to do here."""

    def skip_delay(self) -> None:
        """A second SIGTERM: every worker skips the rest of its delay."""
        self._skip_delay()

    def observe(self, callback: Callable[[str, int], None]) -> None:
        self._observers.append(callback)

    def enter(self, phase: str) -> None:
        for callback in self._observers:
            callback(phase, 0)


class _MadeOnFirstUse(Resource):
    """
    A resource made on first use (the metrics directory exists only once
    the service has started).
    """

    isLeaf = True

    def __init__(self, make: Callable[[], Resource]) -> None:
        super().__init__()
        self._make = make
        self._made: Resource | None = None

    def render(self, request):
        if self._made is None:
            self._made = self._make()
        return self._made.render(request)


class _NoRequestsHere:
    in_flight = 0


class _NoAccessLog:
    """The main process writes no access log: the workers do."""

    def reopen(self, why: str) -> bool:
        return True


class WorkersService(Root):
    """
    The main process: binds the listeners in C{privilegedStartService},
    forks and supervises the workers, serves the summed metrics.
    """

    _log = Logger()

    def __init__(self, config: Config, tls: ServerTLS, reactor, source: str, workers: int) -> None:
        super().__init__()
        self._config = config
        tls = SharedSessionTLS(tls.store)
        self._tls = tls
        self._reactor = reactor
        self._source = source
        self.workers = workers
        # Made in startService, after twistd's privilege drop: the workers
        # run as the same user and must open the files in it.
        self.runtime: SharedRuntime | None = None
        self._sockets: dict[tuple[str, int], socket.socket] = {}
        # With SO_REUSEPORT: one socket per worker slot and address, the
        # kernel spreading connections over them by a hash of the 4-tuple.
        self._reuse_port = os.environ.get(ACCEPT_MODE_VARIABLE) == "reuseport"
        self._slot_sockets: list[dict[tuple[str, int], socket.socket]] = []
        self._previous_usr1 = None
        self.exit_status = 0
        self.drain = WorkersDrain(lambda: self.supervisor.forward(signal.SIGTERM))
        self.access_log = _NoAccessLog()
        # For sd_notify's STATUS= line: requests are counted in the workers.
        self.site = _NoRequestsHere()
        spawner = ForkSpawner(self._run_worker)
        self.supervisor = SupervisorService(
            SupervisorMachine(SupervisorPolicy(workers)),
            spawner,
            reactor,
            on_exit=self._exit,
            on_worker_exit=self._worker_exited,
        )
        self.reloader = _MainReloader(
            tls, config.tls, source, reactor, fan_out=self.supervisor.signal
        )
        self.reloader.setServiceParent(self)
        if config.metrics.enabled:
            from quayfront.listeners import ListenerService, tcp_endpoint
            from quayfront.metrics import MultiProcessMetricsResource

            resource = _MadeOnFirstUse(
                lambda: MultiProcessMetricsResource(
                    self.runtime.metrics_directory,
                    [MainCollector(self.supervisor, self.reloader, tls)],
                )
            )
            metrics_site = server.Site(resource, reactor=reactor)
            metrics_site.noisy = False
            metrics_site.log = lambda request: None
            ListenerService(
                tcp_endpoint(reactor, config.metrics.address),
                metrics_site,
                "metrics.address",
                config.metrics.address,
            ).setServiceParent(self)
        # Last: stopped first, so the workers drain while the rest waits.
        self.supervisor.setServiceParent(self)

    def privilegedStartService(self) -> None:
        inherited = socket_activation_fds()
        for setting, address in listened_addresses(self._config):
            name = setting.split("_", 1)[0]
            if inherited and name not in inherited:
                sys.__stderr__.write(
                    f"quayfront: socket activation: {setting} is configured but no socket"
                    f" named {name!r} was passed (passed: {', '.join(sorted(inherited))})\n"
                )
                raise SystemExit(1)
            if name in inherited:
                # systemd bound it: every worker adopts the passed socket.
                sock = socket.socket(fileno=inherited[name])
                sock.setblocking(False)
                self._sockets[(address.host, address.port)] = sock
            elif not self._reuse_port:
                self._sockets[(address.host, address.port)] = bind_listener(setting, address)
        if self._reuse_port:
            for _ in range(self.workers):
                self._slot_sockets.append(
                    {
                        (address.host, address.port): bind_listener(setting, address, True)
                        for setting, address in listened_addresses(self._config)
                    }
                )
        super().privilegedStartService()

    def startService(self) -> None:
        self.runtime = SharedRuntime(self._config, self.workers, os.environ.get("RUNTIME_DIRECTORY"))
        self._log.info(
            "starting {workers} worker processes; shared state in {directory}",
            workers=self.workers,
            directory=self.runtime.directory,
        )
        self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)
        self._reactor.addSystemEventTrigger("after", "shutdown", self._after_shutdown)
        super().startService()

    def stopService(self):
        # The workers hold their own copies; with the main process's copies
        # closed, a worker closing its listeners really stops accepting.
        for sockets in (self._sockets, *self._slot_sockets):
            for sock in sockets.values():
                sock.close()
            sockets.clear()
        self.drain.enter("delay")
        stopped = super().stopService()
        stopped.addBoth(lambda result: (self.drain.enter("done"), result)[1])
        return stopped

    def _on_usr1(self, signum, frame) -> None:
        previous = self._previous_usr1
        if callable(previous):
            previous(signum, frame)
        self._reactor.callFromThread(self.supervisor.signal, signal.SIGUSR1)

    def _run_worker(self, index: int) -> int:
        return run_worker(
            index,
            self._config,
            self._tls,
            self._slot_sockets[index] if self._reuse_port else self._sockets,
            self.runtime,
            self._source,
            os.getppid(),
        )

    def _worker_exited(self, index: int, pid: int, status: ExitStatus) -> None:
        self.runtime.worker_gone(index)
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid, self.runtime.metrics_directory)
        except OSError:
            pass

    def _exit(self, status: int) -> None:
        self.exit_status = status
        if status and self._reactor.running:
            # Given up: stop the whole process (a no-op when already stopping).
            self._reactor.stop()

    def _after_shutdown(self) -> None:
        if self.runtime is not None:
            self.runtime.remove()
        if self.exit_status:
            self._log.error("exiting with status {status}", status=self.exit_status)
            for stream in (sys.__stdout__, sys.__stderr__):
                try:
                    stream.flush()
                except (AttributeError, OSError, ValueError):
                    pass
            os._exit(self.exit_status)

