"""
The HTTP layer: a L{Site} whose requests are forwarded to their route's
upstream as soon as their headers are complete, except the paths quayfront
answers itself (health, C{/v1/_ping}, static directories).

Twisted's stock L{Request} reads the whole body (into memory or a temporary
file) before C{render()} runs.  L{FrontRequest} instead starts forwarding in
C{gotLength}, which the channel calls once the request head is parsed, and
hands each body chunk on in C{handleContentChunk}; it never calls the
spooling parts.

L{FrontChannel} is the connection: every client byte goes to quayfront's
own strict framer (L{quayfront.http.RequestFramer}) and requests are built
from its events alone (Twisted's C{HTTPChannel} and its line parser are not
used); it answers what the framer refuses itself, and bounds each request
head with C{http.header_timeout_s}.  Requests are routed on their
normalised path (L{quayfront.http.normalise_target}) and sent upstream as
routed.
"""

from __future__ import annotations

import os
from io import BytesIO
from itertools import chain
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, pages, resource, server, static
from twisted.web.http import parse_qs
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from quayfront.accesslog import (
    CLIENT_CLOSED_REQUEST,
    AccessLog,
    AccessLogEntry,
    basic_auth_user,
    make_access_log_entry,
)
from quayfront.connectioninfo import tls_fields, tlv_fields
from quayfront.forward import (
    Forwarding,
    close_after_response,
    header_pairs,
    respond_with_error,
)
from quayfront.headers import client_response_fields, underscored_names, written_name
from quayfront.relayedfields import relayed_lines
from quayfront.http import (
    BodyData,
    MessageEnd,
    PeerMisbehaved,
    RequestFramer,
    RequestHead,
    TargetRefused,
    normalise_target,
)
from quayfront.metrics import Counters, tls_failure_reason
from quayfront.proxylayer import ConnectionOrigin, origin_of
from quayfront.routing import Route, Router
from quayfront.twistedadapter import LeanRequest, add_checked_fields, client_gone, pull_to_push

#: Bytes of pipelined requests read while a response is under way before
#: the client stops being read (Twisted's channel reads as much).
MAX_HELD_BYTES = 16384


#: The last count of a request id's prefix (RequestIds._LAST), also as a
#: global: next_id reads it per request, and CPython 3.11 reads a class
#: attribute through an instance by the generic lookup.
_LAST_REQUEST_COUNT = (1 << 48) - 1


class RequestIds:
    """
    The ids of requests that bring none (no PROXY UNIQUE_ID): 32 lower-case
    hex digits, an 80-bit random prefix drawn once per process and a 48-bit
    counter.  One system call per process, not one per request as a random
    id each would take.

    Unique within a process (a new prefix is drawn in the unlikely case the
    counter runs out: 2**48 ids, nine years at a million a second); across
    processes, workers and restarts unless two prefixes drawn collide
    (about 2**-80 for a pair).  A forked child draws its own prefix (see
    L{REQUEST_IDS}), so workers forked from one parent never share one.
    """

    _LAST = _LAST_REQUEST_COUNT

    def __init__(self, urandom=os.urandom) -> None:
        self._urandom = urandom
        self._prefix = ""
        self._count = self._LAST

    def start_over(self) -> None:
        """
        Draw a new prefix for the next id.
        """
        self._count = self._LAST

    def next_id(self) -> str:
        count = self._count + 1
        if count > _LAST_REQUEST_COUNT:
            # Drawn at first use, not at import.
            self._prefix = self._urandom(10).hex()
            count = 1
        self._count = count
        return "%s%012x" % (self._prefix, count)


#: The request ids of this process; a forked child (a worker, twistd's
#: daemon) draws its own prefix.
REQUEST_IDS = RequestIds()
os.register_at_fork(after_in_child=REQUEST_IDS.start_over)


def _host(address) -> str:
    return getattr(address, "host", None) or str(address)


def _authority(address) -> bytes:
    host, port = getattr(address, "host", ""), getattr(address, "port", None)
    if not host or port is None:
        return b""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}".encode("ascii", "replace")


def first_field(fields: list[tuple[bytes, bytes]], lower_name: bytes) -> bytes | None:
    """
    The value of the first field named C{lower_name} (lower case), or None.
    """
    for name, value in fields:
        if name.lower() == lower_name:
            return value
    return None


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace")


class OriginText(NamedTuple):
    """
    What each request's access-log line and upstream headers say of its
    connection's origin: worked out once per connection.
    """

    #: The client's host (the PROXY header's, else the socket peer's).
    client: str
    socket_peer: str
    client_port: int | None
    proxy_version: int | None
    #: The C{Host} sent upstream for a request without one: the address
    #: the client connected to.
    default_host: bytes


def origin_text(origin: ConnectionOrigin) -> OriginText:
    return OriginText(
        client=_host(origin.client),
        socket_peer=_host(origin.socket_peer),
        client_port=getattr(origin.client, "port", None),
        proxy_version=origin.proxy_header.version if origin.proxy_header else None,
        default_host=_authority(origin.destination),
    )


def _socket_origin(transport) -> ConnectionOrigin:
    # A channel not under quayfront's PROXY layer: the socket is the truth.
    return ConnectionOrigin(
        listener="direct",
        socket_peer=transport.getPeer(),
        client=transport.getPeer(),
        destination=transport.getHost(),
        proxy_header=None,
    )


