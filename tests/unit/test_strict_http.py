"""
Strict framing, the request-head deadline and the header rules, through the
real site and channel on a StringTransport: each refusal is a real response
(status, short body, Connection: close) followed by a close, and the
upstream is never asked.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseDone

from quayfront.config import RouteConfig
from quayfront.limits import ConcurrencyLimiter
from quayfront.routing import Route, Router, Upstream
from tests.unit.test_forward import FakeAgent, connect, make_site, response, site_for


def parse(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return status, headers, body


def assert_refused(client, agent, status: int, reason: str) -> None:
    got, headers, body = parse(client.value())
    assert got == status
    assert headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(body) > 0
    assert reason.encode() in body
    assert client.disconnecting
    assert agent.requests == []


REFUSED = [
    (b"POST /v2/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\nGET /v2/x HTTP/1.1\r\n"
     b"Host: h\r\n\r\n", 501, "unsupported-transfer-coding"),
    (b"POST /v2/ HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400, "transfer-encoding-with-content-length"),
    (b"GET /v2/ HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n folded\r\n\r\n", 400, "obs-fold"),
    (b"POST /v2/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "transfer-encoding-http10"),
    (b"POST /v2/ HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551621\r\n\r\n", 400,
     "bad-content-length"),
    (b"GET /v2/ HTTP/1.1\nHost: h\n\n", 400, "bare-lf"),
    (b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-target"),
    (b"POST /a\x80b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc", 400,
     "bad-request-target"),
    (b"GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-target"),
    (b"GET /v2/ HTTP/1.1\r\n\r\n", 400, "missing-host"),
    (b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "duplicate-host"),
    (b"GET /v2/ HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad-host"),
    (b"GET /v2/ HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 17000, 431, "head-too-large"),
    (b"GET /v2/ HTTP/1.1\r\nHost: h\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431,
     "too-many-headers"),
]


@pytest.mark.parametrize("data, status, reason", REFUSED)
def test_refused_at_once_with_a_real_response(data: bytes, status: int, reason: str) -> None:
    """Each framing class is answered at once and closed; the upstream is never asked."""
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(data)
    assert_refused(client, agent, status, reason)
    assert site.counters.value("http_requests_refused", reason) == 1
    assert site.in_flight == 0
    [entry] = log.entries
    assert (entry.status, entry.outcome) == (status, reason)


@pytest.mark.parametrize("data, status, reason", REFUSED[:9])
def test_refused_byte_by_byte(data: bytes, status: int, reason: str) -> None:
    """The verdict does not depend on how the bytes arrive."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    for i in range(len(data)):
        channel.dataReceived(data[i : i + 1])
    assert_refused(client, agent, status, reason)


