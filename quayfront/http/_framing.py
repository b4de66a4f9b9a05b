"""
A sans-IO framer for HTTP/1.1 requests as a server receives them (RFC 9112),
strict where the RFC allows a choice and at least as strict as nginx 1.22.

L{RequestFramer.feed} takes bytes as they arrive; L{RequestFramer.next_event}
answers L{NEED_DATA} or the next L{RequestHead}, L{BodyData} or
L{MessageEnd}, or raises L{PeerMisbehaved} (carrying the status to answer
with) as soon as the bytes seen so far prove the input is not a request this
framer accepts.  Each event carries C{raw}, the exact wire bytes it was
framed from (the framer is the only parser of client bytes; nothing else
re-reads them); the verdict does not depend on how the input was split.

The rules, each with its reason code (L{PeerMisbehaved.reason}) and status:

  - C{bare-lf} (400): a LF not preceded by CR, in the head, a chunk-size
    line or a trailer (RFC 9112 section 2.2 allows a recipient to accept
    it; a front that accepts what the upstream may not is a smuggling
    vector).  C{bare-cr} (400): a CR not followed by LF.
  - C{bad-request-line} (400): not exactly C{method SP target SP version};
    a method that is not a token.  C{bad-version} (400): not C{HTTP/d.d};
    C{unsupported-version} (505): any version but 1.0 and 1.1.
  - C{bad-request-target} (400): a byte outside printable US-ASCII (a
    control byte 0x00-0x1F or 0x7F, or a byte above 0x7F) or a C{#} in the
    target; raised as soon as such a byte arrives, before the line ends.
  - C{request-line-too-long} (414): a request line over
    L{MAX_REQUEST_LINE_BYTES}.
  - C{head-too-large} (431): a head over L{MAX_HEAD_BYTES} (so also any one
    header line over it), raised as soon as the bytes exceed it.
    C{too-many-headers} (431): more than L{MAX_HEADER_COUNT} field lines.
  - C{obs-fold} (400): a field line starting with SP or HTAB (obsolete line
    folding, or leading whitespace before the first field; RFC 9112 section
    5.2 and 2.2).
  - C{bad-header} (400): a field line without a colon, a name that is not a
    token or whitespace before the colon (RFC 9112 section 5.1), a control
    byte other than HTAB in a value.
  - C{missing-host}, C{duplicate-host}, C{bad-host} (400): an HTTP/1.1
    request without exactly one C{Host}, or a C{Host} that is not
    C{uri-host [":" port]} (RFC 9112 section 3.2); an HTTP/1.0 request may
    omit it.
  - C{transfer-encoding-http10} (400): C{Transfer-Encoding} on an HTTP/1.0
    request (RFC 9112 section 6.1).
  - C{unsupported-transfer-coding} (501): a transfer coding list other than
    exactly C{chunked} (C{identity}, C{gzip, chunked}, C{chunked, chunked},
    an empty value), as nginx answers.
  - C{transfer-encoding-with-content-length} (400): both (RFC 9112 section
    6.1 lets a server reject it; it is the classic smuggling vector).
  - C{bad-content-length} (400): a C{Content-Length} that is not 1*DIGIT, a
    list, a second C{Content-Length} line (even with the same value), or a
    value above 2**63-1.
  - C{bad-chunk-size} (400): a chunk-size line that is not 1 to 16 hex
    digits with an optional extension free of control bytes, a size above
    2**63-1, a chunk-size line over L{MAX_CHUNK_LINE_BYTES}, chunk data not
    followed by CRLF.  C{bad-trailer} (400): a malformed trailer line;
    C{trailer-too-large} (431): trailers over L{MAX_HEAD_BYTES}.

A head that arrived whole is framed in one pass (two regular expressions
over its field lines); anything the one-pass path is not sure of goes line
by line, which gives the same verdict and names the error.  Bodies are
handed on without being copied when nothing is buffered before them.
Either way the head carries what its one pass learnt of the fields (each
name lower-cased, the C{Host}, the first C{Expect}; L{head_facts}), so
that nothing after the framer walks them again.

Not httptools (llhttp): it parses a small head several times faster, but
by itself accepts C{Transfer-Encoding} on HTTP/1.0, a missing or repeated
C{Host} and a C{#} in the target, so the header rules here would still run
over its output, and its errors would have to be mapped onto the reason
codes above.

A request with neither C{Content-Length} nor C{Transfer-Encoding} has no
body (RFC 9112 section 6.3).  One empty line before a request line is
skipped (section 2.2; as Twisted's channel did).  After a request
that ends its connection (HTTP/1.0, or C{Connection: close}) the framer
accepts nothing more: later bytes are dropped without events.
"""

