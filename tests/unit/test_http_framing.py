"""
The request framer (quayfront.http), fed whole, byte by byte and with
trailing data: every refused class answers the same status and reason
however the input is split, and accepted input is framed back to the exact
bytes it came from.
"""

from __future__ import annotations

import pytest

from quayfront.http import (
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    NEED_DATA,
    BodyData,
    MessageEnd,
    PeerMisbehaved,
    RequestFramer,
    RequestHead,
    TargetRefused,
    normalise_target,
)


def frame(pieces: list[bytes]) -> tuple[list[object], PeerMisbehaved | None]:
    """Feed C{pieces} one by one; every event, and the error if one was raised."""
    framer = RequestFramer()
    events: list[object] = []
    for piece in pieces:
        framer.feed(piece)
        while True:
            try:
                event = framer.next_event()
            except PeerMisbehaved as error:
                return events, error
            if event is NEED_DATA:
                break
            events.append(event)
    return events, None


def splits(data: bytes) -> dict[str, list[bytes]]:
    return {
        "whole": [data],
        "bytewise": [data[i : i + 1] for i in range(len(data))],
        "halves": [data[: len(data) // 2], data[len(data) // 2 :]],
    }


def summary(events: list[object]) -> list[tuple]:
    """Events with body pieces merged, so splits compare equal."""
    out: list[tuple] = []
    for event in events:
        if isinstance(event, BodyData):
            if out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + event.data)
            else:
                out.append(("body", event.data))
        elif isinstance(event, RequestHead):
            out.append(("head", event.method, event.target, event.version,
                        tuple(event.headers), event.content_length, event.keep_alive))
        else:
            assert isinstance(event, MessageEnd)
            out.append(("end", tuple(event.trailers)))
    return out


def assert_refused(data: bytes, status: int, reason: str, in_head: bool = True) -> None:
    for name, pieces in splits(data).items():
        events, error = frame(pieces)
        assert error is not None, f"{name}: accepted {data!r}"
        assert (error.status, error.reason, error.in_head) == (status, reason, in_head), name
    # Trailing bytes after the offending ones change nothing.
    events, error = frame([data + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert error is not None and (error.status, error.reason) == (status, reason)


def assert_accepted(data: bytes, expected: list[tuple]) -> None:
    for name, pieces in splits(data).items():
        events, error = frame(pieces)
        assert error is None, f"{name}: {error}"
        assert summary(events) == expected, name
        assert b"".join(e.raw for e in events) == data, name


GET = b"GET /v2/ HTTP/1.1\r\nHost: registry.example\r\n\r\n"


def test_simple_get() -> None:
    """A GET is one head and an end, with its headers in order."""
    assert_accepted(
        b"GET /v2/?n=1 HTTP/1.1\r\nHost: r.example:8443\r\nAccept: a\r\nAccept: b\r\n\r\n",
        [("head", b"GET", b"/v2/?n=1", b"HTTP/1.1",
          ((b"Host", b"r.example:8443"), (b"Accept", b"a"), (b"Accept", b"b")), 0, True),
         ("end", ())],
    )


def test_content_length_body_and_pipelined_request() -> None:
    """A Content-Length body ends at its length; the next request follows."""
    data = b"PUT /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello" + GET
    assert_accepted(data, [
        ("head", b"PUT", b"/a", b"HTTP/1.1", ((b"Host", b"h"), (b"Content-Length", b"5")), 5,
         True),
        ("body", b"hello"), ("end", ()),
        ("head", b"GET", b"/v2/", b"HTTP/1.1", ((b"Host", b"registry.example"),), 0, True),
        ("end", ()),
    ])


def test_chunked_body_with_extension_and_trailer() -> None:
    """Chunks are de-chunked; extensions and trailers are accepted."""
    data = (b"PATCH /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n0000000000000006\r\n world\r\n0\r\nDigest: x\r\n\r\n")
    assert_accepted(data, [
        ("head", b"PATCH", b"/a", b"HTTP/1.1",
         ((b"Host", b"h"), (b"Transfer-Encoding", b"Chunked")), None, True),
        ("body", b"hello world"), ("end", ((b"Digest", b"x"),)),
    ])


def test_one_leading_empty_line_is_skipped() -> None:
    """RFC 9112 section 2.2: one CRLF before a request line is ignored."""
    events, error = frame([b"\r\n" + GET])
    assert error is None and summary(events)[0][1] == b"GET"


def test_http10_without_host_and_close() -> None:
    """HTTP/1.0 may omit Host; the connection then ends and later bytes are dropped."""
    data = b"GET / HTTP/1.0\r\n\r\n"
    events, error = frame([data + b"garbage\n\n"])
    assert error is None
    assert summary(events) == [("head", b"GET", b"/", b"HTTP/1.0", (), 0, False), ("end", ())]


def test_connection_close_ends_framing() -> None:
    """After Connection: close nothing more is framed."""
    events, error = frame([b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" + GET])
    assert error is None and len(events) == 2 and not events[0].keep_alive


@pytest.mark.parametrize(
    "data, status, reason",
    [
        # Transfer codings other than exactly chunked: 501, as nginx.
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", 501,
         "unsupported-transfer-coding"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n"
         b"\r\nabc", 501, "unsupported-transfer-coding"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
         "unsupported-transfer-coding"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n", 501, "unsupported-transfer-coding"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\r\n", 501,
         "unsupported-transfer-coding"),
        # TE with CL.
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
         b"\r\n", 400, "transfer-encoding-with-content-length"),
        # TE on HTTP/1.0.
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
         "transfer-encoding-http10"),
        # obs-fold and leading whitespace.
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n 2\r\n\r\n", 400, "obs-fold"),
        (b"GET / HTTP/1.1\r\n\tHost: h\r\n\r\n", 400, "obs-fold"),
        (b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", 400, "obs-fold"),
        # Unrepresentable lengths.
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551621\r\n\r\n", 400,
         "bad-content-length"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9223372036854775808\r\n\r\n", 400,
         "bad-content-length"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1" + b"0" * 5000 + b"\r\n\r\n", 400,
         "bad-content-length"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n", 400,
         "bad-content-length"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", 400, "bad-content-length"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 400,
         "bad-content-length"),
        # Bare LF and bare CR.
        (b"GET / HTTP/1.1\nHost: h\n\n", 400, "bare-lf"),
        (b"GET / HTTP/1.1\r\nHost: h\n\r\n", 400, "bare-lf"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n\n", 400, "bare-lf"),
        (b"\n", 400, "bare-lf"),
        (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400, "bare-cr"),
        # Request line.
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-line"),
        (b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400, "bad-request-line"),
        (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-line"),
        (b"GET / HTTX/1.1\r\nHost: h\r\n\r\n", 400, "bad-version"),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505, "unsupported-version"),
        (b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-line"),
        # Raw bytes and "#" in the target.
        (b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-target"),
        (b"POST /a\x80b HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx", 400,
         "bad-request-target"),
        (b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-target"),
        (b"GET /a\x1bb HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-target"),
        (b"GET /a\tb HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-target"),
        (b"GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-target"),
        (b"GET /a\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad-request-target"),
        # Header syntax.
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400, "bad-header"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nNo colon\r\n\r\n", 400, "bad-header"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400, "bad-header"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x7fb\r\n\r\n", 400, "bad-header"),
        # Host (RFC 9112 section 3.2).
        (b"GET / HTTP/1.1\r\n\r\n", 400, "missing-host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400, "duplicate-host"),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400, "bad-host"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad-host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "bad-host"),
        (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400, "bad-host"),
        (b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400, "bad-host"),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, "duplicate-host"),
        # Limits.
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431,
         "head-too-large"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: 1\r\n" * MAX_HEADER_COUNT + b"\r\n", 431,
         "too-many-headers"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, "request-line-too-long"),
    ],
)
def test_refused_heads(data: bytes, status: int, reason: str) -> None:
    """Each head class is refused with its status, whatever the split."""
    assert_refused(data, status, reason)


CHUNKED = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"10000000000000005\r\n", "bad-chunk-size"),  # 17 hex digits
        (b"ffffffffffffffffffff\r\n", "bad-chunk-size"),  # 20 hex digits
        (b"8000000000000000\r\n", "bad-chunk-size"),  # 2**63
        (b"0x5\r\nhello\r\n0\r\n\r\n", "bad-chunk-size"),
        (b"5 \r\nhello\r\n0\r\n\r\n", "bad-chunk-size"),
        (b"\r\n", "bad-chunk-size"),
        (b"5;a\x00\r\nhello\r\n0\r\n\r\n", "bad-chunk-size"),
        (b"5\r\nhelloXX0\r\n\r\n", "bad-chunk-size"),
        (b"5\nhello\r\n0\r\n\r\n", "bare-lf"),
        (b"5\r\nhello\n0\r\n\r\n", "bad-chunk-size"),
        (b"0\r\nX: y\n\r\n", "bare-lf"),
        (b"0\r\n X: y\r\n\r\n", "obs-fold"),
        (b"0\r\nbad trailer\r\n\r\n", "bad-trailer"),
        (b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n", "bad-chunk-size"),
        (b"5;" + b"e" * 1022 + b"\r\nhello\r\n0\r\n\r\n", "bad-chunk-size"),
    ],
)
def test_refused_chunked_bodies(body: bytes, reason: str) -> None:
    """Chunk framing errors are refused at once, as body errors."""
    for name, pieces in splits(body).items():
        events, error = frame([CHUNKED, *pieces])
        assert error is not None, name
        assert (error.status, error.reason, error.in_head) == (400, reason, False), name
        assert isinstance(events[0], RequestHead)


def test_longest_chunk_line_is_accepted() -> None:
    """A chunk-size line of 1023 bytes (Twisted refuses 1024) is accepted."""
    events, error = frame([CHUNKED, b"5;" + b"e" * 1021 + b"\r\nhello\r\n0\r\n\r\n"])
    assert error is None and summary(events)[1] == ("body", b"hello")


def test_oversized_trailer() -> None:
    """Trailers are bounded like a head."""
    events, error = frame([CHUNKED, b"0\r\n" + b"X-A: b\r\n" * 3000])
    assert error is not None and (error.status, error.reason) == (431, "trailer-too-large")


def test_refused_at_once() -> None:
    """A bad target byte, an oversized head and a bare LF are refused before the head ends."""
    for partial, reason in [
        (b"GET /a\x7f", "bad-request-target"),
        (b"POST /\x80", "bad-request-target"),
        (b"GET / HTTP/1.1\n", "bare-lf"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * MAX_HEAD_BYTES, "head-too-large"),
    ]:
        events, error = frame([partial])
        assert events == [] and error is not None and error.reason == reason


def test_errors_are_sticky() -> None:
    """After a refusal the framer keeps refusing."""
    framer = RequestFramer()
    framer.feed(b"GET / HTTP/1.1\nHost: h\n\n")
    for _ in range(2):
        with pytest.raises(PeerMisbehaved):
            framer.next_event()


def test_head_in_progress() -> None:
    """head_in_progress is true from the first byte of a head to its end."""
    framer = RequestFramer()
    assert not framer.head_in_progress
    framer.feed(b"G")
    assert framer.next_event() is NEED_DATA and framer.head_in_progress
    framer.feed(GET[1:])
    assert isinstance(framer.next_event(), RequestHead)
    assert isinstance(framer.next_event(), MessageEnd)
    assert not framer.head_in_progress


@pytest.mark.parametrize(
    "target, path, upstream",
    [
        (b"/v2/", b"/v2/", b"/v2/"),
        (b"/%76%32/", b"/v2/", b"/v2/"),
        (b"/%76%32/a%2db?q=%76", b"/v2/a-b", b"/v2/a-b?q=%76"),
        (b"/v2/a%3ab%3A", b"/v2/a%3Ab%3A", b"/v2/a%3Ab%3A"),
        (b"/a%7e%5F", b"/a~_", b"/a~_"),
    ],
)
def test_normalised_targets(target: bytes, path: bytes, upstream: bytes) -> None:
    """Encoded unreserved characters are decoded and other escapes upper-cased."""
    assert normalise_target(target) == (path, upstream)


@pytest.mark.parametrize(
    "target, reason",
    [
        (b"/v2%2Fx", "encoded-slash"),
        (b"/%2f", "encoded-slash"),
        (b"/a%zz", "bad-percent-encoding"),
        (b"/a%4", "bad-percent-encoding"),
        (b"/a/../v2/", "dot-segment"),
        (b"/a/%2e%2E/v2/", "dot-segment"),
        (b"/a/./b", "dot-segment"),
        (b"/a/.%2e", "dot-segment"),
    ],
)
def test_refused_targets(target: bytes, reason: str) -> None:
    """What cannot be normalised is refused with its reason."""
    with pytest.raises(TargetRefused) as raised:
        normalise_target(target)
    assert raised.value.reason == reason


def test_several_feeds_before_reading_events() -> None:
    """Pieces fed one after another before any event is read frame the same."""
    data = (b"PUT /a HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\n"
            b"abc")
    framer = RequestFramer()
    framer.feed(data)
    assert isinstance(framer.next_event(), RequestHead)
    framer.feed(b"de")
    framer.feed(b"f" + GET)
    events = []
    while (event := framer.next_event()) is not NEED_DATA:
        events.append(event)
    assert summary(events) == [
        ("body", b"abcdef"), ("end", ()),
        ("head", b"GET", b"/v2/", b"HTTP/1.1", ((b"Host", b"registry.example"),), 0, True),
        ("end", ()),
    ]
    assert b"".join(e.raw for e in events) == b"abcdef" + GET


# The one-pass path for a whole head and the line-by-line path agree.

from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_EOL = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"])
_REQUEST_LINE = st.tuples(
    st.sampled_from([b"GET", b"POST", b"G T", b"", b"GET\x00"]),
    st.sampled_from([b" ", b"  ", b"\t"]),
    st.sampled_from([b"/v2/", b"/v2/?a=b", b"/a#b", b"/a\x7f", b"/a\x80", b"*",
                     b"/" + b"a" * 8170, b"/" + b"a" * 9000]),
    st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0", b" HTTP/1.1 ", b" http/1.1"]),
).map(b"".join)
_FIELD_LINE = st.sampled_from([
    b"Host: h", b"Host:", b"host: a b", b"Host: h", b"Content-Length: 3",
    b"Content-Length: 99999999999999999999", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity", b"Connection: close", b"X-A: 1", b"X_B: 2", b" folded",
    b"\tfolded", b"Bad Name: x", b"X-C: a\x00b", b"X-D: a\rb", b"NoColon", b"X-E: " + b"e" * 8000,
    b"X-F: \t v w \t", b"X-G:v", b"X-H: \x80\xff", b"X-I:  ", b"X-J: a:b", b":x", b"X-K : v",
])


@given(request_line=_REQUEST_LINE, fields=st.lists(st.tuples(_FIELD_LINE, _EOL), max_size=6),
       first_eol=_EOL, last_eol=_EOL, repeat=st.sampled_from([1, 1, 1, 20, 60]))
@example(request_line=b"GET /v2/ HTTP/1.1", fields=[(b"X-A: 1", b"\r\n")] * 2, first_eol=b"\r\n",
         last_eol=b"\r\n", repeat=60)  # too many headers
@example(request_line=b"GET /v2/ HTTP/1.1", fields=[(b"X-E: " + b"e" * 8000, b"\r\n")] * 3,
         first_eol=b"\r\n", last_eol=b"\r\n", repeat=1)  # head too large
@example(request_line=b"GET /" + b"a" * 9000 + b" HTTP/1.1", fields=[(b"Host: h", b"\r\n")],
         first_eol=b"\r\n", last_eol=b"\r\n", repeat=1)  # request line too long
@example(request_line=b"GET /v2/ HTTP/1.1",
         fields=[(b"Host: h", b"\r\n"), (b"X-F: \t v \t", b"\r\n")],
         first_eol=b"\r\n", last_eol=b"\r\n", repeat=1)  # whitespace around a value
def test_whole_head_path_agrees_with_line_by_line(request_line, fields, first_eol, last_eol,
                                                  repeat) -> None:
    """A head fed whole is framed (or refused) exactly as the line-by-line path frames it."""
    data = request_line + first_eol + b"".join(line + eol for line, eol in fields) * repeat
    data += last_eol + b"abc"

    def run(one_pass: bool):
        framer = RequestFramer()
        if not one_pass:
            framer._whole_head = lambda: None
        framer.feed(data)
        events = []
        try:
            while (event := framer.next_event()) is not NEED_DATA:
                events.append(event)
        except PeerMisbehaved as error:
            return summary(events), (error.status, error.reason, error.in_head), \
                framer.refused_request_line
        return summary(events), None, b"".join(e.raw for e in events)

    assert run(True) == run(False)