def _reactor_seconds() -> float:
    # The global reactor's time, for a channel left on TimeoutMixin's default
    # callLater (imported when used, as that callLater imports it).
    from twisted.internet import reactor

    return reactor.seconds()


class LazyTimeoutMixin:
    """
    C{twisted.protocols.policies.TimeoutMixin}'s idle timeout (the same
    C{timeOut}, C{setTimeout}, C{resetTimeout}, C{timeoutConnection} and
    C{callLater}, firing at the same moments) with a timer that is not
    moved on every reset: a reset only notes the new deadline
    (C{_idle_deadline}), and the timer, when it fires before it, is armed
    again for the rest.  A busy connection resets its timeout on every
    read and rarely sees it fire: one timer operation per timeout period
    instead of one per read.

    A subclass may reset inline: C{_idle_deadline = _idle_now() + timeOut}
    when C{timeOut} is not None (C{_idle_now} is the clock's C{seconds},
    set by L{start_idle_clock}); without a timer the deadline is not read,
    and L{setTimeout} sets it afresh before arming one.
    """

    timeOut: float | None = None
    #: When the idle timeout falls due, as of the last reset.
    _idle_deadline = 0.0
    #: The timer: due at or before C{_idle_deadline}; None when off or fired.
    _idle_call: IDelayedCall | None = None
    #: The time, by the clock of C{callLater}: the global reactor's, as
    #: TimeoutMixin's C{callLater}, unless L{start_idle_clock} says otherwise.
    _idle_now = staticmethod(_reactor_seconds)

    def start_idle_clock(self, seconds) -> None:
        """
        Read the time with C{seconds}, the clock of C{callLater}.
        """
        self._idle_now = seconds

    def callLater(self, period, func):
        # As TimeoutMixin's: set on each channel by the site's buildProtocol.
        from twisted.internet import reactor

        return reactor.callLater(period, func)

    def resetTimeout(self) -> None:
        """
        Restart the count-down, if the timeout is on and has not fired.
        """
        if self._idle_call is not None and self.timeOut is not None:
            self._idle_deadline = self._idle_now() + self.timeOut

    def setTimeout(self, period: float | None) -> float | None:
        """
        Change the timeout period (None: off), counting from now; return
        the previous one.
        """
        previous = self.timeOut
        self.timeOut = period
        call = self._idle_call
        if period is None:
            if call is not None:
                self._idle_call = None
                if call.active():
                    call.cancel()
            return previous
        deadline = self._idle_deadline = self._idle_now() + period
        if call is None:
            self._idle_call = self.callLater(period, self._idle_timer_fired)
        elif call.getTime() > deadline:
            # Due sooner than the timer: move it (later deadlines wait).
            call.reset(period)
        return previous

    def _idle_timer_fired(self) -> None:
        left = self._idle_deadline - self._idle_now()
        if left > 0:
            # Reset since it was armed: wait for the rest.
            self._idle_call = self.callLater(left, self._idle_timer_fired)
            return
        self._idle_call = None
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        self.transport.loseConnection()


