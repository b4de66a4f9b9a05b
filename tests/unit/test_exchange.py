"""
The exchange model (quayfront.http._exchange), on its own: every event in
every reachable state, generated from the transition tables (legal ones
lead where the tables say, with the deadlines the state calls for; illegal
ones raise naming the state and the event), then the event orders that
matter, by hand, with their exact actions.
"""

from __future__ import annotations

from collections import deque

import pytest

from quayfront.http import (
    AbortClient,
    Action,
    Answer,
    Arm,
    BodyState,
    Deadline,
    Disarm,
    Event,
    Exchange,
    ExchangeMisused,
    ExchangeState,
)
from quayfront.http import _endings as endings
from quayfront.http._exchange import (
    BODY_EVENTS,
    BODY_TRANSITIONS,
    DEADLINE_EVENTS,
    EXCHANGE_TRANSITIONS,
    accepts,
    deadlines_for,
)

S = ExchangeState
B = BodyState
E = Event
A = Action
RECEIVING = (B.WAITING, B.WAITING_PAUSED, B.STREAMING, B.PAUSED)

#: A payload for each event that takes one.
PAYLOADS = {
    E.RATE_LIMITED: dict(retry_after_s=1.5),
    E.NOT_ADMITTED: dict(ending=endings.QUEUE_FULL),
    E.BODY_CHUNK: dict(size=4),
    E.RESPONSE_TRUNCATED: dict(detail="connection lost"),
    E.UPSTREAM_FAILED: dict(ending=endings.UPSTREAM_RESET, detail="reset"),
    E.CLIENT_MISBEHAVED: dict(ending=endings.ending_for("bad-chunk-size", 400)),
}

#: The ways an exchange starts: with or without a body, under or over a
#: body limit (a declared 10 over 6 is refused at once; an undeclared body
#: crosses a limit of 3 on its first chunk of 4).
STARTS = {
    "no-body": dict(has_body=False),
    "body": dict(has_body=True, length=10),
    "chunked-limited": dict(has_body=True, length=None, max_body_bytes=3),
    "declared-too-large": dict(has_body=True, length=10, max_body_bytes=6),
}


def handle(exchange: Exchange, event: Event, **payload) -> list:
    return list(exchange.handle(event, **(payload or PAYLOADS.get(event, {}))))


def replay(start: str, path: tuple[Event, ...]) -> Exchange:
    exchange = Exchange(**STARTS[start])
    for event in path:
        handle(exchange, event)
    return exchange


def key(exchange: Exchange) -> tuple:
    return (exchange.state, exchange.body, exchange.draining)


def reachable() -> dict[tuple, tuple[str, tuple[Event, ...]]]:
    """
    Every (start, state, body state, draining) an exchange can reach, each
    with a shortest way there.  Bounded: the configurations are finite
    (4 x 6 x 6 x 2) and each is expanded once.
    """
    found: dict[tuple, tuple[str, tuple[Event, ...]]] = {}
    queue: deque[tuple[str, tuple[Event, ...]]] = deque()
    for start in STARTS:
        found[(start, *key(Exchange(**STARTS[start])))] = (start, ())
        queue.append((start, ()))
    while queue:
        start, path = queue.popleft()
        base = replay(start, path)
        for event in Event:
            if not accepts(*key(base), event):
                continue
            exchange = replay(start, path)
            handle(exchange, event)
            if (start, *key(exchange)) not in found:
                found[(start, *key(exchange))] = (start, path + (event,))
                queue.append((start, path + (event,)))
    return found


REACHABLE = reachable()
# One way into each (state, body state, draining) for the per-event test.
ONE_WAY = {k[1:]: way for k, way in sorted(REACHABLE.items(), key=lambda kv: str(kv[0]))}
CASES = [
    pytest.param(
        start,
        path,
        event,
        id=f"{k[0].name}-{k[1].name}{'-draining' if k[2] else ''}-{event.name}",
    )
    for k, (start, path) in ONE_WAY.items()
    for event in Event
]


def test_every_state_is_reachable() -> None:
    """Every exchange state and every body state is reached, draining or not."""
    assert {k[0] for k in ONE_WAY} == set(ExchangeState)
    assert {k[1] for k in ONE_WAY} == set(BodyState)
    assert {k[2] for k in ONE_WAY} == {False, True}


