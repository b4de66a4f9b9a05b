"""
The request half's short ways through the common case, each held to the
general path it stands in for: on every generated input both give the same
answer (or refuse with the same status and reason).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quayfront.headers import upstream_request_headers
from quayfront.http import (
    BodyState,
    Event,
    Exchange,
    ExchangeState,
    PeerMisbehaved,
    RequestFramer,
    RequestHead,
    normalise_path,
)
from quayfront.http._exchange import accepts
from quayfront.site import LazyTimeoutMixin
from quayfront.http._framing import (
    _HOST,
    _PLAIN_HOST,
    _TARGET,
    _TARGET_BAD_BYTE,
    _TOKEN,
    _VERSION,
    parse_request_line,
    _connection_tokens,
    body_framing,
    head_facts,
)

# Names the rules look at, in several cases, and a few they do not.
NAMES = st.sampled_from(
    [
        b"Host", b"host", b"HOST", b"Content-Length", b"content-length",
        b"Transfer-Encoding", b"Connection", b"connection", b"Expect", b"expect",
        b"Keep-Alive", b"TE", b"Upgrade", b"X-Forwarded-For", b"X-Real-IP",
        b"X-Request-ID", b"x-request-id", b"X-Client-Cert", b"Accept", b"User-Agent",
        b"X_Forwarded_For", b"Authorization", b"Docker-Distribution-Api-Version",
    ]
)
VALUES = st.sampled_from(
    [
        b"", b"a", b"example.test", b"example.test:443", b"[::1]:8443", b"bad host",
        b"0", b"12", b"1, 2", b"99999999999999999999", b"chunked", b"identity",
        b"gzip, chunked", b"close", b"keep-alive, Close", b"Upgrade, x-request-id",
        b"accept, host", b"100-continue", b"100-Continue", b"*/*", b"Bearer a_b",
    ]
)
FIELDS = st.lists(st.tuples(NAMES, VALUES), max_size=8)
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])


def general_facts(version, headers):
    """What the channel and the framer worked out before head_facts."""
    length = body_framing(version, headers)
    keep_alive = version == b"HTTP/1.1" and b"close" not in _connection_tokens(headers)
    host = next((v for n, v in headers if n.lower() == b"host"), None)
    expect = next((v for n, v in headers if n.lower() == b"expect"), None)
    return length, keep_alive, host, expect


def outcome(function, *args):
    try:
        return function(*args)
    except PeerMisbehaved as refusal:
        return ("refused", refusal.status, refusal.reason)


@given(VERSIONS, FIELDS)
def test_head_facts_agree_with_body_framing_and_the_connection_tokens(version, headers):
    names = [name.lower() for name, _ in headers]
    assert outcome(head_facts, version, headers, names) == outcome(
        general_facts, version, headers
    )


def frame_head(pieces):
    framer = RequestFramer()
    for piece in pieces:
        framer.feed(piece)
        event = framer.next_event()
        if type(event) is RequestHead:
            return event
    raise AssertionError("no head")


@given(FIELDS.filter(lambda fields: sum(n.lower() == b"host" for n, _ in fields) == 1))
def test_the_head_carries_its_names_host_and_expect_whole_or_byte_by_byte(headers):
    data = b"GET / HTTP/1.1\r\n" + b"".join(
        name + b": " + value + b"\r\n" for name, value in headers
    ) + b"\r\n"
    try:
        whole = frame_head([data])
    except PeerMisbehaved:
        return
    bytewise = frame_head([data[i : i + 1] for i in range(len(data))])
    for head in (whole, bytewise):
        assert head.headers == headers
        assert head.names == [name.lower() for name, _ in headers]
        assert head.host == next(v for n, v in headers if n.lower() == b"host")
        assert head.expect == next((v for n, v in headers if n.lower() == b"expect"), None)


def test_the_head_says_expect_for_a_body_that_waits_for_it():
    head = frame_head(
        [b"PUT /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"]
    )
    assert (head.content_length, head.expect, head.host) == (3, b"100-continue", b"a")


RESERVED = st.sampled_from(
    [frozenset(), frozenset({b"x-request-id"}), frozenset({b"x-request-id", b"x-client-cert"})]
)
VOUCHED = st.sampled_from(
    [[], [(b"X-Request-ID", b"0123")], [(b"X-Request-ID", b"1"), (b"X-Other", b"2")]]
)


@given(FIELDS, RESERVED, VOUCHED, st.sampled_from([b"", b"127.0.0.1:443"]))
def test_upstream_headers_from_the_framers_names_agree_with_the_general_path(
    pairs, reserved, vouched, default_host
):
    names = [name.lower() for name, _ in pairs]
    sent = list(pairs)
    settings = dict(
        client_ip="192.0.2.1", vouched=vouched, reserved=reserved, default_host=default_host
    )
    given_names = upstream_request_headers(pairs, names=names, **settings)
    assert given_names == upstream_request_headers(pairs, **settings)
    # With the first Host value as the framer has it (head_facts), too.
    host = pairs[names.index(b"host")][1] if b"host" in names else None
    assert upstream_request_headers(pairs, names=names, host=host, **settings) == given_names
    # The request's own fields are never changed.
    assert pairs == sent and names == [name.lower() for name, _ in pairs]


SEGMENT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-._~:@!$&'()*+,;=", max_size=6
).map(str.encode)
TARGETS = st.tuples(st.lists(SEGMENT, min_size=1, max_size=5), st.booleans(), SEGMENT).map(
    lambda parts: b"/" + b"/".join(parts[0]) + (b"?" + parts[2] if parts[1] else b"")
)


@given(TARGETS)
def test_a_target_without_escapes_or_dot_segments_routes_as_sent(target):
    # FrontRequest.gotLength routes such a target on the path as the
    # channel split it, without normalising it.
    if b"%" in target or b"/." in target:
        return
    path = target.partition(b"?")[0]
    assert normalise_path(path) == path


@pytest.mark.parametrize("draining", [False, True])
@pytest.mark.parametrize("state", list(ExchangeState))
def test_the_end_of_no_body_changes_nothing_in_any_state(state, draining):
    # Forwarding.body_done skips Event.BODY_END for a bodiless exchange:
    # the model must take it everywhere, and do nothing with it.
    exchange = Exchange(has_body=False)
    exchange.state, exchange.draining = state, draining
    assert exchange.body is BodyState.NONE
    assert accepts(state, BodyState.NONE, draining, Event.BODY_END)
    assert exchange.handle(Event.BODY_END) == ()
    assert (exchange.state, exchange.body, exchange.draining) == (
        state, BodyState.NONE, draining
    )


HOST_BYTES = st.sampled_from(list(b"aZ09-._~!$&'()*+,;=%:[]@/ \x00\x7fvV")).map(lambda b: bytes((b,)))


@given(st.lists(HOST_BYTES, max_size=16).map(b"".join))
def test_the_plain_host_pattern_takes_only_what_the_full_one_takes(host):
    # head_facts tries _PLAIN_HOST first: the verdict must stay _HOST's.
    if _PLAIN_HOST.match(host):
        assert _HOST.match(host)


def reference_request_line(line):
    """parse_request_line as it was before its short ways for common values."""
    parts = line.split(b" ")
    if len(parts) != 3:
        if _TARGET_BAD_BYTE.search(line.replace(b" ", b"")):
            raise PeerMisbehaved(400, "bad-request-target")
        raise PeerMisbehaved(400, "bad-request-line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise PeerMisbehaved(400, "bad-request-line")
    if not _TARGET.match(target):
        raise PeerMisbehaved(400, "bad-request-target")
    if _VERSION.match(version) is None:
        raise PeerMisbehaved(400, "bad-version")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise PeerMisbehaved(505, "unsupported-version")
    return method, target, version


LINE_PARTS = st.sampled_from(
    [b"GET", b"get", b"PUT", b"OPTIONS", b"M-SEARCH", b"G(T", b"", b"/", b"/a?b", b"/#",
     b"/\x7f", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.12", b"http/1.1", b" "]
)


@given(st.lists(LINE_PARTS, max_size=5).map(b" ".join))
def test_the_request_line_parser_agrees_with_its_reference(line):
    assert outcome(parse_request_line, line) == outcome(reference_request_line, line)


def test_a_request_that_takes_the_fields_alone_still_gets_them():
    from twisted.web import server

    from tests.unit.test_forward import connect, make_site

    got = []

    class FieldsOnly(server.Request):
        def received_fields(self, fields):
            got.append(list(fields))

        def gotLength(self, length):
            pass

        def requestReceived(self, command, path, version):
            pass

    site, _, _, _ = make_site()
    site.requestFactory = FieldsOnly
    channel, _ = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\nAccept: a\r\n\r\n")
    assert got == [[(b"Host", b"h"), (b"Accept", b"a")]]


def admission_run(monkeypatch, scenario: str, general: bool):
    """
    The events each exchange was handed (with the actions it answered),
    the upstream requests made and what each client got, for requests
    through Forwarding's short way to admission or (general) through
    feed(HEAD_COMPLETE) and the action queue.
    """
    from twisted.internet.testing import MemoryReactorClock

    from quayfront import forward
    from quayfront.config import RateLimitConfig, RouteConfig
    from quayfront.limits import ConcurrencyLimiter, RateLimiter
    from quayfront.routing import Route, Router, Upstream
    from tests.unit.test_channel import answer
    from tests.unit.test_forward import FakeAgent, connect, site_for

    handled = []
    handle = Exchange.handle
    # The exchange's short ways to handle(EVENT), recorded as that event
    # (once, where a short way falls back to handle()).
    shortcuts = {
        "head_complete": Event.HEAD_COMPLETE,
        "rate_allowed": Event.RATE_ALLOWED,
        "admitted": Event.ADMITTED,
        "response_whole": Event.RESPONSE_WHOLE,
    }
    depth = [0]

    def recorded(method, event):
        def recording(exchange, *args, **payload):
            depth[0] += 1
            try:
                actions = method(exchange, *args, **payload)
            finally:
                depth[0] -= 1
            if not depth[0]:
                handled.append((id(exchange), args[0] if event is None else event, actions))
            return actions

        return recording

    monkeypatch.setattr(Exchange, "handle", recorded(handle, None))
    for name, event in shortcuts.items():
        monkeypatch.setattr(Exchange, name, recorded(getattr(Exchange, name), event))
    if general:
        monkeypatch.setattr(
            forward.Forwarding, "_head_complete", lambda self: self.feed(Event.HEAD_COMPLETE)
        )
    clock = MemoryReactorClock()
    agent = FakeAgent()
    rate_limiter = (
        RateLimiter(clock, RateLimitConfig(requests_per_s=0.5, burst=1 if scenario == "limited" else 5))
        if scenario in ("limited", "free")
        else None
    )
    route = Route(
        RouteConfig(prefix="/", max_body_bytes=5 if scenario == "too-large" else 0),
        upstream=Upstream(
            "default", agent, ConcurrencyLimiter(clock, 1 if scenario == "queued" else 0, 2, 30.0)
        ),
        rate_limiter=rate_limiter,
    )
    site = site_for(Router([route]), clock)
    request = (
        b"PUT /v2/a HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
        if scenario == "too-large"
        else b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    clients = []
    for _ in range(2):
        channel, client = connect(site)
        channel.dataReceived(request)
        clients.append(client)
    clock.advance(0)
    while agent.requests and not agent.requests[0]["d"].called:
        answer(agent, 0)
        agent.requests.pop(0)
        clock.advance(0)
    ids = {}
    events = [(ids.setdefault(key, len(ids)), event, actions) for key, event, actions in handled]
    outputs = [
        (client.value().split(b"\r\n", 1)[0], client.disconnecting) for client in clients
    ]
    return events, outputs


@pytest.mark.parametrize("scenario", ["free", "limited", "queued", "too-large", "no-limiter"])
def test_the_short_way_to_admission_agrees_with_the_action_queue(monkeypatch, scenario):
    short = admission_run(monkeypatch, scenario, general=False)
    monkeypatch.undo()
    general = admission_run(monkeypatch, scenario, general=True)
    assert short == general
    # Each scenario reaches what it is about.
    statuses = [line.split(b" ")[1] for line, _ in short[1]]
    expected = {
        "free": [b"200", b"200"],
        "limited": [b"200", b"429"],
        "queued": [b"200", b"200"],
        "too-large": [b"413", b"413"],
        "no-limiter": [b"200", b"200"],
    }[scenario]
    assert statuses == expected


# The idle timeout: a lazily moved timer against Twisted's TimeoutMixin.
_TIMER_STEPS = st.lists(
    st.one_of(
        st.just(("reset",)),
        st.tuples(st.just("set"), st.sampled_from([None, 0.5, 1, 3, 10, 60])),
        st.tuples(st.just("advance"), st.sampled_from([0, 0.5, 1, 2.5, 9, 30, 61])),
    ),
    max_size=30,
)


def timeouts_seen(mixin, initial, steps):
    """When each timeout fires, for a protocol on C{mixin} run through C{steps}."""
    from twisted.internet.testing import MemoryReactorClock

    clock = MemoryReactorClock()
    fired = []

    class Timed(mixin):
        timeOut = initial

        def callLater(self, period, func):
            return clock.callLater(period, func)

        def timeoutConnection(self):
            fired.append(clock.seconds())

    timed = Timed()
    if mixin is LazyTimeoutMixin:
        timed.start_idle_clock(clock.seconds)
    results = [timed.setTimeout(initial)]
    for step in steps:
        if step[0] == "reset":
            timed.resetTimeout()
        elif step[0] == "set":
            results.append(timed.setTimeout(step[1]))
        else:
            clock.advance(step[1])
    clock.advance(1000)
    return fired, results, timed.timeOut


@given(st.sampled_from([None, 1, 60]), _TIMER_STEPS)
def test_the_lazy_idle_timer_fires_when_twisteds_timeout_mixin_would(initial, steps):
    from twisted.protocols.policies import TimeoutMixin

    lazy = timeouts_seen(LazyTimeoutMixin, initial, steps)
    assert lazy == timeouts_seen(TimeoutMixin, initial, steps)


def test_a_busy_connection_moves_no_timer_per_read():
    """Reads reset the idle timeout without touching the timer; it still fires from the last one."""
    from tests.unit.test_forward import connect, make_site

    site, agent, _, clock = make_site()
    site.header_timeout_s = 1000.0
    channel, client = connect(site)
    timer = channel._idle_call
    armed_at = timer.getTime()
    for line in [b"GET /v2/a HTTP/1.1\r\n"] + [b"X-A: b\r\n"] * 4:
        clock.advance(10)
        channel.dataReceived(line)
    assert channel._idle_call is timer and timer.getTime() == armed_at
    clock.advance(59.5)
    assert not client.disconnecting
    clock.advance(0.5)
    assert client.disconnecting and client.value() == b""


_CLIENT_PIECES = st.lists(
    st.sampled_from([
        b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /v2/b HTTP/1.1\r\nHo",
        b"st: h\r\n\r\n",
        b"PUT /v2/c HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab",
        b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /v2/d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"GET /v2/e HTTP/1.1\r\n\r\n",
        b"\r\n",
    ]),
    max_size=6,
)


def channel_run(pieces, answers):
    """What a client sees of a channel fed C{pieces}, each upstream request answered in turn."""
    from tests.unit.test_channel import answer
    from tests.unit.test_forward import connect, make_site

    site, agent, log, clock = make_site()
    channel, client = connect(site)
    answered = 0
    for piece in pieces:
        channel.dataReceived(piece)
        clock.advance(1)
        for _ in range(answers):
            if answered < len(agent.requests):
                answer(agent, answered)
                answered += 1
    clock.advance(1000)
    return client.value(), client.disconnecting, [entry.status for entry in log.entries]


@given(_CLIENT_PIECES, st.integers(0, 2))
def test_a_response_ending_with_nothing_buffered_reads_on_as_the_framer_loop_would(
    pieces, answers
):
    """requestDone skips the framer loop only when the framer is idle: the same answers either way."""
    short = channel_run(pieces, answers)
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(RequestFramer, "idle", property(lambda self: False))
        general = channel_run(pieces, answers)
    assert short == general


_PREFIX_TEXT = st.text("/v12ab.*?()[]\\", max_size=6)


@given(st.lists(_PREFIX_TEXT, max_size=6), st.lists(_PREFIX_TEXT.map(str.encode), max_size=8))
def test_routing_in_one_match_agrees_with_prefix_by_prefix(prefixes, paths):
    """The router's one pattern picks the route the longest-prefix-first loop picks."""
    from quayfront.config import RouteConfig
    from quayfront.routing import Route, Router

    router = Router([Route(RouteConfig(prefix=prefix, upstream="u")) for prefix in prefixes])
    for path in [*paths, *(prefix.encode() + b"x" for prefix in prefixes)]:
        assert router.route_for(path) is router.route_for_each(path)