@implementer(IPushProducer)
class FrontChannel(LazyTimeoutMixin, Protocol):
    """
    One client connection: every byte goes to quayfront's strict framer
    (L{RequestFramer}) and only its events make requests.

    A L{RequestHead} becomes a request of the site's C{requestFactory},
    built from the parsed head (no second parser); each L{BodyData} is
    handed to the request's C{handleContentChunk}, L{MessageEnd} to its
    C{requestReceived}, the calls a C{twisted.web} request expects of its
    channel.  One request at a time: bytes of a pipelined request wait in
    the framer, unparsed, until the response before it has ended (and the
    client stops being read once they exceed L{MAX_HELD_BYTES}).

    What the framer refuses is answered with a real response (a short
    body, C{Connection: close}) and a close: in a head, once every earlier
    request on the connection has been answered; in a body, through the
    request it belongs to, which also aborts its upstream request.

    The head deadline (C{header_timeout_s}) runs from the first byte of a
    head, or from the end of the previous response if the head had started
    arriving before it; every byte resets the idle timeout (C{timeOut}),
    which is off from the end of a request body to the end of its response.

    Towards its requests the channel is what C{twisted.web.http.Request}
    uses of C{HTTPChannel}: C{writeHeaders}, C{write}, C{writeSequence},
    C{registerProducer}, C{unregisterProducer}, C{requestDone}, C{getPeer},
    C{getHost}, C{isSecure}, C{loseConnection}, C{transport}, C{site},
    C{factory} and C{_respondToBadRequestAndDisconnect}.  Towards its transport it is the registered push producer:
    a client that does not read pauses the request's producer (the
    upstream) and, between requests, reading from the client.
    """

    _log = Logger()

    # Set on each channel by the site's buildProtocol.
    site = None
    factory = None
    requestFactory = None
    timeOut: float | None = None
    #: After an idle timeout's clean close, how long to wait before aborting
    #: a connection that does not go (Twisted's channel waits as long).
    abortTimeout = 15
    # Set on a connection only when used (a static file's producer, an
    # idle timeout's abort): at most 30 attributes set in __init__ and
    # connectionMade keep a connection's __dict__ a key-sharing one, 296
    # bytes, where a 31st makes it a dict of its own, 1,584 (measured with
    # sys.getsizeof on an idle connection).
    _request_producer = None
    _request_producer_streaming: bool | None = None
    _aborting_call: IDelayedCall | None = None

    def __init__(self) -> None:
        self._framer = RequestFramer()
        #: The request being received or answered, or None between requests.
        self.request = None
        #: Whether the connection may carry another request after this one.
        self.persistent = True
        #: Whether the request's body is complete and its response under
        #: way: the idle timeout is off until it ends.
        self.handling_request = False
        #: The idle timeout to restore when the response ends.
        self.saved_timeout: float | None = None
        #: Whether the client has stopped reading (the transport paused us).
        self.waiting_for_client = False
        self._receiving_body = False
        self._head_deadline: IDelayedCall | None = None
        self._refused = False
        self._closing = False
        self._driving = False
        self._holding_paused = False
        self._producer_registered = False
        self._head_out: bytes | None = None
        self._connection_facts: tuple | None = None
        self._peer = None
        self._host_address = None
        self._secure: bool | None = None

    # Protocol.

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        clock = getattr(self.site, "clock", None)
        if clock is not None:
            self.start_idle_clock(clock.seconds)
        self.setTimeout(self.timeOut)
        if IPushProducer.providedBy(transport):
            transport.registerProducer(self, True)
            self._producer_registered = True
        # A site that drains tracks its connections (stand-ins may not).
        opened = getattr(self.site, "channel_opened", None)
        if opened is not None:
            opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self._refused or self._closing:
            return
        timeout = self.timeOut
        if timeout is not None:
            # resetTimeout, inline: once per read.  (Without a timer the
            # deadline is not read: setTimeout sets it afresh.)
            self._idle_deadline = self._idle_now() + timeout
        framer = self._framer
        framer.feed(data)
        if self.handling_request:
            # A pipelined request waits for the response before it; past a
            # bound, so does the client (as Twisted's channel does).
            if (
                framer.buffered_bytes > MAX_HELD_BYTES
                and not self._holding_paused
                and not self.waiting_for_client
            ):
                self._holding_paused = True
                self.transport.pauseProducing()
            return
        self._drive()

    def connectionLost(self, reason=connectionDone) -> None:
        if isinstance(reason.value, SSL.Error):
            # A TLS error ended the connection (a failed handshake, mostly):
            # counted by OpenSSL's reason.  Here rather than in a wrapper
            # around the channel, which every byte would pass through.
            self.site.counters.increment(
                "tls_handshake_failures", tls_failure_reason(reason.value)
            )
        self._cancel_head_deadline()
        self.setTimeout(None)
        request, self.request = self.request, None
        if request is not None:
            request.connectionLost(reason)
        if self._aborting_call is not None:
            if self._aborting_call.active():
                self._aborting_call.cancel()
            self._aborting_call = None
        # Only now has the last byte left quayfront (TLS and socket buffers
        # flushed): a drain waits for this, not for the response's finish().
        closed = getattr(self.site, "channel_closed", None)
        if closed is not None:
            closed(self)

    def timeoutConnection(self) -> None:
        if self.handling_request and self.timeOut is None:
            # The timer of the idle timeout suspended for this response.
            return
        self._log.info("Timing out client: {peer}", peer=str(self.transport.getPeer()))
        if self.abortTimeout is not None:
            self._aborting_call = self.callLater(self.abortTimeout, self._force_abort)
        self.loseConnection()

    def _force_abort(self) -> None:
        self._aborting_call = None
        self._log.info("Forcibly timing out client: {peer}", peer=str(self.transport.getPeer()))
        self.transport.abortConnection()

    def connection_facts(
        self,
    ) -> tuple[ConnectionOrigin, dict[str, str], dict[str, str], OriginText]:
        """
        Where the connection comes from, its TLS fields (when the site logs
        or forwards them), its PROXY TLVs and what requests say of its
        origin: read once per connection, for every request on it.
        """
        facts = self._connection_facts
        if facts is None:
            transport = self.transport
            origin = origin_of(transport) or _socket_origin(transport)
            tls = tls_fields(transport) if self.site.wants_tls_fields else {}
            facts = self._connection_facts = (
                origin, tls, tlv_fields(origin.proxy_header), origin_text(origin),
            )
        return facts

    # Framer events.

    def _drive(self) -> None:
        """
        Act on the framer's events until it needs data, the current request
        has all its body (its response comes first), or the connection is
        being refused or closed.
        """
        if self._driving:
            # Re-entered from a request that finished inside the loop
            # below: the loop goes on with the next events.
            return
        self._driving = True
        framer = self._framer
        try:
            while not self.handling_request and not self._refused and not self._closing:
                event = framer.next_event()
                kind = type(event)
                if kind is BodyData:
                    request = self.request
                    if event.data and request is not None:
                        request.handleContentChunk(event.data)
                elif kind is RequestHead:
                    self._head_received(event)
                elif kind is MessageEnd:
                    self._body_received()
                else:
                    break
        except PeerMisbehaved as refusal:
            self._misbehaved(refusal)
        finally:
            self._driving = False
        if (
            self.request is None
            and self._head_deadline is None
            and self._framer.head_in_progress
        ):
            self._watch_head()

    def _head_received(self, head: RequestHead) -> None:
        if self._head_deadline is not None:
            self._cancel_head_deadline()
        request = self.requestFactory(self)
        self.request = request
        self._receiving_body = True
        target = head.target
        request.method = head.method
        request.uri = target
        request.clientproto = version = head.version
        path, question, query = target.partition(b"?")
        request.path = path
        request.args = parse_qs(query, 1) if question else {}
        fields = head.headers
        received_head = getattr(request, "received_head", None)
        if received_head is not None:
            received_head(head)
        elif getattr(request, "received_fields", None) is not None:
            # A request that takes the fields alone.
            request.received_fields(fields)
        else:
            # Any other twisted.web request.
            headers = request.requestHeaders
            for name, value in fields:
                headers.addRawHeader(name, value)
        if not head.keep_alive:
            # The framer reads every token of every Connection header.
            self.persistent = False
            if version == b"HTTP/1.1":
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        request.gotLength(head.content_length)
        expect = head.expect
        if expect is None or self.request is not request or self._refused or self._closing:
            return
        # As Twisted's channel: the first Expect header, on HTTP/1.1.
        if expect.lower() == b"100-continue" and version == b"HTTP/1.1":
            if not self.hold_continue():
                self.send_continue()

    def _body_received(self) -> None:
        request = self.request
        self._receiving_body = False
        self.handling_request = True
        # The response may take long to produce: no idle timeout meanwhile.
        # Its timer is left to run out (timeoutConnection ignores it while
        # a response is under way) and is moved, not made again, when the
        # response ends: two fewer timer operations per request.
        if self.timeOut:
            self.saved_timeout, self.timeOut = self.timeOut, None
        request.requestReceived(request.method, request.uri, request.clientproto)

    # The head deadline.

    def _watch_head(self) -> None:
        if (
            self._head_deadline is None
            and not self._refused
            and not self._closing
            and self.request is None
            and self._framer.head_in_progress
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
        if self._framer.head_in_progress and self.request is None and not self._refused:
            self._refuse(PeerMisbehaved(408, "request-head-timeout"))

    # Refusals.

    def _misbehaved(self, refusal: PeerMisbehaved) -> None:
        request = self.request
        self._refused = True
        if request is None:
            self._refuse(refusal)
        else:
            # The body of the request being received: it answers.
            request.client_misbehaved(refusal)

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

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        What C{twisted.web.http.Request} calls on its channel when it finds
        a request bad itself (a malformed multipart body in
        C{requestReceived}, which quayfront's requests do not call): answered
        like the framer's refusals, as C{400 bad-request}.
        """
        refusal = PeerMisbehaved(400, "bad-request", "refused by twisted.web's request")
        request = self.request
        if request is not None and getattr(request, "origin", None) is not None:
            # Its head was complete (the request has started): a body error.
            self._refused = True
            request.client_misbehaved(refusal)
        else:
            self._refuse(refusal)

    # 100 Continue.

    def hold_continue(self) -> bool:
        """
        Whether to hold back the automatic C{100 Continue}: a forwarded
        request's until its upstream is ready for the body.
        """
        request = self.request
        if getattr(request, "forwarding", None) is not None and not request.upstream_ready:
            request.continue_held = True
            return True
        return False

    def send_continue(self) -> None:
        """
        Send C{100 Continue}: the client may send the body now.
        """
        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # What the request uses of its channel.

    def requestDone(self, request) -> None:
        """
        The response to C{request} has been written: read the next request,
        or close.
        """
        if request is not self.request:
            raise TypeError(f"{request!r} is not the request of this channel")
        if self._head_out is not None:
            self.flush_head()
        self.request = None
        self.handling_request = False
        if self._receiving_body:
            # Answered before its body was read: what follows cannot be
            # told apart from the rest of that body.
            self._receiving_body = False
            self.persistent = False
        if not self.waiting_for_client:
            self._holding_paused = False
            self.transport.resumeProducing()
        if not self.persistent:
            self._closing = True
            self.loseConnection()
            return
        saved, self.saved_timeout = self.saved_timeout, None
        if saved:
            # setTimeout(saved), for the usual case: the timer kept through
            # the response is due before the new deadline, and waits.
            self.timeOut = saved
            call = self._idle_call
            deadline = self._idle_deadline = self._idle_now() + saved
            if call is None or call.getTime() > deadline:
                self.timeOut = None
                self.setTimeout(saved)
        if not self._framer.idle:
            # A pipelined request (or the start of one) that waited.  (An
            # idle framer has no event to give and no head under way: the
            # loop would find nothing.)
            self._drive()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers) -> None:
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts.extend((name, b": ", value, b"\r\n"))
        parts.append(b"\r\n")
        # Held until the request's write returns, so that a head and the
        # first body bytes written with it leave in one piece.
        self.flush_head()
        self._head_out = b"".join(parts)

    def write_head(self, head: bytes) -> None:
        """
        Hold a response head its request built itself (a relayed one, see
        L{FrontRequest.relay_response_head}), as L{writeHeaders} holds one.
        """
        self.flush_head()
        self._head_out = head

    def write_response_start(self, head: bytes | list[bytes]) -> None:
        """
        Send a response head its request built itself (with the first body
        bytes, as a list), at once, after any head held back.
        """
        if self._head_out is not None:
            self.flush_head()
        if type(head) is bytes:
            self.transport.write(head)
        else:
            self.transport.writeSequence(head)

    def flush_head(self) -> None:
        """
        Send a response head held back by L{writeHeaders}.
        """
        head, self._head_out = self._head_out, None
        if head is not None and self.transport is not None:
            self.transport.write(head)

    def write(self, data: bytes) -> None:
        head, self._head_out = self._head_out, None
        if head is not None:
            self.transport.writeSequence([head, data])
        else:
            self.transport.write(data)

    def writeSequence(self, iovec) -> None:
        head, self._head_out = self._head_out, None
        if head is not None:
            iovec = [head, *iovec]
        self.transport.writeSequence(iovec)

    # Every request asks for these; a connection's addresses and its TLS do
    # not change, and each answer passes through the TLS and PROXY layers.

    def getPeer(self):
        peer = self._peer
        if peer is None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def getHost(self):
        host = self._host_address
        if host is None:
            host = self._host_address = self.transport.getHost()
        return host

    def isSecure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = self._secure = ISSLTransport(self.transport, None) is not None
        return secure

    def loseConnection(self) -> None:
        """
        Close once what has been written is sent.
        """
        self.flush_head()
        if self._producer_registered:
            self._producer_registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def registerProducer(self, producer, streaming: bool) -> None:
        if self._request_producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer"
                f" {self._request_producer} was never unregistered."
            )
        if not streaming:
            producer = pull_to_push(producer, self)
        self._request_producer = producer
        self._request_producer_streaming = streaming
        if not streaming:
            producer.startStreaming()

    def unregisterProducer(self) -> None:
        producer = self._request_producer
        if producer is None:
            return
        if not self._request_producer_streaming:
            producer.stopStreaming()
        self._request_producer = None
        self._request_producer_streaming = None

    def hand_back_idle_timeout(self, timeout_s: float | None) -> None:
        """
        Give the connection back an idle timeout: at once, or, while a
        response is under way, as the one to restore when it ends.
        """
        if self.handling_request:
            self.saved_timeout = timeout_s
        else:
            self.setTimeout(timeout_s)

    # IPushProducer, for the transport: the client reads or does not.

    def pauseProducing(self) -> None:
        self.waiting_for_client = True
        if self._request_producer is not None:
            self._request_producer.pauseProducing()
        if not self.handling_request:
            # Between requests too: do not read requests whose responses
            # the client does not read.
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.waiting_for_client = False
        if self._request_producer is not None:
            self._request_producer.resumeProducing()
        if not self.handling_request:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._request_producer is not None:
            self._request_producer.stopProducing()


class FrontRequest(LeanRequest):
    """
    A request that is either streamed to an upstream (L{Forwarding}) or
    answered locally.
    """

    # Upstream responses carry their own Content-Type (or none).
    defaultContentType = None
    lean_channel_type = FrontChannel
    forwarding: Forwarding | None = None
    route: Route | None = None
    origin: ConnectionOrigin
    continue_held = False
    upstream_ready = False
    #: The reason of the error quayfront answered itself, if it did.
    answered_with: str | None = None
    _target_refused: str | None = None
    _log = Logger()
    #: The request's header fields, in order, as the channel parsed them.
    fields: list[tuple[bytes, bytes]] | None = None
    #: The head as the channel's framer framed it, when it did.
    head: RequestHead | None = None
    _request_headers: Headers | None = None
    #: Fields not yet copied into C{requestHeaders}.
    _fields_pending: list[tuple[bytes, bytes]] | tuple = ()
    _response_headers: Headers | None = None
    #: A relayed response's head fields, as C{Headers} would hold them
    #: (see L{relay_response_head}); None when C{responseHeaders} holds them.
    _relayed: dict[bytes, list[bytes]] | None = None
    #: A relayed response's head whose field lines are joined as they came
    #: (see L{quayfront.relayedfields}): the upstream's pairs, the length
    #: to send, the lines and their shape; C{_relayed} when materialised.
    _relayed_lines: tuple | None = None

    # The forwarding path reads the fields as pairs; C{requestHeaders}, which
    # Twisted's request and quayfront's own resources use, is filled from
    # them only when something reads it.

    @property
    def requestHeaders(self) -> Headers:
        headers = self._request_headers
        if headers is None:
            headers = self._request_headers = Headers()
        pending = self._fields_pending
        if pending:
            self._fields_pending = ()
            # Checked by the framer.
            add_checked_fields(headers, pending)
        return headers

    @requestHeaders.setter
    def requestHeaders(self, headers: Headers) -> None:
        self._request_headers = headers
        self._fields_pending = ()

    # A relayed response's head is kept as the fields a Headers would hold
    # and written from them (relay_response_head); C{responseHeaders},
    # which twisted.web and quayfront's own answers use, holds them as a
    # Headers again, and the head goes twisted.web's way, when something
    # reads it.

    # Set on every request: kept in slots rather than the instance
    # dictionary, which then stays within the 30 keys CPython 3.11 shares
    # between instances (a dictionary of its own per request otherwise,
    # where no attribute read, write or method lookup is specialised).
    __slots__ = (
        "finished", "startedWriting", "chunked", "sentLength", "producer", "etag",
        "lastModified", "content", "_encoder", "_disconnected", "_inFakeHead",
        "method", "uri", "clientproto", "path", "args", "site", "code", "code_message",
        "streamingProducer", "upstream_target", "_received_s", "origin", "_tls", "tlvs",
        "_origin_text", "_head_length", "request_id",
    )

    def __init__(self, channel, *args, **kwargs) -> None:
        # What twisted.web's Request holds for these as class attributes,
        # which the slots now stand in front of (a test holds the values to
        # twisted.web's).  LeanRequest's own __init__ sets the rest.
        self.method = b"(no method yet)"
        self.uri = b"(no uri yet)"
        self.clientproto = b"(no clientproto yet)"
        self.path = self.args = self.site = None
        self.code = 200
        self.code_message = b"OK"
        super().__init__(channel, *args, **kwargs)
        if args or kwargs:
            # Made twisted.web's way, which leaves these to its classes.
            self.finished = self.startedWriting = self.chunked = self.sentLength = 0
            self.producer = self.etag = self.lastModified = self.content = None
            self._encoder = None
            self._disconnected = self._inFakeHead = False
        else:
            # Read on every request before anything sets them: instance
            # attributes, which CPython 3.11 reads faster than class ones
            # (see LeanRequest.__init__).
            self.defaultContentType = None
            self.lean_channel_type = FrontChannel
            self._response_headers = self._relayed = self._relayed_lines = None
            self._target_refused = None

    def _materialise_relayed(self) -> None:
        """
        Hold a relayed head joined as it came (C{_relayed_lines}) as the
        fields C{relay_response_head} holds otherwise, with what writing it
        added if it was written.
        """
        (pairs, length, _, shape), self._relayed_lines = self._relayed_lines, None
        fields = client_response_fields(pairs)
        if length is not None:
            fields[b"Content-Length"] = [b"%d" % length]
        if self.startedWriting:
            hsts = self.site.hsts
            if hsts and not shape[4]:
                fields[b"Strict-Transport-Security"] = [hsts]
            if self.chunked:
                fields[b"Transfer-Encoding"] = [b"chunked"]
        self._relayed = fields

    @property
    def responseHeaders(self) -> Headers:
        if self._relayed_lines is not None:
            self._materialise_relayed()
        fields = self._relayed
        if fields is not None:
            self._relayed = None
            headers = self._response_headers = Headers()
            for name, values in fields.items():
                headers.setRawHeaders(name, values)
            return headers
        headers = self._response_headers
        if headers is None:
            headers = self._response_headers = Headers()
        return headers

    @responseHeaders.setter
    def responseHeaders(self, headers: Headers) -> None:
        self._response_headers = headers
        self._relayed = None
        self._relayed_lines = None

    def setHeader(self, name, value) -> None:
        if self._relayed_lines is not None:
            self._materialise_relayed()
        fields = self._relayed
        if fields is None:
            self.responseHeaders.setRawHeaders(name, [value])
        elif (
            type(name) is bytes
            and type(value) is bytes
            and b"\r" not in value
            and b"\n" not in value
        ):
            # As Headers.setRawHeaders would set it: in place if present.
            fields[written_name(name)] = [value]
        else:
            self.responseHeaders.setRawHeaders(name, [value])

    def relay_response_head(
        self,
        code: int,
        phrase: bytes | None,
        pairs: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None:
        """
        An upstream response's head, to relay: its status, its fields as
        received (the ones to pass are those
        L{quayfront.headers.client_response_fields} keeps), and the
        C{Content-Length} to send, if any.  The head written is the one
        C{responseHeaders} and twisted.web's C{Request.write} would write
        (added to the fields set already, HSTS and C{Connection: close}
        where quayfront adds them, chunked framing), built straight from
        the fields.
        """
        if type(code) is int and type(phrase) is bytes:
            # What setResponseCode sets, for what it would accept as is.
            self.code = code
            self.code_message = phrase
        else:
            self.setResponseCode(code, phrase)
        if (
            self._relayed is None
            and self._relayed_lines is None
            and self._response_headers is None
            and isinstance(self.channel, FrontChannel)
        ):
            # The usual head: its lines joined as they came, and written so.
            joined = relayed_lines(pairs, length)
            if joined is not None:
                self._relayed_lines = (pairs, length, *joined)
                return
        elif self._relayed_lines is not None:
            self._materialise_relayed()
        fields = client_response_fields(pairs)
        if self._relayed is not None:
            # Relayed twice: the first as Headers, then this one added.
            self.responseHeaders
        held = self._response_headers
        earlier = () if held is None else list(held.getAllRawHeaders())
        if earlier:
            merged = {name: list(values) for name, values in earlier}
            for name, values in fields.items():
                merged.setdefault(name, []).extend(values)
            fields = merged
        if length is not None:
            fields[b"Content-Length"] = [b"%d" % length]
        self._relayed = fields
        if not isinstance(self.channel, FrontChannel):
            # Another channel takes heads as Headers only.
            self.responseHeaders

    def received_head(self, head: RequestHead) -> None:
        """
        The channel framed the request's head: its fields, in order, and
        what the framer learnt of them (L{RequestHead}).
        """
        self.head = head
        self.fields = self._fields_pending = head.headers

    def received_fields(self, fields: list[tuple[bytes, bytes]]) -> None:
        """
        The channel parsed the request's head: its header fields, in order.
        """
        self.fields = fields
        self._fields_pending = fields

    def field_pairs(self) -> list[tuple[bytes, bytes]]:
        """
        The request's header fields as (name, value) pairs, in order.
        """
        fields = self.fields
        if fields is None:
            # Made without a channel's parse (a stand-in channel).
            fields = header_pairs(self.requestHeaders)
        return fields

    def gotLength(self, length: int | None) -> None:
        # The channel has set method, uri, clientproto, path, args and the
        # headers from the parsed head.
        channel = self.channel
        head = self.head
        # Routed on the normalised path and sent upstream as routed; the
        # access log keeps the target as the client sent it.
        uri = self.upstream_target = self.uri
        origin_form = uri[:1] == b"/"
        if origin_form:
            # find rather than in: CPython's bytes.__contains__ first tries
            # its operand as an integer, so every bytes operand costs a
            # TypeError made and dropped (about four times find's cost).
            if head is None or uri.find(b"%") >= 0 or uri.find(b"/.") >= 0:
                try:
                    self.path, self.upstream_target = normalise_target(uri)
                except TargetRefused as refused:
                    self._target_refused = refused.reason
            # Else nothing to decode and no dot segment: the channel's path
            # is the normalised one (normalise_target would answer it).
        self.site = site = channel.site
        self._received_s = now_s = site.clock.seconds()
        # Read now: the channel is gone by the time an aborted request logs.
        self.origin, self._tls, self.tlvs, self._origin_text = channel.connection_facts()
        fields = self.fields
        if fields is None:
            fields = self.field_pairs()
        self._head_length = (
            len(self.method) + len(uri) + len(self.clientproto) + 6
            + sum(map(len, chain.from_iterable(fields))) + 4 * len(fields)
        )
        # The load balancer's UNIQUE_ID names the request where it has one,
        # so its logs and the registry's can be joined.
        self.request_id = self.tlvs.get("unique_id") or REQUEST_IDS.next_id()
        site.request_started()
        if head is None or b"".join(head.names).find(b"_") >= 0:
            underscored = underscored_names(fields)
            if underscored:
                self._log.info(
                    "dropped request headers with underscores from {peer}: {names}",
                    peer=self._origin_text.client,
                    names=", ".join(_text(name) for name in underscored),
                )
                for _ in underscored:
                    # One at a time: the agreed Counters interface is (name, label).
                    site.counters.increment("http_headers_dropped", "underscore")

        # A head from the channel's framer has one Host at most (it refuses
        # more): only the rest of _forwardable is left to check.
        if site.local_resource(self.path) is None and (
            (origin_form and self._target_refused is None)
            if head is not None and isinstance(channel, FrontChannel)
            else self._forwardable()
        ):
            self.route = site.router.route_for(self.path)
        route = self.route
        if route is not None and route.upstream is not None:
            # Unpacked rather than read by name: CPython 3.11 reads a named
            # tuple's fields through the generic attribute lookup.
            client, _, _, _, default_host = self._origin_text
            # Positional: a class called with keywords gathers them in a
            # dict (Forwarding's parameters, in order).
            self.forwarding = Forwarding(
                self,
                length,
                route,
                site.clock,
                client,  # client_ip
                site.vouched_headers(self.request_id, self.tlvs, self._tls),
                site.reserved_headers,
                default_host,
                False,  # watch_client
                head,
                now_s,
            )
        else:
            # Local answers take no body; whatever is sent is read and
            # dropped rather than spooled.
            self.content = BytesIO()
        # What notifyFinish() would add, without a Deferred to make and fire
        # for every request: the request itself (see callback).
        self.notifications.append(self)

    # The request stands in its own notifications for the Deferred that
    # notifyFinish adds: twisted.web calls callback(None) when the response
    # is finished, or errback(reason) when the connection is lost first, and
    # empties the list after (so the reference to itself goes with it).  An
    # error ending the request is logged, as a Deferred would log it, not
    # raised into twisted.web's finish or connectionLost.
    def callback(self, result: object) -> None:
        try:
            self._request_over(result)
        except Exception:
            self._log.failure("ending a request")

    errback = callback

    def _request_over(self, result: object) -> None:
        forwarding = self.forwarding
        if forwarding is not None and isinstance(result, Failure):
            forwarding.client_gone(result)
        # After the forwarding has heard, so an abort's outcome is known.
        self._write_access_log(result)
        # The forwarding points back at this request: with the request over,
        # the link is cut so that both are freed by their reference counts,
        # not left to the garbage collector (a cost on every request).  What
        # the forwarding still has to do (an upstream to stop) it does
        # through its own reference.
        self.forwarding = None

    def _forwardable(self) -> bool:
        # Only origin-form targets are routed; absolute-form and "*" are
        # answered locally with an error, and so are targets that cannot be
        # normalised (dot segments, encoded slashes), which would let a path
        # pick a route with looser limits than the one the upstream resolves
        # it to.
        return (
            self.uri.startswith(b"/")
            and sum(1 for name, _ in self.field_pairs() if name.lower() == b"host") <= 1
            and self._target_refused is None
        )

    def _forwardable_target(self) -> bool:
        return self.uri.startswith(b"/") and self._target_refused is None

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
            self.channel.send_continue()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            site = self.site
            relayed = self._relayed_lines
            if relayed is not None:
                # The shape as a plain tuple (see quayfront.relayedfields).
                _, _, _, content_length_at, hsts = relayed[3]
                if not site.draining and self._write_relayed_lines(
                    relayed[2], content_length_at >= 0, None if hsts else site.hsts, data
                ):
                    return
                self._materialise_relayed()
            fields = self._relayed
            if fields is not None:
                if site.hsts and b"Strict-Transport-Security" not in fields:
                    fields[b"Strict-Transport-Security"] = [site.hsts]
                if site.draining:
                    close_after_response(self)
                if self._write_relayed_head(fields, data):
                    return
            elif site.hsts and not self.responseHeaders.hasHeader(b"strict-transport-security"):
                self.responseHeaders.setRawHeaders(b"Strict-Transport-Security", [site.hsts])
            if site.draining:
                close_after_response(self)
        super().write(data)
        channel = self.channel
        if channel is not None:
            # The head goes out with the first body bytes, not later.
            channel.flush_head()

    def handleContentChunk(self, data: bytes) -> None:
        if self.forwarding is not None:
            self.forwarding.body_chunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.forwarding is not None:
            self.forwarding.body_done()
        else:
            # The channel has set the request line, path and query
            # arguments; the body was dropped, so no form is parsed.
            self.process()

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
        # Unpacked: see gotLength.
        client, socket_peer, client_port, proxy_version, _ = self._origin_text
        status = self.code
        if result is not None and isinstance(result, Failure) and not self.startedWriting:
            status = CLIENT_CLOSED_REQUEST
        head = self.head
        fields = self.fields
        if head is not None and fields is head.headers:
            # logged_fields, inline, with the framer's names (one per field).
            names = head.names
            referer = fields[names.index(b"referer")][1] if b"referer" in names else None
            user_agent = (
                fields[names.index(b"user-agent")][1] if b"user-agent" in names else None
            )
            authorization = (
                fields[names.index(b"authorization")][1] if b"authorization" in names else None
            )
        else:
            referer, user_agent, authorization = logged_fields(
                self.field_pairs() if fields is None else fields,
                None if head is None else head.names,
            )
        if forwarding is not None:
            exchange = forwarding.exchange
            ending = exchange.ending
            outcome = None if ending is None else ending.reason
            request_length = self._head_length + exchange.body_bytes
            upstream_response_time_s = forwarding.upstream_response_time_s
        else:
            outcome = self.answered_with
            request_length = self._head_length
            upstream_response_time_s = None
        # One reading of the clock: the line's time and the request's end.
        now_s = site.clock.seconds()
        site.counters.increment("http_responses", str(status))
        site.access_log.write(
            make_access_log_entry(
                timestamp=now_s,
                socket_peer=socket_peer,
                client=client,
                method=self.method,
                uri=self.uri,
                protocol=self.clientproto,
                status=status,
                body_bytes_sent=self.sentLength,
                referer=referer,
                user_agent=user_agent,
                request_time_s=now_s - self._received_s,
                request_length=request_length,
                upstream_response_time_s=upstream_response_time_s,
                listener=origin.listener,
                client_port=client_port,
                request_id=self.request_id,
                tlvs=self.tlvs,
                tls=self._tls,
                proxy_version=proxy_version,
                outcome=outcome,
                # The metrics' label, known here: not routed again.  Local
                # answers leave it to the path.
                route_label=self.route.config.prefix if self.route is not None else None,
                remote_user=None if authorization is None else basic_auth_user(authorization),
            )
        )


def logged_fields(
    fields: list[tuple[bytes, bytes]], names: list[bytes] | None = None
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """
    The first Referer, User-Agent and Authorization values of C{fields}
    (None for each one absent), for the access log.  C{names}, the fields'
    names lower-cased as the framer gives them, saves lower-casing them all
    again.
    """
    if names is None or len(names) != len(fields):
        names = [name.lower() for name, _ in fields]
    referer = fields[names.index(b"referer")][1] if b"referer" in names else None
    user_agent = fields[names.index(b"user-agent")][1] if b"user-agent" in names else None
    authorization = (
        fields[names.index(b"authorization")][1] if b"authorization" in names else None
    )
    return referer, user_agent, authorization


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
        # The usual vouched headers: the request id alone.
        self._request_id_only = bool(
            self._request_id_header and not self._tlv_headers and not self._tls_headers
        )
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
        if self._drained:
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
            if channel.request is not None:
                channel.persistent = False
        if self.in_flight == 0 and not self.channels:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._drained.append(waiter)
        return waiter

    def cut_off_exchanges_in(self, timeout_s: float) -> int:
        """
        Every forwarded exchange still under way is cut off if it has not
        ended in C{timeout_s}: both its connections aborted, its ending
        logged (C{drain-timeout}) with its access-log line.  Returns how
        many exchanges were told.
        """
        told = 0
        for channel in list(self.channels):
            forwarding = getattr(channel.request, "forwarding", None)
            if forwarding is not None:
                forwarding.drain_started(timeout_s)
                told += 1
        return told

    def close_idle_connections(self) -> int:
        """
        Close (after flushing) every connection with no request under way;
        return how many.
        """
        idle = [channel for channel in self.channels if channel.request is None]
        for channel in idle:
            channel.loseConnection()
        return len(idle)

    def protocol(self):
        return FrontChannel()

    def vouched_headers(
        self, request_id: str, tlvs: dict[str, str], tls: dict[str, str] | None = None
    ) -> list[tuple[bytes, bytes]]:
        """
        The headers quayfront itself asserts to the upstream for a request.
        """
        if self._request_id_only:
            return [(self._request_id_header, request_id.encode("ascii"))]
        headers = []
        if self._request_id_header:
            headers.append((self._request_id_header, request_id.encode("ascii")))
        if not self._tlv_headers and not self._tls_headers:
            return headers
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