def test_every_table_entry_is_exercised_and_every_target_reached() -> None:
    """Each (state, event) of both tables occurs in a reachable state, and each listed target is taken."""
    taken: set[tuple] = set()
    for (_, *k), (start, path) in REACHABLE.items():
        for event in Event:
            if not accepts(*k, event):
                continue
            exchange = replay(start, path)
            handle(exchange, event)
            if event in BODY_EVENTS:
                taken.add(("body", k[1], event, exchange.body))
            else:
                taken.add(("exchange", k[0], event, exchange.state))
    listed = {
        ("exchange", state, event, target)
        for state, events in EXCHANGE_TRANSITIONS.items()
        for event, targets in events.items()
        for target in targets
    } | {
        ("body", state, event, target)
        for state, events in BODY_TRANSITIONS.items()
        for event, targets in events.items()
        for target in targets
    }
    assert listed - taken == set()
    assert taken - listed == set()


@pytest.mark.parametrize("start, path, event", CASES)
def test_each_event_in_each_state(start: str, path: tuple[Event, ...], event: Event) -> None:
    """A legal event leads where the tables say, with the deadlines that follow; an illegal one raises naming state and event."""
    exchange = replay(start, path)
    before = key(exchange)
    armed = deadlines_for(*before)
    if not accepts(*before, event):
        with pytest.raises(ExchangeMisused) as raised:
            handle(exchange, event)
        message = str(raised.value)
        assert event.name in message
        named = before[1] if event in BODY_EVENTS else before[0]
        assert named.name in message
        assert key(exchange) == before  # nothing changed
        return
    actions = handle(exchange, event)
    if event in BODY_EVENTS:
        assert exchange.body in BODY_TRANSITIONS[before[1]][event]
    elif event in DEADLINE_EVENTS:
        assert DEADLINE_EVENTS[event] in armed
        assert exchange.state is S.ENDED
    else:
        assert exchange.state in EXCHANGE_TRANSITIONS[before[0]][event]
    # The deadline actions bring the armed set in line with the new state.
    now = deadlines_for(*key(exchange))
    fired = DEADLINE_EVENTS.get(event)
    assert {a.deadline for a in actions if isinstance(a, Arm)} == now - armed
    assert {a.deadline for a in actions if isinstance(a, Disarm)} == armed - now - {fired}
    if exchange.state is S.ENDED:
        assert exchange.armed == frozenset()
    if before[0] is not S.ENDED and exchange.state is S.ENDED:
        assert_ending_actions(before, exchange, actions, event)
    elif before[0] is S.ENDED:
        # Late news for an exchange that is over: at most a slot to give
        # back or a response to drop; nothing reaches the client.
        assert not [a for a in actions if isinstance(a, (Answer, AbortClient))]
        assert set(a for a in actions if isinstance(a, Action)) <= {
            A.RELEASE_SLOT,
            A.DISCARD_RESPONSE,
            A.RESTORE_CLIENT_TIMEOUT,
            A.SEND_CONTINUE,
            A.FLUSH_HELD,
            A.FINISH_UPLOAD,
        }


def assert_ending_actions(
    before: tuple, exchange: Exchange, actions: list, event: Event | None = None
) -> None:
    """
    An exchange that ends stops what is under way upstream, frees its slot,
    stops the body, and answers or aborts the client exactly once (unless
    it completed or the client left).  A whole response ends an exchange
    whose upstream request is over: nothing to cancel.
    """
    state, body, _ = before
    ending = exchange.ending
    assert ending is not None
    plain = [a for a in actions if isinstance(a, Action)]
    assert (A.CANCEL_ADMISSION in plain) == (state is S.QUEUED)
    assert (A.RELEASE_SLOT in plain) == (state in (S.AWAITING_RESPONSE, S.RELAYING))
    assert (A.STOP_UPLOAD in plain) == (body in RECEIVING)
    # Only a body can have had the client paused.
    assert (A.RESTORE_CLIENT_TIMEOUT in plain) == (body is not B.NONE)
    if state is S.RELAYING:
        assert (A.STOP_UPSTREAM_RESPONSE in plain) == (ending is not endings.COMPLETED)
    if state is S.AWAITING_RESPONSE:
        upstream_failed = ending.counter == endings.UPSTREAM_COUNTER and ending.status == 502
        upstream_over = upstream_failed or event is E.RESPONSE_WHOLE
        assert (A.CANCEL_UPSTREAM_REQUEST in plain) == (not upstream_over)
    told = [a for a in actions if isinstance(a, (Answer, AbortClient))]
    if ending in (endings.COMPLETED, endings.CLIENT_CLOSED):
        assert told == []
    else:
        assert len(told) == 1 and told[0].ending is ending
        assert isinstance(told[0], AbortClient) == (ending.aborts_client or state is S.RELAYING)
    assert exchange.body not in RECEIVING