def test_refusal_waits_for_the_earlier_pipelined_response() -> None:
    """A bad head behind a request in progress is answered after that request's response."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\nGET /v2/b HTTP/1.1\nHost: h\n\n")
    [sent] = agent.requests
    assert client.value() == b"" and not client.disconnecting
    r = response(200, {}, 2)
    sent["d"].callback(r)
    r._bodyDataReceived(b"ok")
    r._bodyDataFinished(Failure(ResponseDone()))
    first, _, rest = client.value().partition(b"ok")
    assert parse(first)[0] == 200
    assert parse(rest)[0] == 400 and b"bare-lf" in rest
    assert client.disconnecting
    assert len(agent.requests) == 1


def test_bad_chunk_size_aborts_the_upstream_request_and_answers_400() -> None:
    """A chunk size too large to represent: 400 at once, the upstream request cancelled."""
    site, agent, log, clock = make_site()
    channel, client = connect(site)
    channel.dataReceived(
        b"PATCH /v2/x/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n"
    )
    [sent] = agent.requests
    channel.dataReceived(b"fffffffffffffffffffff\r\n")
    clock.advance(0)
    assert sent["cancelled"] == [True]
    status, headers, body = parse(client.value())
    assert status == 400 and headers[b"connection"] == b"close" and b"bad-chunk-size" in body
    assert client.disconnecting
    channel.connectionLost(Failure(ConnectionDone()))
    assert site.in_flight == 0
    assert log.entries[-1].outcome == "bad-chunk-size"


def test_bad_chunk_on_a_local_request_answers_400() -> None:
    """A body error on a request quayfront answers itself is a 400 and a close too."""
    site, agent, _, clock = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"POST /health HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"zz\r\n")
    clock.advance(0)
    status, headers, body = parse(client.value())
    assert status == 400 and headers[b"connection"] == b"close" and b"bad-chunk-size" in body
    assert client.disconnecting


def test_request_refusal_is_a_real_response() -> None:
    """The channel's answer to a twisted.web request refusing itself is answered like the framer's."""
    site, agent, _, _ = make_site()
    channel, client = connect(site)
    channel._respondToBadRequestAndDisconnect()
    assert_refused(client, agent, 400, "bad-request")


# The request-head deadline.


def deadline_site(header_timeout_s: float = 10.0, idle_timeout_s: float = 60.0):
    site, agent, log, clock = make_site()
    site.header_timeout_s = header_timeout_s
    site.timeOut = idle_timeout_s
    return site, agent, log, clock


def test_trickled_head_gets_408_at_the_deadline() -> None:
    """A head sent a byte a second is answered 408 at header_timeout_s from its first byte."""
    site, agent, log, clock = deadline_site()
    channel, client = connect(site)
    clock.advance(30)  # idle before the first byte does not count
    head = b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n"
    for byte in range(9):
        channel.dataReceived(head[byte : byte + 1])
        clock.advance(1)
    assert client.value() == b""
    clock.advance(1)
    assert_refused(client, agent, 408, "request-head-timeout")
    assert log.entries[-1].status == 408


def test_head_completed_in_time_is_served() -> None:
    """A head completed before its deadline is forwarded, and no 408 follows."""
    site, agent, _, clock = deadline_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
    clock.advance(9)
    channel.dataReceived(b"Host: h\r\n\r\n")
    clock.advance(20)
    assert len(agent.requests) == 1
    assert client.value() == b""


def test_deadline_on_kept_alive_connection_runs_from_end_of_response() -> None:
    """A head that started arriving during a response has its deadline from that response's end."""
    site, agent, _, clock = deadline_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\nGET /v2/b")
    clock.advance(30)  # the response takes 30 s; the partial head waits
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    assert not client.disconnecting
    clock.advance(9.5)
    assert not client.disconnecting
    clock.advance(0.5)
    assert parse(client.value().split(b"\r\n\r\n", 1)[1])[0] == 408
    assert client.disconnecting


def test_idle_connection_is_closed_silently_by_the_idle_timeout() -> None:
    """Without a byte, the idle timeout (not the head deadline) closes the connection, without 408."""
    site, agent, _, clock = deadline_site(header_timeout_s=10.0, idle_timeout_s=60.0)
    channel, client = connect(site)
    clock.advance(59)
    assert not client.disconnecting
    clock.advance(1)
    assert client.disconnecting and client.value() == b""


# Routing on the normalised path.


def two_route_site():
    clock_site, agent, log, clock = make_site()
    v2_agent = FakeAgent()
    upstream = Upstream("default", agent, ConcurrencyLimiter(clock, 0, 2, 30.0))
    v2 = Upstream("v2", v2_agent, ConcurrencyLimiter(clock, 0, 2, 30.0))
    router = Router([
        Route(RouteConfig(prefix="/"), upstream=upstream),
        Route(RouteConfig(prefix="/v2/", upstream="v2", max_body_bytes=10), upstream=v2),
    ])
    site = site_for(router, clock, access_log=log)
    return site, agent, v2_agent, log, clock


def test_encoded_prefix_routes_as_the_plain_one() -> None:
    """/%76%32/ takes the /v2/ route (and its limits) and goes upstream as /v2/."""
    site, agent, v2_agent, log, clock = two_route_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /%76%32/x%2dy?q=%76 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert agent.requests == []
    [sent] = v2_agent.requests
    assert sent["uri"].endswith(b"/v2/x-y?q=%76")
    channel, client = connect(site)
    channel.dataReceived(b"PATCH /%76%32/b HTTP/1.1\r\nHost: h\r\nContent-Length: 20\r\n\r\n")
    clock.advance(0)
    assert parse(client.value())[0] == 413
    assert len(v2_agent.requests) == 1


@pytest.mark.parametrize("target, reason", [
    (b"/v2%2Fx", b"encoded-slash"), (b"/a%zz", b"bad-percent-encoding"),
    (b"/a/%2e%2e/v2/", b"dot-segment"),
])
def test_targets_that_cannot_be_normalised_are_400(target: bytes, reason: bytes) -> None:
    """An encoded slash, a bad escape or a dot segment is refused, not routed."""
    site, agent, v2_agent, _, _ = two_route_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    status, _, body = parse(client.value())
    assert status == 400 and reason in body
    assert agent.requests == v2_agent.requests == []


