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

What happens when is decided by the exchange model
(L{quayfront.http.Exchange}): L{Forwarding} only turns callbacks into its
events and its actions into calls, and how a request ended (status,
registry error code, log reason) comes from the table of endings
(L{quayfront.http.ENDINGS}).  The upstream is reached only through
C{IAgent}, C{IResponse} and C{IBodyProducer}.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import replace
from heapq import heapify, heappop, heappush
from itertools import count
from weakref import WeakKeyDictionary, ref

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import NO_BODY_CODES
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from quayfront.headers import (
    client_response_headers,
    upstream_request_headers,
)
from quayfront.http import (
    AbortClient,
    Action,
    Answer,
    Arm,
    BodyState,
    Deadline,
    Disarm,
    Ending,
    Event,
    Exchange,
    UpstreamMisbehaved,
    ending_for,
)
from quayfront.http import _endings as endings
from quayfront.http._exchange import (
    ADMITTED_WITHOUT_BODY,
    ASKS_ADMISSION,
    ASKS_RATE_LIMITER,
    WHOLE_WITHOUT_BODY,
)
from quayfront.limits import Overloaded
from quayfront.routing import Route
from quayfront.twistedadapter import (
    add_checked_fields,
    client_gone,
    hand_back_idle_timeout,
    proxied_transport,
    waiting_for_client,
)
from quayfront.upstream import UPSTREAM_AUTHORITY, upstream_uri

# The events and deadlines Forwarding uses, as module-level names: on
# Python 3.11 reading an Enum member through its class costs a descriptor
# call, on every event.
_ADMITTED = Event.ADMITTED
_BODY_CHUNK = Event.BODY_CHUNK
_BODY_END = Event.BODY_END
_CLIENT_GONE = Event.CLIENT_GONE
_CLIENT_MISBEHAVED = Event.CLIENT_MISBEHAVED
_DOWNLOAD_IDLE_TIMEOUT = Event.DOWNLOAD_IDLE_TIMEOUT
_DRAINING = Event.DRAINING
_DRAIN_TIMEOUT = Event.DRAIN_TIMEOUT
_HEAD_COMPLETE = Event.HEAD_COMPLETE
_NOT_ADMITTED = Event.NOT_ADMITTED
_RATE_ALLOWED = Event.RATE_ALLOWED
_RATE_LIMITED = Event.RATE_LIMITED
_RESPONSE_DATA = Event.RESPONSE_DATA
_RESPONSE_END = Event.RESPONSE_END
_RESPONSE_HEAD = Event.RESPONSE_HEAD
_RESPONSE_TIMEOUT = Event.RESPONSE_TIMEOUT
_RESPONSE_TRUNCATED = Event.RESPONSE_TRUNCATED
_UPLOAD_IDLE_TIMEOUT = Event.UPLOAD_IDLE_TIMEOUT
_UPLOAD_PAUSED = Event.UPLOAD_PAUSED
_UPLOAD_RESUMED = Event.UPLOAD_RESUMED
_UPLOAD_STOPPED = Event.UPLOAD_STOPPED
_UPSTREAM_FAILED = Event.UPSTREAM_FAILED
_UPSTREAM_READY = Event.UPSTREAM_READY
_NO_BODY = BodyState.NONE
_DOWNLOAD_IDLE_DEADLINE = Deadline.DOWNLOAD_IDLE
_DRAIN_DEADLINE = Deadline.DRAIN
_RESPONSE_DEADLINE = Deadline.RESPONSE
_UPLOAD_IDLE_DEADLINE = Deadline.UPLOAD_IDLE

# Paths whose clients (docker, podman, skopeo, containerd) expect registry
# errors as JSON and retry 502/503/504.
REGISTRY_API_PREFIXES = (b"/v1/", b"/v2/")