# Event orders that matter, with their exact actions.


def run(exchange: Exchange, *events, **payload) -> list:
    actions = []
    for event in events:
        actions.extend(handle(exchange, event, **payload))
    return actions


def admitted(**start) -> Exchange:
    exchange = Exchange(**start)
    run(exchange, E.HEAD_COMPLETE, E.RATE_ALLOWED, E.ADMITTED)
    return exchange


def test_get_from_head_to_end() -> None:
    """A GET: rate limiter, cap, upstream request with the response deadline, relay, finish."""
    exchange = Exchange(has_body=False)
    assert handle(exchange, E.HEAD_COMPLETE) == [A.ASK_RATE_LIMITER]
    assert handle(exchange, E.RATE_ALLOWED) == [A.ASK_ADMISSION]
    assert handle(exchange, E.ADMITTED) == [A.START_UPSTREAM_REQUEST, Arm(Deadline.RESPONSE)]
    assert handle(exchange, E.BODY_END) == []
    assert handle(exchange, E.RESPONSE_HEAD) == [
        A.RELAY_HEAD,
        Disarm(Deadline.RESPONSE),
        Arm(Deadline.DOWNLOAD_IDLE),
    ]
    assert handle(exchange, E.RESPONSE_DATA) == [A.RELAY_DATA]
    assert handle(exchange, E.RESPONSE_END) == [
        A.RELEASE_SLOT,
        A.FINISH_RESPONSE,
        Disarm(Deadline.DOWNLOAD_IDLE),
    ]
    assert exchange.ending is endings.COMPLETED


def test_upload_held_until_the_upstream_is_ready_then_streamed() -> None:
    """Chunks before the upstream is ready are held (client paused), then flushed with the held 100-continue."""
    exchange = Exchange(has_body=True, length=8)
    run(exchange, E.HEAD_COMPLETE)
    assert handle(exchange, E.BODY_CHUNK, size=4) == [A.HOLD_CHUNK, A.PAUSE_CLIENT]
    run(exchange, E.RATE_ALLOWED)
    assert handle(exchange, E.ADMITTED) == [A.START_UPSTREAM_REQUEST, Arm(Deadline.UPLOAD_IDLE)]
    assert handle(exchange, E.UPSTREAM_READY) == [A.SEND_CONTINUE, A.FLUSH_HELD, A.RESUME_CLIENT]
    assert handle(exchange, E.UPLOAD_PAUSED) == [A.PAUSE_CLIENT]
    assert handle(exchange, E.BODY_CHUNK, size=2) == [A.FORWARD_CHUNK, A.PAUSE_CLIENT]
    assert handle(exchange, E.UPLOAD_RESUMED) == [A.RESUME_CLIENT]
    assert handle(exchange, E.BODY_CHUNK, size=2) == [A.FORWARD_CHUNK]
    assert handle(exchange, E.BODY_END) == [
        A.RESTORE_CLIENT_TIMEOUT,
        A.FINISH_UPLOAD,
        Disarm(Deadline.UPLOAD_IDLE),
        Arm(Deadline.RESPONSE),
    ]
    assert exchange.body_bytes == 8


