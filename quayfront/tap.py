"""
C{twistd quayfront}: command-line options and the service tree.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import sys
from pathlib import Path
from typing import Any, Mapping, NoReturn

import twisted
from twisted.application.internet import TimerService
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import server

import quayfront
from quayfront.accesslog import AccessLog, access_log_problem
from quayfront.config import BUILT_IN_DEFAULT, Config, ConfigError, key_sources, load_config
from quayfront.health import HealthResource, UpstreamProbe
from quayfront.lifecycle import (
    DrainController,
    Reopener,
    Root,
    StartupFailure,
    StopSignals,
    bind_problem,
    listener_addresses,
    listener_conflict,
)
from quayfront.limits import ConcurrencyLimiter, RateLimiter, SharedRateLimiter
from quayfront.listeners import (
    InheritedSockets,
    ListenerService,
    SocketActivationError,
    listener_endpoint,
    plain_endpoint,
    prepare_descriptors,
    tcp_endpoint,
)
from quayfront.metrics import (
    Counters,
    GaugeSampler,
    MeteredAccessLog,
    MetricsOfTLS,
    MetricsResource,
    route_label,
)
from quayfront.proxylayer import ProxyHeaderPolicy
from quayfront.redisstore import RedisStore, check_config as check_redis_config
from quayfront.redirect import redirect_site
from quayfront.routing import Route, Router, Upstream, log_route_table
from quayfront.sdnotify import add_systemd_notify
from quayfront.site import FrontSite, RegistryPing, StaticDirectory
from quayfront.tls import CertificateReloader, load_server_tls
from quayfront.twistedadapter import install_lean_reactor
from quayfront.upstream import upstream_agent, upstream_uri
from quayfront.upstreamclient import UpstreamPool
from quayfront.workers import (
    SAMPLE_INTERVAL_S,
    WorkersService,
    tune_garbage_collector,
    worker_count,
)


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _worker_option(text: str) -> str | int:
    return text if text == "auto" else int(text)


#: Read when no --config is given and the file exists; the environment
#: variable QUAYFRONT_CONFIG names another file instead (or, when empty, none:
#: the built-in defaults).
DEFAULT_CONFIG_PATH = "/etc/quayfront/quayfront.toml"
CONFIG_PATH_VARIABLE = "QUAYFRONT_CONFIG"

#: The exit status of every startup error (configuration, certificate, port,
#: log path), in the foreground and when daemonised (twistd's waiting parent
#: exits 1 too).  --check exits 2 on an invalid configuration.
STARTUP_ERROR_EXIT = 1
CHECK_ERROR_EXIT = 2


def default_config_path(environ: Mapping[str, str] = os.environ) -> str | None:
    """
    The configuration file read when no --config is given.
    """
    if CONFIG_PATH_VARIABLE in environ:
        return environ[CONFIG_PATH_VARIABLE] or None
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def example_config_path() -> str:
    """
    The documented example configuration shipped with the package.
    """
    return str(Path(quayfront.__file__).parent / "quayfront.toml")


class Options(usage.Options):
    synopsis = "[options]"
    optFlags = [
        ["check", None, "Validate the configuration (as a start would, without binding any"
         " port), print FILE: OK and exit 0, or the errors and exit 2."],
    ]
    optParameters = [
        ["config", "c", None, "The configuration file (TOML) [$QUAYFRONT_CONFIG, else"
         f" {DEFAULT_CONFIG_PATH} when it exists]."],
        ["proxy-listen", None, None, "HOST:PORT of the PROXY+TLS listener [0.0.0.0:8443]."],
        ["listen", None, None, "HOST:PORT of the plain TLS listener [0.0.0.0:443]."],
        ["upstream", None, None, "The registry: http://HOST:PORT or unix:/PATH."],
        ["cert", None, None, "PEM certificate (leaf, then chain)."],
        ["key", None, None, "PEM private key."],
        ["access-log", None, None, "Access log file, or - for standard output."],
        ["proxy-trusted", None, None, "CIDR[,CIDR]: sources allowed to send a PROXY header."],
        ["proxy-exempt", None, None, "CIDR[,CIDR]: sources served without a PROXY header."],
        ["proxy-timeout", None, None, "Seconds a connection has to send its PROXY header."],
        ["metrics-listen", None, None, "HOST:PORT of the metrics endpoint, or 'off' [127.0.0.1:9091]."],
        ["drain-delay", None, None, "Seconds health checks answer 503 before the listeners"
         " close on SIGTERM [15]."],
        ["workers", None, None, "Worker processes: a number, or 'auto' for one per core [1]."],
    ]
    # option -> (dotted config key, conversion from the command-line text)
    _OVERRIDES: dict[str, tuple[str, Any]] = {
        "proxy-listen": ("proxy_listener.address", str),
        "listen": ("tls_listener.address", str),
        "upstream": ("upstream.url", str),
        "cert": ("tls.cert", str),
        "key": ("tls.key", str),
        "access-log": ("access_log.path", str),
        "proxy-trusted": ("proxy_listener.trusted_sources", _split_list),
        "proxy-exempt": ("proxy_listener.exempt_sources", _split_list),
        "proxy-timeout": ("proxy_listener.header_timeout_s", float),
        "drain-delay": ("http.drain_delay_s", float),
        "workers": ("process.workers", _worker_option),
    }

    @property
    def longdesc(self) -> str:  # type: ignore[override]
        return (
            "PROXY protocol + TLS front end for container registries. Settings come "
            "from --config (TOML); every key is documented, with its default, in the "
            f"example {example_config_path()} (etc/quayfront.toml in the source). The "
            "options below override single settings. SIGTERM drains, SIGHUP reloads "
            "certificates and re-reads the configuration, SIGUSR1 and SIGHUP reopen the "
            "access log."
        )

    def opt_version(self) -> None:
        """
        Print quayfront's and Twisted's versions and exit.
        """
        print(f"quayfront {quayfront.__version__} (Twisted {twisted.__version__})")
        raise SystemExit(0)

    def postOptions(self) -> None:
        self.overrides: dict[str, Any] = {}
        self.override_sources: dict[str, str] = {}
        if self["metrics-listen"] == "off":
            self.overrides["metrics.enabled"] = False
            self.override_sources["metrics.enabled"] = "--metrics-listen"
        elif self["metrics-listen"] is not None:
            self.overrides["metrics.address"] = self["metrics-listen"]
            self.override_sources["metrics.address"] = "--metrics-listen"
        for option, (key, convert) in self._OVERRIDES.items():
            if self[option] is not None:
                try:
                    self.overrides[key] = convert(self[option])
                except ValueError:
                    raise usage.UsageError(f"--{option}: {self[option]!r} is not valid")
                self.override_sources[key] = f"--{option}"
        self.path = self["config"] if self["config"] is not None else default_config_path()
        self.source = self.path or BUILT_IN_DEFAULT
        self.source_of = key_sources(self.path, self.overrides, self.override_sources)
        twistd = self.twistd_options()
        self.daemonising = twistd is not None and not twistd.get("nodaemon", True)
        try:
            self.config = self.load()
        except ConfigError as e:
            self.fail(e)
        try:
            prepare_descriptors(self.config, self.source)
            self.tls = load_server_tls(self.config.tls, self.source)
            check_redis_config(self.config.redis, self.source)
        except ConfigError as e:
            self.fail(self.attribute(e))
        conflict = listener_conflict(self.config)
        if conflict is not None:
            key, reason = conflict
            self.fail(ConfigError(self.source_of(key), key, reason))
        problem = access_log_problem(self.config.access_log.path, *self.run_as(twistd))
        if problem is not None:
            self.fail(ConfigError(self.source_of("access_log.path"), "access_log.path", problem))
        if self["check"]:
            print(f"{self.source}: OK")
            raise SystemExit(0)
        if self.daemonising:
            # Once daemonised, standard error is /dev/null: keep a way to
            # the terminal that started us, for errors after the fork.
            self.terminal_fd: int | None = os.dup(2)
            # Catch a port in use here, before the fork, so it is reported
            # like any other startup error.
            for key, address in listener_addresses(self.config):
                reason = bind_problem(address)
                if reason is not None:
                    self.fail(
                        ConfigError(self.source_of(key), key, f"cannot listen on {address}: {reason}")
                    )
        else:
            self.terminal_fd = None

    def load(self) -> Config:
        """
        The configuration as the files and options now say.
        """
        return load_config(self.path, self.overrides, self.override_sources)

    def attribute(self, error: ConfigError) -> ConfigError:
        """
        C{error} naming the source that set its key.
        """
        return ConfigError(self.source_of(error.key), error.key, error.reason)

    def fail(self, error: ConfigError) -> NoReturn:
        # One clear line and a non-zero exit; a traceback would bury it.
        sys.stderr.write(f"quayfront: {error}\n")
        raise SystemExit(CHECK_ERROR_EXIT if self["check"] else STARTUP_ERROR_EXIT)

    def twistd_options(self) -> Mapping[str, Any] | None:
        parent = getattr(self, "parent", None)
        return parent if isinstance(parent, Mapping) else None

    @staticmethod
    def run_as(twistd: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
        """
        The uid and gid quayfront runs as after twistd's C{-u}/C{-g}.
        """
        if twistd is None:
            return None, None
        uid, gid = twistd.get("uid"), twistd.get("gid")
        if uid is not None and gid is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = None
        return uid, gid


_log = Logger(namespace="quayfront")


def make_service(
    config: Config,
    tls,
    reactor,
    source: str = "command line",
    to_twistd_log: bool = False,
    worker=None,
) -> Root:
    """
    The whole service tree for C{config}, on C{reactor}.  C{to_twistd_log}:
    twistd daemonises, so an access log on standard output goes to
    twistd's log instead.  With several workers configured, the main
    process's tree (L{quayfront.workers}); in a worker (C{worker}, a
    L{quayfront.workers.WorkerContext}), that worker's.
    """
    if worker is None:
        workers = worker_count(config.process.workers)
        if workers > 1:
            main = WorkersService(config, tls, reactor, source, workers)
            add_systemd_notify(main, reactor)
            return main
    # Listeners of a worker adopt the main process's sockets.
    listen_reactor = reactor if worker is None else worker.listen_reactor
    root = Root()
    if not config.tls.cert:
        _log.warn(
            "!!! NO CERTIFICATE CONFIGURED: serving a SELF-SIGNED DEVELOPMENT CERTIFICATE for"
            " localhost (tls.self_signed_dev = true). Clients cannot verify it. Never use this in"
            " production. !!!"
        )
    _log.info("TLS certificates: {certificates}", certificates=tls.store.describe())
    reloader = CertificateReloader(tls, config.tls, source, reactor)
    reloader.setServiceParent(root)
    root.reloader = reloader
    counters = Counters()
    access_log = AccessLog(config.access_log.path, config.access_log.format, to_twistd_log)
    root.access_log = access_log

    store = None
    if any(zone.store == "redis" for zone in config.rate_limits.values()):
        store = RedisStore(reactor, config.redis, source)
        store.setServiceParent(root)
    root.store = store
    router = build_router(config, reactor, store, counters, worker)
    log_route_table(config.routes)
    probe_agent = upstream_agent(reactor, config.upstream, persistent=False)
    probe = UpstreamProbe(
        reactor, probe_agent, upstream_uri(config.health.probe_path.encode("ascii")), config.health
    )
    health = HealthResource(probe, draining=lambda: site.draining)
    local_resources = {path.encode("ascii"): health for path in config.health.paths}
    local_resources[b"/v1/_ping"] = RegistryPing()
    site = FrontSite(
        clock=reactor,
        router=router,
        local_resources=local_resources,
        access_log=MeteredAccessLog(access_log, counters, lambda path: route_label(router, path)),
        counters=counters,
        idle_timeout_s=config.http.idle_timeout_s,
        header_timeout_s=config.http.header_timeout_s,
        request_id_header=config.http.request_id_header,
        tlv_headers=config.proxy_listener.tlv_headers,
        tls_headers=config.tls.headers,
        hsts=config.tls.hsts,
    )
    # Startup log lines name each listener; no "Starting factory <...>".
    site.noisy = False
    root.site = site
    root.counters = counters
    # The drain stops the listeners and, last, the access log.
    drain = DrainController(
        site, reactor, config.http.drain_delay_s, config.http.drain_timeout_s
    )
    drain.setServiceParent(root)
    root.drain = drain
    access_log.setServiceParent(drain)

    # Sockets passed by systemd socket activation are adopted instead of bound.
    inherited = InheritedSockets.from_environment(reactor)

    def adopted(name: str, setting: str):
        return inherited.endpoint(name, setting) if inherited is not None else None

    listener_factories = {}
    listeners = []
    if config.proxy_listener.enabled:
        listeners.append(
            (
                config.proxy_listener.address,
                ProxyHeaderPolicy.from_config("proxy", config.proxy_listener),
            )
        )
    if config.tls_listener.enabled:
        listeners.append(
            (
                config.tls_listener.address,
                ProxyHeaderPolicy(
                    "tls", required=False, max_connections=config.tls_listener.max_connections
                ),
            )
        )
    for address, policy in listeners:
        setting = "proxy_listener.address" if policy.listener == "proxy" else "tls_listener.address"
        endpoint = listener_endpoint(
            listen_reactor, address, policy, tls, counters, adopted(policy.listener, setting),
            handshake_timeout_s=config.tls.handshake_timeout_s,
        )
        listener_factories[policy.listener] = endpoint
        drain.add_listener(
            # The site's channels count the TLS errors that end connections.
            ListenerService(endpoint, site, setting, address)
        )
        root.listening.append((setting, address, _ROLES[policy.listener]))
    gauges = [
        (
            "requests_in_flight",
            "Requests being served.",
            "",
            lambda: [("", site.in_flight)],
        ),
        (
            "connections_open",
            "Open client connections, by listener.",
            "listener",
            lambda: [(name, e.open_connections()) for name, e in listener_factories.items()],
        ),
        (
            "upstream_requests_active",
            "Requests holding an upstream slot, by upstream.",
            "upstream",
            lambda: [(u.name, u.limiter.active) for u in router.upstreams()],
        ),
        (
            "upstream_requests_waiting",
            "Requests queued for an upstream slot, by upstream.",
            "upstream",
            lambda: [(u.name, u.limiter.waiting) for u in router.upstreams()],
        ),
    ]
    if worker is not None:
        # The main process serves the metrics: it sees these gauges as each
        # worker's latest sample, summed.
        sampling = TimerService(SAMPLE_INTERVAL_S, GaugeSampler(gauges, counters.registry).sample)
        sampling.clock = reactor
        sampling.setServiceParent(root)
    if config.metrics.enabled:
        metrics_site = server.Site(
            MetricsResource(counters, gauges, [MetricsOfTLS(tls, reloader)]), reactor=reactor
        )
        metrics_site.noisy = False
        # A scrape every few seconds is not worth a log line each.
        metrics_site.log = lambda request: None
        ListenerService(
            adopted("metrics", "metrics.address") or tcp_endpoint(reactor, config.metrics.address),
            metrics_site,
            "metrics.address",
            config.metrics.address,
        ).setServiceParent(drain)
        root.listening.append(("metrics.address", config.metrics.address, "metrics, plain HTTP"))
    if config.redirect_listener.enabled:
        redirect = config.redirect_listener
        endpoint = plain_endpoint(
            listen_reactor,
            redirect.address,
            ProxyHeaderPolicy.from_config("redirect", redirect),
            counters,
            adopted("redirect", "redirect_listener.address"),
        )
        redirecting = redirect_site(redirect.https_port, reactor)
        redirecting.noisy = False
        drain.add_listener(
            ListenerService(
                endpoint,
                redirecting,
                "redirect_listener.address",
                redirect.address,
            )
        )
        root.listening.append(
            ("redirect_listener.address", redirect.address, "plain HTTP, redirects to https")
        )
    if inherited is not None:
        inherited.check_all_taken()
    add_systemd_notify(root, reactor)
    return root


def build_router(config: Config, reactor, store=None, counters=None, worker=None) -> Router:
    """
    The upstreams with their pools and caps, rate-limit zones, and routes.
    Zones with C{store = "redis"} use C{store} and count its failures in
    C{counters}.
    """
    upstream_configs = {"default": config.upstream, **config.upstreams}
    upstreams = {}
    # Idle upstream connections, by upstream address: shared by the agents
    # that reach one upstream with different connect timeouts.
    pool = UpstreamPool(reactor)
    for name, upstream in upstream_configs.items():
        upstreams[name] = Upstream(
            name=name,
            agent=upstream_agent(reactor, upstream, pool=pool),
            limiter=ConcurrencyLimiter(
                reactor, upstream.max_connections, upstream.queue_size, upstream.queue_timeout_s
            )
            if worker is None
            # Workers share the cap: it is the upstream's, not each worker's.
            else worker.concurrency_limiter(reactor, name, upstream),
        )
    # One limiter per zone, shared by the routes that name it.
    zones = {
        name: (
            SharedRateLimiter(name, zone, store, counters)
            if zone.store == "redis"
            else RateLimiter(reactor, zone)
            if worker is None
            # Workers share the buckets: a client's rate holds across them.
            else worker.rate_limiter(reactor, name, zone)
        )
        for name, zone in config.rate_limits.items()
    }
    routes = []
    for route in config.routes:
        upstream = None if route.directory else upstreams[route.upstream]
        if upstream is not None and route.connect_timeout_s:
            # Its own agent with the route's connect timeout; the idle
            # connections and the upstream's concurrency cap stay shared.
            agent = upstream_agent(
                reactor,
                dataclasses.replace(
                    upstream_configs[route.upstream], connect_timeout_s=route.connect_timeout_s
                ),
                pool=pool,
            )
            upstream = dataclasses.replace(upstream, agent=agent)
        routes.append(
            Route(
                config=route,
                upstream=upstream,
                resource=StaticDirectory(route.directory) if route.directory else None,
                rate_limiter=zones.get(route.rate_limit) if route.rate_limit else None,
            )
        )
    return Router(routes)


_ROLES = {
    "proxy": "PROXY header, then TLS (load balancers)",
    "tls": "TLS without PROXY header (direct clients, health checks)",
}


def makeService(options: Options) -> Root:
    # Before anything imports the default reactor: the epoll reactor without
    # the per-event log context, with eager TCP writes (a reactor chosen
    # with twistd --reactor is kept).
    install_lean_reactor()
    from twisted.internet import reactor

    try:
        root = make_service(
            options.config, options.tls, reactor, options.source, to_twistd_log=options.daemonising
        )
    except SocketActivationError as e:
        sys.__stderr__.write(f"quayfront: socket activation: {e}\n")
        raise SystemExit(STARTUP_ERROR_EXIT)
    failure = StartupFailure(
        lambda e: str(options.attribute(e)) if isinstance(e, ConfigError) else str(e),
        options.twistd_options(),
        options.terminal_fd,
        STARTUP_ERROR_EXIT,
    )
    root.on_startup_error = failure
    root.on_started = failure.started
    Reopener(
        reactor,
        root.access_log,
        options.config,
        options.load,
        # Read only when a drain starts: safe to change at any time.
        live={
            "http.drain_delay_s": root.drain.set_delay,
            "http.drain_timeout_s": root.drain.set_timeout,
        },
    ).setServiceParent(root)
    reactor.callWhenRunning(StopSignals(reactor, root.drain).install)
    tune_garbage_collector()
    return root
