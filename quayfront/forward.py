"""
Streaming one client request to the upstream and its response back.

The upstream request starts as soon as the client's headers are complete;
body bytes are written upstream as they arrive and response bytes are
written to the client as they arrive, with backpressure both ways: a slow
upstream stops quayfront reading from the client, a slow client stops
quayfront reading from the upstream.  Nothing is spooled, so memory does not
grow with body size.

Failures are never silent.  A client that goes away cancels the upstream
request (aborting its connection, so a half-sent blob is never taken as
whole); an upstream response that ends early aborts the client connection,
so a truncated body never looks complete.
"""

from __future__ import annotations

import json
from typing import Callable

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
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
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer
from zope.interface import implementer

from quayfront.headers import client_response_headers, upstream_request_headers
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
    ) -> None:
        self.length = length
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._consumer = None
        # Chunks that arrived before the upstream connection was ready; at
        # most one read's worth, since the client is paused on the first.
        self._backlog: list[bytes] = []
        self._producing: Deferred | None = None
        self._complete = False
        self._stopped = False
        self._upstream_paused = False
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
        if self._upstream_paused:
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
        backlog, self._backlog = self._backlog, []
        for chunk in backlog:
            consumer.write(chunk)
        if self._complete:
            return succeed(None)
        self._producing = Deferred()
        if not self._upstream_paused:
            self._resume_client()
        return self._producing

    def pauseProducing(self) -> None:
        self._upstream_paused = True
        self._pause_client()

    def resumeProducing(self) -> None:
        self._upstream_paused = False
        if not self._stopped:
            self._resume_client()

    def stopProducing(self) -> None:
        # The upstream request is over (answered early, failed, cancelled):
        # the agent no longer waits for the Deferred, and further client
        # bytes have nowhere to go.
        self._stopped = True
        self._producing = None
        self._backlog = []


class ResponseRelay(Protocol):
    """
    Writes the upstream response body to the client, with the upstream
    transport registered as the client request's producer.
    """

    def __init__(self, forwarding: Forwarding) -> None:
        self._forwarding = forwarding

    def connectionMade(self) -> None:
        request = self._forwarding.request
        if request._disconnected:
            self.transport.stopProducing()
            return
        request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self._forwarding.request.write(data)

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
        agent: IAgent,
        clock: IReactorTime,
        client_ip: str,
        vouched_headers: list[tuple[bytes, bytes]] = [],
        reserved_headers: frozenset[bytes] = frozenset(),
    ) -> None:
        self.request = request
        self._clock = clock
        self._started_s = clock.seconds()
        self.upstream_response_time_s: float | None = None
        self.failure_reason: str | None = None
        self._relay: ResponseRelay | None = None
        self._client_paused_timeout: object = None

        headers = Headers()
        for name, value in upstream_request_headers(
            header_pairs(request.requestHeaders),
            client_ip=client_ip,
            vouched=vouched_headers,
            reserved=reserved_headers,
        ):
            headers.addRawHeader(name, value)

        # The channel reports length None for a chunked body and 0 both for
        # "Content-Length: 0" and for no body at all; only the first two are
        # sent with a body (the agent writes the framing itself).
        self.body: RequestBodyStream | None = None
        if length is None:
            self.body = RequestBodyStream(UNKNOWN_LENGTH, self._pause_client, self._resume_client)
        elif request.requestHeaders.hasHeader(b"content-length"):
            self.body = RequestBodyStream(length, self._pause_client, self._resume_client)

        self._upstream = agent.request(request.method, upstream_uri(request.uri), headers, self.body)
        self._upstream.addCallbacks(self._got_response, self._upstream_failed)
        request.notifyFinish().addErrback(self._client_gone)

    @property
    def body_complete(self) -> bool:
        return self.body is None or self.body.complete

    @property
    def body_bytes_received(self) -> int:
        return 0 if self.body is None else self.body.bytes_received

    # Backpressure on the client connection.

    def _client_transport(self) -> IPushProducer | None:
        channel = self.request.channel
        return None if channel is None else channel.transport

    def _pause_client(self) -> None:
        channel = self.request.channel
        if channel is None:
            return
        channel.transport.pauseProducing()
        # A client we stopped reading from is not idle: do not time it out.
        if self._client_paused_timeout is None:
            self._client_paused_timeout = channel.setTimeout(None) or 0

    def _resume_client(self) -> None:
        channel = self.request.channel
        if channel is None:
            return
        if self._client_paused_timeout is not None:
            channel.setTimeout(self._client_paused_timeout or None)
            self._client_paused_timeout = None
        channel.transport.resumeProducing()

    # The client's side of the exchange.

    def body_chunk(self, data: bytes) -> None:
        if self.body is not None:
            self.body.body_chunk(data)

    def body_done(self) -> None:
        if self.body is not None:
            self.body.body_complete()

    def _client_gone(self, reason: Failure) -> None:
        if self.failure_reason is None:
            self.failure_reason = "client-closed"
        if not self._upstream.called:
            # Aborts the upstream connection, mid-body if need be.
            self._upstream.cancel()
        elif self._relay is not None and self._relay.transport is not None:
            self._relay.transport.stopProducing()

    # The upstream's side.

    def _got_response(self, response) -> None:
        self.upstream_response_time_s = self._clock.seconds() - self._started_s
        request = self.request
        self._relay = ResponseRelay(self)
        if request._disconnected:
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
        response.deliverBody(self._relay)

    def response_ended(self, reason: Failure) -> None:
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if request._disconnected:
            return
        # PotentialDataLoss: a body delimited by the upstream closing the
        # connection, complete by HTTP's own definition.
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            return
        self.failure_reason = "upstream-truncated"
        self._log.warn(
            "upstream response to {method} {uri} ended early; aborting the client connection:"
            " {error}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            error=reason.getErrorMessage(),
        )
        request.channel.transport.abortConnection()

    def _upstream_failed(self, failure: Failure) -> None:
        request = self.request
        if failure.check(CancelledError) or request._disconnected:
            return
        if failure.check(TimeoutError):
            status, reason = 504, "upstream-timeout"
        elif failure.check(net_error.ConnectError, net_error.DNSLookupError):
            status, reason = 502, "upstream-unreachable"
        elif failure.check(ResponseNeverReceived, ResponseFailed, net_error.ConnectionLost):
            status, reason = 502, "upstream-reset"
        else:
            status, reason = 502, "upstream-error"
        self.failure_reason = reason
        self._log.warn(
            "{status} for {method} {uri}: {reason}: {error}",
            status=status,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            reason=reason,
            error=_describe(failure),
        )
        respond_with_error(request, status, reason, close=not self.body_complete)


def _describe(failure: Failure) -> str:
    if failure.check(ResponseFailed, ResponseNeverReceived):
        return "; ".join(f.getErrorMessage() or f.type.__name__ for f in failure.value.reasons)
    return failure.getErrorMessage() or failure.type.__name__


_REGISTRY_ERROR_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}


def respond_with_error(request, status: int, reason: str, close: bool = False) -> None:
    """
    Answer C{request} with an error quayfront makes itself: the registry's
    JSON error shape on registry API paths, plain text elsewhere.

    @param close: the client is still sending a body nobody will read, so
        close the connection after the answer instead of reading on.
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
    request.responseHeaders = Headers()
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.setHeader(b"Cache-Control", b"no-store")
    channel = request.channel
    if close:
        request.setHeader(b"Connection", b"close")
        channel.persistent = False
        # Whatever else the client sends belongs to a request that has been
        # answered; the channel must not parse it as a new one.
        channel.dataReceived = lambda data: None
    request.write(body)
    request.finish()