# Header rules.


def test_underscore_headers_are_dropped_logged_and_counted() -> None:
    """Names with "_" never reach the upstream; one log line names them and the peer; they are counted."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        channel.dataReceived(
            b"GET /v2/ HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 6.6.6.6\r\n"
            b"X_Real_IP: 6.6.6.6\r\nX_Real_IP: 7.7.7.7\r\nX-Ok: 1\r\n\r\n"
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    [line] = [formatEvent(e) for e in events if "underscores" in formatEvent(e)]
    # (Names as Twisted's header store spells them; they are case-insensitive.)
    assert line.lower() == ("dropped request headers with underscores from 198.51.100.4:"
                            " x_forwarded_for, x_real_ip")
    headers = agent.requests[0]["headers"]
    names = [name.lower() for name, _ in headers.getAllRawHeaders()]
    assert not any(b"_" in name for name in names)
    assert headers.getRawHeaders(b"x-ok") == [b"1"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"198.51.100.4"]
    assert site.counters.value("http_headers_dropped", "underscore") == 2


def test_connection_cannot_nominate_host_or_own_headers() -> None:
    """Connection: Host, X-Request-ID leaves Host and quayfront's own headers in place."""
    site, agent, _, _ = make_site()
    channel, _ = connect(site)
    channel.dataReceived(
        b"GET /v2/ HTTP/1.1\r\nHost: reg.example\r\n"
        b"Connection: Host, X-Request-ID, X-Forwarded-For, X-Other\r\nX-Other: 1\r\n\r\n"
    )
    headers = agent.requests[0]["headers"]
    assert headers.getRawHeaders(b"host") == [b"reg.example"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"198.51.100.4"]
    assert len(headers.getRawHeaders(b"x-request-id")) == 1
    assert not headers.hasHeader(b"x-other")


def test_agent_refusing_synchronously_releases_the_slot() -> None:
    """An agent that raises (an invalid URI) ends the request with 502 and frees its slot."""

    class RaisingAgent(FakeAgent):
        def request(self, *args, **kwargs):
            raise ValueError("Invalid URI")

    site, _, log, clock = make_site()
    limiter = ConcurrencyLimiter(clock, 1, 0, 30.0)
    upstream = Upstream("default", RaisingAgent(), limiter)
    site.router = Router([Route(RouteConfig(prefix="/"), upstream=upstream)])
    for _ in range(2):
        channel, client = connect(site)
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
        clock.advance(0)
        assert parse(client.value())[0] == 502
    assert site.in_flight == 0


def test_upstream_head_refused_is_502_with_its_reason() -> None:
    """An upstream head the client refused (bad status line, flood) becomes a 502."""
    from twisted.web.client import ResponseFailed

    from quayfront.http import UpstreamMisbehaved

    site, agent, log, clock = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    agent.requests[0]["d"].errback(
        ResponseFailed([Failure(UpstreamMisbehaved("upstream-bad-status-line", "HTTX/1.1"))])
    )
    clock.advance(0)
    status, _, body = parse(client.value())
    assert status == 502 and b"upstream-bad-status-line" in body
    assert log.entries[-1].outcome == "upstream-bad-status-line"


def test_request_refusal_mid_body_goes_through_the_request() -> None:
    """A refusal during a forwarded body aborts the upstream request and answers 400."""
    site, agent, _, clock = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"PUT /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    [sent] = agent.requests
    channel._respondToBadRequestAndDisconnect()
    clock.advance(0)
    assert sent["cancelled"] == [True]
    status, headers, _ = parse(client.value())
    assert status == 400 and headers[b"connection"] == b"close"
    assert client.disconnecting


