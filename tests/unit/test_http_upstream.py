"""
The upstream response reader (quayfront.http.ResponseReader), fed whole,
byte by byte, in halves and with trailing data: every response frames to
the same events however it is split, and every refusal raises the same
reason.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quayfront.http import (
    Framing,
    ReaderMisused,
    ReaderState,
    ResponseData,
    ResponseEnd,
    ResponseHead,
    ResponseIncomplete,
    ResponseReader,
    UpstreamMisbehaved,
)
from quayfront.http._upstream import _TRANSITIONS, _Event

HEAD_BYTES = 32768
HEADERS = 100


def splits(data: bytes) -> dict[str, list[bytes]]:
    return {
        "whole": [data],
        "bytewise": [data[i : i + 1] for i in range(len(data))],
        "halves": [data[: len(data) // 2], data[len(data) // 2 :]],
    }


def read(pieces: list[bytes], method: bytes = b"GET", close: bool = False, **limits):
    """Feed C{pieces}; the merged events, the reader, and the error if one was raised."""
    reader = ResponseReader(
        method, limits.get("max_head_bytes", HEAD_BYTES), limits.get("max_headers", HEADERS)
    )
    events: list[object] = []
    try:
        for piece in pieces:
            events += reader.receive(piece)
        if reader.failed:
            reader.receive(b"")
        if close:
            end = reader.connection_closed()
            if end is not None:
                events.append(end)
    except (UpstreamMisbehaved, ResponseIncomplete) as error:
        return merged(events), reader, error
    return merged(events), reader, None


def merged(events: list[object]) -> list[object]:
    out: list[object] = []
    for event in events:
        if isinstance(event, ResponseData):
            if out and isinstance(out[-1], ResponseData):
                out[-1] = ResponseData(out[-1].data + event.data)
                continue
            assert event.data, "an empty ResponseData"
        out.append(event)
    return out


def one_way(data: bytes, **options):
    """The result of every split of C{data}, checked to be the same."""
    results = {name: read(pieces, **options) for name, pieces in splits(data).items()}
    first = results["whole"]
    for name, result in results.items():
        assert result[0] == first[0], name
        assert type(result[2]) is type(first[2]), name
        if first[2] is not None and isinstance(first[2], UpstreamMisbehaved):
            assert result[2].reason == first[2].reason, name
    return first


@pytest.mark.parametrize("split", ["whole", "bytewise", "halves"])
def test_content_length_response(split: str) -> None:
    """A Content-Length body is read to its length; head fields keep their order and repeats."""
    data = b"HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 5\r\nA:  2 \r\nB:\r\n\r\nhello"
    events, reader, error = read(splits(data)[split])
    assert error is None
    head, body, end = events
    assert head == ResponseHead(
        200, b"OK", (1, 1), [(b"A", b"1"), (b"Content-Length", b"5"), (b"A", b"2"), (b"B", b"")],
        Framing.LENGTH, 5, True,
    )
    assert head.headers == [(b"A", b"1"), (b"Content-Length", b"5"), (b"A", b"2"), (b"B", b"")]
    assert body == ResponseData(b"hello")
    assert end == ResponseEnd()
    assert reader.state is ReaderState.DONE


def test_trailing_data_is_kept_apart() -> None:
    """Bytes after a complete response are not part of it; they are kept as trailing data."""
    for pieces in splits(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1").values():
        events, reader, error = read(pieces)
        assert error is None and events[-2:] == [ResponseData(b"ok"), ResponseEnd()]
        assert reader.trailing_data == b"HTTP/1.1"


def test_chunked_response_with_extensions_and_trailers() -> None:
    """A chunked body is de-chunked; extensions and trailer fields are dropped."""
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\nDigest: a\r\n\r\n")
    events, reader, error = one_way(data)
    assert error is None
    head, body, end = events
    assert (head.framing, head.length) == (Framing.CHUNKED, None)
    assert body == ResponseData(b"hello" + b"x" * 26)
    assert end == ResponseEnd()


def test_close_delimited_body_ends_with_the_connection() -> None:
    """Without a length the body runs to the close, which ends it as delimited by close."""
    events, reader, error = one_way(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nsome bytes", close=True)
    assert error is None
    head, body, end = events
    assert (head.framing, head.keep_alive) == (Framing.UNTIL_CLOSE, False)
    assert body == ResponseData(b"some bytes")
    assert end == ResponseEnd(delimited_by_close=True)


@pytest.mark.parametrize(
    "data, method",
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", b"GET"),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"HEAD"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET"),
    ],
)
def test_responses_without_a_body(data: bytes, method: bytes) -> None:
    """HEAD, 204, 304 and a zero length end with the head, whatever the fields say."""
    events, reader, error = one_way(data + b"NEXT", method=method)
    assert error is None
    head, end = events
    assert head.length == 0 and end == ResponseEnd()
    assert reader.trailing_data == b"NEXT"


def test_interim_responses_are_skipped() -> None:
    """100 Continue and 103 Early Hints are read and dropped; the final head follows."""
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    events, _, error = one_way(data)
    assert error is None
    assert [type(e) for e in events] == [ResponseHead, ResponseEnd]
    assert events[0].status == 201 and events[0].reason == b"Created"


def test_bare_lf_heads_and_no_reason_phrase() -> None:
    """Bare LF line ends and a status line without a reason phrase are read (RFC 9112 2.2, 4)."""
    events, _, error = one_way(b"HTTP/1.0 404\nContent-Length: 1\nConnection: keep-alive\n\nx")
    assert error is None
    head = events[0]
    assert (head.status, head.reason, head.version, head.keep_alive) == (404, b"", (1, 0), True)
    assert events[1:] == [ResponseData(b"x"), ResponseEnd()]


@pytest.mark.parametrize(
    "headers, keep_alive",
    [
        (b"Connection: close\r\n", False),
        (b"Connection: Keep-Alive, CLOSE\r\n", False),
        (b"Connection: keep-alive\r\n", True),
        (b"", True),
    ],
)
def test_connection_close_is_seen(headers: bytes, keep_alive: bool) -> None:
    """Connection: close among the tokens makes the connection unfit for reuse."""
    events, _, _ = one_way(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 0\r\n\r\n")
    assert events[0].keep_alive is keep_alive


@given(
    st.lists(
        st.sampled_from(
            [b"keep-alive", b"Keep-Alive", b"close", b"CLOSE", b"close, keep-alive",
             b"keep-alive ,", b"x-a", b"", b"Upgrade, Close"]
        ),
        max_size=3,
    ),
    st.sampled_from([b"1.0", b"1.1"]),
)
def test_connection_tokens_decide_keep_alive_as_the_rule_says(values, version) -> None:
    """However its Connection fields read, a response's keep_alive is RFC 9112 section 9.3's answer."""
    tokens = {token.strip().lower() for value in values for token in value.split(b",")}
    expected = (b"keep-alive" in tokens) if version == b"1.0" else (b"close" not in tokens)
    fields = b"".join(b"Connection: " + value + b"\r\n" for value in values)
    reader = ResponseReader(b"GET", HEAD_BYTES, HEADERS)
    head = reader.receive(b"HTTP/" + version + b" 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n")[0]
    assert head.keep_alive is expected


def test_identical_content_lengths_are_one() -> None:
    """Repeated identical Content-Length values (RFC 9110 8.6) are one length."""
    events, _, error = one_way(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nok")
    assert error is None and events[0].length == 2


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"HTTX/1.1 200 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/1.1 600 Odd\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/1.1 200 OK\x00\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "upstream-bad-header"),
        (b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n", "upstream-bad-header"),
        (b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n", "upstream-bad-header"),
        (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "upstream-bad-header"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", "upstream-too-many-headers"),
        (b"HTTP/1.1 200 OK\r\n" + (b"X-A: " + b"a" * 1000 + b"\r\n") * 40,
         "upstream-head-too-large"),
        (b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 40000, "upstream-head-too-large"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 2000, "upstream-head-too-large"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "upstream-switching-protocols"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
         "upstream-bad-content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "upstream-bad-content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "upstream-bad-content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n", "upstream-bad-content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551621\r\n\r\n",
         "upstream-bad-content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
         "upstream-bad-content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
         "upstream-bad-transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n", "upstream-bad-transfer-encoding"),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "upstream-bad-transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "upstream-bad-chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "upstream-bad-chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\n",
         "upstream-bad-chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n",
         "upstream-bad-chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 2000,
         "upstream-bad-chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nBad trailer\r\n\r\n",
         "upstream-bad-header"),
    ],
)
def test_refusals(data: bytes, reason: str) -> None:
    """Each malformed, ambiguous or oversized response raises its reason, however split."""
    events, reader, error = one_way(data)
    assert isinstance(error, UpstreamMisbehaved), events
    assert error.reason == reason
    assert reader.state is ReaderState.ERROR
    with pytest.raises(ReaderMisused, match="error"):
        reader.receive(b"more")


def test_bad_status_line_is_refused_before_the_head_ends() -> None:
    """A bad status line is refused as soon as its line is complete, not after the whole head."""
    reader = ResponseReader(b"GET", HEAD_BYTES, HEADERS)
    assert reader.receive(b"HTTX/1.1 200 O") == []
    with pytest.raises(UpstreamMisbehaved, match="upstream-bad-status-line"):
        reader.receive(b"K\r\nX: y\r\n")


def test_a_bad_status_line_after_an_interim_head_is_refused_as_early() -> None:
    """The status line of the head after a 1xx one is checked as soon as its line is complete too."""
    reader = ResponseReader(b"GET", HEAD_BYTES, HEADERS)
    assert reader.receive(b"HTTP/1.1 100 Continue\r\n\r\nHTTX/1.1 200 O") == []
    with pytest.raises(UpstreamMisbehaved, match="upstream-bad-status-line"):
        reader.receive(b"K\r\nX: y\r\n")


def test_head_limits_are_the_readers() -> None:
    """max_head_bytes and max_headers are the reader's own, with 1xx heads counted."""
    answer = b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n"
    assert read([answer], max_headers=2)[2].reason == "upstream-too-many-headers"
    assert read([answer], max_headers=3)[2] is None
    assert read([answer], max_head_bytes=len(answer) - 1)[2].reason == "upstream-head-too-large"
    assert read([answer], max_head_bytes=len(answer))[2] is None
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert read([interim + answer], max_head_bytes=len(answer))[2].reason == (
        "upstream-head-too-large")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
    ],
)
def test_a_close_before_the_end_is_incomplete(data: bytes) -> None:
    """A connection closed mid-head, mid-length or mid-chunked is never a complete response."""
    events, reader, error = one_way(data, close=True)
    assert isinstance(error, ResponseIncomplete)
    assert not any(isinstance(e, ResponseEnd) for e in events)


