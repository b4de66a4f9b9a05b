"""
Which route a request path takes: the longest configured prefix wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.logger import Logger
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from quayfront.config import RouteConfig
from quayfront.limits import ConcurrencyLimiter, RateLimiter


@dataclass(frozen=True)
class Upstream:
    """
    A named upstream: its pooled agent and its concurrency cap.
    """

    name: str
    agent: IAgent
    limiter: ConcurrencyLimiter


@dataclass(frozen=True)
class Route:
    """
    A configured route, resolved: where it leads and what limits apply.
    Exactly one of C{upstream} and C{resource} is set.
    """

    config: RouteConfig
    upstream: Upstream | None = None
    resource: IResource | None = None
    rate_limiter: RateLimiter | None = None

    @property
    def prefix(self) -> bytes:
        return self.config.prefix.encode("ascii")


class Router:
    def __init__(self, routes: list[Route]) -> None:
        # Longest first, so the first match is the most specific.
        self._routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        # Each prefix as bytes once, not on every request.
        self._prefixes = [(route.prefix, route) for route in self._routes]
        # The prefixes as one pattern's alternatives, longest first: the
        # first that matches (one C call) is the first route_for_each
        # finds.  Group N is the Nth route.
        self._match = re.compile(
            b"|".join(b"(" + re.escape(prefix) + b")" for prefix, _ in self._prefixes)
        ).match if self._prefixes else None
        self._by_group = [None, *self._routes]

    def upstreams(self) -> list[Upstream]:
        seen: dict[str, Upstream] = {}
        for route in self._routes:
            if route.upstream is not None:
                seen.setdefault(route.upstream.name, route.upstream)
        return list(seen.values())

    def route_for(self, path: bytes) -> Route | None:
        match = self._match
        if match is None:
            return None
        matched = match(path)
        return None if matched is None else self._by_group[matched.lastindex]

    def route_for_each(self, path: bytes) -> Route | None:
        """
        What L{route_for} answers, prefix by prefix (the longest first).
        """
        for prefix, route in self._prefixes:
            if path.startswith(prefix):
                return route
        return None


_log = Logger(namespace="quayfront")


def describe_route(route: RouteConfig) -> str:
    """
    One line for the route table: prefix, destination, limits.
    """
    destination = f"directory {route.directory}" if route.directory else f"upstream {route.upstream}"
    limits = [
        f"max_body_bytes={route.max_body_bytes or 'unlimited'}",
        f"response_timeout_s={route.response_timeout_s:g}",
        f"idle_timeout_s={route.idle_timeout_s:g}",
        f"keepalive={'on' if route.keepalive else 'off'}",
        f"rate_limit={route.rate_limit or 'none'}",
    ]
    if route.connect_timeout_s:
        limits.append(f"connect_timeout_s={route.connect_timeout_s:g}")
    return f"{route.prefix} -> {destination} ({', '.join(limits)})"


def log_route_table(routes: tuple[RouteConfig, ...] | list[RouteConfig]) -> list[str]:
    """
    Log the effective routes at startup, longest prefix first (the order in
    which they match), and warn when no route covers C{/v2/}: listing any
    [[routes]] replaces the defaults, registry routes included.

    @return: the lines logged, for tests.
    """
    ordered = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
    lines = [describe_route(route) for route in ordered]
    for line in lines:
        _log.info("Route: {route}", route=line)
    if not any("/v2/".startswith(route.prefix) for route in routes):
        warning = (
            "No route covers /v2/ (the registry API): configured [[routes]] replace the"
            " defaults; add one with prefix = \"/v2/\" (or \"/\")"
        )
        _log.warn(warning)
        lines.append(warning)
    return lines
