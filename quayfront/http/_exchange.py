"""
The life of one proxied request, free of I/O and of Twisted: events in,
actions out, in the manner of h11's C{_state.py}.

An exchange has two sides, each with its own named states:

  - L{ExchangeState}, the request's way through quayfront to the upstream
    and the response's way back: C{NEW} (the head is complete),
    C{RATE_LIMITING} (the route's rate limiter decides), C{QUEUED} (the
    upstream's concurrency cap decides), C{AWAITING_RESPONSE} (the upstream
    request is under way), C{RELAYING} (the response head went to the
    client, its body follows), C{ENDED}.
  - L{BodyState}, the client's request body: C{NONE} (there is none),
    C{WAITING} (the upstream is not ready for it: a chunk that arrives is
    held and the client paused), C{WAITING_PAUSED} (the same, and the
    upstream connection asked for a pause before asking for the body),
    C{STREAMING}, C{PAUSED} (the upstream asked for a pause), C{COMPLETE},
    C{DISCARDING} (the exchange ended first: what still arrives is
    dropped).

L{EXCHANGE_TRANSITIONS} and L{BODY_TRANSITIONS} list, for each state, the
events it accepts and the states each may lead to (an event that concerns
the body is checked against the body's table, every other against the
exchange's; a deadline event is legal only where that deadline is armed).
The handlers are held to these tables by tests generated from them.
Anything else raises L{ExchangeMisused}, naming the state and the event:
quayfront itself misused the model, as opposed to a peer misbehaving
(L{quayfront.http.PeerMisbehaved}, L{quayfront.http.UpstreamMisbehaved}),
which arrives here as an event.

Deadlines follow from the states (L{deadlines_for}): C{RESPONSE} while the
upstream request is under way with the body complete (or none),
C{UPLOAD_IDLE} while it is under way with the body still arriving,
C{DOWNLOAD_IDLE} while the response is relayed, C{DRAIN} in every live
state once the process drains.  Each event's actions end with the
L{Arm}/L{Disarm} that bring the armed deadlines in line with the new state.
The head deadline belongs to the client channel, not to an exchange.

How the exchange ended is one of the L{quayfront.http._endings} table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import _endings
from ._endings import Ending


# Members are looked up in dicts on every event: hashed by identity (in C)
# rather than by Enum's own __hash__ (in Python); equality is identity
# either way.
_identity_hash = object.__hash__


class ExchangeMisused(RuntimeError):
    """
    An event the current state does not accept: a bug in the caller, not
    something a peer did.
    """

    def __init__(self, state: enum.Enum, event: Event) -> None:
        super().__init__(
            f"event {event.name} is not accepted in state {type(state).__name__}.{state.name}"
        )
        self.state = state
        self.event = event


class ExchangeState(enum.Enum):
    __hash__ = _identity_hash

    NEW = "new"
    RATE_LIMITING = "rate-limiting"
    QUEUED = "queued"
    AWAITING_RESPONSE = "awaiting-response"
    RELAYING = "relaying"
    ENDED = "ended"


class BodyState(enum.Enum):
    __hash__ = _identity_hash

    NONE = "none"
    WAITING = "waiting"
    WAITING_PAUSED = "waiting-paused"
    STREAMING = "streaming"
    PAUSED = "paused"
    COMPLETE = "complete"
    DISCARDING = "discarding"


class Event(enum.Enum):
    """
    What happens to an exchange.  Payloads, where an event has one, are
    keyword arguments of L{Exchange.handle}.
    """

    __hash__ = _identity_hash

    HEAD_COMPLETE = "head-complete"
    RATE_ALLOWED = "rate-allowed"
    #: retry_after_s
    RATE_LIMITED = "rate-limited"
    ADMITTED = "admitted"
    #: ending (QUEUE_FULL or QUEUE_TIMEOUT)
    NOT_ADMITTED = "not-admitted"
    #: The upstream has the request head and asks for the body.
    UPSTREAM_READY = "upstream-ready"
    #: size
    BODY_CHUNK = "body-chunk"
    BODY_END = "body-end"
    UPLOAD_PAUSED = "upload-paused"
    UPLOAD_RESUMED = "upload-resumed"
    #: The upstream request takes no more of the body (it was answered or
    #: failed on the upstream's side).
    UPLOAD_STOPPED = "upload-stopped"
    RESPONSE_HEAD = "response-head"
    RESPONSE_DATA = "response-data"
    RESPONSE_END = "response-end"
    #: The head, the whole body and the end of a response, together (it
    #: came in one read): what RESPONSE_HEAD, RESPONSE_DATA and
    #: RESPONSE_END do, in one event.
    RESPONSE_WHOLE = "response-whole"
    #: detail
    RESPONSE_TRUNCATED = "response-truncated"
    #: ending, detail
    UPSTREAM_FAILED = "upstream-failed"
    CLIENT_GONE = "client-gone"
    #: ending (a framing refusal)
    CLIENT_MISBEHAVED = "client-misbehaved"
    DRAINING = "draining"
    RESPONSE_TIMEOUT = "response-timeout"
    UPLOAD_IDLE_TIMEOUT = "upload-idle-timeout"
    DOWNLOAD_IDLE_TIMEOUT = "download-idle-timeout"
    DRAIN_TIMEOUT = "drain-timeout"


class Deadline(enum.Enum):
    __hash__ = _identity_hash

    RESPONSE = "response"
    UPLOAD_IDLE = "upload-idle"
    DOWNLOAD_IDLE = "download-idle"
    DRAIN = "drain"


class Action(enum.Enum):
    """
    What the adapter does, in the order given.
    """

    __hash__ = _identity_hash

    ASK_RATE_LIMITER = "ask-rate-limiter"
    ASK_ADMISSION = "ask-admission"
    CANCEL_ADMISSION = "cancel-admission"
    START_UPSTREAM_REQUEST = "start-upstream-request"
    #: Cancel the upstream request (its connection is aborted).
    CANCEL_UPSTREAM_REQUEST = "cancel-upstream-request"
    #: Stop the upstream response (its connection is aborted).
    STOP_UPSTREAM_RESPONSE = "stop-upstream-response"
    #: Abort the upstream connection after a response that came early.
    ABORT_UPSTREAM_CONNECTION = "abort-upstream-connection"
    RELEASE_SLOT = "release-slot"
    SEND_CONTINUE = "send-continue"
    #: Hand the held chunks to the upstream.
    FLUSH_HELD = "flush-held"
    HOLD_CHUNK = "hold-chunk"
    FORWARD_CHUNK = "forward-chunk"
    #: The body is complete: tell the upstream request.
    FINISH_UPLOAD = "finish-upload"
    #: The exchange is over: the upstream takes no more of the body.
    STOP_UPLOAD = "stop-upload"
    PAUSE_CLIENT = "pause-client"
    RESUME_CLIENT = "resume-client"
    #: Give the client connection back its idle timeout.
    RESTORE_CLIENT_TIMEOUT = "restore-client-timeout"
    RELAY_HEAD = "relay-head"
    #: Relay the head of an answer that came before the body was complete,
    #: and read no more from the client.
    RELAY_EARLY_HEAD = "relay-early-head"
    #: A response head for an exchange already over: drop its body.
    DISCARD_RESPONSE = "discard-response"
    RELAY_DATA = "relay-data"
    #: Relay the head and the whole body of a response that brought both
    #: (L{Event.RESPONSE_WHOLE}), in one write.
    RELAY_WHOLE_RESPONSE = "relay-whole-response"
    #: The same, for an answer that came before the request body was
    #: complete (as RELAY_EARLY_HEAD).
    RELAY_EARLY_WHOLE_RESPONSE = "relay-early-whole-response"
    FINISH_RESPONSE = "finish-response"


@dataclass(frozen=True)
class Answer:
    """
    Answer the client with C{ending}'s status (quayfront's own response).
    """

    ending: Ending
    detail: str = ""
    retry_after_s: float | None = None


@dataclass(frozen=True)
class AbortClient:
    """
    Abort the client connection: its response has started, or must never
    look complete.
    """

    ending: Ending
    detail: str = ""


@dataclass(frozen=True)
class Arm:
    deadline: Deadline


@dataclass(frozen=True)
class Disarm:
    deadline: Deadline


S = ExchangeState
B = BodyState
E = Event

_LIVE = (S.RATE_LIMITING, S.QUEUED, S.AWAITING_RESPONSE, S.RELAYING)
_RECEIVING = (B.WAITING, B.WAITING_PAUSED, B.STREAMING, B.PAUSED)
_BODY_WAITING = (B.WAITING, B.WAITING_PAUSED)
_BODY_PAUSED = (B.WAITING_PAUSED, B.PAUSED)

#: The events that concern the request body (checked against BODY_TRANSITIONS).
BODY_EVENTS = frozenset(
    {
        E.UPSTREAM_READY,
        E.BODY_CHUNK,
        E.BODY_END,
        E.UPLOAD_PAUSED,
        E.UPLOAD_RESUMED,
        E.UPLOAD_STOPPED,
    }
)
#: The events a deadline raises, and the deadline.
DEADLINE_EVENTS = {
    E.RESPONSE_TIMEOUT: Deadline.RESPONSE,
    E.UPLOAD_IDLE_TIMEOUT: Deadline.UPLOAD_IDLE,
    E.DOWNLOAD_IDLE_TIMEOUT: Deadline.DOWNLOAD_IDLE,
    E.DRAIN_TIMEOUT: Deadline.DRAIN,
}

_ENDS = frozenset({S.ENDED})

#: For each exchange state, the events it accepts and where each may lead.
EXCHANGE_TRANSITIONS: dict[ExchangeState, dict[Event, frozenset[ExchangeState]]] = {
    S.NEW: {
        E.HEAD_COMPLETE: frozenset({S.RATE_LIMITING, S.ENDED}),
        E.DRAINING: frozenset({S.NEW}),
    },
    S.RATE_LIMITING: {
        E.RATE_ALLOWED: frozenset({S.QUEUED}),
        E.RATE_LIMITED: _ENDS,
        E.CLIENT_GONE: _ENDS,
        E.CLIENT_MISBEHAVED: _ENDS,
        E.DRAINING: frozenset({S.RATE_LIMITING}),
        E.DRAIN_TIMEOUT: _ENDS,
    },
    S.QUEUED: {
        E.ADMITTED: frozenset({S.AWAITING_RESPONSE}),
        E.NOT_ADMITTED: _ENDS,
        E.CLIENT_GONE: _ENDS,
        E.CLIENT_MISBEHAVED: _ENDS,
        E.DRAINING: frozenset({S.QUEUED}),
        E.DRAIN_TIMEOUT: _ENDS,
    },
    S.AWAITING_RESPONSE: {
        E.RESPONSE_HEAD: frozenset({S.RELAYING}),
        E.RESPONSE_WHOLE: _ENDS,
        E.UPSTREAM_FAILED: _ENDS,
        E.CLIENT_GONE: _ENDS,
        E.CLIENT_MISBEHAVED: _ENDS,
        E.DRAINING: frozenset({S.AWAITING_RESPONSE}),
        E.RESPONSE_TIMEOUT: _ENDS,
        E.UPLOAD_IDLE_TIMEOUT: _ENDS,
        E.DRAIN_TIMEOUT: _ENDS,
    },
    S.RELAYING: {
        E.RESPONSE_DATA: frozenset({S.RELAYING}),
        E.RESPONSE_END: _ENDS,
        E.RESPONSE_TRUNCATED: _ENDS,
        E.CLIENT_GONE: _ENDS,
        E.CLIENT_MISBEHAVED: _ENDS,
        E.DRAINING: frozenset({S.RELAYING}),
        E.DOWNLOAD_IDLE_TIMEOUT: _ENDS,
        E.DRAIN_TIMEOUT: _ENDS,
    },
    # What is still under way when an exchange ends reports in late: a
    # rate decision or a slot arriving, a cancelled request failing, the
    # upstream connection closing, the client leaving after its answer.
    S.ENDED: {
        E.RATE_ALLOWED: _ENDS,
        E.RATE_LIMITED: _ENDS,
        E.ADMITTED: _ENDS,
        E.RESPONSE_HEAD: _ENDS,
        E.RESPONSE_WHOLE: _ENDS,
        E.RESPONSE_DATA: _ENDS,
        E.RESPONSE_END: _ENDS,
        E.RESPONSE_TRUNCATED: _ENDS,
        E.UPSTREAM_FAILED: _ENDS,
        E.CLIENT_GONE: _ENDS,
        E.CLIENT_MISBEHAVED: _ENDS,
        E.DRAINING: _ENDS,
    },
}

#: For each body state, the body events it accepts and where each may lead.
BODY_TRANSITIONS: dict[BodyState, dict[Event, frozenset[BodyState]]] = {
    B.NONE: {
        # The channel reports the end of every request, bodiless ones too.
        E.BODY_END: frozenset({B.NONE}),
    },
    B.WAITING: {
        E.UPSTREAM_READY: frozenset({B.STREAMING}),
        E.BODY_CHUNK: frozenset({B.WAITING, B.DISCARDING}),
        E.BODY_END: frozenset({B.COMPLETE}),
        # A connection may push back before it asks for the body (a TLS
        # one whose write waits on a read, say).
        E.UPLOAD_PAUSED: frozenset({B.WAITING_PAUSED}),
        E.UPLOAD_RESUMED: frozenset({B.WAITING}),
        E.UPLOAD_STOPPED: frozenset({B.DISCARDING}),
    },
    B.WAITING_PAUSED: {
        E.UPSTREAM_READY: frozenset({B.PAUSED}),
        E.BODY_CHUNK: frozenset({B.WAITING_PAUSED, B.DISCARDING}),
        E.BODY_END: frozenset({B.COMPLETE}),
        E.UPLOAD_PAUSED: frozenset({B.WAITING_PAUSED}),
        E.UPLOAD_RESUMED: frozenset({B.WAITING}),
        E.UPLOAD_STOPPED: frozenset({B.DISCARDING}),
    },
    B.STREAMING: {
        E.BODY_CHUNK: frozenset({B.STREAMING, B.DISCARDING}),
        E.BODY_END: frozenset({B.COMPLETE}),
        E.UPLOAD_PAUSED: frozenset({B.PAUSED}),
        E.UPLOAD_RESUMED: frozenset({B.STREAMING}),
        E.UPLOAD_STOPPED: frozenset({B.DISCARDING}),
    },
    B.PAUSED: {
        E.BODY_CHUNK: frozenset({B.PAUSED, B.DISCARDING}),
        E.BODY_END: frozenset({B.COMPLETE}),
        E.UPLOAD_PAUSED: frozenset({B.PAUSED}),
        E.UPLOAD_RESUMED: frozenset({B.STREAMING}),
        E.UPLOAD_STOPPED: frozenset({B.DISCARDING}),
    },
    B.COMPLETE: {
        # Held chunks and the end go upstream when it asks for the body.
        E.UPSTREAM_READY: frozenset({B.COMPLETE}),
        E.UPLOAD_PAUSED: frozenset({B.COMPLETE}),
        E.UPLOAD_RESUMED: frozenset({B.COMPLETE}),
        E.UPLOAD_STOPPED: frozenset({B.COMPLETE}),
    },
    B.DISCARDING: {
        E.UPSTREAM_READY: frozenset({B.DISCARDING}),
        E.BODY_CHUNK: frozenset({B.DISCARDING}),
        E.BODY_END: frozenset({B.COMPLETE}),
        E.UPLOAD_PAUSED: frozenset({B.DISCARDING}),
        E.UPLOAD_RESUMED: frozenset({B.DISCARDING}),
        E.UPLOAD_STOPPED: frozenset({B.DISCARDING}),
    },
}


def _deadlines(state: ExchangeState, body: BodyState, draining: bool) -> frozenset[Deadline]:
    armed = set()
    if state is S.AWAITING_RESPONSE:
        armed.add(Deadline.UPLOAD_IDLE if body in _RECEIVING else Deadline.RESPONSE)
    elif state is S.RELAYING:
        armed.add(Deadline.DOWNLOAD_IDLE)
    if draining and state in _LIVE:
        armed.add(Deadline.DRAIN)
    return frozenset(armed)


# Looked up on every event: computed once, each distinct set one object
# (so that "unchanged" is an identity test).
_SETS: dict[frozenset[Deadline], frozenset[Deadline]] = {}
_DEADLINES = {
    (state, body, draining): _SETS.setdefault(
        _deadlines(state, body, draining), _deadlines(state, body, draining)
    )
    for state in ExchangeState
    for body in BodyState
    for draining in (False, True)
}


def deadlines_for(state: ExchangeState, body: BodyState, draining: bool) -> frozenset[Deadline]:
    """
    The deadlines armed in a state.
    """
    return _DEADLINES[state, body, draining]


def accepts(state: ExchangeState, body: BodyState, draining: bool, event: Event) -> bool:
    """
    Whether an exchange in C{state} with C{body} accepts C{event}.
    """
    deadline = DEADLINE_EVENTS.get(event)
    if deadline is not None:
        return deadline in deadlines_for(state, body, draining)
    if event in BODY_EVENTS:
        return event in BODY_TRANSITIONS[body]
    return event in EXCHANGE_TRANSITIONS[state]


# On Python 3.11 reading an Enum member through its class runs a descriptor
# (about a quarter of a microsecond); the handlers, run on every event,
# read these module-level names instead.
_NEW = ExchangeState.NEW
_RATE_LIMITING = ExchangeState.RATE_LIMITING
_QUEUED = ExchangeState.QUEUED
_AWAITING_RESPONSE = ExchangeState.AWAITING_RESPONSE
_RELAYING = ExchangeState.RELAYING
_ENDED = ExchangeState.ENDED
_NONE = BodyState.NONE
_WAITING = BodyState.WAITING
_WAITING_PAUSED = BodyState.WAITING_PAUSED
_STREAMING = BodyState.STREAMING
_PAUSED = BodyState.PAUSED
_COMPLETE = BodyState.COMPLETE
_DISCARDING = BodyState.DISCARDING
_ASK_RATE_LIMITER = Action.ASK_RATE_LIMITER
_ASK_ADMISSION = Action.ASK_ADMISSION
_CANCEL_ADMISSION = Action.CANCEL_ADMISSION
_START_UPSTREAM_REQUEST = Action.START_UPSTREAM_REQUEST
_CANCEL_UPSTREAM_REQUEST = Action.CANCEL_UPSTREAM_REQUEST
_STOP_UPSTREAM_RESPONSE = Action.STOP_UPSTREAM_RESPONSE
_ABORT_UPSTREAM_CONNECTION = Action.ABORT_UPSTREAM_CONNECTION
_RELEASE_SLOT = Action.RELEASE_SLOT
_SEND_CONTINUE = Action.SEND_CONTINUE
_FLUSH_HELD = Action.FLUSH_HELD
_HOLD_CHUNK = Action.HOLD_CHUNK
_FORWARD_CHUNK = Action.FORWARD_CHUNK
_FINISH_UPLOAD = Action.FINISH_UPLOAD
_STOP_UPLOAD = Action.STOP_UPLOAD
_PAUSE_CLIENT = Action.PAUSE_CLIENT
_RESUME_CLIENT = Action.RESUME_CLIENT
_RESTORE_CLIENT_TIMEOUT = Action.RESTORE_CLIENT_TIMEOUT
_RELAY_HEAD = Action.RELAY_HEAD
_RELAY_EARLY_HEAD = Action.RELAY_EARLY_HEAD
_DISCARD_RESPONSE = Action.DISCARD_RESPONSE
_RELAY_DATA = Action.RELAY_DATA
_RELAY_WHOLE_RESPONSE = Action.RELAY_WHOLE_RESPONSE
_RELAY_EARLY_WHOLE_RESPONSE = Action.RELAY_EARLY_WHOLE_RESPONSE
_FINISH_RESPONSE = Action.FINISH_RESPONSE
_BODY_CHUNK_EVENT = Event.BODY_CHUNK
_RESPONSE_DATA_EVENT = Event.RESPONSE_DATA
_RESPONSE_WHOLE_EVENT = Event.RESPONSE_WHOLE
_FORWARD_ONLY = (_FORWARD_CHUNK,)
_HEAD_COMPLETE_EVENT = Event.HEAD_COMPLETE
_RATE_ALLOWED_EVENT = Event.RATE_ALLOWED
_ADMITTED_EVENT = Event.ADMITTED
#: What HEAD_COMPLETE and RATE_ALLOWED answer in the common case (the
#: adapter may compare with these, by identity).
ASKS_RATE_LIMITER = _ASKS_RATE_LIMITER = (_ASK_RATE_LIMITER,)
ASKS_ADMISSION = _ASKS_ADMISSION = (_ASK_ADMISSION,)
_COMPLETED = _endings.COMPLETED
_CLIENT_CLOSED = _endings.CLIENT_CLOSED


class Exchange:
    """
    One request's exchange.  L{handle} takes an event and answers the
    actions to take, in order; the states are L{state} and L{body}.

    @ivar ending: how the exchange ended, None until it has.
    @ivar body_bytes: request body bytes received before the exchange ended.
    """

    def __init__(
        self, has_body: bool, length: int | None = None, max_body_bytes: int = 0
    ) -> None:
        self.state = _NEW
        self.body = _WAITING if has_body else _NONE
        self._length = length
        self._max_body_bytes = max_body_bytes
        # Set here although the class says the same: every request reads
        # them, and CPython 3.11 reads an instance's own attribute faster
        # than its class's.
        self.draining = False
        self.ending = None
        self.body_bytes = 0

    draining = False
    ending: Ending | None = None
    body_bytes = 0

    @property
    def body_complete(self) -> bool:
        return self.body is _NONE or self.body is _COMPLETE

    @property
    def armed(self) -> frozenset[Deadline]:
        return deadlines_for(self.state, self.body, self.draining)

    def handle(self, event: Event, **payload) -> tuple:
        """
        Take C{event} (with its payload) and answer the actions, in order.

        @raise ExchangeMisused: the current state does not accept C{event}.
        """
        state, body, draining = self.state, self.body, self.draining
        handlers, armed = _CONFIGURATIONS[state, body, draining]
        handler = handlers.get(event)
        if handler is None:
            raise ExchangeMisused(body if event in BODY_EVENTS else state, event)
        actions = handler(self, **payload) if payload else handler(self)
        if self.state is not state or self.body is not body or self.draining is not draining:
            now = _DEADLINES[self.state, self.body, self.draining]
            if now is not armed:
                actions += _DEADLINE_ACTIONS[armed, now, _FIRED.get(event)]
        return actions

    # The admission events, once per request: the same as handle() (the
    # tests hold them to it), with a short way through the common case
    # (no drain, so no deadline armed or disarmed on the way).

    def head_complete(self) -> tuple:
        """
        C{handle(Event.HEAD_COMPLETE)}.
        """
        if self.state is _NEW and not self.draining:
            limit = self._max_body_bytes
            length = self._length
            if not limit or length is None or length <= limit:
                self.state = _RATE_LIMITING
                return _ASKS_RATE_LIMITER
        return self.handle(_HEAD_COMPLETE_EVENT)

    def rate_allowed(self) -> tuple:
        """
        C{handle(Event.RATE_ALLOWED)}.
        """
        if self.state is _RATE_LIMITING and not self.draining:
            self.state = _QUEUED
            return _ASKS_ADMISSION
        return self.handle(_RATE_ALLOWED_EVENT)

    def admitted(self) -> tuple:
        """
        C{handle(Event.ADMITTED)}: the upstream request starts, with the
        deadline its body state calls for.
        """
        if self.state is _QUEUED and not self.draining:
            actions = _ADMITTED_ACTIONS.get(self.body)
            if actions is not None:
                self.state = _AWAITING_RESPONSE
                return actions
        return self.handle(_ADMITTED_EVENT)

    # The data events, once per chunk: the same as handle() (the tests hold
    # them to it), with a short way through the common case.

    def body_chunk(self, size: int) -> tuple:
        """
        C{handle(Event.BODY_CHUNK, size=size)}.
        """
        if self.body is _STREAMING:
            total = self.body_bytes + size
            limit = self._max_body_bytes
            if not limit or total <= limit:
                self.body_bytes = total
                return _FORWARD_ONLY
        return self.handle(_BODY_CHUNK_EVENT, size=size)

    def response_data(self) -> bool:
        """
        C{handle(Event.RESPONSE_DATA)}: whether to relay the data (the
        response is being relayed) or drop it (the exchange is over).
        """
        state = self.state
        if state is _RELAYING:
            return True
        if state is _ENDED:
            return False
        raise ExchangeMisused(state, _RESPONSE_DATA_EVENT)

    def response_whole(self) -> tuple:
        """
        C{handle(Event.RESPONSE_WHOLE)}, with a short way through the
        common case: a response awaited, the request body complete (or
        none), no drain.
        """
        if self.state is _AWAITING_RESPONSE and not self.draining:
            body = self.body
            if body is _NONE or body is _COMPLETE:
                self.state = _ENDED
                self.ending = _COMPLETED
                return _WHOLE_ACTIONS[body]
        return self.handle(_RESPONSE_WHOLE_EVENT)

    # The request side.

    def _on_head_complete(self) -> tuple:
        limit = self._max_body_bytes
        if limit and self._length is not None and self._length > limit:
            return self._end(_endings.BODY_TOO_LARGE)
        self.state = _RATE_LIMITING
        return (_ASK_RATE_LIMITER,)

    def _on_rate_allowed(self) -> tuple:
        if self.state is _ENDED:
            return ()
        self.state = _QUEUED
        return (_ASK_ADMISSION,)

    def _on_rate_limited(self, retry_after_s: float | None = None) -> tuple:
        if self.state is _ENDED:
            return ()
        return self._end(_endings.RATE_LIMITED, retry_after_s=retry_after_s)

    def _on_admitted(self) -> tuple:
        if self.state is _ENDED:
            # The slot came after all: give it back.
            return (_RELEASE_SLOT,)
        self.state = _AWAITING_RESPONSE
        return (_START_UPSTREAM_REQUEST,)

    def _on_not_admitted(self, ending: Ending) -> tuple:
        return self._end(ending)

    # The request body.

    def _on_upstream_ready(self) -> tuple:
        body = self.body
        if body is _DISCARDING:
            return ()
        if body is _COMPLETE:
            return (_SEND_CONTINUE, _FLUSH_HELD, _FINISH_UPLOAD)
        if body is _WAITING_PAUSED:
            # The client stays paused until the upstream resumes.
            self.body = _PAUSED
            return (_SEND_CONTINUE, _FLUSH_HELD)
        self.body = _STREAMING
        return (_SEND_CONTINUE, _FLUSH_HELD, _RESUME_CLIENT)

    def _on_body_chunk(self, size: int) -> tuple:
        body = self.body
        if body is _DISCARDING:
            return ()
        self.body_bytes += size
        limit = self._max_body_bytes
        if limit and self.body_bytes > limit:
            # Not one byte past the limit reaches the upstream.
            return self._end(_endings.BODY_TOO_LARGE)
        if body is _STREAMING:
            return _FORWARD_ONLY
        if body is _PAUSED:
            # The channel resumes its transport on its own schedule (after
            # writing a 100 Continue, for one); the upstream still wants a
            # pause.
            return (_FORWARD_CHUNK, _PAUSE_CLIENT)
        # Held until the upstream asks for the body.
        return (_HOLD_CHUNK, _PAUSE_CLIENT)

    def _on_body_end(self) -> tuple:
        body = self.body
        if body is _NONE:
            # Without a body the client was never paused.
            return ()
        self.body = _COMPLETE
        if body is _STREAMING or body is _PAUSED:
            return (_RESTORE_CLIENT_TIMEOUT, _FINISH_UPLOAD)
        return (_RESTORE_CLIENT_TIMEOUT,)

    def _on_upload_paused(self) -> tuple:
        body = self.body
        if body in _BODY_WAITING:
            # The client is paused anyway once a chunk is held.
            self.body = _WAITING_PAUSED
        elif body in _RECEIVING:
            self.body = _PAUSED
            return (_PAUSE_CLIENT,)
        return ()

    def _on_upload_resumed(self) -> tuple:
        body = self.body
        if body in _BODY_WAITING:
            self.body = _WAITING
        elif body in _RECEIVING:
            self.body = _STREAMING
            return (_RESUME_CLIENT,)
        return ()

    def _on_upload_stopped(self) -> tuple:
        if self.body in _RECEIVING:
            self.body = _DISCARDING
            return (_STOP_UPLOAD,)
        return ()

    # The response.

    def _on_response_head(self) -> tuple:
        if self.state is _ENDED:
            return (_DISCARD_RESPONSE,)
        self.state = _RELAYING
        return (_RELAY_HEAD,) if self.body_complete else (_RELAY_EARLY_HEAD,)

    def _on_response_whole(self) -> tuple:
        # RESPONSE_HEAD, RESPONSE_DATA and RESPONSE_END in turn, with the
        # relay of the head and of the data one action.
        if self.state is _ENDED:
            return (_DISCARD_RESPONSE,)
        self.state = _RELAYING
        relay = (
            (_RELAY_WHOLE_RESPONSE,) if self.body_complete else (_RELAY_EARLY_WHOLE_RESPONSE,)
        )
        return relay + self._on_response_end()

    def _on_response_data(self) -> tuple:
        return () if self.state is _ENDED else (_RELAY_DATA,)

    def _on_response_end(self) -> tuple:
        if self.state is _ENDED:
            return ()
        if self.body_complete:
            return self._end(_COMPLETED) + (_FINISH_RESPONSE,)
        # The request body never finished: the upstream connection would
        # wait for it.
        return self._end(_COMPLETED) + (
            _FINISH_RESPONSE,
            _ABORT_UPSTREAM_CONNECTION,
        )

    def _on_response_truncated(self, detail: str = "") -> tuple:
        if self.state is _ENDED:
            return ()
        return self._end(_endings.UPSTREAM_TRUNCATED, detail=detail)

    def _on_upstream_failed(self, ending: Ending, detail: str = "") -> tuple:
        if self.state is _ENDED:
            # Cancelled by quayfront, which has answered already.
            return ()
        return self._end(ending, detail=detail, upstream_over=True)

    # The client.

    def _on_client_gone(self) -> tuple:
        if self.state is _ENDED:
            return ()
        return self._end(_CLIENT_CLOSED)

    def _on_client_misbehaved(self, ending: Ending) -> tuple:
        if self.state is _ENDED:
            return ()
        return self._end(ending)

    # Deadlines.

    def _on_draining(self) -> tuple:
        self.draining = True
        return ()

    def _on_response_timeout(self) -> tuple:
        return self._end(_endings.UPSTREAM_TIMEOUT)

    def _on_upload_idle_timeout(self) -> tuple:
        if self.body in _BODY_PAUSED:
            return self._end(_endings.UPSTREAM_STALLED)
        return self._end(_endings.CLIENT_BODY_TIMEOUT)

    def _on_download_idle_timeout(self) -> tuple:
        return self._end(_endings.RESPONSE_IDLE_TIMEOUT)

    def _on_drain_timeout(self) -> tuple:
        return self._end(_endings.DRAIN_TIMEOUT)

    # Endings.

    def _end(
        self,
        ending: Ending,
        detail: str = "",
        retry_after_s: float | None = None,
        upstream_over: bool = False,
    ) -> tuple:
        """
        End the exchange: whatever is under way upstream stops, the slot is
        freed, the body stops, and the client is answered or aborted.
        """
        state = self.state
        self.state = _ENDED
        self.ending = ending
        actions: list = []
        if state is _QUEUED:
            actions.append(_CANCEL_ADMISSION)
        elif state is _AWAITING_RESPONSE and not upstream_over:
            actions.append(_CANCEL_UPSTREAM_REQUEST)
        elif state is _RELAYING and ending is not _COMPLETED:
            actions.append(_STOP_UPSTREAM_RESPONSE)
        if state is _AWAITING_RESPONSE or state is _RELAYING:
            actions.append(_RELEASE_SLOT)
        if self.body in _RECEIVING:
            self.body = _DISCARDING
            actions.append(_STOP_UPLOAD)
        if self.body is not _NONE:
            # The client may have been paused for its body.
            actions.append(_RESTORE_CLIENT_TIMEOUT)
        if ending is _CLIENT_CLOSED or ending is _COMPLETED:
            return tuple(actions)
        if ending.aborts_client or state is _RELAYING:
            # The response has started (or must never look complete): the
            # client can only be cut off.
            actions.append(AbortClient(ending, detail))
        else:
            actions.append(Answer(ending, detail, retry_after_s))
        return tuple(actions)


_HANDLERS = {event: getattr(Exchange, "_on_" + event.name.lower()) for event in Event}

# What each configuration accepts (each event it accepts, with its handler)
# and has armed, computed once from the tables: one lookup per event, and an
# event it does not accept is not found.
_CONFIGURATIONS = {
    (state, body, draining): (
        {
            event: _HANDLERS[event]
            for event in Event
            if accepts(state, body, draining, event)
        },
        _DEADLINES[state, body, draining],
    )
    for state in ExchangeState
    for body in BodyState
    for draining in (False, True)
}


def _deadline_actions(
    armed: frozenset[Deadline], now: frozenset[Deadline], fired: Deadline | None
) -> tuple:
    """
    The Disarm and Arm actions that take the armed deadlines from C{armed}
    to C{now}; a deadline that fired is disarmed already.
    """
    return tuple(
        Disarm(d) for d in Deadline if d in armed and d not in now and d is not fired
    ) + tuple(Arm(d) for d in Deadline if d in now and d not in armed)


# The deadline that fired, for the events a deadline raises.
_FIRED: dict[Event, Deadline] = dict(DEADLINE_EVENTS)
# Every change of armed deadlines, made once (the distinct sets are few).
_DEADLINE_ACTIONS: dict[tuple, tuple] = {
    (armed, now, fired): _deadline_actions(armed, now, fired)
    for armed in _SETS.values()
    for now in _SETS.values()
    for fired in (None, *Deadline)
}


def _whole_actions(body: BodyState) -> tuple:
    # What handle() answers for RESPONSE_WHOLE while a response is awaited
    # with the request body complete (or none), not draining: made once
    # (the tests hold response_whole() to handle() in every state).
    exchange = Exchange(has_body=body is not _NONE)
    exchange.state, exchange.body = _AWAITING_RESPONSE, body
    return exchange.handle(_RESPONSE_WHOLE_EVENT)


_WHOLE_ACTIONS = {body: _whole_actions(body) for body in (_NONE, _COMPLETE)}


def _admitted_actions(body: BodyState) -> tuple:
    # What handle() answers for ADMITTED while queued with C{body}, not
    # draining: made once (the tests hold admitted() to handle()).
    exchange = Exchange(has_body=body is not _NONE)
    exchange.state, exchange.body = _QUEUED, body
    return exchange.handle(_ADMITTED_EVENT)


# The body states an exchange can be queued in: none, or not yet asked for
# (complete already, or still arriving).
_ADMITTED_ACTIONS = {body: _admitted_actions(body) for body in (_NONE, _WAITING, _COMPLETE)}
#: What ADMITTED and RESPONSE_WHOLE answer for a request without a body,
#: the usual GET (the adapter compares with these, by identity).
ADMITTED_WITHOUT_BODY = _ADMITTED_ACTIONS[_NONE]
WHOLE_WITHOUT_BODY = _WHOLE_ACTIONS[_NONE]
