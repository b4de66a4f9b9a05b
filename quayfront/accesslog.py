"""
The access log: one line per request, finished, failed or aborted, in
Quay's C{lb_logs} format (the nginx format Quay's own front end writes):

    $remote_addr ($proxy_protocol_addr) - $remote_user [$time_local]
    "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"
    ($request_time $request_length $upstream_response_time)

C{$remote_addr} is the socket peer (the load balancer on the PROXY
listener) and the parenthesised address is the client the PROXY header
named, or C{-} when the connection brought no header (the plain TLS
listener, exempt sources), as nginx's C{$proxy_protocol_addr}: a reader can
tell a PROXY-given address from a socket one.  C{$remote_user} is the user
name of an C{Authorization: Basic} header, as nginx logs it, else C{-}.
Formatting is a pure function of an L{AccessLogEntry}.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Callable

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
    listener: str = "-"
    client_port: int | None = None
    request_id: str = "-"
    # Sanitised PROXY TLV fields and TLS session details (connectioninfo).
    tlvs: dict[str, str] = field(default_factory=dict)
    tls: dict[str, str] = field(default_factory=dict)
    proxy_version: int | None = None
    # Why the exchange did not complete normally (client-closed,
    # upstream-unreachable, upstream-truncated, ...), or None.
    outcome: str | None = None
    # The Basic-auth user name (basic_auth_user), raw; escaped when written.
    remote_user: bytes | None = None


# A user name longer than this is cut in the log.
REMOTE_USER_MAX_BYTES = 128


def basic_auth_user(authorization: bytes | None) -> bytes | None:
    """
    The user name of an C{Authorization: Basic} header value (RFC 7617: the
    base64 of C{user:password}), or C{None} when there is none, it is
    empty, or the value is not valid Basic credentials.  The password never
    leaves this function.
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, _ = decoded.partition(b":")
    if not colon or not user:
        return None
    return user[:REMOTE_USER_MAX_BYTES]


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


def _proxy_client(entry: AccessLogEntry) -> str:
    """
    The parenthesised client: the PROXY header's, or C{-} without a header.
    """
    return entry.client if entry.proxy_version is not None else "-"


def _remote_user(entry: AccessLogEntry) -> str:
    """
    C{$remote_user}, escaped; a space is escaped too, so the field stays
    one word in the line.
    """
    if entry.remote_user is None:
        return "-"
    return _escape(entry.remote_user).replace(" ", "\\x20")


def format_quay_line(entry: AccessLogEntry) -> str:
    local = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(entry.timestamp))
    request_line = _escape(b" ".join((entry.method, entry.uri, entry.protocol)))
    upstream = (
        "-"
        if entry.upstream_response_time_s is None
        else "%.3f" % entry.upstream_response_time_s
    )
    return (
        f"{entry.socket_peer} ({_proxy_client(entry)}) - {_remote_user(entry)} [{local}] "
        f'"{request_line}" {entry.status} {entry.body_bytes_sent} '
        f'"{_escape(entry.referer)}" "{_escape(entry.user_agent)}" '
        f"({entry.request_time_s:.3f} {entry.request_length} {upstream})"
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else _escape(value)


def format_json_line(entry: AccessLogEntry) -> str:
    """
    One JSON object with every field; byte strings escaped as in the Quay
    format, so the line is ASCII and a client cannot break it.
    """
    document = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry.timestamp))
        + ".%03dZ" % (int(entry.timestamp * 1000) % 1000),
        "listener": entry.listener,
        "socket_peer": entry.socket_peer,
        "client": _proxy_client(entry),
        "client_port": entry.client_port if entry.proxy_version is not None else None,
        "remote_user": None if entry.remote_user is None else _remote_user(entry),
        "proxy_version": entry.proxy_version,
        "request_id": entry.request_id,
        "method": _escape(entry.method),
        "uri": _escape(entry.uri),
        "protocol": _escape(entry.protocol),
        "status": entry.status,
        "body_bytes_sent": entry.body_bytes_sent,
        "request_length": entry.request_length,
        "request_time_s": round(entry.request_time_s, 6),
        "upstream_response_time_s": None
        if entry.upstream_response_time_s is None
        else round(entry.upstream_response_time_s, 6),
        "referer": _text(entry.referer),
        "user_agent": _text(entry.user_agent),
        "outcome": entry.outcome,
        "proxy_tlvs": entry.tlvs,
        "tls": entry.tls,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True)


FORMATS: dict[str, Callable[[AccessLogEntry], str]] = {
    "quay": format_quay_line,
    "json": format_json_line,
}


class AccessLog(Service):
    """
    Writes formatted lines to a file (opened in append mode when the service
    starts, so twistd's privilege drop and log rotation see a real file) or
    to standard output for C{-}.
    """

    def __init__(self, path: str, format: str = "quay") -> None:
        self.path = path
        self.format = format
        self._formatter = FORMATS[format]
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
        self._file.write(self._formatter(entry) + "\n")
        if self.path == "-":
            self._file.flush()