from __future__ import annotations

import enum
import re
from dataclasses import field
from operator import itemgetter
from types import SimpleNamespace

from ._record import frozen_record, maker

#: Longest request line (without CRLF): nginx's large_client_header_buffers.
MAX_REQUEST_LINE_BYTES = 8192
#: Longest request head, request line to the empty line, CRLFs included: the
#: 16 KiB Twisted's channel took, so clients meet the bound they always met.
MAX_HEAD_BYTES = 16384
#: Most field lines in one head (Twisted's channel took 500).
MAX_HEADER_COUNT = 100
#: Longest chunk-size line, extensions included, without its CRLF: below
#: the 1024 bytes at which Twisted's decoder refused it.
MAX_CHUNK_LINE_BYTES = 1023
#: Largest Content-Length or chunk size: what a signed 64-bit integer holds.
MAX_BODY_LENGTH = 2**63 - 1

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Request target: printable US-ASCII but "#" (a fragment is never sent).
_TARGET = re.compile(rb"[\x21\x22\x24-\x7e]+\Z")
_TARGET_BAD_BYTE = re.compile(rb"[^\x21\x22\x24-\x7e]")
# What no request line may hold (CR only as part of its CRLF, which the
# line-end rules check).
_REQUEST_LINE_BAD_BYTE = re.compile(rb"[^\x20-\x22\x24-\x7e\r]")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
# A field value after trimming OWS: VCHAR, obs-text, SP and HTAB.
_VALUE_BAD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\x00-\x08\x0a-\x1f\x7f]*)?\Z")
_DIGITS = re.compile(rb"[0-9]+\Z")
# Field lines, each with its CRLF, all valid (what parse_field_line
# accepts); and one field line's name and value without surrounding OWS.
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
# The value is matched greedily up to its last byte that is not SP or HTAB
# (a lazy quantifier retries the rest of the line at every byte, about
# twice the cost); on lines _FIELD_LINES accepted, the pairs are the same.
_FIELD_PAIR = re.compile(rb"([^:\r\n]+):[ \t]*((?:[^\r\n]*[^ \t\r\n])?)[ \t]*\r\n")
# A whole head, request line to empty line, in one match, as the line by
# line path would accept it: a token method, a target of the bytes it takes,
# HTTP/1.1 or HTTP/1.0, then field lines as _FIELD_LINES takes them (no CR or
# LF but in the CRLFs, no bytes between them).  Groups: method, target,
# version, the field lines.
_WHOLE_HEAD = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21\x22\x24-\x7e]+) (HTTP/1\.[01])\r\n"
    rb"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*)\r\n"
)
# Host = uri-host [ ":" port ]; uri-host is an IP-literal or a reg-name
# (which also covers IPv4 addresses), RFC 3986 section 3.2.2.
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\]"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)(?::[0-9]*)?\Z"
)


# The usual Host, a name or IPv4 address and a port: a part of what _HOST
# takes, found without its per-byte alternation.
_PLAIN_HOST = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=]+(?::[0-9]*)?\Z")


class PeerMisbehaved(Exception):
    """
    The client sent something that is not an acceptable request: answer
    with C{status} and close the connection.

    @ivar status: the HTTP status to answer with.
    @ivar reason: a short code for logs and metrics (see the module
        docstring).
    @ivar in_head: whether it was found in a request head (no request has
        been announced for it) rather than in the body of one.
    """

    def __init__(self, status: int, reason: str, detail: str = "", in_head: bool = True) -> None:
        super().__init__(f"{status} {reason}" + (f": {detail}" if detail else ""))
        self.status = status
        self.reason = reason
        self.detail = detail
        self.in_head = in_head


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: L{RequestFramer.next_event}: more bytes are needed.
NEED_DATA = _NeedData()


