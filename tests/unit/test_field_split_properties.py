"""
Property tests for the one-pass field splitters: the request framer's
(C{_FIELD_PAIR}, after C{_FIELD_LINES} accepted the lines) and the upstream
reader's (C{_FIELD_PAIRS}, after C{_FIELD_BLOCK} accepted the block).

On every generated field section (leading and trailing SP and HTAB, empty
values, obs-text bytes, inner whitespace) they must give the pairs that
the line-by-line parsers give and that the earlier lazy-quantifier
patterns gave; a request head must frame to the same headers whether it
arrives whole (one pass) or in pieces (line by line).  Run with
HYPOTHESIS_PROFILE=fuzz for a long search.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from quayfront.http import RequestFramer, RequestHead
from quayfront.http._framing import _FIELD_LINES, _FIELD_PAIR, parse_field_line
from quayfront.http._response import (
    _FIELD_BLOCK,
    _FIELD_PAIRS,
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


@given(st.lists(noisy_lines, max_size=6))
def test_response_split_agrees_with_the_lazy_pattern_on_any_accepted_block(lines):
    block = b"".join(line + b"\n" for line in lines)
    if _FIELD_BLOCK.match(block):
        assert _FIELD_PAIRS.findall(block) == LAZY_RESPONSE_PAIRS.findall(block)
