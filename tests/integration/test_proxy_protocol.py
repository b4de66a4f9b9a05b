"""
The PROXY listener against real senders: HAProxy with its TLV options,
curl's own header, raw sockets for the trust rules, the header deadline and
invalid input.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration import harness
from tests.integration.harness import LOOPBACK, curl, wait_for

pytestmark = pytest.mark.integration

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

HAPROXY_TLS_CONFIG = """\
global
    maxconn 256
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m

frontend fe_tls
    bind 127.0.0.1:{port} ssl crt {pem}
    unique-id-format lb-%[uuid()]
    default_backend be_quayfront

backend be_quayfront
    server quayfront 127.0.0.1:{backend_port} ssl verify none send-proxy-v2-ssl-cn proxy-v2-options authority,crc32c,unique-id,ssl-cipher,cert-sig,cert-key
"""


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def quayfront_output_lines(proc: harness.Process, needle: str) -> list[str]:
    return [line for line in proc.output().splitlines() if needle in line]


def test_haproxy_ssl_tlvs_reach_log_and_upstream(tmp_path, dev_cert, start_quayfront, echo_upstream):
    """HAProxy terminating client TLS sends SSL, AUTHORITY, UNIQUE_ID and CRC32C TLVs; quayfront verifies and uses them."""
    config = write_config(
        tmp_path / "quayfront.toml",
        '[proxy_listener]\ntlv_headers = { authority = "X-Proxy-Authority", ssl_version = "X-Client-TLS" }\n'
        '[access_log]\nformat = "json"\n',
    )
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}", extra=("--config", str(config))
    )
    cert, key = dev_cert
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    port = harness.free_port()
    cfg = write_config(
        tmp_path / "haproxy-tls.cfg",
        HAPROXY_TLS_CONFIG.format(port=port, pem=pem, backend_port=qf.ports["proxy"]),
    )
    lb = harness.spawn("haproxy-tls", [harness.require_binary("haproxy"), "-db", "-f", str(cfg)], tmp_path)
    try:
        wait_for(lambda: harness.port_listening(port), 30, what="haproxy", abort=lb.died)
        result = curl(
            "--resolve", f"registry.example:{port}:127.0.0.1",
            "--interface", "127.0.0.21",
            "-H", "X-Proxy-Authority: forged",
            f"https://registry.example:{port}/v2/tlv",
            workdir=tmp_path / "curl",
        )
        assert result.status == 200, result.describe()
        echoed = dict((k.lower(), v) for k, v in json.loads(result.body)["headers"])
        assert echoed["x-proxy-authority"] == "registry.example"
        assert echoed["x-client-tls"].startswith("TLSv1.")
        assert echoed["x-forwarded-for"] == "127.0.0.21"
        assert echoed["x-request-id"].startswith("lb-")

        def logged():
            for line in harness.read_access_log(qf.extra["access_log"]):
                doc = json.loads(line)
                if doc["uri"] == "/v2/tlv":
                    return doc
            return None

        doc = wait_for(logged, 10, what="the JSON access log line")
        assert doc["client"] == "127.0.0.21" and doc["proxy_version"] == 2
        tlvs = doc["proxy_tlvs"]
        assert tlvs["authority"] == "registry.example"
        assert tlvs["unique_id"] == echoed["x-request-id"] == doc["request_id"]
        assert tlvs["ssl_version"].startswith("TLSv1.")
        assert "ssl_cipher" in tlvs
        assert doc["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    finally:
        lb.stop()


def test_curl_haproxy_protocol_header(tmp_path, start_quayfront, echo_upstream):
    """curl's own PROXY v1 header is read and its source becomes X-Forwarded-For."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}")
    result = curl(
        "--haproxy-protocol", "--interface", "127.0.0.22",
        f"https://127.0.0.1:{qf.ports['proxy']}/v2/x", workdir=tmp_path,
    )
    assert result.status == 200, result.describe()
    echoed = dict((k.lower(), v) for k, v in json.loads(result.body)["headers"])
    assert echoed["x-forwarded-for"] == "127.0.0.22"


