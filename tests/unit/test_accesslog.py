"""
The access log line: Quay's lb_logs format, escaped.
"""

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quayfront.accesslog import (
    AccessLog,
    AccessLogEntry,
    _escape,
    basic_auth_user,
    format_json_line,
    format_quay_line,
)


def entry(**overrides) -> AccessLogEntry:
    fields = dict(
        timestamp=1795470600.0,  # 2026-11-23 21:50:00 UTC
        socket_peer="127.0.0.1",
        client="203.0.113.7",
        method=b"PATCH",
        uri=b"/v2/lib/app/blobs/uploads/8f0e",
        protocol=b"HTTP/1.1",
        status=202,
        body_bytes_sent=0,
        referer=None,
        user_agent=b"skopeo/1.9.3",
        request_time_s=1.23456,
        request_length=67109000,
        upstream_response_time_s=1.2,
        # Through the PROXY listener: the parenthesised client is the header's.
        proxy_version=1,
    )
    fields.update(overrides)
    return AccessLogEntry(**fields)


def test_quay_format() -> None:
    """Socket peer, (client), request, status, bytes, referer, agent and timings, as Quay's nginx."""
    assert format_quay_line(entry()) == (
        '127.0.0.1 (203.0.113.7) - - [23/Nov/2026:21:50:00 +0000] '
        '"PATCH /v2/lib/app/blobs/uploads/8f0e HTTP/1.1" 202 0 "-" "skopeo/1.9.3" '
        "(1.235 67109000 1.200)"
    )


def test_no_upstream_time_is_a_dash() -> None:
    """Requests quayfront answered itself have no upstream time."""
    assert format_quay_line(entry(upstream_response_time_s=None)).endswith("67109000 -)")


def test_client_bytes_are_escaped() -> None:
    """Quotes, backslashes, control and non-ASCII bytes cannot forge fields or reach a terminal raw."""
    line = format_quay_line(entry(user_agent=b'x" 200 "\x1b[31m\\\xff', uri=b"/a\nb"))
    assert '"x\\x22 200 \\x22\\x1B[31m\\x5C\\xFF"' in line
    assert "/a\\x0Ab" in line
    assert "\n" not in line and "\x1b" not in line


def test_json_format_carries_every_field() -> None:
    """The JSON line has the addresses, request, timings, TLVs and TLS fields, in ASCII."""
    import json

    from quayfront.accesslog import format_json_line

    line = format_json_line(
        entry(
            listener="proxy",
            client_port=51000,
            request_id="lb-req-42",
            tlvs={"authority": "registry.example"},
            tls={"version": "TLSv1.3"},
            proxy_version=2,
            outcome="client-closed",
            user_agent=b"ua\xff",
        )
    )
    assert line.isascii() and "\n" not in line
    doc = json.loads(line)
    assert doc["time"] == "2026-11-23T21:50:00.000Z"
    assert (doc["socket_peer"], doc["client"], doc["client_port"]) == ("127.0.0.1", "203.0.113.7", 51000)
    assert doc["proxy_tlvs"] == {"authority": "registry.example"}
    assert doc["tls"] == {"version": "TLSv1.3"}
    assert doc["user_agent"] == "ua\\xFF"
    assert doc["referer"] is None
    assert (doc["status"], doc["outcome"], doc["request_id"]) == (202, "client-closed", "lb-req-42")


def test_no_proxy_header_prints_a_dash_for_the_proxy_client() -> None:
    """Without a PROXY header (plain TLS listener) the parenthesised client is -, as nginx's."""
    line = format_quay_line(entry(proxy_version=None, client="127.0.0.1"))
    assert line.startswith("127.0.0.1 (-) - - [")
    doc = json.loads(format_json_line(entry(proxy_version=None, client="127.0.0.1", client_port=5)))
    assert (doc["socket_peer"], doc["client"], doc["client_port"]) == ("127.0.0.1", "-", None)


def basic(credentials: bytes) -> bytes:
    return b"Basic " + base64.b64encode(credentials)


@pytest.mark.parametrize(
    "header, user",
    [
        (None, None),
        (b"", None),
        (basic(b"alice:s3cret"), b"alice"),
        (b"basic " + base64.b64encode(b"bob:x:y"), b"bob"),
        (basic(b"robot$quay+ci:token"), b"robot$quay+ci"),
        (basic(b":password-only"), None),
        (basic(b"no-colon"), None),
        (b"Basic !!not-base64!!", None),
        (b"Bearer eyJhbGciOi.x.y", None),
        (basic(b"u" * 300 + b":p"), b"u" * 128),
    ],
)
def test_basic_auth_user(header: bytes | None, user: bytes | None) -> None:
    """The user name of Basic credentials, never the password; anything else gives none."""
    assert basic_auth_user(header) == user