def test_a_close_after_the_end_is_nothing() -> None:
    """A close after a complete response adds no event."""
    reader = ResponseReader(b"GET", HEAD_BYTES, HEADERS)
    reader.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert reader.connection_closed() is None


def test_received_any_marks_the_first_byte() -> None:
    """Whether a response byte arrived decides whether a request may be retried."""
    reader = ResponseReader(b"GET", HEAD_BYTES, HEADERS)
    assert not reader.received_any
    reader.receive(b"H")
    assert reader.received_any


def test_transition_table_names_state_and_event() -> None:
    """An event the table does not allow raises, naming the state and the event."""
    reader = ResponseReader(b"GET", HEAD_BYTES, HEADERS)
    with pytest.raises(ReaderMisused, match="'body-complete'.*'head'"):
        reader._move(_Event.BODY_COMPLETE)
    assert reader.state is ReaderState.HEAD
    # Every state but the final ones can fail; nothing leaves DONE or ERROR.
    for state in ReaderState:
        leaving = {event for (s, event) in _TRANSITIONS if s is state}
        if state in (ReaderState.DONE, ReaderState.ERROR):
            assert leaving == set()
        else:
            assert _Event.MISBEHAVED in leaving


@given(
    st.text(alphabet="0123456789", max_size=24).map(str.encode)
    | st.sampled_from([b"", b" 5", b"5 ", b"+5", b"-1", b"0x10", b"\xd9\xa3", b"5;"])
)
def test_one_plain_content_length_reads_as_the_general_rule_does(value: bytes) -> None:
    """
    A single Content-Length value, read the short way, gives the length (or
    the refusal) the general rule gives the same value repeated in a list.
    """

    def read(field: bytes):
        reader = ResponseReader(b"GET", 65536, 100)
        try:
            [head] = reader.receive(b"HTTP/1.1 200 OK\r\nContent-Length: " + field + b"\r\n\r\n")[:1]
        except UpstreamMisbehaved as refused:
            return refused.reason
        return head.length

    assert read(value) == read(value + b", " + value)


