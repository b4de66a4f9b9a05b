"""
An upstream's response to one request, read from bytes: free of I/O and of
Twisted.  L{ResponseReader} is fed what the upstream connection receives and
answers with events: the final response head (L{ResponseHead}), body bytes
(L{ResponseData}), the end of the response (L{ResponseEnd}).  A head, a
chunk size or a length that breaks the rules in L{quayfront.http._response}
raises L{UpstreamMisbehaved}: the response cannot be relayed, the connection
cannot be reused.

Framing is RFC 9112 section 6.3: the response to C{HEAD} and a C{204} or
C{304} have no body; otherwise C{Transfer-Encoding: chunked} (the only
transfer coding accepted), else C{Content-Length}, else the body ends when
the upstream closes the connection (L{ResponseReader.connection_closed}).
Interim C{1xx} heads are read and dropped (RFC 9110 section 15.2: a client
may ignore them), but count towards the head bound; C{101} is refused, since
quayfront never asks for an upgrade.

The reader's life is an explicit state machine in the manner of h11's
C{_state.py}: L{ReaderState} names the states, L{_TRANSITIONS} says which
event may follow which state, and an event the table does not allow raises
L{ReaderMisused} naming both.
"""

from __future__ import annotations

import enum
import re
from operator import itemgetter
from types import SimpleNamespace
from typing import NamedTuple

from ._response import (
    _FIELD_LINES,
    UpstreamMisbehaved,
    check_field_line,
    check_status_line,
    parse_field_block,
)

# Bounds of the chunked framing, whatever the head bound: a chunk-size line
# with extensions, and a length that fits a signed 64-bit integer.
MAX_RESPONSE_CHUNK_LINE_BYTES = 1024
MAX_RESPONSE_BODY_LENGTH = 2**63 - 1

_DIGITS = re.compile(rb"[0-9]+\Z")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?\Z")
_NO_BODY_STATUSES = frozenset((204, 304))
# The names framing looks at, lower-cased.
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONNECTION = b"connection"
# The names of a head's fields, in order -> where its Content-Length,
# Transfer-Encoding and Connection fields are (tuples of indices): an
# upstream answers with a handful of orders of names, so each is searched
# once.  Bounded, so that an upstream making up names cannot grow it.
_framing_fields_at: dict[tuple[bytes, ...], tuple[tuple[int, ...], ...]] = {}
_MAX_FRAMING_SHAPES = 1000
_name_of = itemgetter(0)
# A Connection field of one of these values (lower-cased) alone: whether
# the connection stays open, in HTTP/1.0 and 1.1 alike.
_KEEP_ALIVE_BY_CONNECTION = {b"keep-alive": True, b"close": False}

# Status lines already checked, as received (CR included, LF not) -> what
# check_status_line made of them: an upstream answers with a handful of
# them, and a lookup costs a fraction of the check.  Bounded, so that an
# upstream making up reason phrases cannot grow it.
_checked_status_lines: dict[bytes, tuple[int, bytes, tuple[int, int]]] = {}
_MAX_CHECKED_STATUS_LINES = 1000


# Members are looked up in the transition table on every move: hashed by
# identity (in C) rather than by Enum's own __hash__ (in Python); equality
# is identity either way.
_identity_hash = object.__hash__


class ReaderState(enum.Enum):
    """
    Where a L{ResponseReader} is in the response.
    """

    __hash__ = _identity_hash

    #: Reading a response head (after any number of 1xx heads).
    HEAD = "head"
    #: Reading a body of known length (C{Content-Length}).
    BODY_LENGTH = "body-length"
    #: Reading a chunk-size line.
    CHUNK_SIZE = "chunk-size"
    #: Reading the bytes of one chunk.
    CHUNK_DATA = "chunk-data"
    #: Reading the CRLF after a chunk's bytes.
    CHUNK_END = "chunk-end"
    #: Reading the trailer section after the last chunk.
    TRAILERS = "trailers"
    #: Reading a body that ends when the connection closes.
    BODY_UNTIL_CLOSE = "body-until-close"
    #: The response is complete.
    DONE = "done"
    #: The upstream broke the rules; nothing more is read.
    ERROR = "error"


