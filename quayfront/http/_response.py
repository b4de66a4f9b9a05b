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


# The line rules as Agent's parser used them, until it is replaced.
_OLD_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [\t\x20-\x7e\x80-\xff]*)?\Z")
_OLD_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\Z")


class ResponseHeadChecker:
    """
    Checks the lines of the response heads to one request.
    """

    def __init__(self, max_head_bytes: int, max_headers: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self._head_bytes = 0
        self._headers = 0

    def too_long(self) -> None:
        """
        A line is already longer than the whole head may be.
        """
        raise UpstreamMisbehaved("upstream-head-too-large", f"over {self.max_head_bytes} bytes")

    def line(self, line: bytes, is_status_line: bool) -> None:
        """
        Check one head line, without its line end (C{\\n} or C{\\r\\n}).
        """
        self._head_bytes += len(line) + 2
        if self._head_bytes > self.max_head_bytes:
            self.too_long()
        line = line[:-1] if line[-1:] == b"\r" else line
        if is_status_line:
            if not _OLD_STATUS_LINE.match(line):
                raise UpstreamMisbehaved(
                    "upstream-bad-status-line", line[:80].decode("ascii", "backslashreplace")
                )
            return
        if not line:
            return
        self._headers += 1
        if self._headers > self.max_headers:
            raise UpstreamMisbehaved("upstream-too-many-headers", f"over {self.max_headers}")
        if not _OLD_FIELD_LINE.match(line):
            raise UpstreamMisbehaved(
                "upstream-bad-header", line[:80].decode("ascii", "backslashreplace")
            )
