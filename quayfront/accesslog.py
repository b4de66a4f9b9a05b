"""
The access log: one line per request, finished, failed or aborted, in
Quay's C{lb_logs} format (the nginx format Quay's own front end writes):

    $remote_addr ($proxy_protocol_addr) - $remote_user [$time_local]
    "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"
    ($request_time $request_length $upstream_response_time)

C{$remote_addr} is the socket peer (the load balancer on the PROXY
listener) and the parenthesised address is the client quayfront vouches for.
Formatting is a pure function of an L{AccessLogEntry}.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO

from twisted.application.service import Service

# The status nginx logs for a request whose client went away before the
# response started; operators' dashboards already know it.
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class AccessLogEntry:
    timestamp: float
    socket_peer: str
    client: str
    method: bytes
    uri: bytes
    protocol: bytes
    status: int
    body_bytes_sent: int
    referer: bytes | None
    user_agent: bytes | None
    request_time_s: float
    request_length: int
    upstream_response_time_s: float | None


def _escape(value: bytes | None) -> str:
    """
    nginx's escaping: C{"}, C{\\} and bytes outside printable ASCII become
    C{\\xHH}, so a client cannot forge fields or terminal escapes.
    """
    if value is None:
        return "-"
    out = []
    for byte in value:
        if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C):
            out.append(chr(byte))
        else:
            out.append("\\x%02X" % byte)
    return "".join(out)


def format_quay_line(entry: AccessLogEntry) -> str:
    local = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(entry.timestamp))
    request_line = _escape(b" ".join((entry.method, entry.uri, entry.protocol)))
    upstream = (
        "-"
        if entry.upstream_response_time_s is None
        else "%.3f" % entry.upstream_response_time_s
    )
    return (
        f"{entry.socket_peer} ({entry.client}) - - [{local}] "
        f'"{request_line}" {entry.status} {entry.body_bytes_sent} '
        f'"{_escape(entry.referer)}" "{_escape(entry.user_agent)}" '
        f"({entry.request_time_s:.3f} {entry.request_length} {upstream})"
    )


class AccessLog(Service):
    """
    Writes formatted lines to a file (opened in append mode when the service
    starts, so twistd's privilege drop and log rotation see a real file) or
    to standard output for C{-}.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def startService(self) -> None:
        super().startService()
        if self.path == "-":
            # twistd redirects sys.stdout into its own log; the access log
            # must stay one clean line per request.
            self._file = sys.__stdout__
        else:
            self._file = open(self.path, "a", buffering=1, encoding="ascii")

    def stopService(self) -> None:
        super().stopService()
        if self._file is not None and self.path != "-":
            self._file.close()
        self._file = None

    def write(self, entry: AccessLogEntry) -> None:
        if self._file is None:
            return
        self._file.write(format_quay_line(entry) + "\n")
        if self.path == "-":
            self._file.flush()
