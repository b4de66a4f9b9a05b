"""
Rules for an upstream's response head, as a front holds it to them: a
bounded size and header count, a well-formed status line and field lines.
L{ResponseHeadChecker} is fed each line of a response head (1xx heads
included) and raises L{UpstreamMisbehaved} when a rule is broken, so that
the client gets 502 and the upstream connection is closed before the head
can grow quayfront's memory or be relayed.

Reasons (L{UpstreamMisbehaved.reason}):

  - C{upstream-head-too-large}: the head's lines, line ends included, over
    the limit (1xx heads count towards it).
  - C{upstream-too-many-headers}: more field lines than the limit.
  - C{upstream-bad-status-line}: not C{HTTP/1.0} or C{HTTP/1.1}, SP, three
    digits 100-599, then SP and a reason phrase (or nothing; some servers
    omit the phrase and its space).
  - C{upstream-bad-header}: a field line starting with whitespace (obs-fold,
    which a proxy must not relay as is: RFC 9112 section 5.2), without a
    colon, with a name that is not a token or a control byte in its value.
"""

from __future__ import annotations

import re

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [\t\x20-\x7e\x80-\xff]*)?\Z")
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\Z")


class UpstreamMisbehaved(Exception):
    """
    The upstream's response cannot be relayed: answer the client 502 and
    close the upstream connection.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason + (f": {detail}" if detail else ""))
        self.reason = reason
        self.detail = detail


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
            if not _STATUS_LINE.match(line):
                raise UpstreamMisbehaved(
                    "upstream-bad-status-line", line[:80].decode("ascii", "backslashreplace")
                )
            return
        if not line:
            return
        self._headers += 1
        if self._headers > self.max_headers:
            raise UpstreamMisbehaved("upstream-too-many-headers", f"over {self.max_headers}")
        if not _FIELD_LINE.match(line):
            raise UpstreamMisbehaved(
                "upstream-bad-header", line[:80].decode("ascii", "backslashreplace")
            )