@given(st.sampled_from([
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\n",
    b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n",
]), st.integers(1, 40))
def test_the_end_of_a_request_on_a_connection_that_goes_on_is_the_general_end(data, cut):
    """next_event's own end of a request leaves the framer as _end_message leaves it."""
    from quayfront.http._framing import _NO_TRAILERS, NEED_DATA

    def framer_at_end():
        framer = RequestFramer()
        framer.feed(data[:cut])
        framer.feed(data[cut:])
        while framer._state.name not in ("END", "CLOSED"):
            if framer.next_event() is NEED_DATA:
                return None
        return framer

    short, general = framer_at_end(), framer_at_end()
    if short is None or short._state.name == "CLOSED":
        return
    assert short.next_event() is general._end_message(b"", _NO_TRAILERS)
    assert vars(short) == vars(general)


_LOGGED_NAMES = st.sampled_from(
    [b"Referer", b"referer", b"User-Agent", b"USER-AGENT", b"Authorization", b"X-A"]
)
_LOGGED_VALUES = st.sampled_from([b"a", b"docker/27", b"Basic dTpw", b"Basic dTI6cA==", b"x y"])


@given(st.lists(st.tuples(_LOGGED_NAMES, _LOGGED_VALUES), max_size=6))
def test_the_logged_fields_of_a_framed_head_are_those_logged_fields_finds(fields):
    """The access log reads Referer, User-Agent and Authorization of a framed head as logged_fields does."""
    from quayfront.accesslog import basic_auth_user
    from quayfront.site import logged_fields
    from tests.unit.test_channel import answer
    from tests.unit.test_forward import connect, make_site

    site, agent, log, _ = make_site()
    channel, _ = connect(site)
    head = b"GET /v2/a HTTP/1.1\r\nHost: h\r\n" + b"".join(
        name + b": " + value + b"\r\n" for name, value in fields
    )
    channel.dataReceived(head + b"\r\n")
    answer(agent)
    (entry,) = log.entries
    referer, user_agent, authorization = logged_fields([(b"Host", b"h"), *fields])
    assert (entry.referer, entry.user_agent, entry.remote_user) == (
        referer, user_agent, basic_auth_user(authorization)
    )