class _Event(enum.Enum):
    """
    What moves a reader from one state to the next.
    """

    __hash__ = _identity_hash

    INTERIM_HEAD = "interim-head"
    HEAD_NO_BODY = "head-without-body"
    HEAD_LENGTH = "head-with-length"
    HEAD_CHUNKED = "head-chunked"
    HEAD_UNTIL_CLOSE = "head-until-close"
    BODY_BYTES = "body-bytes"
    BODY_COMPLETE = "body-complete"
    CHUNK_SIZE = "chunk-size"
    LAST_CHUNK = "last-chunk"
    CHUNK_COMPLETE = "chunk-complete"
    CHUNK_END = "chunk-end"
    TRAILERS_END = "trailers-end"
    CLOSED = "connection-closed"
    MISBEHAVED = "misbehaved"


_S, _E = ReaderState, _Event
_TRANSITIONS: dict[tuple[ReaderState, _Event], ReaderState] = {
    (_S.HEAD, _E.INTERIM_HEAD): _S.HEAD,
    (_S.HEAD, _E.HEAD_NO_BODY): _S.DONE,
    (_S.HEAD, _E.HEAD_LENGTH): _S.BODY_LENGTH,
    (_S.HEAD, _E.HEAD_CHUNKED): _S.CHUNK_SIZE,
    (_S.HEAD, _E.HEAD_UNTIL_CLOSE): _S.BODY_UNTIL_CLOSE,
    (_S.BODY_LENGTH, _E.BODY_BYTES): _S.BODY_LENGTH,
    (_S.BODY_LENGTH, _E.BODY_COMPLETE): _S.DONE,
    (_S.CHUNK_SIZE, _E.CHUNK_SIZE): _S.CHUNK_DATA,
    (_S.CHUNK_SIZE, _E.LAST_CHUNK): _S.TRAILERS,
    (_S.CHUNK_DATA, _E.BODY_BYTES): _S.CHUNK_DATA,
    (_S.CHUNK_DATA, _E.CHUNK_COMPLETE): _S.CHUNK_END,
    (_S.CHUNK_END, _E.CHUNK_END): _S.CHUNK_SIZE,
    (_S.TRAILERS, _E.TRAILERS_END): _S.DONE,
    (_S.BODY_UNTIL_CLOSE, _E.BODY_BYTES): _S.BODY_UNTIL_CLOSE,
    (_S.BODY_UNTIL_CLOSE, _E.CLOSED): _S.DONE,
}
# Misbehaviour is possible anywhere the upstream is still talking.
for _state in ReaderState:
    if _state not in (_S.DONE, _S.ERROR):
        _TRANSITIONS[(_state, _E.MISBEHAVED)] = _S.ERROR
del _state, _S, _E

_BODY_STATES = frozenset(
    (
        ReaderState.BODY_LENGTH,
        ReaderState.CHUNK_SIZE,
        ReaderState.CHUNK_DATA,
        ReaderState.CHUNK_END,
        ReaderState.TRAILERS,
        ReaderState.BODY_UNTIL_CLOSE,
    )
)


class ReaderMisused(Exception):
    """
    quayfront drove a L{ResponseReader} in a way its state does not allow
    (a programming error, never the upstream's doing).
    """


class Framing(enum.Enum):
    """
    How the body of a response is delimited.
    """

    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


# EnumType has a __getattr__, so reading a member through its class
# (ReaderState.HEAD) takes Python's slow attribute path, about 0.1 us, and the
# code below does so several times per request: it reads the same members
# through plain namespaces instead.
_STATES = SimpleNamespace(**ReaderState.__members__)
_EVENTS = SimpleNamespace(**_Event.__members__)
_FRAMINGS = SimpleNamespace(**Framing.__members__)
_BODY_COMPLETE = _Event.BODY_COMPLETE


# Events are named tuples: one is made per head and per read, and a
# frozen dataclass costs several times as much to build.


class ResponseHead(NamedTuple):
    """
    The final response head: status, reason phrase, version (C{(1, 0)} or
    C{(1, 1)}), the header fields as ordered pairs as received, how the body
    is framed, its length when known, and whether the upstream keeps the
    connection open after it.
    """

    status: int
    reason: bytes
    version: tuple[int, int]
    headers: list[tuple[bytes, bytes]]
    framing: Framing
    length: int | None
    keep_alive: bool


class ResponseData(NamedTuple):
    """
    Body bytes, de-chunked.
    """

    data: bytes


class ResponseEnd(NamedTuple):
    """
    The response is complete; C{delimited_by_close} when it was the
    upstream closing the connection that ended it (complete by HTTP's
    definition, but indistinguishable from a cut-off body).
    """

    delimited_by_close: bool = False


Event = ResponseHead | ResponseData | ResponseEnd

