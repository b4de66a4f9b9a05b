"""
The field lines of a relayed response head, joined from the upstream's
fields as they came.

What a client is sent of an upstream's field section is what
L{quayfront.headers.client_response_fields} keeps: every field but the
hop-by-hop ones, the values of a repeated name gathered under its first
appearance, each name in the case Twisted's C{Headers} writes it.  Where no
name is repeated and C{Connection} names no field, that is every other field
in the order received, so the lines can be joined from the pairs in one call
(no dict built and walked per response).  Whether a section allows it
depends only on its names and their order, of which an upstream sends a
handful: learnt once per order of names and remembered (bounded).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Callable, NamedTuple

from quayfront.headers import HOP_BY_HOP, written_name

# The most orders of names remembered: an upstream that makes up names
# cannot grow the table beyond this; sections of new orders are then learnt
# each time (and relayed as ever).
MAX_SHAPES = 1_000
# Connection values (lower-cased) that name no field to remove.
_NOMINATING_NOTHING = frozenset({b"keep-alive", b"close"})
# The first item of each pair (a name), the second (a value).
_name_of = itemgetter(0)
_value_of = itemgetter(1)


class FieldShape(NamedTuple):
    """
    What a client is sent of a field section with a given order of names.

    @ivar names: the names of the fields kept, in order, in the case
        C{Headers} writes them.
    @ivar kept: picks the kept pairs out of the section (an C{itemgetter});
        None when every field is kept.
    @ivar connection_at: where the C{Connection} field is, or -1.
    @ivar content_length_at: where the C{Content-Length} field is, or -1.
    @ivar hsts: whether C{Strict-Transport-Security} is among them.
    """

    names: tuple[bytes, ...]
    kept: Callable[[list[tuple[bytes, bytes]]], tuple[tuple[bytes, bytes], ...]] | None
    connection_at: int
    content_length_at: int
    hsts: bool


# Order of names as received -> its shape, or None where the lines cannot
# be joined as they came (a repeated name, fewer than two fields kept).
_shapes: dict[tuple[bytes, ...], FieldShape | None] = {}
_UNLEARNT = object()


def field_shape(names: tuple[bytes, ...]) -> FieldShape | None:
    """
    The shape of a section with these names in this order; None if its
    lines cannot be joined as they came.
    """
    try:
        return _shapes[names]
    except KeyError:
        pass
    shape = _learn_shape(names)
    if len(_shapes) < MAX_SHAPES:
        _shapes[names] = shape
    return shape


def _learn_shape(names: tuple[bytes, ...]) -> FieldShape | None:
    lowered = [name.lower() for name in names]
    if len(set(lowered)) != len(lowered):
        # A repeated name: its values go under its first appearance.
        return None
    kept_at = [index for index, lower in enumerate(lowered) if lower not in HOP_BY_HOP]
    if len(kept_at) < 2:
        # itemgetter of one index gives the pair, not a tuple of pairs; rare
        # enough to leave to the general way.
        return None
    return FieldShape(
        names=tuple(written_name(names[index]) for index in kept_at),
        kept=None if len(kept_at) == len(names) else itemgetter(*kept_at),
        connection_at=lowered.index(b"connection") if b"connection" in lowered else -1,
        content_length_at=(
            lowered.index(b"content-length") if b"content-length" in lowered else -1
        ),
        hsts=b"strict-transport-security" in lowered,
    )


def relayed_lines(
    pairs: list[tuple[bytes, bytes]], length: int | None
) -> tuple[bytes, FieldShape] | None:
    """
    The field lines a client is sent of C{pairs} (an upstream's checked
    fields), each ended by CRLF, as the head built from
    L{quayfront.headers.client_response_fields} with C{Content-Length} set
    to C{length} (when not None) writes them; and the section's shape.
    None when they cannot be joined as they came: a repeated name, a
    C{Connection} that names a field, a C{Content-Length} written otherwise
    than C{length} is (leading zeros, a list).
    """
    names = tuple(map(_name_of, pairs))
    shape = _shapes.get(names, _UNLEARNT)
    if shape is _UNLEARNT:
        shape = field_shape(names)
    if shape is None:
        return None
    at = shape.connection_at
    if at >= 0 and pairs[at][1].lower() not in _NOMINATING_NOTHING:
        return None
    if length is not None:
        at = shape.content_length_at
        if at < 0 or pairs[at][1] != b"%d" % length:
            return None
    kept = shape.kept
    values = map(_value_of, pairs if kept is None else kept(pairs))
    return b"\r\n".join(map(b": ".join, zip(shape.names, values))) + b"\r\n", shape