def test_remote_user_is_logged_escaped() -> None:
    """$remote_user is the Basic user, escaped, one word; - without one."""
    line = format_quay_line(entry(remote_user=b'al ice"\x1b'))
    assert ' - al\\x20ice\\x22\\x1B [' in line
    assert format_quay_line(entry(remote_user=b"alice")).startswith(
        "127.0.0.1 (203.0.113.7) - alice ["
    )
    assert json.loads(format_json_line(entry(remote_user=b"alice")))["remote_user"] == "alice"
    assert json.loads(format_json_line(entry()))["remote_user"] is None


def escaped_byte_by_byte(value: bytes) -> str:
    """nginx's escaping, spelled out one byte at a time."""
    return "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C) else "\\x%02X" % byte
        for byte in value
    )


@pytest.mark.parametrize("byte", range(256))
def test_each_byte_is_escaped_as_nginx_does(byte: int) -> None:
    """Each byte alone, and among plain ones, is written as itself or as \\xHH, as nginx does."""
    for value in (bytes([byte]), b"/v2/" + bytes([byte]) + b"/x", bytes([byte]) * 3):
        assert _escape(value) == escaped_byte_by_byte(value)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_escaped_as_nginx_does(value: bytes) -> None:
    """Any byte string is escaped exactly as the byte-by-byte definition says."""
    assert _escape(value) == escaped_byte_by_byte(value)


def test_escape_of_no_value_is_a_dash() -> None:
    """An absent referer or user agent is written as -; an empty one as nothing."""
    assert (_escape(None), _escape(b"")) == ("-", "")


@pytest.mark.parametrize(
    "timestamp, quay_time, json_time",
    [
        (1795470599.999, "23/Nov/2026:21:49:59", "2026-11-23T21:49:59.999Z"),
        (1795470600.0, "23/Nov/2026:21:50:00", "2026-11-23T21:50:00.000Z"),
        (1795470600.9995, "23/Nov/2026:21:50:00", "2026-11-23T21:50:00.999Z"),
        (1795470601.0005, "23/Nov/2026:21:50:01", "2026-11-23T21:50:01.000Z"),
        (1795470599.5, "23/Nov/2026:21:49:59", "2026-11-23T21:49:59.500Z"),
        (0.25, "01/Jan/1970:00:00:00", "1970-01-01T00:00:00.250Z"),
    ],
)
def test_times_are_to_the_second_rounded_down(
    timestamp: float, quay_time: str, json_time: str
) -> None:
    """Each line shows its own second (the fraction dropped), whatever was logged before it."""
    line = format_quay_line(entry(timestamp=timestamp))
    assert f"[{quay_time} +0000]" in line
    assert json.loads(format_json_line(entry(timestamp=timestamp)))["time"] == json_time


def test_lines_are_pinned_byte_for_byte() -> None:
    """Both formats of a full entry, byte for byte (escapes, nested fields, rounding)."""
    full = entry(
        listener="proxy",
        client_port=51000,
        request_id="lb-req-42",
        tlvs={"authority": "registry.example", "unique_id": 'a"b'},
        tls={"version": "TLSv1.3"},
        proxy_version=2,
        outcome="client-closed",
        user_agent=b'ua\xff"',
        referer=b"https://x.example/?q=\\",
        remote_user=b"al ice",
        timestamp=1795470600.9995,
    )
    assert format_quay_line(full) == (
        '127.0.0.1 (203.0.113.7) - al\\x20ice [23/Nov/2026:21:50:00 +0000] '
        '"PATCH /v2/lib/app/blobs/uploads/8f0e HTTP/1.1" 202 0 "https://x.example/?q=\\x5C" '
        '"ua\\xFF\\x22" (1.235 67109000 1.200)'
    )
    assert format_json_line(full) == (
        '{"time":"2026-11-23T21:50:00.999Z","listener":"proxy","socket_peer":"127.0.0.1",'
        '"client":"203.0.113.7","client_port":51000,"remote_user":"al\\\\x20ice",'
        '"proxy_version":2,"request_id":"lb-req-42","method":"PATCH",'
        '"uri":"/v2/lib/app/blobs/uploads/8f0e","protocol":"HTTP/1.1","status":202,'
        '"body_bytes_sent":0,"request_length":67109000,"request_time_s":1.23456,'
        '"upstream_response_time_s":1.2,"referer":"https://x.example/?q=\\\\x5C",'
        '"user_agent":"ua\\\\xFF\\\\x22","outcome":"client-closed",'
        '"proxy_tlvs":{"authority":"registry.example","unique_id":"a\\"b"},'
        '"tls":{"version":"TLSv1.3"}}'
    )