# The events below are made for every request: frozen records, stored in one
# go rather than one object.__setattr__ per field.
@frozen_record
class RequestHead:
    """
    A complete, valid request head.

    @ivar content_length: the body length, 0 for no body, or None for a
        chunked body.
    @ivar keep_alive: whether the connection may carry another request.
    """

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    content_length: int | None
    keep_alive: bool
    raw: bytes = field(repr=False)
    #: What the framer learnt of the fields in its one pass, so that no
    #: later stage walks them again: each name lower-cased, in order.
    names: list[bytes] = field(default_factory=list, repr=False, compare=False)
    #: The C{Host} value (there is one at most), or None.
    host: bytes | None = field(default=None, repr=False, compare=False)
    #: The first C{Expect} value, or None.
    expect: bytes | None = field(default=None, repr=False, compare=False)


@frozen_record
class BodyData:
    """
    Body bytes (C{data}, de-chunked), framed from C{raw}.
    """

    data: bytes
    raw: bytes = field(repr=False)


@frozen_record
class MessageEnd:
    """
    The request is complete; C{raw} is the last framing consumed (the last
    chunk and trailers), empty for a C{Content-Length} body.
    """

    trailers: list[tuple[bytes, bytes]]
    raw: bytes = field(repr=False)


#: Builds a L{RequestHead} without calling the class (see L{maker}): one per
#: request.
_make_head = maker(RequestHead)

#: The trailers of a request without chunks (never changed), and its end.
_NO_TRAILERS: list[tuple[bytes, bytes]] = []
_PLAIN_END = MessageEnd(_NO_TRAILERS, b"")


class _State(enum.Enum):
    HEAD = "head"
    BODY_LENGTH = "body-length"
    CHUNK_SIZE = "chunk-size"
    CHUNK_DATA = "chunk-data"
    CHUNK_CRLF = "chunk-crlf"
    TRAILER = "trailer"
    END = "end"
    CLOSED = "closed"
    ERROR = "error"


# EnumType has a __getattr__, so reading a member through its class
# (_State.HEAD) takes Python's slow attribute path, about 0.1 us, and the
# code below does so several times per request: it reads the same members
# through plain namespaces instead.
_STATES = SimpleNamespace(**_State.__members__)
# And, for the states read on every request, as module-level names: one
# lookup rather than two.
_HEAD = _STATES.HEAD
_BODY_LENGTH = _STATES.BODY_LENGTH
_CHUNK_SIZE = _STATES.CHUNK_SIZE
_CHUNK_DATA = _STATES.CHUNK_DATA
_CHUNK_CRLF = _STATES.CHUNK_CRLF
_TRAILER = _STATES.TRAILER
_END = _STATES.END
_CLOSED = _STATES.CLOSED
_ERROR = _STATES.ERROR


_BODY_BYTES = (_BODY_LENGTH, _CHUNK_DATA)
_name_of = itemgetter(0)


def _line_end(buffer: bytearray, start: int, scan_from: int, limit: int, reason: str,
              status: int, in_head: bool) -> int | None:
    """
    The index of the CRLF ending the line that starts at C{start}, or None
    if it is not complete yet; raises for a bare LF, a bare CR, or a line
    that already exceeds C{limit}.
    """
    lf = buffer.find(b"\n", scan_from)
    if lf < 0:
        cr = buffer.find(b"\r", scan_from)
        if 0 <= cr < len(buffer) - 1:
            raise PeerMisbehaved(400, "bare-cr", in_head=in_head)
        if len(buffer) - start > limit:
            raise PeerMisbehaved(status, reason, in_head=in_head)
        return None
    if lf == start or buffer[lf - 1] != 0x0D:
        raise PeerMisbehaved(400, "bare-lf", in_head=in_head)
    if buffer.find(b"\r", scan_from, lf - 1) >= 0:
        raise PeerMisbehaved(400, "bare-cr", in_head=in_head)
    if lf - 1 - start > limit:
        raise PeerMisbehaved(status, reason, in_head=in_head)
    return lf - 1


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }


# The fields whose values decide the framing, the connection's persistence or
# an answer of the channel's own: a head with none of them (the usual GET)
# needs only its Host checked.
_DECIDING_FIELDS = frozenset({b"transfer-encoding", b"content-length", b"connection", b"expect"})