@pytest.mark.parametrize(
    "answer, line",
    [
        (b"HTTX/1.1 200 OK\r\n\r\n", "HTTX/1.1 200 OK"),
        (b"HTTP/1.1 99 X\n\nab\r", "HTTP/1.1 99 X"),
        (b"\n\r\nbody\r", ""),
        (b"\r\n\r\n", ""),
    ],
)
def test_a_bad_status_line_is_named_without_its_line_end(answer: bytes, line: str) -> None:
    """A refused status line is named as received, without its CR, and nothing else."""
    reader = ResponseReader(b"GET", 65536, 100)
    with pytest.raises(UpstreamMisbehaved) as refused:
        reader.receive(answer)
    assert (refused.value.reason, refused.value.detail) == ("upstream-bad-status-line", line)



_FRAMING_NAMES = st.sampled_from(
    [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Transfer-Encoding",
     b"transfer-encoding", b"Connection", b"connection", b"Date", b"Content-Type", b"X-Len"]
)


@given(st.lists(_FRAMING_NAMES, max_size=8))
def test_where_the_framing_fields_are_is_learnt_once_and_found_again(names) -> None:
    """
    Where a head's Content-Length, Transfer-Encoding and Connection fields
    are (in any case) is found by name, then remembered for the same names.
    """
    from quayfront.http import _upstream

    expected = tuple(
        tuple(index for index, name in enumerate(names) if name.lower() == wanted)
        for wanted in (b"content-length", b"transfer-encoding", b"connection")
    )
    key = tuple(names)
    assert _upstream.framing_fields_at(key) == expected
    assert _upstream._framing_fields_at.get(key, expected) == expected


