"""
quayfront's own HTTP/1.1 client for its upstreams, behind Twisted's
C{IAgent}: L{UpstreamAgent} sends a request on a pooled persistent
connection (L{UpstreamPool}) and answers with an C{IResponse}, the way
C{twisted.web.client.Agent} does, so callers (forwarding, the health probe)
talk to an C{IAgent} whatever sits under it.  It replaces C{Agent},
C{HTTPConnectionPool} and C{_newclient} on the data path: the response is
read by quayfront's strict, bounded L{ResponseReader}, and one small
exchange object per request stands where Twisted stacks a request writer, a
parser, a proxy producer, a response and a chain of Deferreds.

Behaviour callers rely on, as with C{Agent}:

  - the request head goes out as given (method, target, headers in order,
    C{Host} from the headers, else the URI's authority); a body from an
    C{IBodyProducer} is framed with C{Content-Length} when its length is
    known, else chunked, and streams with backpressure: the body producer
    is registered on the upstream socket, which pauses it when its buffer
    fills;
  - the Deferred fires with the response once its head is read, even while
    the request body is still being written (an early answer: the body
    producer is stopped and the connection is never reused); it fails with
    L{ResponseNeverReceived} (nothing read), L{ResponseFailed} (part of a
    response read, or a response that broke the rules: the reason is then
    an L{UpstreamMisbehaved}) or L{RequestTransmissionFailed} (lost while
    the body was being written), or with the connection error itself;
  - C{deliverBody(protocol)} gives the protocol an C{IPushProducer}
    transport (pausing it stops reading from the upstream) and ends with
    L{ResponseDone}, L{PotentialDataLoss} (a body delimited by the close)
    or L{ResponseFailed}: a body cut short is never presented as complete;
  - cancelling the Deferred aborts the upstream connection;
  - a dead pooled connection found on reuse is retried once on a new
    connection, only for a body-less idempotent request of which no
    response byte arrived.

A connection goes back to the pool only after a complete exchange that
neither side asked to close; idle connections are closed after the
upstream's C{idle_keepalive_s} and kept at most C{max_idle_connections}
per upstream.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Union

from twisted.internet.defer import AlreadyCalledError, CancelledError, Deferred, fail
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

from quayfront.http import (
    ResponseData,
    ResponseEnd,
    ResponseHead,
    ResponseIncomplete,
    ResponseReader,
    UpstreamMisbehaved,
)

# Agent retries these (RFC 9110 section 9.2.2) when a pooled connection
# turns out dead; never a request with a body.
_RETRYABLE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"))
# Methods whose semantics anticipate a body get "Content-Length: 0" when
# sent without one (RFC 9110 section 8.6), as Agent does.
_METHODS_WITH_BODY = frozenset((b"PUT", b"POST"))
# Bytes that cannot appear in a method or a request target.
_UNSAFE = frozenset(range(0x21)) | {0x7F}
# Methods known to be safe to send, not looked at byte by byte.
_KNOWN_METHODS = frozenset(
    (b"GET", b"HEAD", b"PUT", b"POST", b"PATCH", b"DELETE", b"OPTIONS", b"TRACE")
)
# Of those, the ones sent without a body as they are (no framing field).
_BODILESS_METHODS = _KNOWN_METHODS - _METHODS_WITH_BODY


class WrongBodyLength(Exception):
    """
    A body producer wrote more or fewer bytes than the length it announced.
    """


class _Phase(enum.Enum):
    """
    Where one exchange is.
    """

    #: Waiting for a connection.
    CONNECTING = "connecting"
    #: The head is written; the request body is being written.
    SENDING = "sending"
    #: The request is written; waiting for the response head.
    WAITING = "waiting"
    #: The response head is delivered; its body is being read.
    RECEIVING = "receiving"
    #: Over: the connection is back in the pool, closed, or aborted.
    DONE = "done"


# EnumType has a __getattr__, so reading a member through its class
# (_Phase.DONE) takes Python's slow attribute path, about 0.1 us, and the
# code below does so several times per request: it reads the same members
# as module-level names instead (one lookup, not two).
_CONNECTING = _Phase.CONNECTING
_SENDING = _Phase.SENDING
_WAITING = _Phase.WAITING
_RECEIVING = _Phase.RECEIVING
_DONE = _Phase.DONE


def split_uri(uri: bytes) -> tuple[bytes, bytes]:
    """
    The authority and origin-form target of an absolute C{http:} URI.
    """
    scheme_end = uri.find(b"://")
    if scheme_end < 0:
        raise ValueError(f"not an absolute URI: {uri[:80]!r}")
    slash = uri.find(b"/", scheme_end + 3)
    if slash < 0:
        return uri[scheme_end + 3 :], b"/"
    return uri[scheme_end + 3 : slash], uri[slash:]


HeaderFields = Union[Headers, Sequence[tuple[bytes, bytes]], None]

_name_of = itemgetter(0)


def _pairs_of(headers: HeaderFields) -> Sequence[tuple[bytes, bytes]]:
    """
    The fields of C{headers} as (name, value) pairs: a caller that has its
    fields as pairs already (as quayfront's forwarding does) passes them
    as they are, with no L{Headers} made and read back.
    """
    if headers is None:
        return ()
    if isinstance(headers, Headers):
        return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
    return headers


def request_head(
    method: bytes,
    target: bytes,
    headers: HeaderFields,
    authority: bytes,
    body_length: int | object | None,
    persistent: bool,
) -> bytes:
    """
    The bytes of a request head: the request line, the framing of a body
    of C{body_length} (None: no body; C{UNKNOWN_LENGTH}: chunked), the
    headers in order, C{Host} from them or else C{authority}.
    """
    pairs = headers if type(headers) is list else _pairs_of(headers)
    return _request_head(
        method,
        target,
        pairs,
        authority,
        body_length,
        persistent,
        b"host" in map(bytes.lower, map(_name_of, pairs)),
    )


def _request_head(
    method: bytes,
    target: bytes,
    pairs: Sequence[tuple[bytes, bytes]],
    authority: bytes,
    body_length: int | object | None,
    persistent: bool,
    has_host: bool,
) -> bytes:
    """
    L{request_head}, for fields as pairs whose names the caller has looked
    at already (C{has_host}: whether one of them is C{Host}).
    """
    if (
        method not in _KNOWN_METHODS
        and (not method or _UNSAFE.intersection(method))
        or not target
        or _UNSAFE.intersection(target)
    ):
        raise ValueError(f"cannot send {method[:20]!r} {target[:80]!r}")
    if body_length is None:
        framing = _NO_BODY_FRAMING if method in _METHODS_WITH_BODY else b""
    elif body_length is UNKNOWN_LENGTH:
        framing = _CHUNKED_FRAMING
    else:
        framing = b"Content-Length: %d\r\n" % body_length
    # In one join: the request line, the framing, each field as "name:
    # value" in order (no Python-level loop), Host if the fields have none.
    return b"".join(
        (
            method,
            b" ",
            target,
            _VERSION_LINE if persistent else _CLOSING_VERSION_LINE,
            framing,
            b"\r\n".join(map(b": ".join, pairs)),
            b"\r\n" if pairs else b"",
            b"" if has_host else b"Host: " + authority + b"\r\n",
            b"\r\n",
        )
    )


_VERSION_LINE = b" HTTP/1.1\r\n"
_CLOSING_VERSION_LINE = b" HTTP/1.1\r\nConnection: close\r\n"
_NO_BODY_FRAMING = b"Content-Length: 0\r\n"
_CHUNKED_FRAMING = b"Transfer-Encoding: chunked\r\n"


@implementer(IPushProducer)
class UpstreamBodyTransport:
    """
    The transport a response's body protocol is given: pausing it stops
    reading from the upstream connection, stopping it aborts the
    connection.  It lets go of the connection when the response ends, so
    nothing done to it afterwards reaches a connection back in the pool.
    """

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection: UpstreamConnection | None = connection

    @property
    def connection_transport(self):
        """
        The upstream connection's own transport, or None once the response
        is over.
        """
        connection = self._connection
        return None if connection is None else connection.transport

    def detach(self) -> None:
        self._connection = None

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause_reading()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume_reading()

    def stopProducing(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()


@implementer(IResponse)
class UpstreamResponse:
    """
    An upstream's response as an C{IResponse}: body bytes that arrive before
    C{deliverBody} are kept (the connection stops reading meanwhile).
    """

    version = (b"HTTP", 1, 1)
    previousResponse = None
    #: The whole body, while the response is told (to the Deferred's
    #: callback or C{on_response}) and its body came with its head; else
    #: None.  See L{take_whole_body}.
    whole_body: bytes | None = None

    # Set when first needed (see __init__).
    _headers: Headers | None = None
    _transport: UpstreamBodyTransport | None = None
    _connection: UpstreamConnection | None = None
    _protocol = None
    _early: list[bytes] | tuple = ()
    _ended: Failure | None = None

    def __init__(
        self,
        head: ResponseHead,
        exchange: _Exchange,
        transport=None,
        connection: UpstreamConnection | None = None,
    ) -> None:
        """
        @param transport: what the body protocol is given as its transport;
            or None, to give it an L{UpstreamBodyTransport} of
            C{connection}, made when the body is delivered (most responses
            are relayed whole, and never need one).
        """
        # Unpacked: CPython 3.11 reads a named tuple's fields by name
        # through the generic attribute lookup.
        status, reason, version, headers, _, length, _ = head
        minor = version[1]
        if minor != 1:
            self.version = (b"HTTP", 1, minor)
        self.code = status
        self.phrase = reason
        #: The header fields as received, in order (what C{headers} holds).
        self.header_pairs = headers
        # The Headers made from them when asked for (_headers).
        self.length = UNKNOWN_LENGTH if length is None else length
        self._exchange = exchange
        if transport is None:
            self._connection = connection
        else:
            self._transport = transport
        # What every response reads before it may be set: its own, not the
        # class's, which CPython 3.11 reads through the generic lookup.
        self.whole_body = self._protocol = self._ended = None
        # The body protocol once delivered (_protocol); body bytes that
        # came before it (_early); how the body ended, once it has (_ended).

    def take_whole_body(self) -> bytes:
        """
        The whole body, while the response is told with it (L{whole_body}
        is not None): the response is over once taken (its connection back
        in the pool or closed, C{deliverBody} then tells only its end), so
        a caller relays it in one go rather than through a body protocol.
        """
        body = self.whole_body
        if body is None or self._protocol is not None:
            raise RuntimeError("the response has no whole body to take")
        self.whole_body = None
        self._exchange._response_complete(_READ_TO_ITS_END)
        return body

    @property
    def headers(self) -> Headers:
        # Built when asked for: a caller that reads header_pairs skips it.
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers()
            for name, value in self.header_pairs:
                headers.addRawHeader(name, value)
        return headers

    @property
    def request(self):
        return self._exchange.client_request

    def setPreviousResponse(self, response) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol) -> None:
        if self._protocol is not None:
            raise RuntimeError("the response body was delivered already")
        self._protocol = protocol
        transport = self._transport
        if transport is None:
            # Let go of with the connection if the body ended already.
            transport = self._transport = UpstreamBodyTransport(self._connection)
            self._connection = None
        protocol.makeConnection(transport)
        early, self._early = self._early, ()
        for data in early:
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)
        else:
            self._exchange.body_delivered()

    def body_data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None:
            early = self._early
            if not early:
                early = self._early = []
            early.append(data)
        else:
            protocol.dataReceived(data)

    def body_ended(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        # The connection let go of, whether its transport is made or not.
        transport = self._transport
        if transport is None:
            self._connection = None
        else:
            transport.detach()
        if self._protocol is not None:
            self._protocol.connectionLost(reason)


#: How a response's body ends when it ends well; made once, as Twisted's own
#: C{connectionDone} is (a Failure costs as much to make as a request's
#: whole header parse).
_RESPONSE_COMPLETE = Failure(ResponseDone())
_DELIMITED_BY_CLOSE = Failure(PotentialDataLoss())
_READ_TO_ITS_END = ResponseEnd()


class _ClientRequest:
    """
    What C{IClientRequest} tells about the request a response answers.
    """

    def __init__(self, method: bytes, uri: bytes, headers: HeaderFields) -> None:
        self.method = method
        self.absoluteURI = uri
        if not isinstance(headers, Headers):
            pairs, headers = headers, Headers()
            for name, value in pairs or ():
                headers.addRawHeader(name, value)
        self.headers = headers


@implementer(IConsumer)
class _BodyWriter:
    """
    The consumer a request body producer writes to: frames each write
    (chunked, or counted against the announced length) onto the upstream
    socket.
    """

    def __init__(self, exchange: _Exchange, transport, length) -> None:
        self._exchange = exchange
        self._transport = transport
        self._chunked = length is UNKNOWN_LENGTH
        self._remaining = None if self._chunked else length
        self.stopped = False

    def write(self, data: bytes) -> None:
        if self.stopped or not data:
            return
        if self._chunked:
            self._transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            return
        if len(data) > self._remaining:
            self._exchange.body_failed(
                Failure(WrongBodyLength(f"{len(data) - self._remaining} bytes too many"))
            )
            return
        self._remaining -= len(data)
        self._transport.write(data)

    def finish(self) -> bool:
        """
        Write the end of the body; false when it was shorter than announced.
        """
        if self._chunked:
            self._transport.write(b"0\r\n\r\n")
            return True
        return self._remaining == 0

    def registerProducer(self, producer, streaming) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@implementer(IPushProducer)
class _BodyFlowControl:
    """
    Registered on the upstream socket while a request body is written: the
    socket's pause and resume (its send buffer full, then drained) reach
    the body producer.
    """

    def __init__(self, producer) -> None:
        self._producer = producer
        self.active = True

    def pauseProducing(self) -> None:
        if self.active:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.active:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        if self.active:
            self.active = False
            self._producer.stopProducing()


class UpstreamConnection(Protocol):
    """
    One persistent connection to an upstream: carries one exchange at a
    time, and sits in the pool between exchanges.
    """

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self._pool = pool
        self.key = key
        self.exchange: _Exchange | None = None
        self.closed = False
        self.reading_paused = False
        # When an idle connection expires (set by the pool).
        self.expires_s = 0.0

    def connectionMade(self) -> None:
        # Heads and bodies are separate writes: Nagle plus delayed ACKs
        # would add tens of milliseconds to a small request.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # An idle upstream talking out of turn: nothing can be trusted.
            self.abort()
            return
        exchange.data_received(data)

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connection_lost(reason)
        else:
            self._pool.discard(self)

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resumeProducing()

    def abort(self) -> None:
        """
        Drop the connection at once; its exchange ends when the loss is
        reported.
        """
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()

    def close(self) -> None:
        """
        Close the connection once what is written has gone out.
        """
        if not self.closed:
            self.closed = True
            self.transport.loseConnection()


class _ConnectionFactory(Factory):
    # One upstream connection is not worth two log lines.
    noisy = False

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr) -> UpstreamConnection:
        return UpstreamConnection(self._pool, self._key)


class _Outcome:
    """
    Where an exchange's outcome goes when its caller gave two functions
    (L{UpstreamAgent.request_with}) rather than taking a Deferred: the part
    of a Deferred the exchange uses (C{callback}, C{errback}) and its caller
    uses (C{cancel}), without a Deferred made and fired for every request.
    Either function is called once at most; an error in it is logged (a
    Deferred would have logged it as unhandled), not raised into the
    connection.
    """

    __slots__ = ("_on_response", "_on_failure", "_canceller", "called")
    _log = Logger()

    def __init__(self, on_response, on_failure, canceller) -> None:
        self._on_response = on_response
        self._on_failure = on_failure
        self._canceller = canceller
        self.called = False

    def callback(self, response: object) -> None:
        # _tell, written out: once per request.
        if self.called:
            raise AlreadyCalledError()
        self.called = True
        on_response = self._on_response
        self._on_response = self._on_failure = self._canceller = None
        try:
            on_response(response)
        except Exception:
            self._log.failure("handling an upstream response")

    def errback(self, failure: Failure) -> None:
        self._tell(self._on_failure, failure)

    def _tell(self, function, result: object) -> None:
        if self.called:
            raise AlreadyCalledError()
        self.called = True
        # Told once: the functions (bound to the caller) and the canceller
        # (bound to the exchange) are let go, so that the exchange, its
        # caller and this are freed by their reference counts rather than
        # left for the garbage collector as a cycle.
        self._on_response = self._on_failure = self._canceller = None
        try:
            function(result)
        except Exception:
            self._log.failure("handling an upstream response")

    def cancel(self) -> None:
        """
        As C{Deferred.cancel}: stop the exchange unless its outcome is
        known, and fail it with C{CancelledError} if stopping did not.
        """
        if self.called:
            return
        self._canceller(self)
        if not self.called:
            self.errback(Failure(CancelledError()))


class _Exchange:
    """
    One request and its response on one upstream connection (two, when a
    dead pooled connection is retried).
    """

    _log = Logger()

    def __init__(
        self,
        agent: UpstreamAgent,
        method: bytes,
        uri: bytes,
        headers: HeaderFields,
        head: bytes,
        body,
        outcome: tuple | None = None,
        request_closes: bool | None = None,
    ) -> None:
        """
        @param outcome: C{(on_response, on_failure)}, or an object with
            C{callback} and C{errback} (L{UpstreamAgent.request_for}), to be
            told the outcome instead of L{result} being a Deferred.
        @param request_closes: whether the request asks for the connection
            to close, if the caller has looked (else it is looked for).
        """
        self._agent = agent
        self.method = method
        self._uri = uri
        self._headers = headers
        self._head = head
        self._body = body
        self.phase = _CONNECTING
        # Where the outcome goes (see UpstreamAgent._start), until told.
        if outcome is None:
            self.result: Deferred | _Outcome | object | None = Deferred(self._cancel)
        elif type(outcome) is tuple:
            self.result = _Outcome(*outcome, self._cancel)
        else:
            self.result = outcome
        # The rest starts as the class attributes below say, and is set as
        # the exchange goes.
        # The request itself asked for the connection to close.
        self._request_closes = (
            not agent.persistent or _asks_close(headers)
            if request_closes is None
            else request_closes
        )

    _connecting: Deferred | None = None
    connection: UpstreamConnection | None = None
    _reused = False
    _retried = False
    _reader: ResponseReader | None = None
    _writer: _BodyWriter | None = None
    _flow: _BodyFlowControl | None = None
    _response: UpstreamResponse | None = None
    _response_head: ResponseHead | None = None
    _delivery_pending = False
    _paused_for_delivery = False
    #: The response head came while the body was being written.
    _answered_early = False

    @property
    def client_request(self) -> _ClientRequest:
        return _ClientRequest(self.method, self._uri, self._headers)

    def _fail(self, failure: Failure) -> None:
        """
        Tell the failure, once (and let go of where it went, as after a
        response).
        """
        result, self.result = self.result, None
        if result is None:
            return
        try:
            result.errback(failure)
        except Exception:
            self._log.failure("handling an upstream failure")

    def cancel(self) -> None:
        """
        As C{Deferred.cancel}, for an exchange whose outcome goes to an
        object (L{UpstreamAgent.request_for}): stop the exchange unless its
        outcome is told, and tell C{CancelledError} if stopping did not.
        """
        result = self.result
        if result is None:
            return
        self._cancel(result)
        if self.result is result:
            self._fail(Failure(CancelledError()))

    # Getting a connection.

    def start(self, reuse: bool = True) -> None:
        agent = self._agent
        connection = agent.pool.take(agent.key) if reuse else None
        if connection is not None:
            self._send(connection, reused=True)
            return
        self._connecting = agent.connect()
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self._connecting = None
        if self.phase is not _CONNECTING:
            # Cancelled while connecting, and the connection came anyway.
            connection.close()
            return
        self._send(connection, reused=False)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.phase is not _CONNECTING:
            return
        self.phase = _DONE
        self._fail(failure)

    def _cancel(self, result: Deferred | _Outcome) -> None:
        # Deferred.cancel errbacks with CancelledError after this.
        phase, self.phase = self.phase, _DONE
        if phase is _CONNECTING:
            if self._connecting is not None:
                self._connecting.cancel()
            return
        self._stop_body()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.exchange = None
            connection.abort()

    # The request.

    def _send(self, connection: UpstreamConnection, reused: bool) -> None:
        agent = self._agent
        self.connection = connection
        self._reused = reused
        connection.exchange = self
        self._reader = ResponseReader(self.method, agent.max_head_bytes, agent.max_headers)
        transport = connection.transport
        body = self._body
        if body is None:
            self.phase = _WAITING
            transport.write(self._head)
            return
        self.phase = _SENDING
        transport.write(self._head)
        self._writer = _BodyWriter(self, transport, body.length)
        self._flow = _BodyFlowControl(body)
        transport.registerProducer(self._flow, True)
        try:
            producing = body.startProducing(self._writer)
        except BaseException:
            producing = fail()
        producing.addCallbacks(self._body_written, self.body_failed)

    def _body_written(self, _: object) -> None:
        if self.phase is not _SENDING or self._writer is None or self._writer.stopped:
            return
        writer = self._writer
        if not writer.finish():
            self.body_failed(Failure(WrongBodyLength("fewer bytes than announced")))
            return
        self._end_body()
        self.phase = _WAITING

    def body_failed(self, failure: Failure) -> None:
        """
        The body producer failed or broke its length: the request cannot be
        completed, the connection is aborted.
        """
        if self.phase is not _SENDING:
            return
        self._stop_body()
        self.phase = _DONE
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.exchange = None
            connection.abort()
        self._fail(Failure(RequestGenerationFailed([failure])))

    def _end_body(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stopped = True
        flow, self._flow = self._flow, None
        if flow is not None:
            flow.active = False
            connection = self.connection
            if connection is not None and not connection.closed:
                connection.transport.unregisterProducer()

    def _stop_body(self) -> None:
        """
        Stop a request body still being written.
        """
        if self._writer is None:
            return
        self._end_body()
        body = self._body
        try:
            body.stopProducing()
        except Exception:
            self._log.failure("stopping a request body producer")

    # The response.

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        try:
            events = reader.receive(data)
        except UpstreamMisbehaved:
            self._misbehaved(Failure())
            return
        count = len(events)
        if (
            count > 1
            and type(events[-1]) is ResponseEnd
            and self.phase is _WAITING
        ):
            # The whole response in one read (the common case of a small
            # answer): its body is offered with its head, for a caller
            # that takes both at once (UpstreamResponse.take_whole_body);
            # if it does not, the events are told one by one as ever.
            if count == 2:
                body = b""
            elif count == 3:
                body = events[1].data
            else:
                body = b"".join([event.data for event in events[1:-1]])
            self._got_head(events[0], body)
            if self.phase is _DONE:
                # Taken whole (or cancelled, or stopped): as the loop below
                # would find at its first event.
                return
            events = events[1:]
        connection = self.connection
        for event in events:
            if self.phase is _DONE or connection.closed:
                # Cancelled or stopped by whoever handled the last event:
                # the end comes with the connection's loss.
                return
            if type(event) is ResponseData:
                self._response.body_data(event.data)
            elif type(event) is ResponseHead:
                self._got_head(event)
            else:
                self._response_complete(event)
        if reader.failed and self.phase is not _DONE:
            # The rules broken after the events above.
            try:
                reader.receive(b"")
            except UpstreamMisbehaved:
                self._misbehaved(Failure())

    def _got_head(self, head: ResponseHead, whole_body: bytes | None = None) -> None:
        if self.phase is _SENDING:
            # An early answer: the upstream will not read the rest, and the
            # connection is not reused with a request half sent.
            self._answered_early = True
            self._stop_body()
        self.phase = _RECEIVING
        self._response_head = head
        connection = self.connection
        response = UpstreamResponse(head, self, None, connection)
        self._response = response
        self._delivery_pending = True
        if whole_body is not None:
            response.whole_body = whole_body
        # Told once and not needed after: a Deferred keeps its canceller
        # (bound to this exchange), which would make a reference cycle.
        result, self.result = self.result, None
        try:
            result.callback(response)
        except Exception:
            # Only an outcome object's own callback can raise (a Deferred
            # and request_with's functions log it themselves): logged as
            # they would, not raised into the connection.
            self._log.failure("handling an upstream response")
        if self.phase is _DONE:
            # Taken whole, cancelled or failed: nothing more to tell.
            return
        # Offered only while the response is being told.
        response.whole_body = None
        if self._delivery_pending and self.phase is _RECEIVING:
            # Nobody reads the body yet: stop reading from the upstream.
            self._delivery_pending = False
            connection.pause_reading()
            self._paused_for_delivery = True

    def body_delivered(self) -> None:
        if self._delivery_pending:
            self._delivery_pending = False
            return
        if self._paused_for_delivery:
            self._paused_for_delivery = False
            if self.connection is not None:
                self.connection.resume_reading()

    def _response_complete(self, end: ResponseEnd) -> None:
        connection, self.connection = self.connection, None
        self.phase = _DONE
        head = self._response_head
        reader = self._reader
        connection.exchange = None
        reusable = (
            head.keep_alive
            and not self._answered_early
            and not end.delimited_by_close
            and not reader.trailing_data
            and not self._request_closes
            and not connection.closed
        )
        if reusable:
            # Back to the pool before the body protocol hears the end, so a
            # request it starts can take this connection (as Agent does).
            if connection.reading_paused:
                connection.resume_reading()
            agent = self._agent
            agent.pool.put(agent.key, connection, agent)
        elif self._answered_early:
            # The upstream may still be waiting for the rest of the body.
            connection.abort()
        else:
            connection.close()
        # Let go of (see _ended_response) as it hears its end.
        response, self._response = self._response, None
        response.body_ended(_DELIMITED_BY_CLOSE if end.delimited_by_close else _RESPONSE_COMPLETE)

    def _ended_response(self) -> UpstreamResponse:
        """
        The response, let go of as its body ends: it points back here, and
        nothing needs it once the exchange is done, so the two are freed by
        their reference counts rather than left to the garbage collector.
        """
        response, self._response = self._response, None
        return response

    def _misbehaved(self, failure: Failure) -> None:
        phase, self.phase = self.phase, _DONE
        self._stop_body()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.exchange = None
            # Read no more, and close in order (as Agent does): there is
            # nothing of ours left to send.
            connection.close()
        if phase is _RECEIVING:
            response = self._ended_response()
            response.body_ended(Failure(ResponseFailed([failure], response)))
        else:
            self._fail(Failure(ResponseFailed([failure])))

    def connection_lost(self, reason: Failure) -> None:
        phase, self.phase = self.phase, _DONE
        self.connection = None
        if phase is _RECEIVING:
            response = self._ended_response()
            try:
                end = self._reader.connection_closed()
            except ResponseIncomplete:
                response.body_ended(Failure(ResponseFailed([reason, Failure()], response)))
                return
            if end is not None:
                response.body_ended(Failure(PotentialDataLoss()))
            else:
                # Read to its end, but stopped before the end was delivered.
                response.body_ended(Failure(ResponseFailed([reason], response)))
            return
        if phase is _SENDING:
            self._stop_body()
            self._fail(Failure(RequestTransmissionFailed([reason])))
            return
        if phase is not _WAITING:
            return
        received = self._reader.received_any
        if (
            self._reused
            and not self._retried
            and not received
            and self._body is None
            and self.method in _RETRYABLE_METHODS
        ):
            # A pooled connection the upstream had closed: once more, on a
            # new connection (as Agent does).
            self._retried = True
            self.phase = _CONNECTING
            self.start(reuse=False)
            return
        error = ResponseFailed if received else ResponseNeverReceived
        self._fail(Failure(error([reason])))


def _asks_close(headers: HeaderFields) -> bool:
    pairs = headers if type(headers) is list else _pairs_of(headers)
    if b"connection" not in map(bytes.lower, map(_name_of, pairs)):
        # The usual case (a forwarded request never has one), found
        # without a Python-level loop.
        return False
    return any(
        token.strip().lower() == b"close"
        for name, value in pairs
        if name.lower() == b"connection"
        for token in value.split(b",")
    )


@implementer(IAgent)
class UpstreamAgent:
    """
    An C{IAgent} that sends every request to one upstream, whatever
    authority the URI names (the URI's target is sent; its authority only
    when the headers have no C{Host}).

    @param endpoint: where new connections go (its connect timeout
        included).
    @param key: the upstream's name in C{pool} (its address).
    @param persistent: false sends C{Connection: close} and never pools.
    """

    #: C{request} also takes the headers as (name, value) pairs.
    takes_header_pairs = True

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        pool: UpstreamPool,
        key: str,
        *,
        max_head_bytes: int,
        max_headers: int,
        max_idle_connections: int,
        idle_keepalive_s: float,
        persistent: bool = True,
    ) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.key = key
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_idle_connections = max_idle_connections
        self.idle_keepalive_s = idle_keepalive_s
        self.persistent = persistent
        self._factory = _ConnectionFactory(pool, key)

    def connect(self) -> Deferred:
        return self.endpoint.connect(self._factory)

    def request(self, method: bytes, uri: bytes, headers: HeaderFields = None, bodyProducer=None):
        # C{headers}: a L{Headers}, as IAgent has it, or (name, value) pairs.
        return self._start(method, uri, headers, bodyProducer, None)

    def request_with(
        self,
        on_response: Callable[[UpstreamResponse], object],
        on_failure: Callable[[Failure], object],
        method: bytes,
        uri: bytes,
        headers: HeaderFields = None,
        bodyProducer=None,
    ) -> _Outcome:
        """
        L{request}, its outcome told to C{on_response(response)} or
        C{on_failure(failure)} (what the Deferred would have fired with)
        rather than through a Deferred; the answer's C{cancel()} is the
        Deferred's.
        """
        return self._start(method, uri, headers, bodyProducer, (on_response, on_failure))

    def request_target_with(
        self,
        on_response: Callable[[UpstreamResponse], object],
        on_failure: Callable[[Failure], object],
        method: bytes,
        authority: bytes,
        target: bytes,
        headers: HeaderFields = None,
        bodyProducer=None,
    ) -> _Outcome:
        """
        L{request_with} for the URI C{http://authority/target}, given as
        its two parts (the authority is sent only when the headers have no
        C{Host}), so that no URI is put together only to be split again.
        """
        return self._start(
            method, b"http://" + authority + target, headers, bodyProducer,
            (on_response, on_failure), authority, target,
        )

    def request_for(
        self,
        outcome,
        method: bytes,
        authority: bytes,
        target: bytes,
        headers: HeaderFields = None,
        bodyProducer=None,
    ) -> _Exchange:
        """
        L{request_target_with}, its outcome told to C{outcome.callback(response)}
        or C{outcome.errback(failure)}, as a Deferred would tell its
        callbacks: once, an error raised by either logged rather than raised
        into the connection, and C{outcome} let go of once told.  The
        answer's C{cancel()} is the Deferred's.  No Deferred, and no object
        to hold two functions, is made for the request.
        """
        if (
            bodyProducer is None
            and method in _BODILESS_METHODS
            and type(headers) is list
            and self.persistent
            and target
            and not _UNSAFE.intersection(target)
        ):
            names = set(map(bytes.lower, map(_name_of, headers)))
            if b"connection" not in names:
                return self._start_bodiless(
                    outcome, method, authority, target, headers, b"host" in names
                )
        return self._start(
            method, b"http://" + authority + target, headers, bodyProducer,
            outcome, authority, target,
        )

    def _start_bodiless(self, outcome, method, authority, target, pairs, has_host):
        """
        L{_start} for what L{request_for} sends most: a request without a
        body whose method needs no C{Content-Length: 0}, on a persistent
        agent, whose fields (as pairs) have no C{Connection}: the same head
        (L{_request_head}, written out for this case), the same exchange,
        and the same connection taken from the pool and written to, without
        the checks and branches those cases never take.
        """
        head = b"".join(
            (
                method,
                b" ",
                target,
                _VERSION_LINE,
                b"\r\n".join(map(b": ".join, pairs)),
                b"\r\n" if pairs else b"",
                b"" if has_host else b"Host: " + authority + b"\r\n",
                b"\r\n",
            )
        )
        exchange = _Exchange(
            self, method, b"http://" + authority + target, pairs, head, None, outcome, False
        )
        result = exchange.result
        if result is outcome:
            result = exchange
        connection = self.pool.take(self.key)
        if connection is None:
            exchange.start(reuse=False)
            return result
        # _send(connection, reused=True), for a request without a body.
        exchange.connection = connection
        exchange._reused = True
        connection.exchange = exchange
        exchange._reader = ResponseReader(method, self.max_head_bytes, self.max_headers)
        exchange.phase = _WAITING
        connection.transport.write(head)
        return result

    def _start(
        self, method, uri, headers, bodyProducer, outcome, authority=None, target=None
    ):
        """
        Start an exchange, and answer what its caller is given: the
        Deferred, the L{_Outcome}, or (for an outcome object) the exchange
        itself; taken before the exchange starts, as it may be told at
        once (and then lets go of it).
        """
        if target is None:
            authority, target = split_uri(uri)
        pairs = headers if type(headers) is list else _pairs_of(headers)
        # The names looked at once, for the head (Host) and the connection
        # (Connection: close).
        names = set(map(bytes.lower, map(_name_of, pairs)))
        persistent = self.persistent
        head = _request_head(
            method,
            target,
            pairs,
            authority,
            None if bodyProducer is None else bodyProducer.length,
            persistent,
            b"host" in names,
        )
        exchange = _Exchange(
            self,
            method,
            uri,
            headers,
            head,
            bodyProducer,
            outcome,
            not persistent or b"connection" in names and _asks_close(pairs),
        )
        result = exchange.result
        if result is outcome:
            result = exchange
        exchange.start(reuse=persistent)
        return result


class UpstreamPool:
    """
    Idle persistent connections, by upstream key.  The most recently used
    connection is reused first, so the others age out when traffic drops;
    each closes C{idle_keepalive_s} after it went idle, and an upstream
    keeps at most C{max_idle_connections} (the oldest goes first).
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._sweep_call = None

    def idle_count(self, key: str) -> int:
        return len(self._idle.get(key, ()))

    def take(self, key: str) -> UpstreamConnection | None:
        """
        An idle connection to C{key} that has not expired, or None.
        """
        stack = self._idle.get(key)
        if not stack:
            return None
        now = self._clock.seconds()
        while stack:
            connection = stack.pop()
            if connection.expires_s > now and not connection.closed:
                return connection
            connection.close()
        return None

    def put(self, key: str, connection: UpstreamConnection, limits: UpstreamAgent) -> None:
        """
        C{connection} is idle and reusable.
        """
        connection.expires_s = self._clock.seconds() + limits.idle_keepalive_s
        stack = self._idle.get(key)
        if stack is None:
            stack = self._idle[key] = []
        stack.append(connection)
        while len(stack) > limits.max_idle_connections:
            stack.pop(0).close()
        if self._sweep_call is None:
            self._sweep_call = self._clock.callLater(limits.idle_keepalive_s, self._sweep)

    def discard(self, connection: UpstreamConnection) -> None:
        """
        C{connection} is closed: forget it.
        """
        stack = self._idle.get(connection.key)
        if stack and connection in stack:
            stack.remove(connection)

    def _sweep(self) -> None:
        # One timer for the whole pool, set to the next expiry: no timer is
        # made or cancelled per request.
        self._sweep_call = None
        now = self._clock.seconds()
        next_expiry = None
        for stack in self._idle.values():
            # Oldest first: the stacks are in the order connections went idle.
            while stack and stack[0].expires_s <= now:
                stack.pop(0).close()
            if stack and (next_expiry is None or stack[0].expires_s < next_expiry):
                next_expiry = stack[0].expires_s
        if next_expiry is not None:
            self._sweep_call = self._clock.callLater(next_expiry - now, self._sweep)
