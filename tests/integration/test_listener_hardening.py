"""
Listener hardening against a real quayfront: the TLS handshake deadline on
both TLS listeners, custom vendor TLVs accepted end to end, the connection
cap, trust-configuration errors at startup, a PROXY header from an exempt
source, and the access log's fields for connections without a header.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration import harness
from tests.integration.harness import LOOPBACK, curl, wait_for
from tests.unit.proxy_encoder import FAMILY_TCP4, ipv4_addresses, v2_header

pytestmark = pytest.mark.integration

HANDSHAKE_TIMEOUT_S = 1.0
# How late a close may come after the deadline on a busy 2-core machine.
CLOSE_SLACK_S = 1.5


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def output_lines(proc: harness.Process, needle: str) -> list[str]:
    return [line for line in proc.output().splitlines() if needle in line]


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(port: int, line_start: str) -> float | None:
    for line in metrics_text(port).splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


class ManualTLSClient:
    """
    A TLS client over memory BIOs: it produces a real ClientHello and then
    answers the server only when told to (or never).
    """

    def __init__(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def client_hello(self) -> bytes:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()


def time_to_close(sock: socket.socket, limit_s: float) -> float | None:
    """
    Seconds until the server closes or resets C{sock} (data it sends is
    read and dropped), or C{None} if it is still open after C{limit_s}.
    """
    started = time.monotonic()
    deadline = started + limit_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return None
        except ConnectionResetError:
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started


def stalled_handshake(port: int, preamble: bytes, stage: str) -> float | None:
    """
    Open a connection, send C{preamble} (a PROXY header or nothing), then
    stall at C{stage}; return how long after that the server closed it.
    """
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        if preamble:
            sock.sendall(preamble)
        hello = ManualTLSClient().client_hello()
        if stage == "half-client-hello":
            sock.sendall(hello[: len(hello) // 2])
        elif stage == "stall-after-server-flight":
            sock.sendall(hello)
            sock.settimeout(5)
            first = sock.recv(65536)  # the server's flight: ServerHello onwards
            assert first[:1] == b"\x16", first[:16]
        return time_to_close(sock, HANDSHAKE_TIMEOUT_S + CLOSE_SLACK_S + 3)


@pytest.fixture
def short_handshake_quayfront(tmp_path, start_quayfront, echo_upstream):
    config = write_config(
        tmp_path / "quayfront.toml",
        f"[tls]\nhandshake_timeout_s = {HANDSHAKE_TIMEOUT_S}\n[access_log]\nformat = \"json\"\n",
    )
    metrics_port = harness.free_port()
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
        extra=("--config", str(config), "--metrics-listen", f"{LOOPBACK}:{metrics_port}"),
    )
    qf.ports["metrics"] = metrics_port
    return qf


STAGES = ["silence", "half-client-hello", "stall-after-server-flight"]
PROXY_V1 = b"PROXY TCP4 203.0.113.50 127.0.0.1 40000 8443\r\n"


def test_incomplete_handshakes_closed_at_the_deadline(short_handshake_quayfront):
    """Silence, half a ClientHello, or no answer to the server's flight: closed at handshake_timeout_s on both listeners."""
    qf = short_handshake_quayfront
    cases = [
        (listener, stage) for listener in ("proxy", "tls") for stage in STAGES
    ]
    results: dict[tuple[str, str], object] = {}

    def run(listener: str, stage: str) -> None:
        preamble = PROXY_V1 if listener == "proxy" else b""
        try:
            results[(listener, stage)] = stalled_handshake(qf.ports[listener], preamble, stage)
        except Exception as e:  # reported below, with the case
            results[(listener, stage)] = e

    threads = [threading.Thread(target=run, args=case) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for case in cases:
        closed_after = results.get(case)
        assert isinstance(closed_after, float), f"{case}: {closed_after!r}"
        # Closed by the handshake deadline: not before it, and well before
        # the 5 s header deadline or any idle timeout.
        assert HANDSHAKE_TIMEOUT_S - 0.2 <= closed_after <= HANDSHAKE_TIMEOUT_S + CLOSE_SLACK_S, (
            f"{case}: closed after {closed_after:.2f}s"
        )
    wait_for(
        lambda: metric(qf.ports["metrics"], 'quayfront_tls_handshake_failed_total{reason="timeout"}')
        == len(cases),
        10,
        what="six handshake timeouts counted",
    )
    lines = output_lines(qf, "TLS handshake failed")
    assert len(lines) == len(cases), lines
    assert all(": timeout: " in line for line in lines), lines
    # On the PROXY listener the line names the PROXY client too.
    assert len([line for line in lines if "(client 203.0.113.50:40000)" in line]) == 3, lines


def test_completed_handshake_outlives_the_deadline(short_handshake_quayfront, tmp_path):
    """A connection that completed its handshake is not closed by the deadline, and nothing is counted."""
    qf = short_handshake_quayfront
    context = harness.unverified_tls_context()
    with socket.create_connection((LOOPBACK, qf.ports["tls"]), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            started = time.monotonic()
            assert time_to_close(sock, HANDSHAKE_TIMEOUT_S + 1.0) is None
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(12) == b"HTTP/1.1 200"
            assert time.monotonic() - started > HANDSHAKE_TIMEOUT_S
    assert metric(qf.ports["metrics"], 'quayfront_tls_handshake_failed_total{reason="timeout"}') is None


def test_plain_http_to_tls_listener_is_counted_not_tls(short_handshake_quayfront):
    """Plain HTTP on a TLS listener is closed at once and counted as not-tls."""
    qf = short_handshake_quayfront
    with socket.create_connection((LOOPBACK, qf.ports["tls"]), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        closed_after = time_to_close(sock, 5)
    assert closed_after is not None and closed_after < HANDSHAKE_TIMEOUT_S
    wait_for(
        lambda: metric(qf.ports["metrics"], 'quayfront_tls_handshake_failed_total{reason="not-tls"}')
        == 1,
        10,
        what="the not-tls count",
    )


def test_custom_vendor_tlvs_accepted_end_to_end(tmp_path, start_quayfront, echo_upstream):
    """A v2 header with custom 0xE0-0xEF TLVs (foreign layouts, repeats) and a CRC32C is accepted and served."""
    config = write_config(tmp_path / "quayfront.toml", '[access_log]\nformat = "json"\n')
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}", extra=("--config", str(config))
    )
    # What haproxy's set-proxy-v2-tlv-fmt (not in Debian 12's 2.6) would
    # send, plus an Azure type with another load balancer's 6-byte value and
    # two AUTHORITY TLVs (the first wins).
    header = v2_header(
        family=FAMILY_TCP4,
        addresses=ipv4_addresses("198.51.100.77", "127.0.0.1", 45000, 8443),
        tlvs=[
            (0xE5, b"tenant=blue"),
            (0xEE, b"\x01" + bytes(range(6))),
            (0x02, b"first.example"),
            (0x02, b"second.example"),
            (0xE5, b"tenant=red"),
        ],
        crc32c_at=0,
    )
    with socket.create_connection((LOOPBACK, qf.ports["proxy"]), timeout=10) as raw:
        raw.sendall(header)
        with harness.unverified_tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"GET /v2/custom-tlv HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = b""
            for _ in range(100):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:200]
    echoed = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
    assert echoed["x-forwarded-for"] == "198.51.100.77"

    def logged():
        for line in harness.read_access_log(qf.extra["access_log"]):
            doc = json.loads(line)
            if doc["uri"] == "/v2/custom-tlv":
                return doc
        return None

    doc = wait_for(logged, 10, what="the JSON access log line")
    assert doc["client"] == "198.51.100.77"
    tlvs = doc["proxy_tlvs"]
    assert tlvs["authority"] == "first.example"
    assert tlvs["tlv_0xe5"] == "tenant=blue"
    assert tlvs["tlv_0xee"] == "\\x01\\x00\\x01\\x02\\x03\\x04\\x05"
    assert "azure_link_id" not in tlvs
    assert not output_lines(qf, "PROXY header rejected")