_SENT_METHODS = st.sampled_from(
    [b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"PUT", b"POST", b"PATCH", b"PURGE", b"G T", b""]
)
_SENT_TARGETS = st.sampled_from([b"/v2/", b"/v2/a/manifests/1", b"/a b", b"/a\x7f", b"", b"*"])
_SENT_NAMES = st.sampled_from([b"Host", b"HOST", b"Accept", b"Connection", b"X-A"])
_SENT_VALUES = st.sampled_from([b"h", b"close", b"keep-alive", b"*/*"])


def _agent_with_pooled_connection(persistent: bool, pooled: bool):
    """An upstream agent whose pool holds one idle connection (if C{pooled}), and that connection's transport."""
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from quayfront.config import UpstreamConfig
    from quayfront.upstream import upstream_agent
    from quayfront.upstreamclient import UpstreamConnection

    reactor = MemoryReactorClock()
    agent = upstream_agent(reactor, UpstreamConfig(), persistent=persistent)
    transport = StringTransport()
    connection = UpstreamConnection(agent.pool, agent.key)
    connection.makeConnection(transport)
    if pooled:
        agent.pool.put(agent.key, connection, agent)
    return agent, connection, transport


class _StillProducing:
    """A request body of 3 bytes that never ends."""

    length = 3

    def startProducing(self, consumer):
        from twisted.internet.defer import Deferred

        return Deferred()

    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


