"""
Streaming one client request to its upstream and the response back.

The upstream request starts as soon as the client's headers are complete
(and the route's rate limit and the upstream's concurrency cap admit it);
body bytes are written upstream as they arrive and response bytes are
written to the client as they arrive, with backpressure both ways: a slow
upstream stops quayfront reading from the client, a slow client stops
quayfront reading from the upstream.  Nothing is spooled, so memory does not
grow with body size.

Failures are never silent.  A client that goes away cancels the upstream
request (aborting its connection, so a half-sent blob is never taken as
whole); an upstream response that ends early aborts the client connection,
so a truncated body never looks complete; quayfront's own answers (413, 429,
502, 503, 504) use the registry's JSON error shape on registry paths.

An upstream may answer before the request body is complete (401, 403, 413
mid-upload): the answer is relayed at once and the client connection is
closed after it rather than reading the rest of the body.  For the same
reason a client's C{Expect: 100-continue} is answered only once the upstream
has the request head, so a client that asked first never sends a body the
upstream has already refused.
"""

from __future__ import annotations

import json
import math
from typing import Callable

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from quayfront.headers import client_response_headers, upstream_request_headers
from quayfront.http import UpstreamMisbehaved
from quayfront.limits import Overloaded
from quayfront.routing import Route
from quayfront.twistedadapter import (
    client_gone,
    hand_back_idle_timeout,
    proxied_transport,
    waiting_for_client,
)
from quayfront.upstream import upstream_uri

# Paths whose clients (docker, podman, skopeo, containerd) expect registry
# errors as JSON and retry 502/503/504.
REGISTRY_API_PREFIXES = (b"/v1/", b"/v2/")