def _connection_closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _refused(port: int, source: str, payload: bytes) -> bool:
    """
    Connect from C{source}, send C{payload}: True when the server closes or
    resets the connection (which, on loopback, may already show at connect).
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5, source_address=(source, 0)) as s:
            s.sendall(payload)
            return _connection_closed(s, 5)
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_untrusted_source_is_refused(tmp_path, start_quayfront, echo_upstream):
    """A source outside trusted_sources is disconnected with a log line, even with a valid header."""
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
        extra=("--proxy-trusted", "127.0.0.2/32"),
    )
    assert _refused(qf.ports["proxy"], "127.0.0.23", b"PROXY TCP4 203.0.113.1 127.0.0.1 1234 443\r\n")
    wait_for(lambda: quayfront_output_lines(qf, "untrusted-source"), 10, what="untrusted-source log line")
    [line] = quayfront_output_lines(qf, "untrusted-source")
    assert "127.0.0.23:" in line
    # The trusted load balancer still gets through.
    result = curl(
        "--haproxy-protocol", "--interface", "127.0.0.2",
        f"https://127.0.0.1:{qf.ports['proxy']}/v2/", workdir=tmp_path,
    )
    assert result.status == 200, result.describe()


def test_exempt_source_is_served_without_header(tmp_path, start_quayfront, echo_upstream):
    """An exempt source (a registry probing itself) speaks TLS directly on the PROXY listener."""
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
        # Exempt and trusted sources must not overlap: trust two other ones.
        extra=("--proxy-exempt", "127.0.0.24/32", "--proxy-trusted", "127.0.0.1/32,127.0.0.25/32"),
    )
    result = curl(
        "--interface", "127.0.0.24", f"https://127.0.0.1:{qf.ports['proxy']}/v2/", workdir=tmp_path
    )
    assert result.status == 200, result.describe()
    echoed = dict((k.lower(), v) for k, v in json.loads(result.body)["headers"])
    assert echoed["x-forwarded-for"] == "127.0.0.24"
    # Anyone else still has to send a header: plain TLS from another source fails.
    other = curl("--interface", "127.0.0.25", f"https://127.0.0.1:{qf.ports['proxy']}/v2/", workdir=tmp_path)
    assert other.status == 0


def _v2_header_with_crc(corrupt: bool) -> bytes:
    from quayfront.proxyprotocol._crc32c import crc32c

    addresses = socket.inet_aton("203.0.113.9") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 5000, 443)
    crc_tlv = b"\x03\x00\x04" + b"\x00\x00\x00\x00"
    body = addresses + crc_tlv
    header = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body
    checksum = crc32c(header) ^ (1 if corrupt else 0)
    return header[:-4] + struct.pack("!I", checksum)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n", "v1-bad-port"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 1\r\n", "v1-bad-address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 1\r\n", "v1-bad-address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 1\n", "v1-bad-crlf"),
        (b"GET / HTTP/1.1\r\n\r\n", "not-proxy-protocol"),
        (None, "v2-crc-mismatch"),
    ],
)
def test_invalid_headers_logged_with_reason(tmp_path, start_quayfront, echo_upstream, payload, reason):
    """Each invalid header closes the connection with one log line naming the peer and a stable reason."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}")
    if payload is None:
        payload = _v2_header_with_crc(corrupt=True)
    assert _refused(qf.ports["proxy"], "127.0.0.26", payload)
    wait_for(lambda: quayfront_output_lines(qf, f": {reason}: "), 10, what=f"a {reason} log line")
    lines = quayfront_output_lines(qf, "PROXY header rejected")
    assert len(lines) == 1 and "127.0.0.26:" in lines[0], lines
    assert "Traceback" not in qf.output()


