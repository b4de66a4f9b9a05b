"""
The HTTP layer: a L{Site} whose requests are forwarded to their route's
upstream as soon as their headers are complete, except the paths quayfront
answers itself (health, C{/v1/_ping}, static directories).

Twisted's stock L{Request} reads the whole body (into memory or a temporary
file) before C{render()} runs.  L{FrontRequest} instead starts forwarding in
C{gotLength}, which the channel calls once the request head is parsed, and
hands each body chunk on in C{handleContentChunk}; it never calls the
spooling parts.

L{FrontChannel} feeds every client byte to quayfront's own strict framer
(L{quayfront.http.RequestFramer}) before Twisted's parser sees it, answers
what the framer refuses itself, and bounds each request head with
C{http.header_timeout_s}.  Requests are routed on their normalised path
(L{quayfront.http.normalise_target}) and sent upstream as routed.
"""

from __future__ import annotations

import os
from collections import deque
from io import BytesIO
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
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
from quayfront.forward import (
    Forwarding,
    close_after_response,
    header_pairs,
    respond_with_error,
)
from quayfront.headers import underscored_names
from quayfront.http import (
    NEED_DATA,
    PeerMisbehaved,
    RequestFramer,
    RequestHead,
    TargetRefused,
    normalise_target,
)
from quayfront.metrics import Counters
from quayfront.proxylayer import ConnectionOrigin, origin_of
from quayfront.routing import Route, Router
from quayfront.twistedadapter import (
    ChannelBadRequestHook,
    ChannelContinueHook,
    client_gone,
    request_line,
    send_continue,
    wrap_channel,
)


def _host(address) -> str:
    return getattr(address, "host", None) or str(address)


def _authority(address) -> bytes:
    host, port = getattr(address, "host", ""), getattr(address, "port", None)
    if not host or port is None:
        return b""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}".encode("ascii", "replace")


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace")


def _socket_origin(transport) -> ConnectionOrigin:
    # A channel not under quayfront's PROXY layer: the socket is the truth.
    return ConnectionOrigin(
        listener="direct",
        socket_peer=transport.getPeer(),
        client=transport.getPeer(),
        destination=transport.getHost(),
        proxy_header=None,
    )