# An end is the same every time: made once.
_END = ResponseEnd()
# What a named tuple's own __new__ calls, without the Python frame of that
# __new__: tuple.__new__(ResponseHead, (status, ...)) is ResponseHead(status, ...).
_new_tuple = tuple.__new__


def _values_at(headers: list[tuple[bytes, bytes]], indices: tuple[int, ...]) -> list[bytes]:
    return [headers[index][1] for index in indices]


def framing_fields_at(names: tuple[bytes, ...]) -> tuple[tuple[int, ...], ...]:
    """
    Where the C{Content-Length}, C{Transfer-Encoding} and C{Connection}
    fields are among a head's field C{names} (in any case), in order: three
    tuples of indices.  Remembered for the next head of the same names.
    """
    lowered = [name.lower() for name in names]
    found = tuple(
        tuple(index for index, lower in enumerate(lowered) if lower == wanted)
        for wanted in (_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION)
    )
    if len(_framing_fields_at) < _MAX_FRAMING_SHAPES:
        _framing_fields_at[names] = found
    return found


class ResponseReader:
    """
    Reads one response from an upstream connection.

    @param method: the method of the request the response answers (the
        response to C{HEAD} has no body).
    @param max_head_bytes: the largest head, 1xx heads and line ends
        included; more is L{UpstreamMisbehaved} C{upstream-head-too-large}.
    @param max_headers: the most field lines in one head.
    """

    def __init__(self, method: bytes, max_head_bytes: int, max_headers: int) -> None:
        self._no_body = method == b"HEAD"
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.state = _STATES.HEAD
        self._buffer = b""
        # Head bytes of 1xx heads already consumed: they count towards the
        # bound of the final one.
        self._head_bytes_used = 0
        self._status_line_checked = False
        self._head_scanned = 0
        self._remaining = 0
        # Whether any byte of a response arrived (a retry is only safe
        # when none did).
        self.received_any = False
        self._pending_error: UpstreamMisbehaved | None = None

    def _move(self, event: _Event) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise ReaderMisused(
                f"event {event.value!r} is not allowed in state {self.state.value!r}"
            ) from None

    def _misbehaved(self, reason: str, detail: str = "") -> UpstreamMisbehaved:
        self._move(_EVENTS.MISBEHAVED)
        self._buffer = b""
        return UpstreamMisbehaved(reason, detail)

    @property
    def in_body(self) -> bool:
        """
        Whether the final head has been read and the body has not ended.
        """
        return self.state in _BODY_STATES

    @property
    def trailing_data(self) -> bytes:
        """
        Bytes received after the end of the response (an upstream that
        talks out of turn: the connection cannot be reused).
        """
        return self._buffer if self.state is _STATES.DONE else b""

    def receive(self, data: bytes) -> list[Event]:
        """
        Feed C{data} as received; the events it completes, in order.
        Raises L{UpstreamMisbehaved} when the upstream broke the rules;
        when it did so after events in the same data, those are returned
        and the error is raised by the next call (C{receive(b"")}), so no
        event is lost however the bytes were split.
        """
        if self.state is _STATES.DONE or self.state is _STATES.ERROR:
            if self.state is _STATES.DONE:
                self._buffer += data
                return []
            error, self._pending_error = self._pending_error, None
            if error is not None:
                raise error
            raise ReaderMisused(f"data received in state {self.state.value!r}")
        events: list[Event] = []
        try:
            return self._receive(data, events)
        except UpstreamMisbehaved as error:
            if not events:
                raise
            self._pending_error = error
            return events

    @property
    def failed(self) -> bool:
        """
        Whether the upstream broke the rules (the error is raised by the
        next L{receive} if it has not been yet).
        """
        return self.state is _STATES.ERROR

    def _receive(self, data: bytes, events: list[Event]) -> list[Event]:
        if data:
            self.received_any = True
        if self.state is _STATES.BODY_UNTIL_CLOSE and not self._buffer:
            # The common case of a streamed body: no copy.
            if data:
                self._move(_EVENTS.BODY_BYTES)
                events.append(_new_tuple(ResponseData, (data,)))
            return events
        if self.state is _STATES.BODY_LENGTH and not self._buffer:
            return self._length_body(data, events)
        if self.state is _STATES.HEAD and not self._buffer:
            # The common case of a response's first read: its head and a
            # body of known length (or none), without the loop below,
            # which takes whatever else there is (interim heads, a head in
            # pieces, chunks) as ever.
            self._buffer = data
            self._read_head(events)
            state = self.state
            if state is _STATES.BODY_LENGTH:
                buffer, self._buffer = self._buffer, b""
                if buffer:
                    self._length_body(buffer, events)
                return events
            if state is _STATES.DONE:
                return events
            data = b""
        self._buffer = self._buffer + data if self._buffer else data
        progress = None
        # Each step moves the state or consumes bytes, or the loop stops:
        # bounded by the data.
        while progress != (self.state, len(self._buffer)):
            progress = (self.state, len(self._buffer))
            state = self.state
            if state is _STATES.HEAD:
                self._read_head(events)
            elif state is _STATES.BODY_LENGTH:
                buffer, self._buffer = self._buffer, b""
                if buffer:
                    self._length_body(buffer, events)
            elif state is _STATES.BODY_UNTIL_CLOSE:
                buffer, self._buffer = self._buffer, b""
                if buffer:
                    self._move(_EVENTS.BODY_BYTES)
                    events.append(ResponseData(buffer))
            elif state is _STATES.CHUNK_SIZE:
                self._read_chunk_size()
            elif state is _STATES.CHUNK_DATA:
                self._read_chunk_data(events)
            elif state is _STATES.CHUNK_END:
                self._read_chunk_end()
            elif state is _STATES.TRAILERS:
                self._read_trailers(events)
        return events

    def connection_closed(self) -> ResponseEnd | None:
        """
        The upstream closed the connection.  A body delimited by the close
        ends here (a L{ResponseEnd}); a response already complete gives
        None; anything else raises L{ResponseIncomplete}.
        """
        if self.state is _STATES.DONE:
            return None
        if self.state is _STATES.BODY_UNTIL_CLOSE:
            self._move(_EVENTS.CLOSED)
            return ResponseEnd(delimited_by_close=True)
        raise ResponseIncomplete(self.state)

    # The head.

    def _read_head(self, events: list[Event]) -> None:
        buffer = self._buffer
        # The blank line that ends a head: CRLF CRLF, or bare LFs (RFC 9112
        # section 2.2 lets a recipient accept a bare LF as a line end).
        # Searched from where the last search stopped, so a head that
        # trickles in is not scanned again from its start on every read.
        scan_from = self._head_scanned
        end = buffer.find(b"\n\r\n", scan_from)
        if end >= 0:
            end += 3
        bare = buffer.find(b"\n\n", scan_from, end if end >= 0 else len(buffer))
        if bare >= 0:
            end = bare + 2
        limit = self.max_head_bytes - self._head_bytes_used
        if end < 0:
            self._head_scanned = max(0, len(buffer) - 2)
            if len(buffer) > limit:
                raise self._misbehaved("upstream-head-too-large", f"over {self.max_head_bytes} bytes")
            if not self._status_line_checked:
                # Refuse a bad status line at once, not after the head.
                line_end = buffer.find(b"\n")
                if line_end >= 0:
                    self._check_status_line(buffer[:line_end])
            return
        if end > limit:
            raise self._misbehaved("upstream-head-too-large", f"over {self.max_head_bytes} bytes")
        self._head_bytes_used += end
        self._buffer = buffer[end:]
        self._head_scanned = 0
        status_end = buffer.find(b"\n")
        line = buffer[:status_end]
        checked = _checked_status_lines.get(line)
        if checked is None:
            checked = self._check_status_line(line)
            if len(_checked_status_lines) < _MAX_CHECKED_STATUS_LINES:
                _checked_status_lines[line] = checked
        # The next head's status line (after an interim one) is checked anew.
        self._status_line_checked = False
        status, reason, version = checked
        # The field lines with their line ends, without the blank line,
        # split and checked in one pass (see _FIELD_LINES); a section it
        # does not wholly accept, or too many fields, goes to the general
        # rule, which names the first line broken.
        block_end = end - 2 if buffer[end - 2] == 13 else end - 1
        headers = _FIELD_LINES.findall(buffer, status_end + 1, block_end)
        if (
            len(headers) != buffer.count(b"\n", status_end + 1, block_end)
            or len(headers) > self.max_headers
        ):
            try:
                headers = parse_field_block(buffer[status_end + 1 : block_end], self.max_headers)
            except UpstreamMisbehaved as refused:
                raise self._misbehaved(refused.reason, refused.detail) from None
        if status < 200:
            if status == 101:
                raise self._misbehaved("upstream-switching-protocols", "101 to a request without Upgrade")
            # An interim response (100 Continue, 103 Early Hints): dropped.
            self._move(_EVENTS.INTERIM_HEAD)
            return
        self._final_head(status, reason, version, headers, events)

    def _check_status_line(self, line: bytes) -> tuple[int, bytes, tuple[int, int]]:
        if line[-1:] == b"\r":
            line = line[:-1]
        try:
            status, reason, version = check_status_line(line)
        except UpstreamMisbehaved as refused:
            raise self._misbehaved(refused.reason, refused.detail) from None
        self._status_line_checked = True
        return status, reason, version

    def _field(self, line: bytes) -> tuple[bytes, bytes]:
        try:
            return check_field_line(line)
        except UpstreamMisbehaved as refused:
            raise self._misbehaved(refused.reason, refused.detail) from None

    def _final_head(
        self,
        status: int,
        reason: bytes,
        version: tuple[int, int],
        headers: list[tuple[bytes, bytes]],
        events: list[Event],
    ) -> None:
        names = tuple(map(_name_of, headers))
        found = _framing_fields_at.get(names)
        if found is None:
            found = framing_fields_at(names)
        lengths_at, codings_at, connection_at = found
        # The values of each, in order, or None if it has none; the usual
        # single field without a comprehension (a function made and called).
        lengths = codings = connection = None
        if lengths_at:
            lengths = (
                [headers[lengths_at[0]][1]]
                if len(lengths_at) == 1
                else _values_at(headers, lengths_at)
            )
        if codings_at:
            codings = _values_at(headers, codings_at)
        if connection_at:
            connection = (
                [headers[connection_at[0]][1]]
                if len(connection_at) == 1
                else _values_at(headers, connection_at)
            )
        if connection is None:
            keep_alive = version[1] == 1
        else:
            # The usual single "keep-alive" or "close": what the tokens
            # would say of it, in either version, without splitting it.
            keep_alive = (
                _KEEP_ALIVE_BY_CONNECTION.get(connection[0].lower())
                if len(connection) == 1
                else None
            )
            if keep_alive is None:
                tokens = {
                    token.strip().lower() for value in connection for token in value.split(b",")
                }
                keep_alive = (
                    (b"keep-alive" in tokens) if version[1] == 0 else (b"close" not in tokens)
                )
        length: int | None = None
        if self._no_body or status in _NO_BODY_STATUSES:
            # RFC 9112 section 6.3 (1): whatever the fields say.
            framing = _FRAMINGS.NONE
            event = _EVENTS.HEAD_NO_BODY
            length = 0
        elif codings:
            coding = b",".join(codings).strip(b" \t").lower()
            if coding != b"chunked" or version != (1, 1):
                raise self._misbehaved(
                    "upstream-bad-transfer-encoding",
                    b",".join(codings)[:80].decode("ascii", "backslashreplace"),
                )
            if lengths:
                # Allowed to mean "chunked wins" (section 6.3 (3)), but a
                # sign of a confused or smuggling upstream: refused, as nginx.
                raise self._misbehaved(
                    "upstream-bad-content-length", "Content-Length with Transfer-Encoding"
                )
            framing = _FRAMINGS.CHUNKED
            event = _EVENTS.HEAD_CHUNKED
        elif lengths:
            value = lengths[0]
            if len(lengths) == 1 and len(value) < 19 and value.isdigit():
                # One plain value (the common case): what _content_length
                # answers for it, without its general checks; under 19
                # digits it cannot exceed MAX_RESPONSE_BODY_LENGTH.
                length = int(value)
            else:
                length = self._content_length(lengths)
            if length == 0:
                framing = _FRAMINGS.LENGTH
                event = _EVENTS.HEAD_NO_BODY
            else:
                framing = _FRAMINGS.LENGTH
                event = _EVENTS.HEAD_LENGTH
                self._remaining = length
        else:
            framing = _FRAMINGS.UNTIL_CLOSE
            event = _EVENTS.HEAD_UNTIL_CLOSE
            keep_alive = False
        try:
            self.state = _TRANSITIONS[self.state, event]
        except KeyError:
            self._move(event)
        events.append(
            _new_tuple(
                ResponseHead, (status, reason, version, headers, framing, length, keep_alive)
            )
        )
        if self.state is _STATES.DONE:
            events.append(_END)

    def _content_length(self, values: list[bytes]) -> int:
        # RFC 9110 section 8.6: a list of identical values is one value.
        found: set[bytes] = set()
        for value in values:
            for item in value.split(b","):
                found.add(item.strip(b" \t"))
        if len(found) != 1:
            raise self._misbehaved(
                "upstream-bad-content-length",
                b", ".join(values)[:80].decode("ascii", "backslashreplace"),
            )
        [text] = found
        if not _DIGITS.match(text) or len(text.lstrip(b"0")) > 19:
            raise self._misbehaved(
                "upstream-bad-content-length", text[:80].decode("ascii", "backslashreplace")
            )
        length = int(text)
        if length > MAX_RESPONSE_BODY_LENGTH:
            raise self._misbehaved("upstream-bad-content-length", text.decode("ascii"))
        return length

    # Bodies.

    def _length_body(self, data: bytes, events: list[Event]) -> list[Event]:
        remaining = self._remaining
        size = len(data)
        if size < remaining:
            self._remaining = remaining - size
            self._move(_EVENTS.BODY_BYTES)
            events.append(_new_tuple(ResponseData, (data,)))
            return events
        if size > remaining:
            self._buffer = data[remaining:]
            data = data[:remaining]
        self._remaining = 0
        if data:
            events.append(_new_tuple(ResponseData, (data,)))
        try:
            self.state = _TRANSITIONS[self.state, _BODY_COMPLETE]
        except KeyError:
            # Names the state and the event.
            self._move(_BODY_COMPLETE)
        events.append(_END)
        return events

    def _line(self, max_bytes: int, reason: str) -> bytes | None:
        """
        The next line of the buffer without its line end, or None if it is
        not complete yet.
        """
        buffer = self._buffer
        end = buffer.find(b"\n", 0, max_bytes + 1)
        if end < 0:
            if len(buffer) > max_bytes:
                raise self._misbehaved(reason, f"a line over {max_bytes} bytes")
            return None
        self._buffer = buffer[end + 1 :]
        line = buffer[:end]
        return line[:-1] if line[-1:] == b"\r" else line

    def _read_chunk_size(self) -> None:
        line = self._line(MAX_RESPONSE_CHUNK_LINE_BYTES, "upstream-bad-chunk-size")
        if line is None:
            return
        matched = _CHUNK_LINE.match(line)
        if matched is None:
            raise self._misbehaved(
                "upstream-bad-chunk-size", line[:80].decode("ascii", "backslashreplace")
            )
        size = int(matched.group(1), 16)
        if size > MAX_RESPONSE_BODY_LENGTH:
            raise self._misbehaved("upstream-bad-chunk-size", line.decode("ascii"))
        if size == 0:
            self._head_bytes_used = 0
            self._move(_EVENTS.LAST_CHUNK)
            return
        self._remaining = size
        self._move(_EVENTS.CHUNK_SIZE)

    def _read_chunk_data(self, events: list[Event]) -> None:
        buffer = self._buffer
        if not buffer:
            return
        remaining = self._remaining
        if len(buffer) < remaining:
            self._remaining = remaining - len(buffer)
            self._buffer = b""
            self._move(_EVENTS.BODY_BYTES)
            events.append(ResponseData(buffer))
            return
        self._buffer = buffer[remaining:]
        self._remaining = 0
        events.append(ResponseData(buffer[:remaining]))
        self._move(_EVENTS.CHUNK_COMPLETE)

    def _read_chunk_end(self) -> None:
        buffer = self._buffer
        if buffer[:2] == b"\r\n":
            self._buffer = buffer[2:]
        elif buffer[:1] == b"\n":
            self._buffer = buffer[1:]
        elif buffer in (b"", b"\r"):
            return
        else:
            raise self._misbehaved("upstream-bad-chunk-size", "chunk data longer than its size")
        self._move(_EVENTS.CHUNK_END)

    def _read_trailers(self, events: list[Event]) -> None:
        # Trailer fields are read, bounded like a head, and dropped (RFC
        # 9112 section 7.1.2 lets a recipient discard them).
        while True:
            limit = self.max_head_bytes - self._head_bytes_used
            before = len(self._buffer)
            line = self._line(limit, "upstream-head-too-large")
            if line is None:
                return
            self._head_bytes_used += before - len(self._buffer)
            if not line:
                self._move(_EVENTS.TRAILERS_END)
                events.append(ResponseEnd())
                return
            self._field(line)


class ResponseIncomplete(Exception):
    """
    The connection closed before the response was complete (in C{state}).
    """

    def __init__(self, state: ReaderState) -> None:
        super().__init__(f"connection closed in state {state.value!r}")
        self.state = state