def test_connection_cap_makes_new_connections_wait(tmp_path, start_quayfront, echo_upstream):
    """Beyond max_connections new connections wait in the backlog (not reset) and are served once one closes."""
    config = write_config(tmp_path / "quayfront.toml", "[tls_listener]\nmax_connections = 3\n")
    metrics_port = harness.free_port()
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
        extra=("--config", str(config), "--metrics-listen", f"{LOOPBACK}:{metrics_port}"),
    )
    context = harness.unverified_tls_context()
    held = []
    waiting = None
    try:
        for _ in range(3):
            raw = socket.create_connection((LOOPBACK, qf.ports["tls"]), timeout=5)
            held.append(context.wrap_socket(raw, server_hostname="localhost"))
        wait_for(
            lambda: metric(metrics_port, 'quayfront_connections_open{listener="tls"}') == 3,
            10,
            what="three open connections",
        )
        # The kernel completes the TCP handshake from the backlog; quayfront
        # does not accept, so the ClientHello goes unanswered, without a reset.
        waiting = socket.create_connection((LOOPBACK, qf.ports["tls"]), timeout=5)
        hello_client = ManualTLSClient()
        waiting.sendall(hello_client.client_hello())
        assert time_to_close(waiting, 1.5) is None
        assert metric(metrics_port, 'quayfront_connections_open{listener="tls"}') == 3
        assert metric(metrics_port, 'quayfront_listener_accept_paused_total{listener="tls"}') >= 1
        # The other listener is not affected.
        assert harness.tls_handshake(LOOPBACK, qf.ports["proxy"], preamble=PROXY_V1)

        held.pop().close()
        waiting.settimeout(10)
        flight = waiting.recv(65536)
        assert flight[:1] == b"\x16", flight[:16]  # accepted: the server's flight
        waiting.close()
        waiting = None
        # And a fresh client is served end to end.
        result = curl(f"https://127.0.0.1:{qf.ports['tls']}/v2/", workdir=tmp_path)
        assert result.status == 200, result.describe()
    finally:
        for sock in held:
            sock.close()
        if waiting is not None:
            waiting.close()
    assert output_lines(qf, "holds max_connections = 3")
    [limit_line] = output_lines(qf, "Descriptor limit (RLIMIT_NOFILE)")
    assert "was" in limit_line