class _Told:
    def callback(self, response):
        pass

    def errback(self, failure):
        pass


@given(
    _SENT_METHODS,
    _SENT_TARGETS,
    st.lists(st.tuples(_SENT_NAMES, _SENT_VALUES), max_size=4),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_a_bodiless_request_for_is_started_as_the_general_start_starts_it(
    method, target, fields, with_body, persistent, pooled
):
    """UpstreamAgent.request_for's short way for a bodiless request writes, makes and answers what _start does, and is taken only when its conditions hold."""
    from quayfront.upstream import UPSTREAM_AUTHORITY
    from quayfront.upstreamclient import UpstreamAgent, _Exchange

    body = _StillProducing() if with_body else None
    short_agent, short_connection, short_transport = _agent_with_pooled_connection(persistent, pooled)
    general_agent, general_connection, general_transport = _agent_with_pooled_connection(persistent, pooled)
    taken = []
    original = UpstreamAgent._start_bodiless

    def recording(self, *args):
        taken.append(args)
        return original(self, *args)

    outcome = _Told()
    UpstreamAgent._start_bodiless = recording
    try:
        try:
            short = short_agent.request_for(outcome, method, UPSTREAM_AUTHORITY, target, list(fields), body)
        except ValueError as error:
            short = error
    finally:
        UpstreamAgent._start_bodiless = original
    try:
        general = general_agent._start(
            method, b"http://" + UPSTREAM_AUTHORITY + target, list(fields), body, outcome,
            UPSTREAM_AUTHORITY, target,
        )
    except ValueError as error:
        general = error

    expected_short = (
        body is None
        and method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH")
        and persistent
        and target not in (b"", b"/a b", b"/a\x7f")
        and all(name.lower() != b"connection" for name, _ in fields)
    )
    assert bool(taken) == expected_short
    if isinstance(general, ValueError):
        assert isinstance(short, ValueError) and str(short) == str(general)
        return
    assert type(short) is type(general) is _Exchange
    assert short_transport.value() == general_transport.value()
    assert len(short_agent.pool._idle.get(short_agent.key, ())) == len(
        general_agent.pool._idle.get(general_agent.key, ())
    )
    short_state, general_state = dict(vars(short)), dict(vars(general))
    for state, agent, connection in (
        (short_state, short_agent, short_connection),
        (general_state, general_agent, general_connection),
    ):
        assert state.pop("_agent") is agent
        if state.get("connection") is not None:
            assert state.pop("connection") is connection
            assert connection.exchange is (short if agent is short_agent else general)
        reader = state.pop("_reader", None)
        state["_reader"] = None if reader is None else vars(reader)
        connecting = state.pop("_connecting", None)
        state["_connecting"] = connecting is not None
        state.pop("result")
        for made in ("_writer", "_flow"):
            state[made] = type(state.pop(made, None))
    assert short_state == general_state
    assert short.result is general.result is outcome
