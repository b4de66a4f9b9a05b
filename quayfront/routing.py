"""
Which route a request path takes: the longest configured prefix wins.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def upstreams(self) -> list[Upstream]:
        seen: dict[str, Upstream] = {}
        for route in self._routes:
            if route.upstream is not None:
                seen.setdefault(route.upstream.name, route.upstream)
        return list(seen.values())

    def route_for(self, path: bytes) -> Route | None:
        for route in self._routes:
            if path.startswith(route.prefix):
                return route
        return None