class FrontChannel(ChannelBadRequestHook, ChannelContinueHook, http.HTTPChannel):
    """
    An HTTP/1.1 channel that only ever parses what quayfront's strict
    framer (L{RequestFramer}) has accepted, bounds each request head with a
    deadline, and whose automatic C{100 Continue} a request can hold back
    until its upstream is ready for the body.

    Bytes go through the framer first and only the bytes of complete, valid
    heads and of well-framed bodies reach Twisted's parser.  What the framer
    refuses is answered with a real response (a short body, C{Connection:
    close}) and a close: in a head, once every earlier request on the
    connection has been answered; in a body, through the request it belongs
    to, which also aborts its upstream request.

    The head deadline (C{header_timeout_s}) runs from the first byte of a
    head, or from the end of the previous response if the head had started
    arriving before it; every byte still resets the idle timeout.
    """

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self._framer = RequestFramer()
        # Whether each head passed on (in order) lets the connection persist.
        self._keep_alive: deque[bool] = deque()
        self._head_deadline: IDelayedCall | None = None
        # A refusal found behind requests still being answered.
        self._pending_refusal: PeerMisbehaved | None = None
        self._refused = False
        # Inside Twisted's own requestDone (nested ones included).
        self._replaying = 0

    def dataReceived(self, data: bytes) -> None:
        if self._replaying:
            # Twisted handing itself pipelined bytes it had buffered: the
            # framer passed them already.
            http.HTTPChannel.dataReceived(self, data)
            return
        if self._refused or self._pending_refusal is not None:
            return
        framer = self._framer
        framer.feed(data)
        released = []
        refusal = None
        try:
            while (event := framer.next_event()) is not NEED_DATA:
                released.append(event.raw)
                if isinstance(event, RequestHead):
                    self._keep_alive.append(event.keep_alive)
                    self._cancel_head_deadline()
        except PeerMisbehaved as error:
            refusal = error
        if released:
            super().dataReceived(released[0] if len(released) == 1 else b"".join(released))
        else:
            self.resetTimeout()
        if refusal is not None:
            self._misbehaved(refusal)
        else:
            self._watch_head()

    def checkPersistence(self, request, version) -> bool:
        persistent = super().checkPersistence(request, version)
        # Twisted reads only the first Connection header, split on spaces;
        # the framer's verdict (every token of every Connection header)
        # decides too, so both agree on where the connection ends.
        keep_alive = self._keep_alive.popleft() if self._keep_alive else True
        if persistent and not keep_alive:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return persistent

    def requestDone(self, request) -> None:
        # The channel replays the pipelined bytes it buffered through
        # self.dataReceived (see twistedadapter).
        self._replaying += 1
        try:
            super().requestDone(request)
        finally:
            self._replaying -= 1
        if self.requests or not self.persistent or self.transport is None:
            return
        if self._pending_refusal is not None:
            refusal, self._pending_refusal = self._pending_refusal, None
            self._refuse(refusal)
        else:
            # A head that started arriving during the response: its
            # deadline runs from now.
            self._watch_head()

    def connectionMade(self) -> None:
        super().connectionMade()
        # A site that drains tracks its connections (stand-ins may not).
        opened = getattr(self.site, "channel_opened", None)
        if opened is not None:
            opened(self)

    def connectionLost(self, reason) -> None:
        self._cancel_head_deadline()
        super().connectionLost(reason)
        # Only now has the last byte left quayfront (TLS and socket buffers
        # flushed): a drain waits for this, not for the response's finish().
        closed = getattr(self.site, "channel_closed", None)
        if closed is not None:
            closed(self)

    # The head deadline.

    def _watch_head(self) -> None:
        if (
            self._head_deadline is None
            and not self._refused
            and self._framer.head_in_progress
            and not self.requests
        ):
            site = self.site
            self._head_deadline = site.clock.callLater(
                site.header_timeout_s, self._head_timed_out
            )

    def _cancel_head_deadline(self) -> None:
        deadline, self._head_deadline = self._head_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._framer.head_in_progress and not self.requests and not self._refused:
            self._refuse(PeerMisbehaved(408, "request-head-timeout"))

    # Refusals.

    def _misbehaved(self, refusal: PeerMisbehaved) -> None:
        if not refusal.in_head and self.requests:
            # The body of the request being received: it answers.
            self._refused = True
            self.requests[-1].client_misbehaved(refusal)
        elif self.requests:
            self._pending_refusal = refusal
        else:
            self._refuse(refusal)

    def twisted_refused_request(self) -> None:
        """
        Twisted's own parser refused a request the framer passed (a
        backstop: it should never happen).
        """
        refusal = PeerMisbehaved(400, "bad-request", "refused by Twisted's parser")
        request = self.requests[-1] if self.requests else None
        if request is not None and getattr(request, "origin", None) is not None:
            # Its head was complete (the request has started): a body error.
            self._refused = True
            request.client_misbehaved(refusal)
        else:
            self._refuse(refusal)

    def _refuse(self, refusal: PeerMisbehaved) -> None:
        """
        Answer a request that never became one: status, short body,
        C{Connection: close}; then close.
        """
        self._refused = True
        self._cancel_head_deadline()
        site = self.site
        origin = origin_of(self.transport) or _socket_origin(self.transport)
        peer = _host(origin.client)
        self._log.info(
            "refused a request from {peer}: {status} {reason}{detail}",
            peer=peer,
            status=refusal.status,
            reason=refusal.reason,
            detail=f" ({refusal.detail})" if refusal.detail else "",
        )
        site.counters.increment("http_requests_refused", refusal.reason)
        site.counters.increment("http_responses", str(refusal.status))
        message = http.RESPONSES.get(refusal.status, b"Error")
        body = b"%d %s: %s\n" % (refusal.status, message, refusal.reason.encode("ascii"))
        headers = [
            b"HTTP/1.1 %d %s" % (refusal.status, message),
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
            b"Cache-Control: no-store",
        ]
        if site.hsts:
            headers.append(b"Strict-Transport-Security: " + site.hsts)
        self.transport.write(b"\r\n".join(headers) + b"\r\n\r\n" + body)
        site.log_refusal(origin, refusal, len(body), self._framer.refused_request_line)
        self.loseConnection()

    def hold_continue(self) -> bool:
        """
        Whether to hold back the automatic C{100 Continue}: a forwarded
        request's until its upstream is ready for the body.
        """
        request = self.requests[-1]
        if getattr(request, "forwarding", None) is not None and not request.upstream_ready:
            request.continue_held = True
            return True
        return False


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
    _target_refused: str | None = None
    _log = Logger()

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        # The request line is only on the channel until the body has been
        # read; the access log and the forwarding need it now.
        self.method, self.uri, self.clientproto = request_line(channel)
        self.path = self.uri.split(b"?", 1)[0]
        # Routed on the normalised path and sent upstream as routed; the
        # access log keeps the target as the client sent it.
        self.upstream_target = self.uri
        self._target_refused = None
        if self.uri.startswith(b"/"):
            try:
                self.path, self.upstream_target = normalise_target(self.uri)
            except TargetRefused as refused:
                self._target_refused = refused.reason
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
        underscored = underscored_names(header_pairs(self.requestHeaders))
        if underscored:
            self._log.info(
                "dropped request headers with underscores from {peer}: {names}",
                peer=_host(self.origin.client),
                names=", ".join(_text(name) for name in underscored),
            )
            for _ in underscored:
                # One at a time: the agreed Counters interface is (name, label).
                site.counters.increment("http_headers_dropped", "underscore")

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
        # answered locally with an error, and so are targets that cannot be
        # normalised (dot segments, encoded slashes), which would let a path
        # pick a route with looser limits than the one the upstream resolves
        # it to.
        return (
            self.uri.startswith(b"/")
            and len(self.requestHeaders.getRawHeaders(b"host", ())) <= 1
            and self._target_refused is None
        )

    def client_misbehaved(self, refusal: PeerMisbehaved) -> None:
        """
        The channel's framer refused this request's body: answer
        C{refusal.status} and close (or only close if the response has
        started); the upstream request, if any, is aborted.
        """
        site = self.site
        self._log.info(
            "refused the body of {method} {uri} from {peer}: {status} {reason}",
            method=_text(self.method),
            uri=_text(self.uri),
            peer=_host(self.origin.client),
            status=refusal.status,
            reason=refusal.reason,
        )
        site.counters.increment("http_requests_refused", refusal.reason)
        if self.forwarding is not None:
            self.forwarding.client_misbehaved(refusal.status, refusal.reason)
        elif self.startedWriting:
            self.channel.transport.abortConnection()
        else:
            # Not under the channel's parser, which is mid-body.
            site.clock.callLater(0, self._answer_refusal, refusal)

    def _answer_refusal(self, refusal: PeerMisbehaved) -> None:
        if not client_gone(self) and not self.startedWriting and not self.finished:
            respond_with_error(self, refusal.status, refusal.reason, close=True)

    def send_held_continue(self) -> None:
        """
        The upstream is ready for the body: send the C{100 Continue} the
        client asked for, if it is still wanted.
        """
        # With a pooled connection this can run inside gotLength, before the
        # channel asks for the 100: it then goes out at once.
        self.upstream_ready = True
        if self.continue_held and not self.startedWriting and not client_gone(self):
            self.continue_held = False
            send_continue(self.channel)

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
            respond_with_error(self, 400, self._target_refused or "bad-request-target")

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
        header_timeout_s: float = 60.0,
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
        self.header_timeout_s = header_timeout_s
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
        # Open client connections (their HTTP channels).
        self.channels: set[FrontChannel] = set()
        self._drained: list[Deferred] = []

    def request_started(self) -> None:
        self.in_flight += 1

    def request_ended(self) -> None:
        self.in_flight -= 1
        self._check_drained()

    def channel_opened(self, channel: FrontChannel) -> None:
        self.channels.add(channel)

    def channel_closed(self, channel: FrontChannel) -> None:
        self.channels.discard(channel)
        self._check_drained()

    def _check_drained(self) -> None:
        if self.in_flight == 0 and not self.channels and self._drained:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

    def drain(self) -> Deferred:
        """
        From now on, health checks fail and connections close after their
        current response (one already under way included); fires when no
        request is in flight and every connection has closed.
        """
        self.draining = True
        for channel in self.channels:
            if channel.requests:
                channel.persistent = False
        if self.in_flight == 0 and not self.channels:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._drained.append(waiter)
        return waiter

    def close_idle_connections(self) -> int:
        """
        Close (after flushing) every connection with no request under way;
        return how many.
        """
        idle = [channel for channel in self.channels if not channel.requests]
        for channel in idle:
            channel.loseConnection()
        return len(idle)

    def protocol(self):
        return wrap_channel(FrontChannel())

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

    def log_refusal(
        self, origin: ConnectionOrigin, refusal: PeerMisbehaved, body_bytes: int, line: bytes
    ) -> None:
        """
        The access-log line of a request refused in its head; C{line} is
        its request line, or what had arrived of it.
        """
        method, uri, protocol = (line.split(b" ", 2) + [b"", b""])[:3] if line else (b"-", b"", b"")
        now = self.clock.seconds()
        self.access_log.write(
            AccessLogEntry(
                timestamp=now,
                socket_peer=_host(origin.socket_peer),
                client=_host(origin.client),
                method=method,
                uri=uri,
                protocol=protocol,
                status=refusal.status,
                body_bytes_sent=body_bytes,
                referer=None,
                user_agent=None,
                request_time_s=0.0,
                request_length=len(line),
                upstream_response_time_s=None,
                listener=origin.listener,
                client_port=getattr(origin.client, "port", None),
                proxy_version=origin.proxy_header.version if origin.proxy_header else None,
                outcome=refusal.reason,
            )
        )

    def local_resource(self, path: bytes) -> IResource | None:
        return self.local_resources.get(path)

    def log(self, request) -> None:
        # FrontRequest writes its own line when it ends, aborted or not;
        # Twisted's hook runs only for finished requests.
        pass