@given(
    st.lists(st.sampled_from([b"Content-Length: 3", b"content-length: 3", b"Date: d",
                              b"Connection: close", b"connection: keep-alive"]),
             max_size=4)
)
def test_a_head_of_names_seen_before_is_framed_by_its_own_values(lines) -> None:
    """
    Two responses of the same names with different values: each is framed by
    its own (the indices are remembered, not the values).
    """
    for length in (b"3", b"5"):
        head = b"".join(line.replace(b": 3", b": " + length) + b"\r\n" for line in lines)
        reader = ResponseReader(b"GET", 65536, 100)
        has_length = any(line.lower().startswith(b"content-length") for line in lines)
        events = reader.receive(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n")
        [response_head] = [event for event in events if isinstance(event, ResponseHead)]
        assert response_head.length == (int(length) if has_length else None)


def test_the_framing_shapes_remembered_are_bounded(monkeypatch) -> None:
    """Made-up names cannot grow the table past its bound."""
    from quayfront.http import _upstream

    monkeypatch.setattr(_upstream, "_framing_fields_at", {})
    for number in range(_upstream._MAX_FRAMING_SHAPES + 20):
        _upstream.framing_fields_at((b"X-%d" % number, b"Content-Length"))
    assert len(_upstream._framing_fields_at) == _upstream._MAX_FRAMING_SHAPES
