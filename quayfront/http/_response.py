"""
Rules for an upstream's response head, as a front holds it to them: a
bounded size and header count, a well-formed status line and field lines,
an unambiguous body length.  L{quayfront.http._upstream.ResponseReader}
applies them to every head it reads (1xx heads included) and raises
L{UpstreamMisbehaved} when one is broken, so that the client gets 502 and
the upstream connection is closed before the head can grow quayfront's
memory or be relayed.

Reasons (L{UpstreamMisbehaved.reason}):

  - C{upstream-head-too-large}: the head's lines, line ends included, over
    the limit (1xx heads count towards it; so do trailer fields, on their
    own).
  - C{upstream-too-many-headers}: more field lines than the limit.
  - C{upstream-bad-status-line}: not C{HTTP/1.0} or C{HTTP/1.1}, SP, three
    digits 100-599, then SP and a reason phrase (or nothing; some servers
    omit the phrase and its space).
  - C{upstream-bad-header}: a field line starting with whitespace (obs-fold,
    which a proxy must not relay as is: RFC 9112 section 5.2), without a
    colon, with a name that is not a token or a control byte in its value.
  - C{upstream-bad-content-length}: a C{Content-Length} that is not digits,
    over 2^63-1, several different values, or one with
    C{Transfer-Encoding}.
  - C{upstream-bad-transfer-encoding}: a transfer coding other than
    C{chunked}, or any on an HTTP/1.0 response.
  - C{upstream-bad-chunk-size}: a chunk-size line that is not hex digits
    (with optional extensions), over 2^63-1 or over 1 KiB, or chunk data
    not followed by its line end.
  - C{upstream-switching-protocols}: a C{101}, never asked for.
"""

from __future__ import annotations

import re

_STATUS_LINE = re.compile(
    rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\Z"
)
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*\Z")
# A whole field section (each line with its line end) checked and split in
# one pass: per-line work in Python, and a second pass over the bytes, are
# most of a head's cost.  Every match is one whole line (it starts where a
# line starts, and neither the value nor the whitespace around it can hold
# CR or LF), so a section whose match count is its count of LFs, ending
# with one, is one whose every line follows the rules.  The leading
# whitespace is possessive and the value matched greedily up to its last
# byte that is not SP or HTAB, so that a line that fails is given up in
# time linear in its length.
_FIELD_LINES = re.compile(
    rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*+"
    rb"((?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)[ \t]*\r?\n",
    re.MULTILINE,
)


class UpstreamMisbehaved(Exception):
    """
    The upstream's response cannot be relayed: answer the client 502 and
    close the upstream connection.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason + (f": {detail}" if detail else ""))
        self.reason = reason
        self.detail = detail


def check_status_line(line: bytes) -> tuple[int, bytes, tuple[int, int]]:
    """
    The status, reason phrase and version of a status line without its line
    end, or raise L{UpstreamMisbehaved}.
    """
    matched = _STATUS_LINE.match(line)
    if matched is None:
        raise UpstreamMisbehaved(
            "upstream-bad-status-line", line[:80].decode("ascii", "backslashreplace")
        )
    minor, status, reason = matched.groups()
    return int(status), reason or b"", (1, int(minor))


def check_field_line(line: bytes) -> tuple[bytes, bytes]:
    """
    The name and value (without surrounding whitespace) of a field line
    without its line end, or raise L{UpstreamMisbehaved}.
    """
    matched = _FIELD_LINE.match(line)
    if matched is None:
        raise UpstreamMisbehaved(
            "upstream-bad-header", line[:80].decode("ascii", "backslashreplace")
        )
    return matched.group(1), matched.group(2)


def parse_field_block(block: bytes, max_headers: int) -> list[tuple[bytes, bytes]]:
    """
    The name and value pairs of a field section C{block} (every line with
    its line end, the blank line excluded), in order, or raise
    L{UpstreamMisbehaved} for the first line broken or the first line over
    C{max_headers}.
    """
    pairs = _FIELD_LINES.findall(block)
    if len(pairs) == block.count(b"\n") and block[-1:] in (b"\n", b""):
        if len(pairs) > max_headers:
            raise UpstreamMisbehaved("upstream-too-many-headers", f"over {max_headers}")
        return pairs
    # Slow path, for the error: the first rule broken, line by line.
    for count, line in enumerate(block.split(b"\n")[:-1], 1):
        if count > max_headers:
            raise UpstreamMisbehaved("upstream-too-many-headers", f"over {max_headers}")
        check_field_line(line[:-1] if line[-1:] == b"\r" else line)
    raise UpstreamMisbehaved("upstream-bad-header", "unterminated field line")