def header_pairs(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


@implementer(IBodyProducer)
class RequestBodyStream:
    """
    The client's request body as the agent's body producer: chunks are
    pushed in by the HTTP channel as they arrive, and the agent's
    pause/resume stop and restart reading from the client.
    """

    def __init__(
        self,
        length: int,
        pause_client: Callable[[], None],
        resume_client: Callable[[], None],
        started: Callable[[], None] = lambda: None,
    ) -> None:
        self.length = length
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._started = started
        self._consumer = None
        # Chunks that arrived before the upstream connection was ready; at
        # most one read's worth, since the client is paused on the first.
        self._backlog: list[bytes] = []
        self._producing: Deferred | None = None
        self._complete = False
        self._stopped = False
        self.upstream_paused = False
        self.bytes_received = 0

    @property
    def complete(self) -> bool:
        return self._complete

    # Fed by the client side.

    def body_chunk(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self._stopped:
            return
        if self._consumer is None:
            self._backlog.append(data)
            self._pause_client()
            return
        self._consumer.write(data)
        if self.upstream_paused:
            # The channel resumes its transport on its own schedule (after
            # writing a 100 Continue, for one); the upstream still wants a
            # pause, and says so only once.
            self._pause_client()

    def body_complete(self) -> None:
        self._complete = True
        producing, self._producing = self._producing, None
        if producing is not None:
            producing.callback(None)

    # IBodyProducer, driven by the agent.

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._started()
        backlog, self._backlog = self._backlog, []
        for chunk in backlog:
            consumer.write(chunk)
        if self._complete:
            return succeed(None)
        self._producing = Deferred()
        if not self.upstream_paused:
            self._resume_client()
        return self._producing

    def pauseProducing(self) -> None:
        self.upstream_paused = True
        self._pause_client()

    def resumeProducing(self) -> None:
        self.upstream_paused = False
        if not self._stopped:
            self._resume_client()

    def stopProducing(self) -> None:
        # The upstream request is over (answered early, failed, cancelled):
        # the agent no longer waits for the Deferred, and further client
        # bytes have nowhere to go.
        self._stopped = True
        self._producing = None
        self._backlog = []

    stop = stopProducing


class ResponseRelay(Protocol):
    """
    Writes the upstream response body to the client, with the upstream
    transport registered as the client request's producer.
    """

    def __init__(self, forwarding: Forwarding) -> None:
        self._forwarding = forwarding

    def connectionMade(self) -> None:
        forwarding = self._forwarding
        request = forwarding.request
        # The upstream socket itself, for aborting an exchange that ended
        # early (the proxy producer lets go of it when the body ends).
        forwarding.upstream_transport = proxied_transport(self.transport)
        if client_gone(request):
            self.transport.stopProducing()
            return
        request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self._forwarding.response_data(data)

    def connectionLost(self, reason: Failure) -> None:
        self._forwarding.response_ended(reason)


class Forwarding:
    """
    One client request on its way to the upstream and back.
    """

    _log = Logger()

    def __init__(
        self,
        request,
        length: int | None,
        route: Route,
        clock: IReactorTime,
        client_ip: str,
        vouched_headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = (),
        reserved_headers: frozenset[bytes] = frozenset(),
        default_host: bytes = b"",
    ) -> None:
        self.request = request
        self.route = route
        self._limits = route.config
        self._clock = clock
        self._started_s = clock.seconds()
        self.upstream_response_time_s: float | None = None
        self.failure_reason: str | None = None
        self._relay: ResponseRelay | None = None
        self.upstream_transport = None
        self._client_paused_timeout: object = None
        self._admission: Deferred | None = None
        self._upstream: Deferred | None = None
        self._holding_slot = False
        self._over = False
        # Set once quayfront itself stops the upstream request, so the
        # failure that cancelling produces is not answered a second time.
        self._abandoned = False
        # The client connection is being aborted: nothing may finish it.
        self._aborting_client = False
        self._response_timer: IDelayedCall | None = None
        self._watchdog: IDelayedCall | None = None
        self._last_activity_s = self._started_s

        self._headers = Headers()
        for name, value in upstream_request_headers(
            header_pairs(request.requestHeaders),
            client_ip=client_ip,
            vouched=vouched_headers,
            reserved=reserved_headers,
            default_host=default_host,
        ):
            self._headers.addRawHeader(name, value)

        # The channel reports length None for a chunked body and 0 both for
        # "Content-Length: 0" and for no body at all; only the first two are
        # sent with a body (the agent writes the framing itself).
        self.body: RequestBodyStream | None = None
        if length is None or request.requestHeaders.hasHeader(b"content-length"):
            self.body = RequestBodyStream(
                UNKNOWN_LENGTH if length is None else length,
                self._pause_client,
                self._resume_client,
                started=request.send_held_continue,
            )
        request.notifyFinish().addErrback(self._client_gone)

        max_body = self._limits.max_body_bytes
        too_large = bool(max_body and length is not None and length > max_body)
        wait_s = None
        if not too_large and route.rate_limiter is not None:
            wait_s = route.rate_limiter.check(client_ip)
        if too_large:
            self._fail(413, "body-too-large")
        elif wait_s is not None:
            self._fail(429, "rate-limited", retry_after_s=wait_s)
        else:
            self._arm_watchdog()
            self._admission = route.upstream.limiter.acquire()
            self._admission.addCallbacks(self._admitted, self._not_admitted)

    @property
    def body_complete(self) -> bool:
        return self.body is None or self.body.complete

    @property
    def body_bytes_received(self) -> int:
        return 0 if self.body is None else self.body.bytes_received

    # Admission.

    def _admitted(self, _: object) -> None:
        self._admission = None
        self._holding_slot = True
        if self._over:
            self._release_slot()
            return
        request = self.request
        try:
            self._upstream = self.route.upstream.agent.request(
                request.method, upstream_uri(request.upstream_target), self._headers, self.body
            )
        except Exception as error:
            # The agent refuses some requests synchronously (an invalid URI);
            # the request must still end and give its slot back.
            self._fail(502, "upstream-request-refused", detail=str(error))
            return
        self._upstream.addCallbacks(self._got_response, self._upstream_failed)
        if self.body_complete and not self._over:
            self._arm_response_timer()

    def _not_admitted(self, failure: Failure) -> None:
        self._admission = None
        if failure.check(CancelledError):
            return
        failure.trap(Overloaded)
        self._fail(503, failure.value.reason)

    def _release_slot(self) -> None:
        if self._holding_slot:
            self._holding_slot = False
            self.route.upstream.limiter.release()

    # Timers.

    def _arm_response_timer(self) -> None:
        # Armed by whichever comes last of admission and the end of the
        # body; both may ask for a body-less request.
        if self._response_timer is not None:
            return
        self._response_timer = self._clock.callLater(
            self._limits.response_timeout_s, self._response_timed_out
        )

    def _response_timed_out(self) -> None:
        self._response_timer = None
        self._abandon_upstream()
        self._fail(504, "upstream-timeout")

    def _arm_watchdog(self) -> None:
        self._watchdog = self._clock.callLater(self._limits.idle_timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        self._watchdog = None
        if self._over:
            return
        idle_s = self._clock.seconds() - self._last_activity_s
        if idle_s < self._limits.idle_timeout_s:
            self._watchdog = self._clock.callLater(
                self._limits.idle_timeout_s - idle_s, self._check_idle
            )
            return
        if self._admission is not None:
            # Waiting for an upstream slot: the queue's own timeout decides.
            self._watchdog = self._clock.callLater(self._limits.idle_timeout_s, self._check_idle)
        elif self._relay is not None:
            # Mid-response: either side may be the one that stopped.
            self._abort_exchange("response-idle-timeout")
        elif not self.body_complete:
            stalled_upstream = self.body is not None and self.body.upstream_paused
            self._abandon_upstream()
            if stalled_upstream:
                self._fail(504, "upstream-stalled")
            else:
                self._fail(408, "client-body-timeout")

    def _touch(self) -> None:
        self._last_activity_s = self._clock.seconds()

    # Backpressure on the client connection.

    def _pause_client(self) -> None:
        channel = getattr(self.request, "channel", None)
        if channel is None:
            return
        channel.transport.pauseProducing()
        # A client we stopped reading from is not idle: do not time it out.
        if self._client_paused_timeout is None:
            self._client_paused_timeout = channel.setTimeout(None) or 0

    def _resume_client(self) -> None:
        channel = getattr(self.request, "channel", None)
        if channel is None:
            return
        self._restore_client_timeout()
        channel.transport.resumeProducing()

    def _restore_client_timeout(self) -> None:
        """
        Give the channel back the idle timeout a pause took away.
        """
        saved, self._client_paused_timeout = self._client_paused_timeout, None
        channel = getattr(self.request, "channel", None)
        if saved is None or channel is None:
            return
        hand_back_idle_timeout(channel, saved or None)

    # The client's side of the exchange.

    def body_chunk(self, data: bytes) -> None:
        body = self.body
        if body is None or self._over:
            return
        self._touch()
        max_body = self._limits.max_body_bytes
        if max_body and body.bytes_received + len(data) > max_body:
            # Not one byte past the limit reaches the upstream.
            body.bytes_received += len(data)
            self._abandon_upstream()
            self._fail(413, "body-too-large")
            return
        body.body_chunk(data)

    def body_done(self) -> None:
        self._restore_client_timeout()
        if self.body is not None:
            self.body.body_complete()
        if self._watchdog is not None and self._relay is None:
            # Waiting for the response head is the response timer's job.
            self._watchdog.cancel()
            self._watchdog = None
        if self._upstream is not None and self._relay is None and not self._over:
            self._arm_response_timer()

    def client_misbehaved(self, status: int, reason: str) -> None:
        """
        The client broke the framing of its request body: the upstream
        request is aborted (incomplete) and the client answered C{status}
        and closed, or only closed if its response has started.
        """
        if self._over:
            return
        self._abandon_upstream()
        if self.request.startedWriting:
            self.failure_reason = reason
            self._aborting_client = True
            self._end()
            channel = getattr(self.request, "channel", None)
            if channel is not None:
                channel.transport.abortConnection()
            return
        self._fail(status, reason)

    def _client_gone(self, reason: Failure) -> None:
        if self.failure_reason is None:
            self.failure_reason = "client-closed"
        self._abandon_upstream()
        self._end()

    # The upstream's side.

    def _got_response(self, response) -> None:
        if self._response_timer is not None:
            self._response_timer.cancel()
            self._response_timer = None
        self.upstream_response_time_s = self._clock.seconds() - self._started_s
        request = self.request
        self._relay = ResponseRelay(self)
        if client_gone(request) or self._over:
            response.deliverBody(self._relay)
            return
        request.setResponseCode(response.code, response.phrase)
        for name, value in client_response_headers(header_pairs(response.headers)):
            request.responseHeaders.addRawHeader(name, value)
        if (
            response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
            and response.code not in http.NO_BODY_CODES
        ):
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        if not self.body_complete:
            # An early answer: the rest of the body is not read.
            self._log.info(
                "upstream answered {status} to {method} {uri} before the request body was"
                " complete; closing the client connection after the answer",
                status=response.code,
                method=_text(request.method),
                uri=_text(request.uri),
            )
            stop_reading_requests(request)
        elif not self._limits.keepalive:
            close_after_response(request)
        self._touch()
        if self._watchdog is None:
            self._arm_watchdog()
        response.deliverBody(self._relay)
        channel = getattr(request, "channel", None)
        if self._relay.transport is not None and waiting_for_client(channel):
            # A pipelined response starting while the client has not read
            # the previous one: the channel pauses producers only when its
            # transport fills, so this one must start paused (and only after
            # deliverBody, which resumes the upstream on its way out).
            self._relay.transport.pauseProducing()

    def response_data(self, data: bytes) -> None:
        self._last_activity_s = self._clock.seconds()
        self.request.write(data)

    def response_ended(self, reason: Failure) -> None:
        self._end()
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if client_gone(request) or request.finished or self._aborting_client:
            return
        # PotentialDataLoss: a body delimited by the upstream closing the
        # connection, complete by HTTP's own definition.
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            if not self.body_complete and self.upstream_transport is not None:
                # An early answer: the request body never finished, and the
                # agent's close would wait on a producer that will not end.
                self.upstream_transport.abortConnection()
            return
        if self.failure_reason is None:
            self.failure_reason = "upstream-truncated"
        self._log.warn(
            "upstream response to {method} {uri} ended early; aborting the client connection:"
            " {error}",
            method=_text(request.method),
            uri=_text(request.uri),
            error=reason.getErrorMessage(),
        )
        request.channel.transport.abortConnection()

    def _upstream_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self._over or self._abandoned:
            # Whoever cancelled it has answered the client already.
            self._end()
            return
        misbehaved = _upstream_misbehaved(failure)
        if misbehaved is not None:
            status, reason = 502, misbehaved.reason
        elif failure.check(net_error.ConnectError, net_error.DNSLookupError):
            status, reason = 502, "upstream-unreachable"
        elif failure.check(ResponseNeverReceived, ResponseFailed, net_error.ConnectionLost):
            status, reason = 502, "upstream-reset"
        else:
            status, reason = 502, "upstream-error"
        self._fail(status, reason, detail=_describe(failure))

    # Endings.

    def _abandon_upstream(self) -> None:
        """
        Stop whatever is under way upstream; an unfinished request is
        aborted, so the upstream sees it end incomplete.
        """
        self._abandoned = True
        if self._admission is not None:
            admission, self._admission = self._admission, None
            admission.cancel()
        if self._relay is None:
            if self._upstream is not None:
                # Also when the agent's Deferred has fired with the pooled
                # connection and waits on the request: cancel() reaches the
                # inner Deferred and aborts that connection.
                self._upstream.cancel()
        elif self._relay.transport is not None:
            self._relay.transport.stopProducing()

    def _abort_exchange(self, reason: str) -> None:
        self.failure_reason = reason
        request = self.request
        self._log.warn(
            "{reason}: {method} {uri}: no progress for {idle}s; aborting both connections",
            reason=reason,
            method=_text(request.method),
            uri=_text(request.uri),
            idle=self._limits.idle_timeout_s,
        )
        self._aborting_client = True
        self._abandon_upstream()
        self._end()
        if request.channel is not None:
            request.channel.transport.abortConnection()

    def _end(self) -> None:
        """
        The exchange is over: timers stop, the body stream stops, the client
        gets its idle timeout back and the upstream slot is freed.
        """
        self._over = True
        for timer in (self._response_timer, self._watchdog):
            if timer is not None and timer.active():
                timer.cancel()
        self._response_timer = self._watchdog = None
        if self.body is not None:
            self.body.stop()
        self._restore_client_timeout()
        self._release_slot()

    def _fail(
        self, status: int, reason: str, detail: str = "", retry_after_s: float | None = None
    ) -> None:
        self._end()
        self.failure_reason = reason
        request = self.request
        self._log.warn(
            "{status} for {method} {uri}: {reason}{detail}",
            status=status,
            method=_text(request.method),
            uri=_text(request.uri),
            reason=reason,
            detail=f": {detail}" if detail else "",
        )
        extra = []
        if retry_after_s is not None:
            extra.append((b"Retry-After", b"%d" % max(1, math.ceil(retry_after_s))))
        # Answered on the next reactor turn: a failure found while the
        # channel is parsing (the head, a body chunk) must not finish the
        # request under it; Twisted's channel cannot take that.
        self._clock.callLater(0, self._answer, status, reason, extra)

    def _answer(self, status: int, reason: str, headers: list[tuple[bytes, bytes]]) -> None:
        request = self.request
        if client_gone(request) or request.startedWriting:
            return
        respond_with_error(
            request,
            status,
            reason,
            close=not self.body_complete or not self._limits.keepalive,
            headers=headers,
        )


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace")


def _upstream_misbehaved(failure: Failure) -> UpstreamMisbehaved | None:
    if failure.check(ResponseFailed, ResponseNeverReceived):
        for reason in failure.value.reasons:
            if reason.check(UpstreamMisbehaved):
                return reason.value
    return None


def _describe(failure: Failure) -> str:
    if failure.check(ResponseFailed, ResponseNeverReceived):
        return "; ".join(f.getErrorMessage() or f.type.__name__ for f in failure.value.reasons)
    return failure.getErrorMessage() or failure.type.__name__


def close_after_response(request) -> None:
    """
    Close the client connection once this response is written.
    """
    request.setHeader(b"Connection", b"close")
    if request.channel is not None:
        request.channel.persistent = False


def stop_reading_requests(request) -> None:
    """
    Close after this response, and ignore what else the client sends: it
    belongs to a request that has been answered, and the channel must not
    parse it as a new one.
    """
    close_after_response(request)
    if request.channel is not None:
        request.channel.dataReceived = lambda data: None


_REGISTRY_ERROR_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    408: "UNKNOWN",
    413: "SIZE_INVALID",
    429: "TOOMANYREQUESTS",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}


def respond_with_error(
    request,
    status: int,
    reason: str,
    close: bool = False,
    headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = (),
) -> None:
    """
    Answer C{request} with an error quayfront makes itself: the registry's
    JSON error shape on registry API paths, plain text elsewhere.

    @param close: the client may still be sending a body nobody will read,
        so close the connection after the answer instead of reading on.
    """
    message = http.RESPONSES.get(status, b"Error").decode("ascii")
    if request.path.startswith(REGISTRY_API_PREFIXES):
        code = _REGISTRY_ERROR_CODES.get(status, "UNKNOWN")
        body = json.dumps(
            {"errors": [{"code": code, "message": message.lower(), "detail": {"reason": reason}}]}
        ).encode("ascii")
        content_type = b"application/json"
    else:
        body = f"{status} {message}: {reason}\n".encode("ascii")
        content_type = b"text/plain; charset=utf-8"
    request.setResponseCode(status)
    closing = request.responseHeaders.getRawHeaders(b"connection", [])
    request.responseHeaders = Headers({b"Connection": closing} if closing else {})
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.setHeader(b"Cache-Control", b"no-store")
    for name, value in headers:
        request.setHeader(name, value)
    if close:
        stop_reading_requests(request)
    request.write(body)
    request.finish()