def test_upstream_pushing_back_before_it_asks_for_the_body() -> None:
    """A pause before the upstream asks for the body keeps the client paused after it does, until resumed."""
    exchange = admitted(has_body=True, length=8)
    assert handle(exchange, E.UPLOAD_PAUSED) == []
    assert handle(exchange, E.BODY_CHUNK, size=4) == [A.HOLD_CHUNK, A.PAUSE_CLIENT]
    assert handle(exchange, E.UPSTREAM_READY) == [A.SEND_CONTINUE, A.FLUSH_HELD]
    assert exchange.body is B.PAUSED
    assert handle(exchange, E.UPLOAD_IDLE_TIMEOUT)[-1] == Answer(endings.UPSTREAM_STALLED)


def test_body_complete_before_the_upstream_is_ready() -> None:
    """A small body that arrived whole while queued goes up, and ends, when the upstream asks for it."""
    exchange = Exchange(has_body=True, length=4)
    run(exchange, E.HEAD_COMPLETE)
    handle(exchange, E.BODY_CHUNK, size=4)
    run(exchange, E.BODY_END, E.RATE_ALLOWED)
    assert handle(exchange, E.ADMITTED) == [A.START_UPSTREAM_REQUEST, Arm(Deadline.RESPONSE)]
    assert handle(exchange, E.UPSTREAM_READY) == [A.SEND_CONTINUE, A.FLUSH_HELD, A.FINISH_UPLOAD]


def test_early_answer_mid_body() -> None:
    """An answer before the body ends is relayed as early; its end aborts the upstream connection."""
    exchange = admitted(has_body=True, length=100)
    run(exchange, E.UPSTREAM_READY)
    handle(exchange, E.BODY_CHUNK, size=3)
    assert handle(exchange, E.RESPONSE_HEAD) == [
        A.RELAY_EARLY_HEAD,
        Disarm(Deadline.UPLOAD_IDLE),
        Arm(Deadline.DOWNLOAD_IDLE),
    ]
    assert handle(exchange, E.RESPONSE_END) == [
        A.RELEASE_SLOT,
        A.STOP_UPLOAD,
        A.RESTORE_CLIENT_TIMEOUT,
        A.FINISH_RESPONSE,
        A.ABORT_UPSTREAM_CONNECTION,
        Disarm(Deadline.DOWNLOAD_IDLE),
    ]
    assert exchange.ending is endings.COMPLETED
    # The upstream draining its send buffer afterwards is no news.
    assert run(exchange, E.UPLOAD_RESUMED, E.UPLOAD_PAUSED) == []


def test_client_gone_while_rate_limited_queued_connecting_uploading_downloading() -> None:
    """A client leaving at each phase stops exactly what that phase has under way."""
    exchange = Exchange(has_body=False)
    run(exchange, E.HEAD_COMPLETE)
    assert handle(exchange, E.CLIENT_GONE) == []
    assert handle(exchange, E.RATE_ALLOWED) == []  # the decision, late

    exchange = Exchange(has_body=False)
    run(exchange, E.HEAD_COMPLETE, E.RATE_ALLOWED)
    assert handle(exchange, E.CLIENT_GONE) == [A.CANCEL_ADMISSION]
    assert handle(exchange, E.ADMITTED) == [A.RELEASE_SLOT]  # the slot, late

    exchange = admitted(has_body=True, length=10)  # connecting: body still waiting
    assert handle(exchange, E.CLIENT_GONE) == [
        A.CANCEL_UPSTREAM_REQUEST,
        A.RELEASE_SLOT,
        A.STOP_UPLOAD,
        A.RESTORE_CLIENT_TIMEOUT,
        Disarm(Deadline.UPLOAD_IDLE),
    ]
    assert handle(exchange, E.UPSTREAM_FAILED) == []  # the cancellation's own failure

    exchange = admitted(has_body=True, length=10)
    run(exchange, E.UPSTREAM_READY)
    handle(exchange, E.BODY_CHUNK, size=3)
    assert handle(exchange, E.CLIENT_GONE)[:3] == [
        A.CANCEL_UPSTREAM_REQUEST,
        A.RELEASE_SLOT,
        A.STOP_UPLOAD,
    ]
    assert exchange.ending is endings.CLIENT_CLOSED

    exchange = admitted(has_body=False)
    run(exchange, E.RESPONSE_HEAD, E.RESPONSE_DATA)
    assert handle(exchange, E.CLIENT_GONE) == [
        A.STOP_UPSTREAM_RESPONSE,
        A.RELEASE_SLOT,
        Disarm(Deadline.DOWNLOAD_IDLE),
    ]
    assert run(exchange, E.RESPONSE_DATA, E.RESPONSE_TRUNCATED) == []
    assert exchange.ending is endings.CLIENT_CLOSED


