"""
Property tests for the one-pass field splitters: the request framer's
(C{_FIELD_PAIR}, after C{_FIELD_LINES} accepted the lines) and the upstream
reader's (C{_FIELD_LINES}, which checks and splits a section in one pass).

On every generated field section (leading and trailing SP and HTAB, empty
values, obs-text bytes, inner whitespace) they must give the pairs that
the line-by-line parsers give and that the earlier lazy-quantifier
patterns gave; a request head must frame to the same headers whether it
arrives whole (one pass) or in pieces (line by line).  Run with
HYPOTHESIS_PROFILE=fuzz for a long search.
"""

from __future__ import annotations

import re

from hypothesis import assume, given
from hypothesis import strategies as st

from quayfront.http import (
    RequestFramer,
    RequestHead,
    ResponseHead,
    ResponseReader,
    UpstreamMisbehaved,
)
from quayfront.http._framing import _FIELD_LINES, _FIELD_PAIR, parse_field_line
from quayfront.http._response import (
    _FIELD_LINES as _RESPONSE_FIELD_LINES,
    check_field_line,
    parse_field_block,
)

# The patterns the one-pass splitters had before the value was matched
# greedily: the reference the new ones must agree with.
LAZY_REQUEST_PAIR = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")
LAZY_RESPONSE_PAIRS = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*\r?\n"
)

TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
names = st.binary(min_size=1, max_size=12).map(
    lambda raw: bytes(TOKEN_BYTES[byte % len(TOKEN_BYTES)] for byte in raw)
)
whitespace = st.lists(st.sampled_from([b" ", b"\t"]), max_size=4).map(b"".join)
# Value pieces: visible ASCII, obs-text, runs of SP and HTAB in between.
visible = st.binary(min_size=1, max_size=8).map(
    lambda raw: bytes(0x21 + byte % 0x5E for byte in raw)
)
obs_text = st.binary(min_size=1, max_size=3).map(lambda raw: bytes(0x80 | byte for byte in raw))
values = st.lists(st.one_of(visible, obs_text, whitespace), max_size=6).map(b"".join)
field_lines = st.tuples(names, whitespace, values, whitespace).map(
    lambda parts: parts[0] + b":" + parts[1] + parts[2] + parts[3]
)
sections = st.lists(field_lines, max_size=12)
# Anything at all, with the bytes the patterns care about made common.
noise = st.lists(
    st.one_of(
        st.sampled_from([b" ", b"\t", b":", b"\r", b"\n", b"\r\n", b"\x00", b"\x7f", b"\xff"]),
        st.binary(max_size=6),
    ),
    max_size=30,
).map(b"".join)
noisy_lines = st.tuples(names, noise).map(lambda parts: parts[0] + b":" + parts[1])


def request_head(lines: list[bytes]) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: example.test\r\n" + b"".join(
        line + b"\r\n" for line in lines
    ) + b"\r\n"