def test_valid_crc32c_is_accepted(tmp_path, start_quayfront, echo_upstream):
    """A v2 header with a correct CRC32C TLV is accepted and TLS proceeds after it."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}")
    version = harness.tls_handshake(LOOPBACK, qf.ports["proxy"], preamble=_v2_header_with_crc(corrupt=False))
    assert version in ("TLSv1.2", "TLSv1.3")


def test_idle_headerless_connections_do_not_block_service(tmp_path, start_quayfront, echo_upstream):
    """1000 connections that never send a header cost little, do not delay a good request, and are closed on time."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(hard, 2500), hard), hard))
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}", extra=("--proxy-timeout", "4")
    )
    rss_before = harness.rss_bytes(qf.pid)
    idle = []
    try:
        opened_at = time.monotonic()
        for _ in range(1000):
            idle.append(socket.create_connection((LOOPBACK, qf.ports["proxy"]), timeout=5))
        started = time.monotonic()
        result = curl(
            "--haproxy-protocol", f"https://127.0.0.1:{qf.ports['proxy']}/v2/", workdir=tmp_path, timeout=10
        )
        elapsed = time.monotonic() - started
        assert result.status == 200, result.describe()
        assert elapsed < 2.0, f"a good request took {elapsed:.2f}s beside 1000 idle connections"
        rss_growth = harness.rss_bytes(qf.pid) - rss_before
        assert rss_growth < 16 * 1024 * 1024, f"1000 idle connections grew RSS by {rss_growth} bytes"

        # All of them are closed by the deadline (4 s after accept), not before it.
        if time.monotonic() - opened_at < 3.0:
            assert not _connection_closed(idle[-1], 0.1), "closed before its header deadline"
        deadline = opened_at + 4.0 + 10.0
        closed = 0
        for sock in idle:
            remaining = max(0.1, deadline - time.monotonic())
            if _connection_closed(sock, remaining):
                closed += 1
        assert closed == 1000
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: len(quayfront_output_lines(qf, ": timeout: ")) >= 1000, 10, what="1000 timeout log lines")


def test_startup_failures_exit_nonzero_with_reason(tmp_path, dev_cert):
    """A bad config or certificate stops quayfront at startup with the key and the reason, no traceback."""
    import datetime

    from tests.unit.certs import make_certificate, write_pair

    cert, key = dev_cert
    now = datetime.datetime.now(datetime.timezone.utc)
    bad_config = write_config(tmp_path / "bad.toml", "[proxy_listener]\nheader_timout_s = 5\n")
    _, other_key = write_pair(tmp_path, *make_certificate(), stem="other")
    expired = write_pair(
        tmp_path,
        *make_certificate(not_before=now - datetime.timedelta(days=9), not_after=now - datetime.timedelta(days=1)),
        stem="expired",
    )
    future = write_pair(tmp_path, *make_certificate(not_before=now + datetime.timedelta(days=1)), stem="future")
    encrypted = write_pair(tmp_path, *make_certificate(), stem="encrypted", password=b"secret")
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_bytes(cert.read_bytes())
    unreadable.chmod(0)
    not_pem = write_config(tmp_path / "not.pem", "hello\n")
    cases = [
        (["--config", str(bad_config), "--cert", str(cert), "--key", str(key)],
         "proxy_listener.header_timout_s: unknown key"),
        (["--cert", str(tmp_path / "missing.pem"), "--key", str(key)], "tls.cert: cannot read"),
        (["--cert", str(not_pem), "--key", str(key)], "tls.cert: " + str(not_pem) + " holds no PEM certificate"),
        (["--cert", str(cert), "--key", str(cert)], "tls.key:"),
        (["--cert", str(cert), "--key", str(other_key)], "the key does not match the certificate"),
        (["--cert", expired[0], "--key", expired[1]], "expired on"),
        (["--cert", future[0], "--key", future[1]], "is not valid before"),
        (["--cert", encrypted[0], "--key", encrypted[1]], "is encrypted"),
        (["--cert", str(cert), "--key", str(key), "--upstream", "ftp://x"], "upstream.url"),
    ]
    if os.geteuid() != 0:  # root reads any file
        cases.append((["--cert", str(unreadable), "--key", str(key)], "tls.cert: cannot read"))
    proxy_port, tls_port = harness.free_ports(2)
    # A port already taken: the setting and the reason, no traceback.
    taken = socket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen()
    busy_port = taken.getsockname()[1]
    cases.append(
        (["--cert", str(cert), "--key", str(key), "--proxy-listen", f"127.0.0.1:{busy_port}"],
         f"--proxy-listen: proxy_listener.address: cannot listen on 127.0.0.1:{busy_port}:"
         " Address already in use")
    )
    for args, expected in cases:
        argv = [*harness.twistd_command(), "-n", "--pidfile=", "quayfront",
                "--proxy-listen", f"127.0.0.1:{proxy_port}", "--listen", f"127.0.0.1:{tls_port}", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, cwd=harness.REPO_ROOT,
                              env=harness.quayfront_env())
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        assert expected in output, output
        assert "Traceback" not in output, output
    taken.close()