def head_facts(
    version: bytes, headers: list[tuple[bytes, bytes]], names: list[bytes]
) -> tuple[int | None, bool, bytes | None, bytes | None]:
    """
    C{(content_length, keep_alive, host, expect)} of a head whose fields
    are C{headers} and whose lower-cased names are C{names}: the body
    length as L{body_framing} answers it (raising what it raises), whether
    the connection persists after the request, the C{Host} value and the
    first C{Expect} value (None when absent).
    """
    hosts = names.count(b"host")
    host = headers[names.index(b"host")][1] if hosts else None
    if _DECIDING_FIELDS.isdisjoint(names):
        # body_framing's verdict, in its order, for a head without
        # Transfer-Encoding or Content-Length.
        if hosts > 1:
            raise PeerMisbehaved(400, "duplicate-host")
        if host is None:
            if version == b"HTTP/1.1":
                raise PeerMisbehaved(400, "missing-host")
        elif not _PLAIN_HOST.match(host) and not _HOST.match(host):
            raise PeerMisbehaved(400, "bad-host")
        return 0, version == b"HTTP/1.1", host, None
    length = body_framing(version, headers)
    keep_alive = version == b"HTTP/1.1" and b"close" not in _connection_tokens(headers)
    expect = headers[names.index(b"expect")][1] if b"expect" in names else None
    return length, keep_alive, host, expect


_COMMON_METHODS = frozenset(
    (b"GET", b"HEAD", b"PUT", b"POST", b"PATCH", b"DELETE", b"OPTIONS")
)
_SUPPORTED_VERSIONS = frozenset((b"HTTP/1.1", b"HTTP/1.0"))


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """
    C{(method, target, version)} of a request line without its CRLF, or
    raise L{PeerMisbehaved}.
    """
    parts = line.split(b" ")
    if len(parts) != 3:
        if _TARGET_BAD_BYTE.search(line.replace(b" ", b"")):
            raise PeerMisbehaved(400, "bad-request-target")
        raise PeerMisbehaved(400, "bad-request-line")
    method, target, version = parts
    # The usual methods are tokens, the usual versions valid: no pattern
    # is run for them.
    if method not in _COMMON_METHODS and not _TOKEN.match(method):
        raise PeerMisbehaved(400, "bad-request-line", "method is not a token")
    if not _TARGET.match(target):
        raise PeerMisbehaved(400, "bad-request-target")
    if version not in _SUPPORTED_VERSIONS:
        if _VERSION.match(version) is None:
            raise PeerMisbehaved(400, "bad-version")
        raise PeerMisbehaved(505, "unsupported-version")
    return method, target, version


def parse_field_line(line: bytes, in_head: bool = True, reason: str = "bad-header"
                     ) -> tuple[bytes, bytes]:
    """
    C{(name, value)} of a field line without its CRLF, the value stripped of
    surrounding whitespace, or raise L{PeerMisbehaved}.
    """
    if line[:1] in (b" ", b"\t"):
        raise PeerMisbehaved(400, "obs-fold", in_head=in_head)
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.match(name):
        raise PeerMisbehaved(400, reason, "malformed field name", in_head=in_head)
    value = value.strip(b" \t")
    if _VALUE_BAD_BYTE.search(value):
        raise PeerMisbehaved(400, reason, "control byte in a field value", in_head=in_head)
    return name, value


def parse_content_length(value: bytes, in_head: bool = True) -> int:
    """
    A C{Content-Length} value as an integer, or raise L{PeerMisbehaved}.
    """
    if not _DIGITS.match(value) or len(value.lstrip(b"0")) > 19:
        raise PeerMisbehaved(400, "bad-content-length", in_head=in_head)
    length = int(value)
    if length > MAX_BODY_LENGTH:
        raise PeerMisbehaved(400, "bad-content-length", in_head=in_head)
    return length


def parse_chunk_size(line: bytes) -> int:
    """
    The size in a chunk-size line without its CRLF, or raise
    L{PeerMisbehaved}.
    """
    matched = _CHUNK_LINE.match(line)
    if matched is None:
        raise PeerMisbehaved(400, "bad-chunk-size", in_head=False)
    size = int(matched.group(1), 16)
    if size > MAX_BODY_LENGTH:
        raise PeerMisbehaved(400, "bad-chunk-size", in_head=False)
    return size


def valid_host(value: bytes) -> bool:
    """
    Whether C{value} is a C{Host} field value: C{uri-host [":" port]}, with
    a non-empty host.
    """
    return bool(_HOST.match(value))