def test_timeouts_in_each_phase() -> None:
    """Response, upload-idle (client or upstream stalled) and download-idle deadlines end as their table entries."""
    exchange = admitted(has_body=False)
    actions = handle(exchange, E.RESPONSE_TIMEOUT)
    assert actions == [
        A.CANCEL_UPSTREAM_REQUEST,
        A.RELEASE_SLOT,
        Answer(endings.UPSTREAM_TIMEOUT),
    ]

    exchange = admitted(has_body=True, length=10)
    run(exchange, E.UPSTREAM_READY)
    assert handle(exchange, E.UPLOAD_IDLE_TIMEOUT)[-1] == Answer(endings.CLIENT_BODY_TIMEOUT)

    exchange = admitted(has_body=True, length=10)
    run(exchange, E.UPSTREAM_READY, E.UPLOAD_PAUSED)
    assert handle(exchange, E.UPLOAD_IDLE_TIMEOUT)[-1] == Answer(endings.UPSTREAM_STALLED)

    exchange = admitted(has_body=False)
    run(exchange, E.RESPONSE_HEAD)
    assert handle(exchange, E.DOWNLOAD_IDLE_TIMEOUT) == [
        A.STOP_UPSTREAM_RESPONSE,
        A.RELEASE_SLOT,
        AbortClient(endings.RESPONSE_IDLE_TIMEOUT),
    ]
    # The upstream's close, processed after the abort, does not finish it.
    assert handle(exchange, E.RESPONSE_END) == []
    assert exchange.ending is endings.RESPONSE_IDLE_TIMEOUT


def test_no_deadline_while_rate_limited_or_queued() -> None:
    """Waiting for the rate limiter or a slot arms none of the exchange's deadlines (the queue has its own)."""
    exchange = Exchange(has_body=True, length=10)
    run(exchange, E.HEAD_COMPLETE)
    assert exchange.armed == frozenset()
    run(exchange, E.RATE_ALLOWED)
    assert exchange.armed == frozenset()
    for event in DEADLINE_EVENTS:
        with pytest.raises(ExchangeMisused):
            handle(exchange, event)


def test_drain_deadline() -> None:
    """Once draining, every live state arms the drain deadline; its expiry aborts both sides."""
    exchange = admitted(has_body=False)
    assert handle(exchange, E.DRAINING) == [Arm(Deadline.DRAIN)]
    assert exchange.armed == {Deadline.DRAIN, Deadline.RESPONSE}
    assert handle(exchange, E.DRAIN_TIMEOUT) == [
        A.CANCEL_UPSTREAM_REQUEST,
        A.RELEASE_SLOT,
        AbortClient(endings.DRAIN_TIMEOUT),
        Disarm(Deadline.RESPONSE),
    ]
    exchange = Exchange(has_body=False)
    assert handle(exchange, E.DRAINING) == []
    assert handle(exchange, E.HEAD_COMPLETE) == [A.ASK_RATE_LIMITER, Arm(Deadline.DRAIN)]


def test_body_over_the_limit() -> None:
    """A declared length over the limit is refused at the head; a chunked body on the crossing chunk, not one byte forwarded."""
    exchange = Exchange(has_body=True, length=10, max_body_bytes=6)
    assert handle(exchange, E.HEAD_COMPLETE) == [
        A.STOP_UPLOAD,
        A.RESTORE_CLIENT_TIMEOUT,
        Answer(endings.BODY_TOO_LARGE),
    ]
    exchange = admitted(has_body=True, length=None, max_body_bytes=6)
    run(exchange, E.UPSTREAM_READY)
    assert handle(exchange, E.BODY_CHUNK, size=6) == [A.FORWARD_CHUNK]
    actions = handle(exchange, E.BODY_CHUNK, size=1)
    assert A.FORWARD_CHUNK not in actions and A.CANCEL_UPSTREAM_REQUEST in actions
    assert actions[-2] == Answer(endings.BODY_TOO_LARGE)
    assert handle(exchange, E.BODY_CHUNK, size=5) == []  # dropped, not counted
    assert exchange.body_bytes == 7
    # The channel read the rest of the body: the answer may keep the connection.
    run(exchange, E.BODY_END)
    assert exchange.body_complete


