"""
The health resource load balancers probe, answered by quayfront itself in
Quay's JSON shape, and the upstream probe behind it.

Load balancers probe every few seconds from several nodes; one cached probe
result, refreshed at most once per C{cache_s} and bounded by a timeout,
keeps them from piling onto the upstream.
"""

from __future__ import annotations

import json
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from quayfront.config import HealthConfig
from quayfront.twistedadapter import client_gone


class _Discard(Protocol):
    """
    Reads a probe's response body to its end; cancelling C{done} (the probe
    timed out) drops the connection instead of leaving it open.
    """

    def __init__(self) -> None:
        self.done: Deferred = Deferred(lambda d: self.transport.stopProducing())

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(None)


class UpstreamProbe:
    """
    Asks the upstream for C{probe_path}; any status below 500 means up.
    Results are cached for C{cache_s}; concurrent askers share one probe.
    """

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, agent: IAgent, probe_uri: bytes, config: HealthConfig
    ) -> None:
        self._clock = clock
        self._agent = agent
        self._probe_uri = probe_uri
        self._config = config
        self._last_result: bool | None = None
        self._last_checked: float | None = None
        self._waiting: list[Deferred] | None = None

    def is_up(self) -> Deferred:
        now = self._clock.seconds()
        if self._last_checked is not None and now - self._last_checked < self._config.cache_s:
            return succeed(self._last_result)
        waiter: Deferred = Deferred()
        if self._waiting is None:
            self._waiting = [waiter]
            self._probe()
        else:
            self._waiting.append(waiter)
        return waiter

    def _probe(self) -> None:
        d = self._agent.request(
            b"GET", self._probe_uri, Headers({b"User-Agent": [b"quayfront-health"]})
        )
        d.addCallback(self._drain)
        d.addTimeout(self._config.probe_timeout_s, self._clock)
        d.addErrback(self._probe_failed)
        d.addCallback(self._probed)

    def _drain(self, response) -> Deferred:
        discard = _Discard()
        response.deliverBody(discard)
        return discard.done.addCallback(lambda _: response.code < 500)

    def _probe_failed(self, failure) -> bool:
        self._log.info(
            "upstream health probe failed: {error}", error=failure.getErrorMessage()
        )
        return False

    def _probed(self, up: bool) -> None:
        if up != self._last_result:
            self._log.info("upstream is {state}", state="up" if up else "down")
        self._last_result = up
        self._last_checked = self._clock.seconds()
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(up)


def health_document(services: dict[str, bool]) -> tuple[int, bytes]:
    """
    Quay's health JSON: HTTP status 200 only when every service is up.
    """
    status = 200 if all(services.values()) else 503
    body = {"data": {"services": services}, "status_code": status}
    return status, json.dumps(body, sort_keys=True).encode("ascii")


class HealthResource(Resource):
    """
    Quay's health document for quayfront itself (down while draining, so
    load balancers stop sending new connections) and its upstream.
    """

    isLeaf = True

    def __init__(self, probe: UpstreamProbe, draining: Callable[[], bool] = lambda: False) -> None:
        super().__init__()
        self._probe = probe
        self._draining = draining

    def render_GET(self, request):
        d = self._probe.is_up()

        def respond(upstream_up: bool) -> None:
            status, body = health_document(
                {"quayfront": not self._draining(), "upstream": upstream_up}
            )
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-cache, no-store")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if not client_gone(request):
                request.write(body)
                request.finish()

        d.addCallback(respond)
        return NOT_DONE_YET

    render_HEAD = render_GET