def test_refusal_is_access_logged_with_its_request_line() -> None:
    """A refused head gets an access-log line with what arrived of its request line."""
    site, agent, log, _ = make_site()
    channel, client = connect(site)
    channel.dataReceived(b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n")
    [entry] = log.entries
    assert (entry.method, entry.uri, entry.status) == (b"GET", b"/a\x7fb", 400)
    assert entry.client == "198.51.100.4"
    assert entry.outcome == "bad-request-target"


# Every valid request the framer passes becomes the same request Twisted's
# parser would have made of it.

from dataclasses import dataclass as _dataclass  # noqa: E402

from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from quayfront.metrics import Counters  # noqa: E402
from quayfront.site import FrontChannel  # noqa: E402


class _Recorded(http.Request):
    """Records what Twisted's parser made of a request, and answers it at once."""

    def __init__(self, channel, queued=None):
        super().__init__(channel, queued)
        self.body = b""

    def handleContentChunk(self, data):
        self.body += data

    def requestReceived(self, command, path, version):
        self.channel.seen.append((command, path, version, self.body))
        super().requestReceived(command, path, version)

    def process(self):
        self.setHeader(b"Content-Length", b"0")
        self.finish()


@_dataclass
class _StubSite:
    clock: MemoryReactorClock
    header_timeout_s: float = 60.0
    counters: Counters = None
    hsts: bytes = b""


_token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8)
_value = st.binary(min_size=0, max_size=20).map(
    lambda b: bytes(c for c in b if 0x20 < c < 0x7F or c >= 0x80))
_path = st.text("abcdefghijklmnopqrstuvwxyz0123456789/-._~%:@!$&'()*+,;=?", max_size=30).map(
    lambda p: "/" + p)


@st.composite
def _request(draw) -> tuple[bytes, tuple]:
    method = draw(st.sampled_from([b"GET", b"PUT", b"PATCH", b"POST", b"DELETE"]))
    path = draw(_path).encode()
    headers = [(b"Host", b"registry.example:8443")]
    headers += [(b"x-" + draw(_token).encode(), draw(_value))
                for _ in range(draw(st.integers(0, 5)))]
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b""
    raw_body = b""
    if framing == "length":
        body = draw(st.binary(max_size=60))
        headers.append((b"Content-Length", b"%d" % len(body)))
        raw_body = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"Chunked"]))))
        for chunk in draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4)):
            ext = draw(st.sampled_from([b"", b";a=b", b";x"]))
            raw_body += b"%x%s\r\n%s\r\n" % (len(chunk), ext, chunk)
            body += chunk
        raw_body += b"0\r\n"
        if draw(st.booleans()):
            raw_body += b"X-Trailer: t\r\n"
        raw_body += b"\r\n"
    head = b"%s %s HTTP/1.1\r\n" % (method, path)
    head += b"".join(b"%s: %s\r\n" % pair for pair in headers) + b"\r\n"
    return head + raw_body, (method, path, b"HTTP/1.1", body)


_GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


@given(requests=st.lists(_request(), min_size=1, max_size=3), cuts=st.lists(st.integers(0, 400)))
@example(  # Pipelined bytes held during a response: once found double-framed.
    requests=[
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n\x00",
         (b"GET", b"/", b"HTTP/1.1", b"\x00")),
        (_GET, (b"GET", b"/", b"HTTP/1.1", b"")),
        (_GET, (b"GET", b"/", b"HTTP/1.1", b"")),
    ],
    cuts=[52 + len(_GET) + 3],
)
def test_framer_and_twisted_agree_on_valid_requests(requests, cuts) -> None:
    """Every valid request reaches its request object whole and unchanged, however it is split."""
    data = b"".join(raw for raw, _ in requests)
    channel = FrontChannel()
    channel.requestFactory = _Recorded
    channel.seen = []
    clock = MemoryReactorClock()
    channel.site = _StubSite(clock, counters=Counters())
    channel.callLater = clock.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    for start, end in zip([0, *points], [*points, len(data)]):
        channel.dataReceived(data[start:end])
    assert channel.seen == [expected for _, expected in requests]
    assert not transport.disconnecting
    assert b" 400 " not in transport.value()


def test_config_keys(tmp_path) -> None:
    """header_timeout_s and the upstream head limits load from the file; a bad value names its key."""
    from quayfront.config import ConfigError, load_config

    # The default 0.0.0.0 PROXY listener must name its load balancers.
    trusted = {"proxy_listener.trusted_sources": ["10.0.0.0/8"]}
    path = tmp_path / "quayfront.toml"
    path.write_text("[http]\nheader_timeout_s = 2.5\n[upstream]\nmax_response_head_bytes = 4096\n"
                    "max_response_headers = 10\n")
    config = load_config(str(path), trusted)
    assert config.http.header_timeout_s == 2.5
    assert (config.upstream.max_response_head_bytes, config.upstream.max_response_headers) == (
        4096, 10)
    assert load_config(None, trusted).http.header_timeout_s == 60.0
    path.write_text("[http]\nheader_timeout_s = 0\n")
    with pytest.raises(ConfigError, match="header_timeout_s"):
        load_config(str(path))
