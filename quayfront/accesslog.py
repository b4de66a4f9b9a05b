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
import functools
import json
import math
import os
import pwd
import stat
import sys
import time
from dataclasses import field
from typing import IO, Callable

from twisted.application.service import Service
from twisted.logger import Logger

from quayfront.http._endings import CLIENT_CLOSED_STATUS
from quayfront.http._record import frozen_record, maker

# The status nginx logs for a request whose client went away before the
# response started; operators' dashboards already know it.  One entry of
# the table of endings.
CLIENT_CLOSED_REQUEST = CLIENT_CLOSED_STATUS


# One is built per request: a frozen dataclass whose fields are stored in
# one go (frozen_record), not one object.__setattr__ call each.
@frozen_record
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
    # The route prefix the request took, as the request metrics label it
    # ("-" for none), when the site already knows it; None: the metrics
    # route the URI's path again (quayfront.metrics.MeteredAccessLog).
    route_label: str | None = None


#: Builds an L{AccessLogEntry} from the same arguments, without calling the
#: class (see quayfront.http._record.maker): what the request path uses.
make_access_log_entry = maker(AccessLogEntry)


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


# The bytes nginx writes as they are: printable ASCII except C{"} and C{\\}.
_PLAIN_BYTES = bytes(byte for byte in range(0x20, 0x7F) if byte not in (0x22, 0x5C))
# What each byte becomes in the log: itself if plain, else C{\\xHH}.
_ESCAPED_BYTES = tuple(
    chr(byte) if byte in _PLAIN_BYTES else "\\x%02X" % byte for byte in range(256)
)


def _escape(value: bytes | None) -> str:
    """
    nginx's escaping: C{"}, C{\\} and bytes outside printable ASCII become
    C{\\xHH}, so a client cannot forge fields or terminal escapes.
    """
    if value is None:
        return "-"
    # Nearly every value has nothing to escape: deleting the plain bytes
    # (one C call) tells, and the value is then written as it is.
    if not value.translate(None, _PLAIN_BYTES):
        return value.decode("ascii")
    return "".join([_ESCAPED_BYTES[byte] for byte in value])


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


# Requests ending in the same second share its text: formatting a time
# costs ten times more than finding it again.  time.gmtime ignores the
# fraction (rounding down), so the whole second is the key.
@functools.lru_cache(maxsize=4)
def _quay_time(second: int) -> str:
    """C{$time_local}, in UTC."""
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))


