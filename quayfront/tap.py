"""
C{twistd quayfront}: command-line options and the service tree.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import server

from quayfront.accesslog import AccessLog
from quayfront.config import Config, ConfigError, load_config
from quayfront.health import HealthResource, UpstreamProbe
from quayfront.lifecycle import DrainService
from quayfront.limits import ConcurrencyLimiter, RateLimiter
from quayfront.listeners import (
    InheritedSockets,
    ListenerService,
    SocketActivationError,
    listener_endpoint,
    plain_endpoint,
    prepare_descriptors,
    tcp_endpoint,
)
from quayfront.metrics import Counters, MetricsResource
from quayfront.proxylayer import ProxyHeaderPolicy
from quayfront.redirect import redirect_site
from quayfront.routing import Route, Router, Upstream, log_route_table
from quayfront.sdnotify import add_systemd_notify
from quayfront.site import FrontSite, RegistryPing, StaticDirectory
from quayfront.tls import CertificateReloader, load_server_tls
from quayfront.upstream import upstream_agent, upstream_uri


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "PROXY protocol + TLS front end for container registries. Settings come "
        "from --config (TOML; see etc/quayfront.toml); the options below "
        "override single settings."
    )
    optParameters = [
        ["config", "c", None, "The configuration file (TOML)."],
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
    ]
    optFlags = [
        ["check", None, "Validate the configuration and certificates, bind nothing, exit."],
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
    }

    def postOptions(self) -> None:
        overrides: dict[str, Any] = {}
        if self["metrics-listen"] == "off":
            overrides["metrics.enabled"] = False
        elif self["metrics-listen"] is not None:
            overrides["metrics.address"] = self["metrics-listen"]
        for option, (key, convert) in self._OVERRIDES.items():
            if self[option] is not None:
                try:
                    overrides[key] = convert(self[option])
                except ValueError:
                    raise usage.UsageError(f"--{option}: {self[option]!r} is not valid")
        self.source = self["config"] or "command line"
        try:
            self.config = load_config(self["config"], overrides)
            prepare_descriptors(self.config, self.source)
            self.tls = load_server_tls(self.config.tls, self.source)
        except ConfigError as e:
            # A clear line and a non-zero exit; a traceback would bury it.
            sys.stderr.write(f"quayfront: configuration error: {e}\n")
            raise SystemExit(2)
        if self["check"]:
            sys.stdout.write(f"{self.source}: OK\n")
            raise SystemExit(0)


_log = Logger(namespace="quayfront")


def make_service(config: Config, tls, reactor, source: str = "command line") -> MultiService:
    """
    The whole service tree for C{config}, on C{reactor}.
    """
    root = MultiService()
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
    access_log = AccessLog(config.access_log.path, config.access_log.format)
    access_log.setServiceParent(root)

    router = build_router(config, reactor)
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
        access_log=access_log,
        counters=counters,
        idle_timeout_s=config.http.idle_timeout_s,
        header_timeout_s=config.http.header_timeout_s,
        request_id_header=config.http.request_id_header,
        tlv_headers=config.proxy_listener.tlv_headers,
        tls_headers=config.tls.headers,
        hsts=config.tls.hsts,
    )
    root.site = site
    root.counters = counters
    DrainService(site, reactor, config.http.drain_timeout_s).setServiceParent(root)

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
            reactor, address, policy, tls, counters, adopted(policy.listener, setting),
            handshake_timeout_s=config.tls.handshake_timeout_s,
        )
        listener_factories[policy.listener] = endpoint
        ListenerService(endpoint, site, setting, address).setServiceParent(root)
    if config.metrics.enabled:
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
        metrics_site = server.Site(MetricsResource(counters, gauges), reactor=reactor)
        metrics_site.noisy = False
        # A scrape every few seconds is not worth a log line each.
        metrics_site.log = lambda request: None
        ListenerService(
            adopted("metrics", "metrics.address") or tcp_endpoint(reactor, config.metrics.address),
            metrics_site,
            "metrics.address",
            config.metrics.address,
        ).setServiceParent(root)
    if config.redirect_listener.enabled:
        redirect = config.redirect_listener
        endpoint = plain_endpoint(
            reactor,
            redirect.address,
            ProxyHeaderPolicy.from_config("redirect", redirect),
            counters,
            adopted("redirect", "redirect_listener.address"),
        )
        ListenerService(
            endpoint,
            redirect_site(redirect.https_port, reactor),
            "redirect_listener.address",
            redirect.address,
        ).setServiceParent(root)
    if inherited is not None:
        inherited.check_all_taken()
    add_systemd_notify(root, reactor)
    return root


def build_router(config: Config, reactor) -> Router:
    """
    The upstreams with their pools and caps, rate-limit zones, and routes.
    """
    upstream_configs = {"default": config.upstream, **config.upstreams}
    upstreams = {}
    for name, upstream in upstream_configs.items():
        upstreams[name] = Upstream(
            name=name,
            agent=upstream_agent(reactor, upstream),
            limiter=ConcurrencyLimiter(
                reactor, upstream.max_connections, upstream.queue_size, upstream.queue_timeout_s
            ),
        )
    # One limiter per zone, shared by the routes that name it.
    zones = {name: RateLimiter(reactor, zone) for name, zone in config.rate_limits.items()}
    routes = []
    for route in config.routes:
        upstream = None if route.directory else upstreams[route.upstream]
        if upstream is not None and route.connect_timeout_s:
            # Its own pool with the route's connect timeout; the upstream's
            # concurrency cap stays shared.
            agent = upstream_agent(
                reactor,
                dataclasses.replace(
                    upstream_configs[route.upstream], connect_timeout_s=route.connect_timeout_s
                ),
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


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    try:
        return make_service(options.config, options.tls, reactor, options.source)
    except SocketActivationError as e:
        sys.__stderr__.write(f"quayfront: socket activation: {e}\n")
        raise SystemExit(2)