def test_header_from_exempt_source_is_refused_and_logged(tmp_path, start_quayfront, echo_upstream):
    """An exempt source that sends a PROXY header is closed with its own reason, not fed to TLS."""
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
        extra=("--proxy-exempt", "127.0.0.26/32", "--proxy-trusted", "127.0.0.1/32"),
    )
    with socket.create_connection(
        (LOOPBACK, qf.ports["proxy"]), timeout=5, source_address=("127.0.0.26", 0)
    ) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.1 127.0.0.1 1234 443\r\n")
        assert time_to_close(sock, 5) is not None
    wait_for(lambda: output_lines(qf, "header-from-exempt-source"), 10, what="the log line")
    [line] = output_lines(qf, "header-from-exempt-source")
    assert "127.0.0.26:" in line
    # The same source speaking TLS directly is served.
    result = curl(
        "--interface", "127.0.0.26", f"https://127.0.0.1:{qf.ports['proxy']}/v2/", workdir=tmp_path
    )
    assert result.status == 200, result.describe()


def test_access_log_without_proxy_header_and_with_basic_auth(tmp_path, start_quayfront, echo_upstream):
    """On the plain TLS listener the PROXY client is '-', and $remote_user is the Basic-auth user."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}")
    result = curl(
        "-u", "robot$ci:s3cret", f"https://127.0.0.1:{qf.ports['tls']}/v2/plain", workdir=tmp_path
    )
    assert result.status == 200, result.describe()
    result = curl(
        "--haproxy-protocol", "--interface", "127.0.0.27",
        f"https://127.0.0.1:{qf.ports['proxy']}/v2/proxied", workdir=tmp_path,
    )
    assert result.status == 200, result.describe()
    log = qf.extra["access_log"]
    [plain] = harness.wait_for_access_line(log, lambda line: "/v2/plain" in line)
    entry = harness.parse_access_line(plain)
    assert (entry.peer, entry.client, entry.fields["user"]) == ("127.0.0.1", "-", "robot$ci"), plain
    assert "s3cret" not in plain
    [proxied] = harness.wait_for_access_line(log, lambda line: "/v2/proxied" in line)
    entry = harness.parse_access_line(proxied)
    assert (entry.client, entry.fields["user"]) == ("127.0.0.27", "-"), proxied


@pytest.mark.parametrize(
    "config, args, expected",
    [
        (
            "",
            ["--proxy-listen", "192.0.2.1:{port}"],
            'proxy_listener.trusted_sources: must be set: proxy_listener.address 192.0.2.1:',
        ),
        (
            "[proxy_listener]\nexempt_sources = [\"127.0.0.1/32\"]\n",
            [],
            "proxy_listener.exempt_sources: 127.0.0.1/32 overlaps 127.0.0.0/8 in"
            " proxy_listener.trusted_sources",
        ),
        (
            "[proxy_listener]\nmax_connections = 100000000\n",
            [],
            "proxy_listener.max_connections + tls_listener.max_connections need about",
        ),
    ],
    ids=["public-listener-without-trust", "exempt-overlaps-trusted", "caps-over-descriptor-limit"],
)
def test_trust_and_cap_errors_stop_startup(tmp_path, dev_cert, config, args, expected):
    """Trust traps and caps over the descriptor limit stop startup with the keys and what to do."""
    cert, key = dev_cert
    proxy_port, tls_port = harness.free_ports(2)
    config_path = write_config(tmp_path / "quayfront.toml", config)
    argv = [
        *harness.twistd_command(), "-n", "--pidfile=", "quayfront",
        "--config", str(config_path),
        "--proxy-listen", f"127.0.0.1:{proxy_port}", "--listen", f"127.0.0.1:{tls_port}",
        "--cert", str(cert), "--key", str(key), "--metrics-listen", "off",
        *[arg.format(port=proxy_port) for arg in args],
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=harness.REPO_ROOT)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert expected in output, output
    assert "Traceback" not in output, output