def body_framing(version: bytes, headers: list[tuple[bytes, bytes]]) -> int | None:
    """
    The body length a request head announces (0 for none), or None for a
    chunked body; raise L{PeerMisbehaved} for the combinations refused.
    """
    codings: list[bytes] = []
    lengths: list[bytes] = []
    hosts: list[bytes] = []
    seen_te = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            seen_te = True
            codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
        elif lowered == b"content-length":
            lengths.append(value)
        elif lowered == b"host":
            hosts.append(value)
    if len(hosts) > 1:
        raise PeerMisbehaved(400, "duplicate-host")
    if not hosts and version == b"HTTP/1.1":
        raise PeerMisbehaved(400, "missing-host")
    if hosts and not valid_host(hosts[0]):
        raise PeerMisbehaved(400, "bad-host")
    if seen_te:
        # nginx's order: HTTP/1.0, then the coding, then Content-Length.
        if version != b"HTTP/1.1":
            raise PeerMisbehaved(400, "transfer-encoding-http10")
        if codings != [b"chunked"]:
            raise PeerMisbehaved(501, "unsupported-transfer-coding")
        if lengths:
            raise PeerMisbehaved(400, "transfer-encoding-with-content-length")
        return None
    if len(lengths) > 1:
        raise PeerMisbehaved(400, "bad-content-length", "repeated")
    if lengths:
        return parse_content_length(lengths[0])
    return 0


