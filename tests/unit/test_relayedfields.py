"""
The field lines of a relayed head joined from the upstream's pairs as they
came (quayfront.relayedfields), against the fields the general way keeps.
"""

from __future__ import annotations

from unittest import mock

from hypothesis import example, given
from hypothesis import strategies as st

from quayfront import relayedfields
from quayfront.headers import HOP_BY_HOP, client_response_fields
from quayfront.relayedfields import MAX_SHAPES, relayed_lines

_NAMES = [
    b"content-type", b"Content-Type", b"etag", b"ETag", b"Set-Cookie", b"x-a", b"X-A",
    b"Connection", b"connection", b"Keep-Alive", b"TE", b"Transfer-Encoding", b"Upgrade",
    b"strict-transport-security", b"Content-Length", b"content-length", b"www-authenticate",
    b"Docker-Distribution-API-Version", b"Date", b"Server", b"x-secret",
]
_VALUES = [b"1", b"0", b"5", b"05", b"5, 5", b"", b"close", b"Keep-Alive", b"x-secret", b"a b"]
_PAIR = st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES))
_PAIRS = st.one_of(
    st.lists(_PAIR, max_size=10, unique_by=lambda pair: pair[0].lower()),
    st.lists(_PAIR, max_size=10),
)


def general_lines(pairs: list[tuple[bytes, bytes]], length: int | None) -> bytes:
    """The lines the general way writes: client_response_fields, Content-Length set."""
    fields = client_response_fields(pairs)
    if length is not None:
        fields[b"Content-Length"] = [b"%d" % length]
    return b"".join(name + b": " + value + b"\r\n" for name, values in fields.items() for value in values)


def can_be_joined(pairs: list[tuple[bytes, bytes]], length: int | None) -> bool:
    """When relayed_lines is to answer (the conditions its documentation gives)."""
    lowered = [name.lower() for name, _ in pairs]
    connection = [value.lower() for name, value in pairs if name.lower() == b"connection"]
    lengths = [value for name, value in pairs if name.lower() == b"content-length"]
    return (
        len(set(lowered)) == len(lowered)
        and all(value in (b"keep-alive", b"close") for value in connection)
        and len([name for name in lowered if name not in HOP_BY_HOP]) >= 2
        and (length is None or lengths == [b"%d" % length])
    )


@given(_PAIRS, st.sampled_from([None, 0, 5]))
@example([(b"Server", b"s"), (b"Connection", b"close"), (b"content-length", b"5")], 5)
@example([(b"x-a", b"1"), (b"X-A", b"2"), (b"etag", b"e")], None)
def test_the_lines_joined_as_they_came_are_the_general_ones(pairs, length) -> None:
    """
    relayed_lines answers exactly when no name repeats, Connection names no
    field, two fields or more are kept and the Content-Length (when a length
    is relayed) is written as the length is; then its lines are those the
    general way writes, and its shape says where Content-Length is and
    whether HSTS is there.
    """
    for _ in range(2):
        # Learnt, then remembered: the same answer.
        joined = relayed_lines(pairs, length)
        assert (joined is not None) == can_be_joined(pairs, length)
        if joined is not None:
            lines, shape = joined
            assert lines == general_lines(pairs, length)
            lowered = [name.lower() for name, _ in pairs]
            assert (shape.content_length_at >= 0) == (b"content-length" in lowered)
            assert shape.hsts == (b"strict-transport-security" in lowered)


def test_the_shapes_remembered_are_bounded() -> None:
    """
    Made-up names cannot grow the table past MAX_SHAPES; sections of orders
    not remembered are still joined right.
    """
    with mock.patch.object(relayedfields, "_shapes", {}):
        for number in range(MAX_SHAPES + 50):
            pairs = [(b"X-N%d" % number, b"v"), (b"Date", b"d")]
            lines, _ = relayed_lines(pairs, None)
            assert lines == b"X-N%d: v\r\nDate: d\r\n" % number
        assert len(relayedfields._shapes) == MAX_SHAPES