def test_access_log_writes_one_line_per_entry(tmp_path) -> None:
    """The file gets each entry's formatted line and a newline, in order."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "quay")
    log.startService()
    try:
        log.write(entry())
        log.write(entry(status=500, user_agent=None))
    finally:
        log.stopService()
    assert path.read_text() == "".join(
        format_quay_line(line) + "\n" for line in (entry(), entry(status=500, user_agent=None))
    )


_LOGGED_NAMES = st.sampled_from(
    [b"Referer", b"referer", b"REFERER", b"User-Agent", b"user-agent", b"Authorization",
     b"authorization", b"Host", b"Accept", b"X-Referer", b"User-Agents"]
)


@given(st.lists(st.tuples(_LOGGED_NAMES, st.binary(max_size=8)), max_size=8), st.booleans())
@settings(max_examples=300, deadline=None)
def test_logged_fields_are_the_first_of_each_name_whatever_the_case(fields, with_names) -> None:
    """The access log's Referer, User-Agent and Authorization are the first value of each, named in any case, with or without the framer's lower-cased names."""
    from quayfront.site import logged_fields

    def first(wanted: bytes):
        for name, value in fields:
            if name.lower() == wanted:
                return value
        return None

    names = [name.lower() for name, _ in fields] if with_names else None
    assert logged_fields(fields, names) == (
        first(b"referer"), first(b"user-agent"), first(b"authorization"))


def test_logged_fields_ignore_names_that_do_not_match_the_fields() -> None:
    """Names of another length than the fields (a head made elsewhere) are not trusted: the fields are read themselves."""
    from quayfront.site import logged_fields

    fields = [(b"User-Agent", b"docker/27"), (b"Referer", b"r")]
    assert logged_fields(fields, []) == (b"r", b"docker/27", None)


def reference_quay_line(entry: AccessLogEntry) -> str:
    """The Quay line field by field, as an f-string writes it."""
    from quayfront.accesslog import _quay_time

    upstream = "-" if entry.upstream_response_time_s is None else (
        "%.3f" % entry.upstream_response_time_s)
    remote_user = "-" if entry.remote_user is None else _escape(entry.remote_user).replace(
        " ", "\\x20")
    return (
        f"{entry.socket_peer} ({entry.client if entry.proxy_version is not None else '-'}) - "
        f"{remote_user} [{_quay_time(int(entry.timestamp // 1))}] "
        f'"{_escape(entry.method + b" " + entry.uri + b" " + entry.protocol)}" {entry.status} '
        f'{entry.body_bytes_sent} "{_escape(entry.referer)}" "{_escape(entry.user_agent)}" '
        f"({entry.request_time_s:.3f} {entry.request_length} {upstream})"
    )


_SOME_BYTES = st.one_of(st.none(), st.binary(max_size=12))
_SECONDS = st.one_of(
    st.floats(min_value=0, max_value=1e6), st.integers(0, 10**6),
    st.sampled_from([float("nan"), float("inf"), 0.0005, 0.0015, 2.0005]),
)


@given(
    st.floats(min_value=0, max_value=4e9), st.binary(min_size=1, max_size=12),
    st.integers(0, 2**64), st.integers(0, 2**64), _SOME_BYTES, _SOME_BYTES, _SOME_BYTES,
    _SECONDS, st.one_of(st.none(), _SECONDS), st.sampled_from([None, 1, 2]),
)
def test_the_quay_line_in_one_operation_is_the_field_by_field_line(
    timestamp, uri, status, length, referer, user_agent, remote_user, request_time_s,
    upstream_s, proxy_version,
) -> None:
    """format_quay_line fills its line in one operation; the line is the one built field by field."""
    entry = AccessLogEntry(
        timestamp=timestamp, socket_peer="127.0.0.1", client="192.0.2.1", method=b"GET",
        uri=uri, protocol=b"HTTP/1.1", status=status, body_bytes_sent=length, referer=referer,
        user_agent=user_agent, request_time_s=request_time_s, request_length=length,
        upstream_response_time_s=upstream_s, proxy_version=proxy_version,
        remote_user=remote_user,
    )
    assert format_quay_line(entry) == reference_quay_line(entry)