def header_pairs(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


def request_fields(request) -> list[tuple[bytes, bytes]]:
    """
    A client request's header fields as pairs: as parsed, when the request
    kept them (L{quayfront.site.FrontRequest}), else from its headers.
    """
    field_pairs = getattr(request, "field_pairs", None)
    if field_pairs is not None:
        return field_pairs()
    return header_pairs(request.requestHeaders)


def response_fields(response) -> list[tuple[bytes, bytes]]:
    """
    An upstream response's header fields as pairs: as parsed, when the
    response kept them (quayfront's own client), else from its headers.
    """
    pairs = getattr(response, "header_pairs", None)
    if pairs is not None:
        return pairs
    return header_pairs(response.headers)


@implementer(IBodyProducer)
class RequestBodyStream:
    """
    The client's request body as the agent's body producer.  What the agent
    does to it (start, pause, resume, stop) goes to the exchange as events;
    the exchange says when chunks are held, written or dropped.
    """

    def __init__(self, length: int, forwarding: Forwarding) -> None:
        self.length = length
        self._forwarding = forwarding
        self._consumer = None
        # Chunks that arrived before the upstream was ready for the body; at
        # most one read's worth, since the client is paused on the first.
        self._held: list[bytes] = []
        self._producing: Deferred = Deferred()

    @property
    def complete(self) -> bool:
        return self._forwarding.body_complete

    @property
    def bytes_received(self) -> int:
        return self._forwarding.body_bytes_received

    # Actions of the exchange.

    def hold(self, data: bytes) -> None:
        self._held.append(data)

    def flush(self) -> None:
        held, self._held = self._held, []
        for chunk in held:
            self._consumer.write(chunk)

    def write(self, data: bytes) -> None:
        self._consumer.write(data)

    def finish(self) -> None:
        self._producing.callback(None)

    def stop(self) -> None:
        # The agent no longer waits for the Deferred, and further client
        # bytes have nowhere to go.
        self._held = []

    # IBodyProducer, driven by the agent.

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        producing = self._producing
        self._forwarding.feed(_UPSTREAM_READY)
        return producing

    def pauseProducing(self) -> None:
        self._forwarding.feed(_UPLOAD_PAUSED)

    def resumeProducing(self) -> None:
        self._forwarding.feed(_UPLOAD_RESUMED)

    def stopProducing(self) -> None:
        # The upstream request is over on the agent's side (answered early,
        # failed, cancelled).
        self._forwarding.feed(_UPLOAD_STOPPED)


class ResponseRelay(Protocol):
    """
    Writes the upstream response body to the client, with the upstream
    transport registered as the client request's producer.
    """

    def __init__(self, forwarding: Forwarding) -> None:
        self._forwarding = forwarding

    def connectionMade(self) -> None:
        forwarding = self._forwarding
        # The upstream socket itself, for aborting an exchange that ended
        # early (the proxy producer lets go of it when the body ends).
        forwarding.upstream_transport = proxied_transport(self.transport)
        forwarding.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self._forwarding.response_data(data)

    def connectionLost(self, reason: Failure) -> None:
        # The body has ended: the forwarding (which holds this relay) is let
        # go of, so that neither waits for the garbage collector.
        forwarding, self._forwarding = self._forwarding, None
        forwarding.response_ended(reason)


class DiscardedResponse(Protocol):
    """
    The body of a response that came for an exchange already over: the
    upstream is stopped (its connection aborted) and nothing is relayed.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class _ClientReading:
    """
    Pausing and resuming reading from the client connection.  A client
    quayfront stopped reading from is not idle, so a pause also takes the
    channel's idle timeout away, until it is given back.
    """

    def __init__(self, request) -> None:
        self._request = request
        self._saved_timeout: list[float | None] = []

    def pause(self) -> None:
        channel = getattr(self._request, "channel", None)
        if channel is None:
            return
        channel.transport.pauseProducing()
        if not self._saved_timeout:
            self._saved_timeout.append(channel.setTimeout(None) or 0)

    def resume(self) -> None:
        channel = getattr(self._request, "channel", None)
        if channel is None:
            return
        self.restore_timeout()
        channel.transport.resumeProducing()

    def restore_timeout(self) -> None:
        channel = getattr(self._request, "channel", None)
        if not self._saved_timeout or channel is None:
            return
        saved = self._saved_timeout.pop()
        hand_back_idle_timeout(channel, saved or None)


class Forwarding:
    """
    One client request on its way to the upstream and back: the Twisted
    side of an L{Exchange}.  Callbacks (the channel's, the rate limiter's,
    the concurrency cap's, the agent's, the timers') become events, and
    the exchange's actions become calls; all the state is the exchange's.
    """

    _log = Logger()

    # What most requests never change, as class attributes (not set on
    # every instance): see __init__ for what each is.
    upstream_response_time_s: float | None = None
    _relay: ResponseRelay | None = None
    upstream_transport = None
    _client_reading: _ClientReading | None = None
    _watch_entry: list | None = None
    _drain_timeout_s = 0.0
    _handling = False
    # Set by the actions that make them (annotated here, where it costs
    # nothing per request).
    _admission: Deferred
    _upstream: Deferred  # or what UpstreamAgent.request_for answers

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
        watch_client: bool = True,
        head=None,
        now_s: float | None = None,
    ) -> None:
        """
        @param watch_client: whether to learn of the client going away from
            C{request.notifyFinish()} itself; false when the caller reports
            it through L{client_gone} (one Deferred per request fewer).
        @param head: the request's head as the channel's framer framed it
            (L{quayfront.http.RequestHead}), whose fields and lower-cased
            names are used as they are; None to read the request's fields.
        @param now_s: the clock's time when the head arrived, if the caller
            has read it already.
        """
        self.request = request
        self.route = route
        self._limits = route.config
        self._clock = clock
        self._client_ip = client_ip
        self._started_s = clock.seconds() if now_s is None else now_s
        # Set when the response head arrives (upstream_response_time_s).
        # The Twisted objects the exchange's actions act on (_admission,
        # _upstream) are set by the actions that make them (the exchange
        # never asks for one before).
        # Made when a body is relayed (a response relayed whole needs none):
        # it points back here until the body ends (_relay), with the
        # upstream socket (upstream_transport).
        # Made when the client is first paused (a request with a body):
        # _client_reading.
        # The armed deadlines, in the order they were armed, each with the
        # time it falls due (an idle one: as armed; it runs from the last
        # activity).  They are watched as one, by an entry in the clock's
        # DeadlineWatch (_watch_entry) due no later than the earliest: a
        # request whose deadline changes (the response deadline, then the
        # download idle one) makes one entry, not one per deadline, and no
        # request makes a timer of its own.
        self._armed: dict[Deadline, float] = {}
        self._last_activity_s = self._started_s
        # The drain's timeout (_drain_timeout_s) is set when it starts.
        # Events raised while the actions of an earlier one run (_handling:
        # an agent that starts the body inside request(), a cancel that
        # fails a Deferred at once) wait their turn.
        self._events: deque[tuple[Event, bytes | object, dict]] = deque()

        if head is None:
            fields = request_fields(request)
            names = host = None
        else:
            fields = head.headers
            names = head.names
            host = head.host
        # Sent upstream as pairs, in order: no Headers object is made.
        self._headers = upstream_request_headers(
            fields,
            client_ip=client_ip,
            vouched=vouched_headers,
            reserved=reserved_headers,
            default_host=default_host,
            names=names,
            host=host,
        )

        # The channel reports length None for a chunked body and 0 both for
        # "Content-Length: 0" and for no body at all; only the first two are
        # sent with a body (the agent writes the framing itself).
        if length is None:
            has_body = True
        elif names is not None:
            has_body = b"content-length" in names
        else:
            has_body = any(name.lower() == b"content-length" for name, _ in fields)
        # Positional: a class called with keywords gathers them in a dict.
        self.exchange = Exchange(has_body, length, self._limits.max_body_bytes)
        self.body: RequestBodyStream | None = (
            RequestBodyStream(UNKNOWN_LENGTH if length is None else length, self)
            if has_body
            else None
        )
        if watch_client:
            request.notifyFinish().addErrback(self.client_gone)
        self._head_complete()

    def _head_complete(self) -> None:
        """
        C{feed(HEAD_COMPLETE)}, the usual admission taken the short way:
        when the exchange asks only for the rate limiter and it allows at
        once, then only for a slot and one is free, the exchange is handed
        the same events in the same order, and the limiters asked the same
        questions, as the action queue would; only the queue is skipped.
        Anything else goes the general way from where it stands.
        """
        exchange = self.exchange
        # The exchange's short ways to the same answers as handle()'s.
        actions = exchange.head_complete()
        if actions == ASKS_RATE_LIMITER:
            route = self.route
            limiter = route.rate_limiter
            if limiter is not None:
                wait_s = limiter.check(self._client_ip)
                if wait_s is not None:
                    # Limited, or decided later: as _ask_rate_limiter does.
                    if isinstance(wait_s, Deferred):
                        wait_s.addCallback(self._rate_limit_decided)
                    else:
                        self._rate_limit_decided(wait_s)
                    return
            actions = exchange.rate_allowed()
            if actions == ASKS_ADMISSION:
                limiter = route.upstream.limiter
                try_acquire = getattr(limiter, "try_acquire", None)
                if try_acquire is None:
                    self._carry_out(actions, None)
                    return
                if not try_acquire():
                    # Waits for a slot: as _ask_admission does.
                    self._admission = limiter.acquire()
                    self._admission.addCallbacks(self._admitted, self._not_admitted)
                    return
                self._admission = _ADMITTED_AT_ONCE
                actions = exchange.admitted()
                if actions is ADMITTED_WITHOUT_BODY:
                    # START_UPSTREAM_REQUEST, then Arm(RESPONSE), carried
                    # out as _carry_out would.
                    self._handling = True
                    try:
                        self._start_upstream_request(None)
                        self._arm(_RESPONSE_DEADLINE)
                        if self._events:
                            self._carry_out_raised()
                    finally:
                        self._done_handling()
                    return
        self._carry_out(actions, None)

    # What site.py and the access log read.

    @property
    def body_complete(self) -> bool:
        return self.exchange.body_complete

    @property
    def body_bytes_received(self) -> int:
        return self.exchange.body_bytes

    @property
    def ending(self) -> Ending | None:
        return self.exchange.ending

    @property
    def failure_reason(self) -> str | None:
        ending = self.exchange.ending
        return None if ending is None else ending.reason

    # Events in.

    def feed(self, event: Event, data: object = None, **payload) -> None:
        """
        Hand C{event} to the exchange and carry out its actions; C{data} is
        what the actions carry (a body chunk, a response).
        """
        if self._handling:
            self._events.append((event, data, payload))
            return
        handle = self.exchange.handle
        self._carry_out(handle(event, **payload) if payload else handle(event), data)

    def _carry_out(self, actions: tuple, data: object) -> None:
        """
        Carry out C{actions}, then the actions of the events they raised.
        """
        self._handling = True
        handle = self.exchange.handle
        events = self._events
        try:
            while True:
                for action in actions:
                    kind = type(action)
                    if kind is Action:
                        _ACTIONS[action](self, data)
                    elif kind is Disarm:
                        # The watchdog stays: the next deadline may use it,
                        # and the end of this stops it once nothing is armed.
                        del self._armed[action.deadline]
                    elif kind is Arm:
                        self._arm(action.deadline)
                    else:
                        self._act(action)
                if not events:
                    break
                event, data, payload = events.popleft()
                actions = handle(event, **payload)
        finally:
            self._done_handling()

    def _carry_out_raised(self) -> None:
        """
        Carry out the events raised while actions carried out outside
        L{_carry_out} (its short ways) ran, as L{_carry_out} would after
        them.
        """
        event, data, payload = self._events.popleft()
        self._carry_out(self.exchange.handle(event, **payload), data)

    def _done_handling(self) -> None:
        self._handling = False
        events = self._events
        if events:
            events.clear()
        if not self._armed and self._watch_entry is not None:
            entry, self._watch_entry = self._watch_entry, None
            entry[3].drop(entry)

    def body_chunk(self, data: bytes) -> None:
        self._last_activity_s = self._clock.seconds()
        if self._handling:
            self.feed(_BODY_CHUNK, data, size=len(data))
        else:
            self._carry_out(self.exchange.body_chunk(len(data)), data)

    def body_done(self) -> None:
        if self.exchange.body is _NO_BODY:
            # Every state takes BODY_END on a bodiless exchange and it
            # changes nothing, answers nothing (the model's tables say so,
            # and a test holds them to it): the usual GET skips it.
            return
        self.feed(_BODY_END)

    def client_misbehaved(self, status: int, reason: str) -> None:
        """
        The client broke the framing of its request body: the upstream
        request is aborted (incomplete) and the client answered C{status}
        and closed, or only closed if its response has started.
        """
        self.feed(_CLIENT_MISBEHAVED, ending=ending_for(reason, status))

    def drain_started(self, timeout_s: float) -> None:
        """
        The process drains: the exchange is cut off (both connections
        aborted) if it is still under way in C{timeout_s}.
        """
        self._drain_timeout_s = timeout_s
        self.feed(_DRAINING)

    def client_gone(self, reason: Failure) -> None:
        """
        The client connection was lost before the response was finished.
        """
        self.feed(_CLIENT_GONE)

    def _rate_limit_decided(self, wait_s: float | None) -> None:
        if wait_s is None:
            self.feed(_RATE_ALLOWED)
        else:
            self.feed(_RATE_LIMITED, retry_after_s=wait_s)

    def _admitted(self, _: object) -> None:
        self.feed(_ADMITTED)

    def _not_admitted(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            # Cancelled by the exchange's own ending.
            return
        failure.trap(Overloaded)
        self.feed(_NOT_ADMITTED, ending=ending_for(failure.value.reason, 503))

    def _got_response(self, response) -> None:
        now = self._clock.seconds()
        self.upstream_response_time_s = now - self._started_s
        self._last_activity_s = now
        # A response whose body came with its head (quayfront's own client
        # offers it so) is relayed in one event, head and body in one
        # write, rather than through the relay protocol and three events;
        # not while other events wait their turn, as the offer ends when
        # this returns.
        if not self._handling and getattr(response, "whole_body", None) is not None:
            actions = self.exchange.response_whole()
            if actions is not WHOLE_WITHOUT_BODY:
                self._carry_out(actions, response)
                return
            # RELAY_WHOLE_RESPONSE, RELEASE_SLOT, FINISH_RESPONSE and
            # Disarm(RESPONSE), carried out as _carry_out would.
            self._handling = True
            try:
                self._relay_whole_response(response)
                self.route.upstream.limiter.release()
                self.request.finish()
                del self._armed[_RESPONSE_DEADLINE]
                if self._events:
                    self._carry_out_raised()
            finally:
                self._done_handling()
        else:
            self.feed(_RESPONSE_HEAD, response)

    def response_data(self, data: bytes) -> None:
        self._last_activity_s = self._clock.seconds()
        if self._handling:
            self.feed(_RESPONSE_DATA, data)
        elif self.exchange.response_data():
            self.request.write(data)

    def response_ended(self, reason: Failure) -> None:
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        # PotentialDataLoss: a body delimited by the upstream closing the
        # connection, complete by HTTP's own definition.  (Failure.check
        # would build each class's qualified name to compare, every time.)
        if isinstance(reason.value, _COMPLETE_ENDS):
            self.feed(_RESPONSE_END)
        else:
            self.feed(_RESPONSE_TRUNCATED, detail=reason.getErrorMessage())

    def _upstream_failed(self, failure: Failure) -> None:
        misbehaved = _upstream_misbehaved(failure)
        if misbehaved is not None:
            ending = ending_for(misbehaved.reason, 502)
        elif failure.check(net_error.ConnectError, net_error.DNSLookupError):
            ending = endings.UPSTREAM_UNREACHABLE
        elif failure.check(ResponseNeverReceived, ResponseFailed, net_error.ConnectionLost):
            ending = endings.UPSTREAM_RESET
        else:
            # A cancelled request among them: the exchange ended already
            # and takes no notice.
            ending = endings.UPSTREAM_ERROR
        self.feed(_UPSTREAM_FAILED, ending=ending, detail=_describe(failure))

    # The outcome of the upstream request, as quayfront's own agent tells it
    # (UpstreamAgent.request_for): what a Deferred's callbacks would get.
    callback = _got_response
    errback = _upstream_failed

    # Actions out.

    def _act(self, action: Arm | Disarm | Answer | AbortClient) -> None:
        if type(action) is Arm:
            self._arm(action.deadline)
        elif type(action) is Disarm:
            # The watchdog stays: the next deadline may use it, and
            # _carry_out stops it once nothing is armed.
            del self._armed[action.deadline]
        elif type(action) is Answer:
            self._answer_with(action)
        else:
            self._abort_client(action)

    def _ask_rate_limiter(self, _) -> None:
        limiter = self.route.rate_limiter
        wait_s = None if limiter is None else limiter.check(self._client_ip)
        if wait_s is None and self._handling:
            # Allowed at once, the common case: the event waits its turn
            # in _carry_out's queue, as feed would put it there.
            self._events.append((_RATE_ALLOWED, None, _NO_PAYLOAD))
        elif isinstance(wait_s, Deferred):
            # A zone in the shared store decides later (within its
            # op_timeout_s); the Deferred never fails.
            wait_s.addCallback(self._rate_limit_decided)
        else:
            self._rate_limit_decided(wait_s)

    def _ask_admission(self, _) -> None:
        limiter = self.route.upstream.limiter
        try_acquire = getattr(limiter, "try_acquire", None)
        if try_acquire is not None and try_acquire():
            # A free slot, the common case: no Deferred made and fired.
            self._admission = _ADMITTED_AT_ONCE
            if self._handling:
                # As feed would queue it.
                self._events.append((_ADMITTED, None, _NO_PAYLOAD))
            else:
                self._admitted(None)
            return
        self._admission = limiter.acquire()
        self._admission.addCallbacks(self._admitted, self._not_admitted)

    def _cancel_admission(self, _) -> None:
        self._admission.cancel()

    def _release_slot(self, _) -> None:
        self.route.upstream.limiter.release()

    def _start_upstream_request(self, _) -> None:
        request = self.request
        try:
            agent = self.route.upstream.agent
            headers = self._headers
            request_for = getattr(agent, "request_for", None)
            if request_for is not None:
                # quayfront's own agent: the outcome comes to this
                # forwarding's callback and errback, as a Deferred's would
                # (no Deferred, and no object holding two functions, made
                # for it); the exchange answered is what cancel() stops.
                self._upstream = request_for(
                    self,
                    request.method,
                    UPSTREAM_AUTHORITY,
                    request.upstream_target,
                    headers,
                    self.body,
                )
                return
            request_target_with = getattr(agent, "request_target_with", None)
            if request_target_with is not None:
                # quayfront's own agent: the outcome comes to the two
                # methods, no Deferred made and fired for it, and the
                # target is given as it is, not inside a URI.
                self._upstream = request_target_with(
                    self._got_response,
                    self._upstream_failed,
                    request.method,
                    UPSTREAM_AUTHORITY,
                    request.upstream_target,
                    headers,
                    self.body,
                )
                return
            request_with = getattr(agent, "request_with", None)
            if request_with is not None:
                self._upstream = request_with(
                    self._got_response,
                    self._upstream_failed,
                    request.method,
                    upstream_uri(request.upstream_target),
                    headers,
                    self.body,
                )
                return
            if not getattr(agent, "takes_header_pairs", False):
                # Any other IAgent takes a Headers, as IAgent says.
                headers = Headers()
                for name, value in self._headers:
                    headers.addRawHeader(name, value)
            self._upstream = agent.request(
                request.method, upstream_uri(request.upstream_target), headers, self.body
            )
        except Exception as error:
            # The agent refuses some requests synchronously (an invalid URI);
            # the request must still end and give its slot back.
            self.feed(
                _UPSTREAM_FAILED,
                ending=endings.UPSTREAM_REQUEST_REFUSED,
                detail=str(error),
            )
            return
        self._upstream.addCallbacks(self._got_response, self._upstream_failed)

    def _cancel_upstream_request(self, _) -> None:
        # Also when the agent's Deferred has fired with the pooled
        # connection and waits on the request: cancel() reaches the inner
        # Deferred and aborts that connection.
        self._upstream.cancel()

    def _stop_upstream_response(self, _) -> None:
        relay = self._relay
        if relay is not None and relay.transport is not None:
            relay.transport.stopProducing()

    def _abort_upstream_connection(self, _) -> None:
        if self.upstream_transport is not None:
            self.upstream_transport.abortConnection()

    def _send_continue(self, _) -> None:
        self.request.send_held_continue()

    def _flush_held(self, _) -> None:
        self.body.flush()

    def _hold_chunk(self, data: bytes) -> None:
        self.body.hold(data)

    def _forward_chunk(self, data: bytes) -> None:
        self.body.write(data)

    def _finish_upload(self, _) -> None:
        self.body.finish()

    def _stop_upload(self, _) -> None:
        self.body.stop()

    @property
    def _client(self) -> _ClientReading:
        client = self._client_reading
        if client is None:
            client = self._client_reading = _ClientReading(self.request)
        return client

    def _pause_client(self, _) -> None:
        self._client.pause()

    def _resume_client(self, _) -> None:
        self._client.resume()

    def _restore_client_timeout(self, _) -> None:
        self._client.restore_timeout()

    def _relay_head(self, response) -> None:
        request = self.request
        self._set_response_head(response)
        if not self._limits.keepalive:
            close_after_response(request)
        self._deliver(response)

    def _relay_early_head(self, response) -> None:
        self._set_response_head(response)
        self._answered_early(response)
        self._deliver(response)

    def _relay_whole_response(self, response) -> None:
        request = self.request
        # Taken first: the upstream connection is back in the pool before
        # the client hears anything (as when the body protocol hears the
        # end), ready for a request the finish starts.
        body = response.take_whole_body()
        self._set_response_head(response)
        if not self._limits.keepalive:
            close_after_response(request)
        if body:
            # The head goes out with it, in one write; the finish that
            # follows writes it alone for an empty body.
            request.write(body)

    def _relay_early_whole_response(self, response) -> None:
        request = self.request
        body = response.take_whole_body()
        self._set_response_head(response)
        self._answered_early(response)
        if body:
            request.write(body)

    def _answered_early(self, response) -> None:
        request = self.request
        # An early answer: the rest of the body is not read.
        self._log.info(
            "upstream answered {status} to {method} {uri} before the request body was"
            " complete; closing the client connection after the answer",
            status=response.code,
            method=_text(request.method),
            uri=_text(request.uri),
        )
        stop_reading_requests(request)

    def _set_response_head(self, response) -> None:
        request = self.request
        relay_response_head = getattr(request, "relay_response_head", None)
        if relay_response_head is not None:
            # quayfront's own request builds the head from the fields
            # themselves (no Headers object filled and walked).
            code = response.code
            length = response.length
            # response_fields(response), written out: once per response.
            pairs = getattr(response, "header_pairs", None)
            if pairs is None:
                pairs = header_pairs(response.headers)
            relay_response_head(
                code,
                response.phrase,
                pairs,
                None
                if length is UNKNOWN_LENGTH or request.method == b"HEAD" or code in NO_BODY_CODES
                else length,
            )
            return
        request.setResponseCode(response.code, response.phrase)
        # Checked by the response reader (or Twisted's): added unchecked.
        add_checked_fields(
            request.responseHeaders, client_response_headers(response_fields(response))
        )
        if (
            response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
            and response.code not in NO_BODY_CODES
        ):
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])

    def _deliver(self, response) -> None:
        relay = self._relay = ResponseRelay(self)
        response.deliverBody(relay)
        channel = getattr(self.request, "channel", None)
        if relay.transport is not None and waiting_for_client(channel):
            # A pipelined response starting while the client has not read
            # the previous one: the channel pauses producers only when its
            # transport fills, so this one must start paused (and only after
            # deliverBody, which resumes the upstream on its way out).
            relay.transport.pauseProducing()

    def _discard_response(self, response) -> None:
        response.deliverBody(DiscardedResponse())

    def _relay_data(self, data: bytes) -> None:
        self.request.write(data)

    def _finish_response(self, _) -> None:
        self.request.finish()

    def _abort_client(self, action: AbortClient) -> None:
        request = self.request
        ending = action.ending
        if ending is endings.UPSTREAM_TRUNCATED:
            self._log.warn(
                "upstream response to {method} {uri} ended early; aborting the client"
                " connection: {error}",
                method=_text(request.method),
                uri=_text(request.uri),
                error=action.detail,
            )
        elif ending is endings.RESPONSE_IDLE_TIMEOUT:
            self._log.warn(
                "{reason}: {method} {uri}: no progress for {idle}s; aborting both connections",
                reason=ending.reason,
                method=_text(request.method),
                uri=_text(request.uri),
                idle=self._limits.idle_timeout_s,
            )
        elif ending is endings.DRAIN_TIMEOUT:
            self._log.warn(
                "{reason}: {method} {uri}: still under way when the drain ended;"
                " aborting both connections",
                reason=ending.reason,
                method=_text(request.method),
                uri=_text(request.uri),
            )
        channel = getattr(request, "channel", None)
        if channel is not None:
            channel.transport.abortConnection()

    def _answer_with(self, action: Answer) -> None:
        ending = action.ending
        request = self.request
        self._log.warn(
            "{status} for {method} {uri}: {reason}{detail}",
            status=ending.status,
            method=_text(request.method),
            uri=_text(request.uri),
            reason=ending.reason,
            detail=f": {action.detail}" if action.detail else "",
        )
        headers = []
        if action.retry_after_s is not None:
            headers.append(
                (b"Retry-After", b"%d" % max(1, math.ceil(action.retry_after_s)))
            )
        # Answered on the next reactor turn: a failure found while the
        # channel is parsing (the head, a body chunk) must not finish the
        # request under it; Twisted's channel cannot take that.
        self._clock.callLater(0, self._answer, ending, headers)

    def _answer(self, ending: Ending, headers: list[tuple[bytes, bytes]]) -> None:
        request = self.request
        if client_gone(request) or request.startedWriting:
            return
        respond_with_ending(
            request,
            ending,
            close=not self.exchange.body_complete or not self._limits.keepalive,
            headers=headers,
        )

    # Deadlines.

    def _arm(self, deadline: Deadline) -> None:
        now = self._clock.seconds()
        if deadline is _RESPONSE_DEADLINE:
            delay_s = self._limits.response_timeout_s
        elif deadline is _DRAIN_DEADLINE:
            delay_s = self._drain_timeout_s
        else:
            # An idle deadline: it runs from the last sign of progress.
            self._last_activity_s = now
            delay_s = self._limits.idle_timeout_s
        due_s = self._armed[deadline] = now + delay_s
        entry = self._watch_entry
        if entry is None:
            self._watch_entry = deadline_watch(self._clock).add(self, due_s, delay_s)
        elif entry[0] > due_s:
            # Sooner than watched: watched anew.
            watch = entry[3]
            watch.drop(entry)
            self._watch_entry = watch.add(self, due_s, delay_s)

    def _watch(self) -> None:
        """
        Called by the clock's L{DeadlineWatch} when this exchange's entry
        falls due: the deadline that fell due first, if one did, raises its
        event; otherwise the exchange is watched until the next one.
        """
        now = self._clock.seconds()
        idle_timeout_s = self._limits.idle_timeout_s
        expired = None
        expired_at = 0.0
        next_s = None
        for deadline, due_s in self._armed.items():
            if deadline is _UPLOAD_IDLE_DEADLINE or deadline is _DOWNLOAD_IDLE_DEADLINE:
                idle_s = now - self._last_activity_s
                if idle_s < idle_timeout_s:
                    left_s = idle_timeout_s - idle_s
                    next_s = left_s if next_s is None else min(next_s, left_s)
                    continue
                due_s = self._last_activity_s + idle_timeout_s
            elif due_s > now:
                next_s = due_s - now if next_s is None else min(next_s, due_s - now)
                continue
            # In the order a timer each would have fired: the earliest due,
            # then the first armed.
            if expired is None or due_s < expired_at:
                expired, expired_at = deadline, due_s
        if expired is not None:
            del self._armed[expired]
            self.feed(_DEADLINE_EVENTS[expired])
            if self._armed and self._watch_entry is None:
                self._watch()
        elif next_s is not None:
            self._watch_entry = deadline_watch(self._clock).add(self, now + next_s, next_s)


class DeadlineWatch:
    """
    The deadlines of every exchange on one clock, watched by one timer.

    Each exchange with a deadline armed has one entry, C{[due_s, order,
    forwarding, watch]}, in a heap; the timer is set for no later than the
    earliest entry, and calls each exchange whose entry fell due
    (L{Forwarding._watch}), which raises its deadline's event or is
    watched again.  An exchange that ends, or watches sooner, drops its
    entry: the entry lets go of the exchange at once (nothing is kept
    alive by a deadline it no longer has), but stays in the heap until it
    comes up, until no exchange is watched, or until dropped entries
    outnumber the others (then the heap is rebuilt without them), and the
    timer is not moved: an exchange answered at once neither makes nor
    cancels a timer.  A timer that fires with nothing due finds nothing to
    do and is set again only for an entry left.
    """

    #: Dropped entries kept in the heap, at most, beyond as many as live ones.
    MAX_DROPPED = 64
    _log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        # Held weakly: the clock holds the timer, which holds this.
        self._clock = ref(clock)
        self._heap: list[list] = []
        # Breaks ties between entries due at the same time: first watched,
        # first called, as timers of their own would be.
        self._order = count()
        self.live = 0
        self._dropped = 0
        self._timer: IDelayedCall | None = None
        self._timer_s = 0.0

    def add(self, forwarding: Forwarding, due_s: float, delay_s: float) -> list:
        """
        Watch C{forwarding} until C{due_s} (C{delay_s} from now): its entry,
        to hand back to L{drop}.
        """
        entry = [due_s, next(self._order), forwarding, self]
        heappush(self._heap, entry)
        self.live += 1
        timer = self._timer
        if timer is None or timer.cancelled:
            # (A timer is only ever cancelled by someone else: made anew.)
            self._timer = self._clock().callLater(delay_s, self._watch)
            self._timer_s = due_s
        elif due_s < self._timer_s:
            timer.reset(delay_s)
            self._timer_s = due_s
        return entry

    def drop(self, entry: list) -> None:
        """
        Watch the exchange of C{entry} no longer.
        """
        entry[2] = None
        live = self.live = self.live - 1
        if not live:
            self._heap.clear()
            self._dropped = 0
            return
        dropped = self._dropped = self._dropped + 1
        if dropped > self.MAX_DROPPED and dropped > live:
            heap = self._heap = [entry for entry in self._heap if entry[2] is not None]
            heapify(heap)
            self._dropped = 0

    def _watch(self) -> None:
        self._timer = None
        clock = self._clock()
        now = clock.seconds()
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            entry = heappop(heap)
            forwarding = entry[2]
            if forwarding is None:
                self._dropped -= 1
            else:
                entry[2] = None
                self.live -= 1
                forwarding._watch_entry = None
                due.append(forwarding)
        # Each called as its own timer would have been (an error in one,
        # logged as the reactor would log it, stops none of the others);
        # what they watch anew (a later deadline) waits for the timer.
        for forwarding in due:
            try:
                forwarding._watch()
            except Exception:
                self._log.failure("watching the deadlines of an exchange")
        heap = self._heap
        while heap and heap[0][2] is None:
            heappop(heap)
            self._dropped -= 1
        if heap:
            next_s = heap[0][0]
            timer = self._timer
            if timer is None or timer.cancelled:
                self._timer = clock.callLater(max(0.0, next_s - now), self._watch)
                self._timer_s = next_s
            elif next_s < self._timer_s:
                timer.reset(max(0.0, next_s - now))
                self._timer_s = next_s


_watches: WeakKeyDictionary = WeakKeyDictionary()
_last_watched: tuple = (None, None)


def deadline_watch(clock: IReactorTime) -> DeadlineWatch:
    """
    The L{DeadlineWatch} of C{clock}.
    """
    global _last_watched
    last_clock, watch = _last_watched
    if last_clock is clock:
        return watch
    watch = _watches.get(clock)
    if watch is None:
        watch = _watches[clock] = DeadlineWatch(clock)
    _last_watched = (clock, watch)
    return watch


_ACTIONS = {action: getattr(Forwarding, "_" + action.name.lower()) for action in Action}

_DEADLINE_EVENTS = {
    _RESPONSE_DEADLINE: _RESPONSE_TIMEOUT,
    _UPLOAD_IDLE_DEADLINE: _UPLOAD_IDLE_TIMEOUT,
    _DOWNLOAD_IDLE_DEADLINE: _DOWNLOAD_IDLE_TIMEOUT,
    _DRAIN_DEADLINE: _DRAIN_TIMEOUT,
}


#: How a response body ends complete (see Forwarding.response_ended).
_COMPLETE_ENDS = (ResponseDone, PotentialDataLoss)

#: The payload of an event queued without one (never changed).
_NO_PAYLOAD: dict = {}

#: The admission of an exchange that found a free slot: already fired, so
#: cancelling it (the exchange's own ending) does nothing.
_ADMITTED_AT_ONCE = succeed(None)


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


def respond_with_error(
    request,
    status: int,
    reason: str,
    close: bool = False,
    headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = (),
) -> None:
    """
    Answer C{request} with an error quayfront makes itself, the ending
    logged as C{reason} (see L{respond_with_ending}).
    """
    ending = ending_for(reason, status)
    if ending.status != status:
        ending = replace(ending, status=status)
    respond_with_ending(request, ending, close=close, headers=headers)


def respond_with_ending(
    request,
    ending: Ending,
    close: bool = False,
    headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = (),
) -> None:
    """
    Answer C{request} with the status of C{ending}: the registry's JSON
    error shape (with the ending's registry error code) on registry API
    paths, plain text elsewhere; both name the ending's reason.

    @param close: the client may still be sending a body nobody will read,
        so close the connection after the answer instead of reading on.
    """
    status = ending.status
    reason = ending.reason
    # What the access log names as the request's outcome.
    request.answered_with = reason
    message = http.RESPONSES.get(status, b"Error").decode("ascii")
    if request.path.startswith(REGISTRY_API_PREFIXES):
        body = json.dumps(
            {
                "errors": [
                    {
                        "code": ending.registry_code,
                        "message": message.lower(),
                        "detail": {"reason": reason},
                    }
                ]
            }
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