@functools.lru_cache(maxsize=4)
def _iso_time_to_the_second(second: int) -> str:
    """The JSON line's time, in UTC, without its milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


# The line, filled by one % operation (the fields formatted as str()
# formats them, the times with three decimals).
_QUAY_LINE = '%s (%s) - %s [%s] "%s" %s %s "%s" "%s" (%.3f %s %s)'


def format_quay_line(entry: AccessLogEntry) -> str:
    # Once per request: _proxy_client, _remote_user and _escape of an
    # absent field written in place (the same text, fewer calls).
    upstream_s = entry.upstream_response_time_s
    return _QUAY_LINE % (
        entry.socket_peer,
        entry.client if entry.proxy_version is not None else "-",
        "-" if entry.remote_user is None else _remote_user(entry),
        _quay_time(math.floor(entry.timestamp)),
        _escape(b" ".join((entry.method, entry.uri, entry.protocol))),
        entry.status,
        entry.body_bytes_sent,
        "-" if entry.referer is None else _escape(entry.referer),
        "-" if entry.user_agent is None else _escape(entry.user_agent),
        entry.request_time_s,
        entry.request_length,
        "-" if upstream_s is None else "%.3f" % upstream_s,
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else _escape(value)


# What json.dumps(document, separators=(",", ":"), ensure_ascii=True) uses,
# made once: json.dumps builds a new encoder on each call that passes options.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def format_json_line(entry: AccessLogEntry) -> str:
    """
    One JSON object with every field; byte strings escaped as in the Quay
    format, so the line is ASCII and a client cannot break it.
    """
    document = {
        "time": _iso_time_to_the_second(math.floor(entry.timestamp))
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
    return _JSON_ENCODER.encode(document)


FORMATS: dict[str, Callable[[AccessLogEntry], str]] = {
    "quay": format_quay_line,
    "json": format_json_line,
}


class AccessLog(Service):
    """
    Writes formatted lines to a file (opened in append mode when the service
    starts, so twistd's privilege drop and log rotation see a real file) or
    to standard output for C{-}.

    With C{to_twistd_log} (twistd daemonised: standard output is
    C{/dev/null}), C{-} sends each line to twistd's own log instead.
    L{reopen} opens the path afresh, for log rotation.
    """

    _log = Logger()

    def __init__(self, path: str, format: str = "quay", to_twistd_log: bool = False) -> None:
        self.path = path
        self.format = format
        self._formatter = FORMATS[format]
        self._file: IO[str] | None = None
        self._to_twistd_log = to_twistd_log and path == "-"

    def startService(self) -> None:
        super().startService()
        if self._to_twistd_log:
            return
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

    def reopen(self, why: str) -> bool:
        """
        Open the path again (after C{mv} by logrotate, new lines go to the
        new file); on failure keep writing to the open file and say why.
        """
        if self.path == "-" or self._file is None:
            return True
        try:
            new = open(self.path, "a", buffering=1, encoding="ascii")
        except OSError as e:
            self._log.error(
                "access log not reopened ({why}): access_log.path: cannot open {path}:"
                " {reason}; still writing to the file already open",
                why=why,
                path=self.path,
                reason=e.strerror,
            )
            return False
        old, self._file = self._file, new
        old.close()
        self._log.info("access log reopened ({why}): {path}", why=why, path=self.path)
        return True

    def write(self, entry: AccessLogEntry) -> None:
        if self._to_twistd_log:
            if self.running:
                self._log.info("{line}", line=self._formatter(entry))
            return
        if self._file is None:
            return
        # One write(2) per line on an O_APPEND file: lines from several
        # worker processes never tear or interleave.
        os.write(self._file.fileno(), (self._formatter(entry) + "\n").encode("ascii"))


def access_log_problem(path: str, uid: int | None = None, gid: int | None = None) -> str | None:
    """
    Why quayfront, running as C{uid}/C{gid} (after twistd's C{-u}/C{-g}; the
    current user when C{None}), could not append to the access log at
    C{path}; C{None} when it can.  Decided from the file's or its
    directory's owner and mode bits (ACLs are not consulted), without
    creating anything.
    """
    if path == "-":
        return None
    if uid is None:
        uid = os.geteuid()
    if gid is None:
        gid = os.getegid() if uid == os.geteuid() else _primary_gid(uid)
    groups = _groups_of(uid, gid)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"cannot use {path}: {e.strerror}"
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return f"{path} is a directory"
        if not _may(st, uid, groups, write=True):
            return f"{path} is not writable by uid {uid}"
    try:
        dir_st = os.stat(directory)
    except FileNotFoundError:
        return f"directory {directory} does not exist"
    except OSError as e:
        return f"cannot use directory {directory}: {e.strerror}"
    if not stat.S_ISDIR(dir_st.st_mode):
        return f"{directory} is not a directory"
    # Reaching the file needs search permission; creating it (and reopening
    # after a rotation moved it) needs write permission on the directory.
    if not _may(dir_st, uid, groups, write=False):
        return f"directory {directory} is not searchable by uid {uid}"
    if st is None and not _may(dir_st, uid, groups, write=True):
        return f"cannot create {path}: directory {directory} is not writable by uid {uid}"
    return None


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def _groups_of(uid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        name = pwd.getpwuid(uid).pw_name
        groups.update(os.getgrouplist(name, gid))
    except KeyError:
        pass
    if uid == os.geteuid():
        groups.update(os.getgroups())
    return groups


def _may(st: os.stat_result, uid: int, groups: set[int], write: bool) -> bool:
    if uid == 0:
        return True
    if write:
        bits = (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)
    else:
        bits = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in groups:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])