class RequestFramer:
    """
    Frames the requests of one client connection; see the module docstring
    for the rules.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = _HEAD
        # Head state: where the current line starts and how far the buffer
        # has been scanned for its end.
        self._line_start = 0
        self._scanned = 0
        self._skipped_empty_line = False
        self._request_line: tuple[bytes, bytes, bytes] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._keep_alive = True
        # Body states: bytes left in the body or the chunk.
        self._remaining = 0
        self._trailers: list[tuple[bytes, bytes]] = []
        # Body bytes fed while nothing was buffered, not yet framed.
        self._direct: bytes | None = None
        self._error: PeerMisbehaved | None = None
        #: The request line (or what had arrived of it) of a refused head,
        #: for the access log.
        self.refused_request_line = b""

    @property
    def head_in_progress(self) -> bool:
        """
        Whether bytes of a request head have arrived and the head is not
        complete yet.
        """
        return self._state is _HEAD and len(self._buffer) > 0

    @property
    def idle(self) -> bool:
        """
        Whether the framer waits for the first byte of a request: nothing
        is buffered and no request is under way (L{next_event} answers
        L{NEED_DATA}, and no head is in progress).
        """
        return self._state is _HEAD and not self._buffer and self._direct is None

    @property
    def buffered_bytes(self) -> int:
        """
        How many bytes have been fed and not yet framed into events (for an
        adapter that stops reading while it holds a pipelined request).
        """
        return len(self._buffer) + (len(self._direct) if self._direct is not None else 0)

    @property
    def closed(self) -> bool:
        """
        Whether a request that ends the connection has been framed.
        """
        return self._state is _CLOSED

    def feed(self, data: bytes) -> None:
        state = self._state
        if state is _CLOSED or state is _ERROR:
            return
        if self._direct is not None:
            self._buffer += self._direct
            self._direct = None
        if not self._buffer and state in _BODY_BYTES:
            # Body bytes with nothing buffered before them are handed on
            # without being copied through the buffer.
            self._direct = data
            return
        self._buffer += data

    def next_event(self) -> RequestHead | BodyData | MessageEnd | _NeedData:
        state = self._state
        if state is _HEAD:
            if not self._buffer:
                # Between requests, the usual case: nothing to scan.
                return NEED_DATA
        elif state is _END:
            # The end of a request without a body (or whose body is all
            # there): nothing left to check.
            if self._keep_alive:
                # _end_message(b"", _NO_TRAILERS) for a connection that
                # goes on, the usual case.
                self._state = _HEAD
                self._line_start = self._scanned = 0
                self._skipped_empty_line = False
                return _PLAIN_END
            return self._end_message(b"", _NO_TRAILERS)
        elif self._error is not None:
            raise self._error
        try:
            if state is _HEAD:
                if self._line_start == 0 and self._request_line is None:
                    # A head from its first byte: whole, the usual case?
                    head = self._whole_head()
                    if head is not None:
                        return head
                return self._next_head_lines()
            return self._next_event()
        except PeerMisbehaved as error:
            if self._state is _HEAD:
                self.refused_request_line = self._first_line()
            self._state = _ERROR
            self._error = error
            self._buffer = bytearray()
            raise

    def _first_line(self) -> bytes:
        buffer = self._buffer
        start = 2 if buffer[:2] == b"\r\n" else 0
        end = buffer.find(b"\n", start, start + MAX_REQUEST_LINE_BYTES)
        if end < 0:
            end = min(len(buffer), start + MAX_REQUEST_LINE_BYTES)
        return bytes(buffer[start:end]).rstrip(b"\r")

    def _take(self, count: int) -> bytes:
        buffer = self._buffer
        if count == len(buffer):
            # All of it (a head that came alone, the usual case).
            taken = bytes(buffer)
            buffer.clear()
            return taken
        with memoryview(buffer) as view:
            taken = bytes(view[:count])
        del self._buffer[:count]
        return taken

    def _take_body(self) -> bytes:
        """
        Up to C{self._remaining} body bytes, from the bytes fed directly if
        there are some, else from the buffer.
        """
        direct = self._direct
        if direct is None:
            data = self._take(min(self._remaining, len(self._buffer)))
        else:
            self._direct = None
            if len(direct) <= self._remaining:
                data = direct
            else:
                data = direct[: self._remaining]
                self._buffer += direct[self._remaining :]
        self._remaining -= len(data)
        return data

    def _next_event(self) -> RequestHead | BodyData | MessageEnd | _NeedData:
        state = self._state
        if state is _HEAD:
            return self._next_head()
        if state is _BODY_LENGTH:
            if not self._buffer and self._direct is None:
                return NEED_DATA
            data = self._take_body()
            if self._remaining == 0:
                self._state = _END
            return BodyData(data, data)
        if state is _CHUNK_SIZE:
            end = _line_end(self._buffer, 0, 0, MAX_CHUNK_LINE_BYTES, "bad-chunk-size", 400,
                            in_head=False)
            if end is None:
                return NEED_DATA
            size = parse_chunk_size(bytes(self._buffer[:end]))
            if size == 0:
                self._state = _TRAILER
                self._line_start = end + 2
                self._scanned = end + 2
                self._trailers = []
                return self._next_event()
            self._remaining = size
            self._state = _CHUNK_DATA
            # The chunk's bytes follow as events of their own: no copy.
            return BodyData(b"", self._take(end + 2))
        if state is _CHUNK_DATA:
            if not self._buffer and self._direct is None:
                return NEED_DATA
            data = self._take_body()
            if self._remaining == 0:
                self._state = _CHUNK_CRLF
            return BodyData(data, data)
        if state is _CHUNK_CRLF:
            if len(self._buffer) < 2:
                if self._buffer[:1] not in (b"", b"\r"):
                    raise PeerMisbehaved(400, "bad-chunk-size", "no CRLF after chunk data",
                                         in_head=False)
                return NEED_DATA
            if self._buffer[:2] != b"\r\n":
                raise PeerMisbehaved(400, "bad-chunk-size", "no CRLF after chunk data",
                                     in_head=False)
            self._state = _CHUNK_SIZE
            return BodyData(b"", self._take(2))
        if state is _TRAILER:
            return self._next_trailer()
        if state is _END:
            return self._end_message(b"", _NO_TRAILERS)
        # CLOSED: nothing more is accepted; ERROR is raised above.
        return NEED_DATA

    def _end_message(self, raw: bytes, trailers: list[tuple[bytes, bytes]]) -> MessageEnd:
        self._state = _HEAD if self._keep_alive else _CLOSED
        self._line_start = self._scanned = 0
        self._skipped_empty_line = False
        if not self._keep_alive:
            self._buffer = bytearray()
        if trailers is _NO_TRAILERS:
            # The end of a request without chunks, the same every time.
            return _PLAIN_END
        return MessageEnd(trailers, raw)

    def _next_trailer(self) -> MessageEnd | _NeedData:
        buffer = self._buffer
        while True:
            start = self._line_start
            end = _line_end(buffer, start, self._scanned, MAX_HEAD_BYTES, "trailer-too-large",
                            431, in_head=False)
            if end is None:
                # The last byte may be a CR whose LF is still to come.
                self._scanned = max(start, len(buffer) - 1)
                if len(buffer) > MAX_HEAD_BYTES:
                    raise PeerMisbehaved(431, "trailer-too-large", in_head=False)
                return NEED_DATA
            self._line_start = self._scanned = end + 2
            if self._line_start > MAX_HEAD_BYTES:
                raise PeerMisbehaved(431, "trailer-too-large", in_head=False)
            if end == start:
                return self._end_message(self._take(end + 2), self._trailers)
            self._trailers.append(
                parse_field_line(bytes(buffer[start:end]), in_head=False, reason="bad-trailer")
            )

    def _next_head(self) -> RequestHead | _NeedData:
        if not self._buffer:
            # Between requests, the usual case: nothing to scan.
            return NEED_DATA
        if self._line_start == 0 and self._request_line is None:
            head = self._whole_head()
            if head is not None:
                return head
        return self._next_head_lines()

    def _next_head_lines(self) -> RequestHead | _NeedData:
        """
        The head line by line, from where the last call left it.
        """
        buffer = self._buffer
        while True:
            start = self._line_start
            if self._request_line is None:
                limit, reason, status = MAX_REQUEST_LINE_BYTES, "request-line-too-long", 414
            else:
                limit, reason, status = MAX_HEAD_BYTES, "head-too-large", 431
            end = _line_end(buffer, start, self._scanned, limit, reason, status, in_head=True)
            if end is None:
                if self._request_line is None and _REQUEST_LINE_BAD_BYTE.search(
                    buffer, max(start, self._scanned)
                ):
                    # A byte no request line may hold is refused at once.
                    raise PeerMisbehaved(400, "bad-request-target")
                # The last byte may be a CR whose LF is still to come.
                self._scanned = max(start, len(buffer) - 1)
                if len(buffer) > MAX_HEAD_BYTES:
                    raise PeerMisbehaved(431, "head-too-large")
                return NEED_DATA
            self._line_start = self._scanned = end + 2
            if self._line_start > MAX_HEAD_BYTES:
                raise PeerMisbehaved(431, "head-too-large")
            line = bytes(buffer[start:end])
            if self._request_line is None:
                if not line and not self._skipped_empty_line and start == 0:
                    self._skipped_empty_line = True
                    continue
                self._request_line = parse_request_line(line)
                continue
            if line:
                if len(self._headers) >= MAX_HEADER_COUNT:
                    raise PeerMisbehaved(431, "too-many-headers")
                self._headers.append(parse_field_line(line))
                continue
            return self._head_complete(end + 2, [name.lower() for name, _ in self._headers])

    def _whole_head(self) -> RequestHead | None:
        """
        The common case in one pass: a whole head at the start of the
        buffer, within every limit and valid.  None whenever the line by
        line path below might decide otherwise (an incomplete or oversized
        head, a stray CR or LF, any line it would refuse): that path then
        runs and finds the same verdict, or the error with its reason.
        """
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
        if end <= 0:
            return None
        head_end = end + 4
        raw = bytes(buffer) if head_end == len(buffer) else bytes(buffer[:head_end])
        matched = _WHOLE_HEAD.fullmatch(raw)
        if matched is None:
            return None
        fields_start, fields_end = matched.span(4)
        # The request line ends 2 bytes before the field lines start.
        if fields_start - 2 > MAX_REQUEST_LINE_BYTES:
            return None
        headers = _FIELD_PAIR.findall(raw, fields_start, fields_end)
        if len(headers) > MAX_HEADER_COUNT:
            return None
        # What _head_complete does, for a head whose request line and fields
        # the framer did not keep (they are the locals here).
        method, target, version = matched.group(1, 2, 3)
        names = list(map(bytes.lower, map(_name_of, headers)))
        length, keep_alive, host, expect = head_facts(version, headers, names)
        if head_end == len(buffer):
            buffer.clear()
        else:
            del buffer[:head_end]
        self._keep_alive = keep_alive
        self._scanned = 0
        self._enter_body(length)
        return _make_head(
            method, target, version, headers, length, keep_alive, raw, names, host, expect
        )

    def _enter_body(self, length: int | None) -> None:
        # Where a head that says C{length} leaves the framer: a chunked
        # body (None), so many body bytes, or the end of the request.
        if length is None:
            self._state = _CHUNK_SIZE
        elif length:
            self._state = _BODY_LENGTH
            self._remaining = length
        else:
            self._state = _END

    def _head_complete(self, head_end: int, names: list[bytes]) -> RequestHead:
        method, target, version = self._request_line
        headers = self._headers
        length, keep_alive, host, expect = head_facts(version, headers, names)
        raw = self._take(head_end)
        self._request_line = None
        self._headers = []
        self._keep_alive = keep_alive
        self._line_start = self._scanned = 0
        self._enter_body(length)
        return _make_head(
            method, target, version, headers, length, keep_alive, raw, names, host, expect
        )