def framed_headers(pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
    framer = RequestFramer()
    for piece in pieces:
        framer.feed(piece)
    event = framer.next_event()
    assert type(event) is RequestHead
    return event.headers


@given(sections)
def test_request_split_agrees_with_the_line_parser_and_the_lazy_pattern(lines):
    block = b"".join(line + b"\r\n" for line in lines)
    assert _FIELD_LINES.fullmatch(block) is not None
    split = _FIELD_PAIR.findall(block)
    assert split == [parse_field_line(line) for line in lines]
    assert split == LAZY_REQUEST_PAIR.findall(block)


@given(sections, st.lists(st.integers(min_value=1, max_value=400), max_size=8))
def test_request_heads_frame_alike_whole_and_in_pieces(lines, cuts):
    head = request_head(lines)
    expected = [(b"Host", b"example.test")] + [parse_field_line(line) for line in lines]
    assert framed_headers([head]) == expected
    points = sorted({cut % len(head) for cut in cuts} - {0})
    pieces = [head[start:end] for start, end in zip([0, *points], [*points, len(head)])]
    assert framed_headers(pieces) == expected
    assert framed_headers([head[i : i + 1] for i in range(len(head))]) == expected


@given(st.lists(noisy_lines, max_size=6))
def test_request_split_agrees_with_the_lazy_pattern_on_any_accepted_lines(lines):
    block = b"".join(line + b"\r\n" for line in lines)
    if _FIELD_LINES.fullmatch(block) is not None:
        assert _FIELD_PAIR.findall(block) == LAZY_REQUEST_PAIR.findall(block)


@given(sections, st.lists(st.booleans(), min_size=12, max_size=12))
def test_response_split_agrees_with_the_line_parser_and_the_lazy_pattern(lines, bare_lf):
    # Upstream heads may end lines with a bare LF.
    block = b"".join(
        line + (b"\n" if bare else b"\r\n") for line, bare in zip(lines, bare_lf)
    )
    pairs = parse_field_block(block, 100)
    assert pairs == [check_field_line(line) for line in lines]
    assert pairs == LAZY_RESPONSE_PAIRS.findall(block)


def line_by_line(block: bytes) -> list[tuple[bytes, bytes]] | None:
    """The pairs of C{block} checked one line at a time, or None if a line breaks the rules."""
    if block[-1:] not in (b"\n", b""):
        return None
    pairs = []
    for line in block.split(b"\n")[:-1]:
        try:
            pairs.append(check_field_line(line[:-1] if line[-1:] == b"\r" else line))
        except UpstreamMisbehaved:
            return None
    return pairs


noisy_sections = st.tuples(
    st.lists(noisy_lines, max_size=6), st.lists(st.booleans(), min_size=6, max_size=6)
).map(
    lambda parts: b"".join(
        line + (b"\n" if bare else b"\r\n") for line, bare in zip(*parts)
    )
)

valid_sections = st.tuples(sections, st.lists(st.booleans(), min_size=12, max_size=12)).map(
    lambda parts: b"".join(
        line + (b"\n" if bare else b"\r\n") for line, bare in zip(*parts)
    )
)


@given(noisy_sections | valid_sections)
def test_response_split_accepts_what_the_line_rule_accepts(block):
    """
    The one-pass split accepts a section exactly when every line passes
    check_field_line, and then gives the pairs the line parser and the lazy
    pattern give.
    """
    expected = line_by_line(block)
    try:
        pairs = parse_field_block(block, 100)
    except UpstreamMisbehaved as refused:
        assert refused.reason == "upstream-bad-header"
        pairs = None
    assert pairs == expected
    one_pass = _RESPONSE_FIELD_LINES.findall(block)
    assert (len(one_pass) == block.count(b"\n") and block[-1:] in (b"\n", b"")) == (
        expected is not None
    )
    if expected is not None:
        assert one_pass == expected == LAZY_RESPONSE_PAIRS.findall(block)


@given(noisy_sections | valid_sections, st.sampled_from([b"\r\n", b"\n"]), st.binary(max_size=8))
def test_response_heads_are_read_as_the_line_rule_reads_them(block, blank, body):
    """
    The reader, which splits a head in place, gives the fields the line
    rule gives (or refuses the head as a bad header when it refuses a line),
    whole and byte by byte.
    """
    # A blank line inside would end the head there.
    assume(b"\n\n" not in b"\n" + block and b"\n\r\n" not in b"\n" + block)
    data = b"HTTP/1.1 200 OK\r\n" + block + blank + body
    expected = line_by_line(block)
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        reader = ResponseReader(b"GET", 65536, 100)
        events = []
        try:
            for piece in pieces:
                events += reader.receive(piece)
        except UpstreamMisbehaved as refused:
            if expected is None:
                assert refused.reason == "upstream-bad-header"
                continue
            # Fields the line rule accepts may still frame badly.
            assert refused.reason.startswith(("upstream-bad-content-length", "upstream-bad-transfer"))
            continue
        assert expected is not None
        assert type(events[0]) is ResponseHead
        assert events[0].headers == expected