def test_rate_limited_and_not_admitted() -> None:
    """A rate-limited request is answered with its retry delay; a full queue with its reason."""
    exchange = Exchange(has_body=False)
    run(exchange, E.HEAD_COMPLETE)
    assert handle(exchange, E.RATE_LIMITED, retry_after_s=2.0) == [
        Answer(endings.RATE_LIMITED, retry_after_s=2.0),
    ]
    exchange = Exchange(has_body=False)
    run(exchange, E.HEAD_COMPLETE, E.RATE_ALLOWED)
    assert handle(exchange, E.NOT_ADMITTED, ending=endings.QUEUE_TIMEOUT) == [
        A.CANCEL_ADMISSION,
        Answer(endings.QUEUE_TIMEOUT),
    ]


def test_truncated_response() -> None:
    """A response that ends early aborts the client with the upstream's reason."""
    exchange = admitted(has_body=False)
    run(exchange, E.RESPONSE_HEAD, E.RESPONSE_DATA)
    assert handle(exchange, E.RESPONSE_TRUNCATED, detail="lost")[-2] == AbortClient(
        endings.UPSTREAM_TRUNCATED, "lost"
    )
    assert exchange.ending is endings.UPSTREAM_TRUNCATED


def test_client_misbehaving_before_and_after_the_response_started() -> None:
    """A framing refusal mid-body is answered while nothing was relayed, and aborts the client after."""
    refusal = endings.ending_for("bad-chunk-size", 400)
    exchange = admitted(has_body=True, length=None)
    run(exchange, E.UPSTREAM_READY)
    assert handle(exchange, E.CLIENT_MISBEHAVED, ending=refusal)[-2] == Answer(refusal)
    exchange = admitted(has_body=True, length=None)
    run(exchange, E.UPSTREAM_READY, E.RESPONSE_HEAD)
    assert handle(exchange, E.CLIENT_MISBEHAVED, ending=refusal)[-2] == AbortClient(refusal)


def test_upstream_stopping_the_body_drops_the_rest() -> None:
    """When the agent stops the body producer, later chunks are dropped and the response deadline takes over."""
    exchange = admitted(has_body=True, length=10)
    run(exchange, E.UPSTREAM_READY)
    assert handle(exchange, E.UPLOAD_STOPPED) == [
        A.STOP_UPLOAD,
        Disarm(Deadline.UPLOAD_IDLE),
        Arm(Deadline.RESPONSE),
    ]
    assert handle(exchange, E.BODY_CHUNK, size=3) == []


def test_misuse_names_state_and_event() -> None:
    """A second head, or a chunk after the body's end, is quayfront's own bug and says where."""
    exchange = admitted(has_body=False)
    with pytest.raises(ExchangeMisused, match="HEAD_COMPLETE .* ExchangeState.AWAITING_RESPONSE"):
        handle(exchange, E.HEAD_COMPLETE)
    with pytest.raises(ExchangeMisused, match="BODY_CHUNK .* BodyState.NONE"):
        handle(exchange, E.BODY_CHUNK)


