"""
The HTTP layer: a L{Site} whose requests are forwarded to their route's
upstream as soon as their headers are complete, except the paths quayfront
answers itself (health, C{/v1/_ping}, static directories).

Twisted's stock L{Request} reads the whole body (into memory or a temporary
file) before C{render()} runs.  L{FrontRequest} instead starts forwarding in
C{gotLength}, which the channel calls once the request head is parsed, and
hands each body chunk on in C{handleContentChunk}; it never calls the
spooling parts.
"""

from __future__ import annotations

import os
from io import BytesIO
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, pages, resource, server, static
from twisted.web.resource import IResource, Resource

from quayfront.accesslog import (
    CLIENT_CLOSED_REQUEST,
    AccessLog,
    AccessLogEntry,
    basic_auth_user,
)
from quayfront.connectioninfo import tls_fields, tlv_fields
from quayfront.forward import Forwarding, close_after_response, respond_with_error
from quayfront.metrics import Counters
from quayfront.proxylayer import ConnectionOrigin, origin_of
from quayfront.routing import Route, Router


def _host(address) -> str:
    return getattr(address, "host", None) or str(address)


def _authority(address) -> bytes:
    host, port = getattr(address, "host", ""), getattr(address, "port", None)
    if not host or port is None:
        return b""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}".encode("ascii", "replace")


def _has_dot_segment(path: bytes) -> bool:
    segments = unquote_to_bytes(path).split(b"/")
    return b"." in segments or b".." in segments


def _socket_origin(transport) -> ConnectionOrigin:
    # A channel not under quayfront's PROXY layer: the socket is the truth.
    return ConnectionOrigin(
        listener="direct",
        socket_peer=transport.getPeer(),
        client=transport.getPeer(),
        destination=transport.getHost(),
        proxy_header=None,
    )


class FrontChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel whose automatic C{100 Continue} a request can hold
    back until its upstream is ready for the body.
    """

    def _send100Continue(self) -> None:
        request = self.requests[-1]
        if getattr(request, "forwarding", None) is not None and not request.upstream_ready:
            request.continue_held = True
        else:
            super()._send100Continue()


class FrontRequest(server.Request):
    """
    A request that is either streamed to an upstream (L{Forwarding}) or
    answered locally.
    """

    # Upstream responses carry their own Content-Type (or none).
    defaultContentType = None
    forwarding: Forwarding | None = None
    route: Route | None = None
    origin: ConnectionOrigin
    continue_held = False
    upstream_ready = False

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        # The request line is only on the channel until the body has been
        # read; the access log and the forwarding need it now.
        self.method = channel._command
        self.uri = channel._path
        self.clientproto = channel._version
        self.path = self.uri.split(b"?", 1)[0]
        self.site = site = channel.site
        self._received_s = site.clock.seconds()
        self.origin = origin_of(channel.transport) or _socket_origin(channel.transport)
        # Read now: the channel is gone by the time an aborted request logs.
        self._tls = tls_fields(channel.transport) if site.wants_tls_fields else {}
        self._head_length = (
            len(self.method) + len(self.uri) + len(self.clientproto) + 4
            + sum(
                len(name) + len(value) + 4
                for name, values in self.requestHeaders.getAllRawHeaders()
                for value in values
            )
            + 2
        )
        self.tlvs = tlv_fields(self.origin.proxy_header)
        # The load balancer's UNIQUE_ID names the request where it has one,
        # so its logs and the registry's can be joined.
        self.request_id = self.tlvs.get("unique_id") or os.urandom(16).hex()
        site.request_started()

        if site.local_resource(self.path) is None and self._forwardable():
            self.route = site.router.route_for(self.path)
        if self.route is not None and self.route.upstream is not None:
            self.forwarding = Forwarding(
                self,
                length,
                self.route,
                site.clock,
                client_ip=_host(self.origin.client),
                vouched_headers=site.vouched_headers(self.request_id, self.tlvs, self._tls),
                reserved_headers=site.reserved_headers,
                default_host=_authority(self.origin.destination),
            )
        else:
            # Local answers take no body; whatever is sent is read and
            # dropped rather than spooled.
            self.content = BytesIO()
        # After the forwarding's own handlers, so an abort's outcome is known.
        self.notifyFinish().addBoth(self._write_access_log)

    def _forwardable(self) -> bool:
        # Only origin-form targets are routed; absolute-form and "*" are
        # answered locally with an error, and so are dot segments, which
        # would let a path pick a route with looser limits than the one the
        # upstream resolves it to.
        return (
            self.uri.startswith(b"/")
            and len(self.requestHeaders.getRawHeaders(b"host", ())) <= 1
            and not _has_dot_segment(self.path)
        )

    def send_held_continue(self) -> None:
        """
        The upstream is ready for the body: send the C{100 Continue} the
        client asked for, if it is still wanted.
        """
        # With a pooled connection this can run inside gotLength, before the
        # channel asks for the 100: it then goes out at once.
        self.upstream_ready = True
        if self.continue_held and not self.startedWriting and not self._disconnected:
            self.continue_held = False
            http.HTTPChannel._send100Continue(self.channel)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            site = self.site
            if site.hsts and not self.responseHeaders.hasHeader(b"strict-transport-security"):
                self.responseHeaders.setRawHeaders(b"Strict-Transport-Security", [site.hsts])
            if site.draining:
                close_after_response(self)
        super().write(data)

    def handleContentChunk(self, data: bytes) -> None:
        if self.forwarding is not None:
            self.forwarding.body_chunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.forwarding is not None:
            self.forwarding.body_done()
        else:
            super().requestReceived(command, path, version)

    def process(self) -> None:
        local = self.site.local_resource(self.path)
        if local is not None:
            self.render(local)
        elif self.route is not None and self.route.resource is not None:
            # A static directory: traverse below the route's prefix.
            self.prepath = []
            self.postpath = [
                unquote_to_bytes(segment)
                for segment in self.path[len(self.route.prefix) :].split(b"/")
            ]
            self.render(resource.getChildForRequest(self.route.resource, self))
        elif self.route is None and self._forwardable():
            respond_with_error(self, 404, "no-route")
        else:
            respond_with_error(self, 400, "bad-request-target")

    def _write_access_log(self, result: object) -> None:
        site = self.site
        site.request_ended()
        forwarding = self.forwarding
        origin = self.origin
        status = self.code
        if isinstance(result, Failure) and not self.startedWriting:
            status = CLIENT_CLOSED_REQUEST
        site.counters.increment("http_responses", str(status))
        site.access_log.write(
            AccessLogEntry(
                timestamp=site.clock.seconds(),
                socket_peer=_host(origin.socket_peer),
                client=_host(origin.client),
                method=self.method,
                uri=self.uri,
                protocol=self.clientproto,
                status=status,
                body_bytes_sent=self.sentLength,
                referer=self.requestHeaders.getRawHeaders(b"referer", [None])[0],
                user_agent=self.requestHeaders.getRawHeaders(b"user-agent", [None])[0],
                request_time_s=site.clock.seconds() - self._received_s,
                request_length=self._head_length
                + (forwarding.body_bytes_received if forwarding else 0),
                upstream_response_time_s=forwarding.upstream_response_time_s
                if forwarding
                else None,
                listener=origin.listener,
                client_port=getattr(origin.client, "port", None),
                request_id=self.request_id,
                tlvs=self.tlvs,
                tls=self._tls,
                proxy_version=origin.proxy_header.version if origin.proxy_header else None,
                outcome=forwarding.failure_reason if forwarding else None,
                remote_user=basic_auth_user(
                    self.requestHeaders.getRawHeaders(b"authorization", [None])[0]
                ),
            )
        )


class StaticDirectory(static.File):
    """
    Files under a directory; no directory listings.
    """

    def directoryListing(self):
        return pages.forbidden()


class RegistryPing(Resource):
    """
    C{/v1/_ping}, answered as Quay's front does: docker clients probe it to
    detect a v1 registry.
    """

    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"X-Docker-Registry-Version", b"0.6.0")
        request.setHeader(b"Cache-Control", b"no-cache")
        return b"true"

    render_HEAD = render_GET


class FrontSite(server.Site):
    """
    The site both TLS listeners serve.

    @ivar local_resources: exact paths answered by quayfront itself.
    """

    requestFactory = FrontRequest
    _log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        router: Router,
        local_resources: dict[bytes, IResource],
        access_log: AccessLog,
        counters: Counters,
        idle_timeout_s: float,
        request_id_header: str = "X-Request-ID",
        tlv_headers: tuple[tuple[str, str], ...] = (),
        tls_headers: tuple[tuple[str, str], ...] = (),
        hsts: str = "",
    ) -> None:
        super().__init__(Resource(), timeout=idle_timeout_s, reactor=clock)
        self.clock = clock
        self.router = router
        self.local_resources = dict(local_resources)
        self.access_log = access_log
        self.counters = counters
        self.hsts = hsts.encode("ascii")
        self.displayTracebacks = False
        self._request_id_header = request_id_header.encode("ascii")
        self._tlv_headers = tuple((field, name.encode("ascii")) for field, name in tlv_headers)
        self._tls_headers = tuple((field, name.encode("ascii")) for field, name in tls_headers)
        self.wants_tls_fields = access_log.format == "json" or bool(tls_headers)
        self.reserved_headers = frozenset(
            name.lower()
            for name in (
                self._request_id_header,
                *dict(self._tlv_headers).values(),
                *dict(self._tls_headers).values(),
            )
            if name
        )
        self.in_flight = 0
        self.draining = False
        self._drained: list[Deferred] = []

    def request_started(self) -> None:
        self.in_flight += 1

    def request_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._drained:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

    def drain(self) -> Deferred:
        """
        From now on, health checks fail and connections close after their
        current response; fires when no request is in flight.
        """
        self.draining = True
        if self.in_flight == 0:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._drained.append(waiter)
        return waiter

    def protocol(self):
        return http._GenericHTTPChannelProtocol(FrontChannel())

    def vouched_headers(
        self, request_id: str, tlvs: dict[str, str], tls: dict[str, str] | None = None
    ) -> list[tuple[bytes, bytes]]:
        """
        The headers quayfront itself asserts to the upstream for a request.
        """
        headers = []
        if self._request_id_header:
            headers.append((self._request_id_header, request_id.encode("ascii")))
        for fields, configured in ((tlvs, self._tlv_headers), (tls or {}, self._tls_headers)):
            for field, name in configured:
                if field in fields:
                    headers.append((name, fields[field].encode("ascii")))
        return headers

    def local_resource(self, path: bytes) -> IResource | None:
        return self.local_resources.get(path)

    def log(self, request) -> None:
        # FrontRequest writes its own line when it ends, aborted or not;
        # Twisted's hook runs only for finished requests.
        pass