@pytest.mark.parametrize("start, path", sorted(set(REACHABLE.values()), key=str))
def test_data_shortcuts_equal_handle(start: str, path: tuple[Event, ...]) -> None:
    """body_chunk(), response_data() and response_whole(), the short ways, answer and change exactly what handle() does."""
    for size in (1, 4, 100):
        by_table, shortcut = replay(start, path), replay(start, path)
        try:
            expected = handle(by_table, E.BODY_CHUNK, size=size)
        except ExchangeMisused as error:
            with pytest.raises(ExchangeMisused, match=str(error)):
                shortcut.body_chunk(size)
        else:
            assert list(shortcut.body_chunk(size)) == expected
        assert (key(shortcut), shortcut.body_bytes, shortcut.ending) == (
            key(by_table),
            by_table.body_bytes,
            by_table.ending,
        )
    by_table, shortcut = replay(start, path), replay(start, path)
    try:
        expected = handle(by_table, E.RESPONSE_DATA)
    except ExchangeMisused as error:
        with pytest.raises(ExchangeMisused, match=str(error)):
            shortcut.response_data()
    else:
        assert shortcut.response_data() == (expected == [A.RELAY_DATA])
        assert expected in ([A.RELAY_DATA], [])
    assert key(shortcut) == key(by_table)
    by_table, shortcut = replay(start, path), replay(start, path)
    try:
        expected = handle(by_table, E.RESPONSE_WHOLE)
    except ExchangeMisused as error:
        with pytest.raises(ExchangeMisused, match=str(error)):
            shortcut.response_whole()
    else:
        assert list(shortcut.response_whole()) == expected
    assert (key(shortcut), shortcut.ending) == (key(by_table), by_table.ending)


@pytest.mark.parametrize("start, path", sorted(set(REACHABLE.values()), key=str))
@pytest.mark.parametrize(
    "shortcut, event",
    [("head_complete", E.HEAD_COMPLETE), ("rate_allowed", E.RATE_ALLOWED), ("admitted", E.ADMITTED)],
)
def test_admission_shortcuts_equal_handle(start: str, path: tuple[Event, ...], shortcut: str, event: Event) -> None:
    """head_complete(), rate_allowed() and admitted(), the short ways, answer and change exactly what handle() does."""
    by_table, short = replay(start, path), replay(start, path)
    try:
        expected = handle(by_table, event)
    except ExchangeMisused as error:
        with pytest.raises(ExchangeMisused, match=str(error)):
            getattr(short, shortcut)()
    else:
        assert list(getattr(short, shortcut)()) == expected
    assert (key(short), short.ending, short.body_bytes) == (
        key(by_table),
        by_table.ending,
        by_table.body_bytes,
    )


# A whole response in one event.

#: What RESPONSE_WHOLE relays in one action, for the head's action.
WHOLE_FOR_HEAD = {A.RELAY_HEAD: A.RELAY_WHOLE_RESPONSE, A.RELAY_EARLY_HEAD: A.RELAY_EARLY_WHOLE_RESPONSE}


@pytest.mark.parametrize("start, path", sorted(set(REACHABLE.values()), key=str))
def test_a_whole_response_is_its_head_data_and_end_in_one_event(start: str, path: tuple[Event, ...]) -> None:
    """
    RESPONSE_WHOLE, in every reachable state, is RESPONSE_HEAD, RESPONSE_DATA
    and RESPONSE_END in turn: accepted where the head is, to the same state
    and ending, with the same actions (the head's and the data's relay one
    action), but the deadline armed for the body and disarmed at its end.
    """
    whole, in_turn = replay(start, path), replay(start, path)
    if not accepts(*key(in_turn), E.RESPONSE_HEAD):
        assert not accepts(*key(whole), E.RESPONSE_WHOLE)
        with pytest.raises(ExchangeMisused, match="RESPONSE_WHOLE"):
            handle(whole, E.RESPONSE_WHOLE)
        return
    armed = whole.armed
    actions = handle(whole, E.RESPONSE_WHOLE)
    expected = []
    for event in (E.RESPONSE_HEAD, E.RESPONSE_DATA, E.RESPONSE_END):
        expected += handle(in_turn, event)
    expected = [WHOLE_FOR_HEAD.get(a, a) for a in expected if a != A.RELAY_DATA]
    deadlines = (Arm, Disarm)
    assert [a for a in actions if not isinstance(a, deadlines)] == [
        a for a in expected if not isinstance(a, deadlines)
    ]
    assert {a.deadline for a in actions if isinstance(a, Disarm)} == armed
    assert not [a for a in actions if isinstance(a, Arm)]
    assert (key(whole), whole.ending, whole.body_bytes) == (
        key(in_turn),
        in_turn.ending,
        in_turn.body_bytes,
    )
