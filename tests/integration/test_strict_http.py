"""
Strict HTTP through real processes: raw requests sent over TLS through
HAProxy (PROXY v2) to quayfront, in front of a recording upstream that
prints every request it reads, or a real docker-registry.

Each framing class is answered with a real response and a close, and the
upstream never sees a request from it; raw bytes in the target are answered
at once and leave nothing in flight; the request-head deadline answers a
trickled head with 408 while other clients are served, also for 1,000 such
connections at once at bounded memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration import harness, upstreams
from tests.integration.harness import LOOPBACK, Process

HEADER_TIMEOUT_S = 2.0


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def strict_front(tmp_path_factory: pytest.TempPathFactory, dev_cert: tuple[Path, Path],
                 quayfront_instances: list[Process]) -> Iterator[dict[str, Process]]:
    """A recording upstream, quayfront (head deadline 2 s, metrics on) and HAProxy."""
    workdir = tmp_path_factory.mktemp("strict")
    recorder = upstreams.start_upstream(workdir / "recorder", "record")
    front = lb = None
    try:
        config = write_config(workdir / "quayfront.toml", f"""
[http]
header_timeout_s = {HEADER_TIMEOUT_S}
""")
        metrics_port = harness.free_port()
        cert, key = dev_cert
        front = harness.start_quayfront(
            workdir / "quayfront", f"http://{LOOPBACK}:{recorder.ports['http']}", cert, key,
            config=config, name="quayfront-strict",
            extra=(*harness.QUAYFRONT_TEST_ARGS, "--metrics-listen",
                   f"{LOOPBACK}:{metrics_port}"),
        )
        front.ports["metrics"] = metrics_port
        quayfront_instances.append(front)
        lb = harness.start_haproxy(workdir / "haproxy", front.ports["proxy"])
        yield {"recorder": recorder, "front": front, "lb": lb}
    finally:
        for proc in (lb, front, recorder):
            if proc is not None:
                proc.stop()


def recorded(recorder: Process) -> list[dict]:
    return [json.loads(line[len("request "):]) for line in recorder.output().splitlines()
            if line.startswith("request ")]


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, float, bool]:
    """
    Send C{data} over TLS to C{port} and read until the server closes or
    C{timeout}: (what was read, seconds until the close or the timeout,
    whether it closed).
    """
    context = harness.unverified_tls_context()
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            started = time.monotonic()
            tls.sendall(data)
            return read_until_close(tls, started, timeout)


def read_until_close(tls: ssl.SSLSocket, started: float, timeout: float
                     ) -> tuple[bytes, float, bool]:
    chunks = []
    while True:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            return b"".join(chunks), time.monotonic() - started, False
        tls.settimeout(left)
        try:
            piece = tls.recv(65536)
        except (socket.timeout, TimeoutError):
            return b"".join(chunks), time.monotonic() - started, False
        except (ConnectionResetError, ssl.SSLError, OSError):
            return b"".join(chunks), time.monotonic() - started, True
        if not piece:
            return b"".join(chunks), time.monotonic() - started, True
        chunks.append(piece)


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data[:200]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def in_flight(front: Process) -> float:
    url = f"http://{LOOPBACK}:{front.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("quayfront_requests_in_flight "):
                return float(line.split()[1])
    raise AssertionError("no quayfront_requests_in_flight in /metrics")


SMUGGLED = b"GET /v2/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
CHUNKED_HEAD = b"POST /v2/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"

FRAMING_CLASSES = [
    ("te-identity", b"POST /v2/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n"
     + SMUGGLED, 501),
    ("te-identity-with-cl", b"POST /v2/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n"
     b"Content-Length: 38\r\n\r\n" + SMUGGLED, 501),
    ("te-with-cl", b"POST /v2/x HTTP/1.1\r\nHost: h\r\nContent-Length: 43\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
    ("obs-fold", b"GET /v2/x HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n folded\r\n\r\n", 400),
    ("leading-space", b"GET /v2/x HTTP/1.1\r\n Host: h\r\n\r\n", 400),
    ("te-http10", b"POST /v2/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("cl-over-2^64", b"POST /v2/x HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551621\r\n"
     b"\r\n" + SMUGGLED, 400),
    ("chunk-20-hex-digits", CHUNKED_HEAD + b"10000000000000000005\r\n" + SMUGGLED, 400),
    ("bare-lf", b"GET /v2/x HTTP/1.1\nHost: h\n\n", 400),
    ("header-line-over-16k", b"GET /v2/x HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 17000, 431),
    ("too-many-headers", b"GET /v2/x HTTP/1.1\r\nHost: h\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n",
     431),
    ("missing-host", b"GET /v2/x HTTP/1.1\r\n\r\n", 400),
    ("duplicate-host", b"GET /v2/x HTTP/1.1\r\nHost: h\r\n"
     b"Host: h\r\n\r\n", 400),
]


@pytest.mark.parametrize("name, data, status", FRAMING_CLASSES,
                         ids=[case[0] for case in FRAMING_CLASSES])
def test_framing_class_answered_and_upstream_sees_nothing(
        strict_front: dict[str, Process], name: str, data: bytes, status: int) -> None:
    """Through HAProxy: a real response with Connection: close, a close, and no request upstream."""
    recorder, lb = strict_front["recorder"], strict_front["lb"]
    before = len(recorded(recorder))
    answer, seconds, closed = exchange(lb.ports["v2"], data)
    got, headers, body = parse(answer)
    assert got == status, answer[:300]
    assert headers.get("connection") == "close"
    assert int(headers["content-length"]) == len(body) > 0
    assert closed and seconds < 2.0, f"closed={closed} after {seconds:.2f}s"
    # A request that does reach the upstream is recorded (the control) ...
    control, _, _ = exchange(lb.ports["v2"], b"GET /v2/control-" + name.encode()
                             + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert parse(control)[0] == 200
    harness.wait_for(lambda: len(recorded(recorder)) > before, 10, what="the control request")
    # ... and it is the only one since the refused request.
    seen = recorded(recorder)[before:]
    assert [r["request_line"] for r in seen] == [f"GET /v2/control-{name} HTTP/1.1"], seen
    assert "smuggled" not in recorder.output()


RAW_TARGETS = [
    ("del", b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n"),
    ("nul", b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n"),
    ("esc", b"GET /a\x1b[31mb HTTP/1.1\r\nHost: h\r\n\r\n"),
    ("non-ascii-post", b"POST /a\x80b HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\npart"),
    ("utf8", b"GET /v2/\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n"),
    ("fragment", b"GET /v2/#frag HTTP/1.1\r\nHost: h\r\n\r\n"),
]


@pytest.mark.parametrize("name, data", RAW_TARGETS, ids=[case[0] for case in RAW_TARGETS])
def test_raw_byte_target_is_400_within_a_second(strict_front: dict[str, Process], name: str,
                                                data: bytes) -> None:
    """Raw control, non-ASCII bytes and '#' in the target: 400 at once; nothing stays in flight."""
    front, lb, recorder = strict_front["front"], strict_front["lb"], strict_front["recorder"]
    before = len(recorded(recorder))
    answer, seconds, closed = exchange(lb.ports["v2"], data)
    assert parse(answer)[0] == 400, answer[:300]
    assert closed and seconds < 1.0, f"closed={closed} after {seconds:.2f}s"
    harness.wait_for(lambda: in_flight(front) == 0, 5, what="no request in flight")
    assert len(recorded(recorder)) == before


def test_client_leaving_mid_head_leaves_nothing_in_flight(strict_front: dict[str, Process]
                                                          ) -> None:
    """A client that sends a POST head with a body and goes away ends its request."""
    front, lb = strict_front["front"], strict_front["lb"]
    context = harness.unverified_tls_context()
    with socket.create_connection((LOOPBACK, lb.ports["v2"]), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"POST /v2/x/blobs/uploads/ HTTP/1.1\r\nHost: h\r\n"
                        b"Content-Length: 100000\r\n\r\npart")
            harness.wait_for(lambda: in_flight(front) == 1, 5, what="the request in flight")
    harness.wait_for(lambda: in_flight(front) == 0, 5, what="no request in flight")


def test_underscore_header_never_reaches_the_upstream(strict_front: dict[str, Process]) -> None:
    """X_Forwarded_For and friends are dropped; the upstream sees quayfront's own X-Forwarded-For."""
    recorder, lb, front = strict_front["recorder"], strict_front["lb"], strict_front["front"]
    marker = f"underscore-{os.getpid()}"
    answer, _, _ = exchange(lb.ports["v2"], (
        f"GET /v2/{marker} HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 6.6.6.6\r\n"
        "X_Real_IP: 6.6.6.6\r\nX_Request_ID: spoof\r\nConnection: close\r\n\r\n").encode())
    assert parse(answer)[0] == 200
    harness.wait_for(lambda: any(marker in r["request_line"] for r in recorded(recorder)), 10,
                     what="the request upstream")
    [seen] = [r for r in recorded(recorder) if marker in r["request_line"]]
    names = [name for name, _ in seen["headers"]]
    assert not [name for name in names if "_" in name], names
    assert dict(seen["headers"])["X-Forwarded-For"] == "127.0.0.1"
    assert "dropped request headers with underscores" in front.output()


def test_trickled_head_gets_408_while_others_are_served(strict_front: dict[str, Process]) -> None:
    """A head at 1 byte/s is answered 408 and closed at header_timeout_s; a normal request on another connection is served at once meanwhile."""
    lb = strict_front["lb"]
    head = b"GET /v2/slow HTTP/1.1\r\nHost: h\r\n\r\n"
    served: list[tuple[int, float]] = []

    def normal_request() -> None:
        answer, seconds, _ = exchange(lb.ports["v2"], b"GET /v2/fast HTTP/1.1\r\nHost: h\r\n"
                                      b"Connection: close\r\n\r\n")
        served.append((parse(answer)[0], seconds))

    context = harness.unverified_tls_context()
    with socket.create_connection((LOOPBACK, lb.ports["v2"]), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            started = time.monotonic()
            other = None
            answer = b""
            closed = False
            for index in range(len(head)):
                tls.sendall(head[index:index + 1])
                if index == 1:
                    other = threading.Thread(target=normal_request)
                    other.start()
                answer, _, closed = read_until_close(tls, time.monotonic(), 1.0)
                if answer or closed:
                    if not closed:
                        answer += read_until_close(tls, time.monotonic(), 2.0)[0]
                        closed = True
                    break
            seconds = time.monotonic() - started
    assert other is not None
    other.join(10)
    assert parse(answer)[0] == 408, answer[:300]
    assert parse(answer)[1]["connection"] == "close"
    assert HEADER_TIMEOUT_S - 0.2 <= seconds <= HEADER_TIMEOUT_S + 1.5, seconds
    assert closed
    assert served and served[0][0] == 200 and served[0][1] < 1.0, served


def test_encoded_prefix_gets_the_v2_limits(tmp_path: Path, registry: Process,
                                           start_quayfront) -> None:
    """Against docker-registry through HAProxy: /%76%32/ gets the /v2/ route's body limit and rate limit."""
    config = write_config(tmp_path / "quayfront.toml", """
[rate_limits.v2]
requests_per_s = 0.05
burst = 2

[[routes]]
prefix = "/v2/"
upstream = "default"
max_body_bytes = 1000
rate_limit = "v2"

[[routes]]
prefix = "/"
upstream = "default"
""")
    front = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}",
                            extra=("--config", str(config)))
    lb = harness.start_haproxy(tmp_path / "haproxy", front.ports["proxy"])
    try:
        port = lb.ports["v2"]
        answer, _, _ = exchange(port, b"PATCH /%76%32/enc/blobs/uploads/x HTTP/1.1\r\nHost: h\r\n"
                                b"Content-Length: 2000\r\nConnection: close\r\n\r\n"
                                + b"a" * 2000)
        status, _, body = parse(answer)
        assert status == 413 and b"body-too-large" in body, answer[:400]
        marker = f"enc{os.getpid()}x"
        statuses = []
        for index in range(5):
            answer, _, _ = exchange(port, f"GET /%76%32/?n={marker}{index} HTTP/1.1\r\n"
                                    "Host: h\r\nConnection: close\r\n\r\n".encode())
            statuses.append(parse(answer)[0])
        assert statuses == [200, 200, 429, 429, 429], statuses
        # The registry was sent the path that was routed, not the encoded one.
        harness.wait_for(lambda: f"/v2/?n={marker}1 " in registry.output(), 10,
                         what="the registry's log of the routed path")
        assert f"n={marker}2" not in registry.output()
        assert "/%76%32/" not in registry.output()
        answer, _, _ = exchange(port, b"GET /v2%2Fx HTTP/1.1\r\nHost: h\r\n"
                                b"Connection: close\r\n\r\n")
        assert parse(answer)[0] == 400
    finally:
        lb.stop()


# 1,000 trickling connections at once.

SLOW_CONNECTIONS = 1000
SLOW_HEADER_TIMEOUT_S = 6.0


async def _slow_clients(port: int, count: int) -> list[tuple[bytes, float | None]]:
    context = harness.unverified_tls_context()
    gate = asyncio.Semaphore(64)
    head = b"GET /v2/trickle HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"

    async def connect():
        async with gate:
            return await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, port, ssl=context, server_hostname="localhost"),
                60)

    connections = await asyncio.gather(*(connect() for _ in range(count)))

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        started = time.monotonic()

        async def send() -> None:
            for index in range(len(head)):
                writer.write(head[index:index + 1])
                await writer.drain()
                await asyncio.sleep(1.0)

        sender = asyncio.create_task(send())
        received = b""
        closed_after = None
        try:
            while time.monotonic() - started < SLOW_HEADER_TIMEOUT_S + 20:
                piece = await asyncio.wait_for(reader.read(4096), SLOW_HEADER_TIMEOUT_S + 20)
                if not piece:
                    closed_after = time.monotonic() - started
                    break
                received += piece
        except (ConnectionError, ssl.SSLError, OSError):
            closed_after = time.monotonic() - started
        except asyncio.TimeoutError:
            pass
        sender.cancel()
        try:
            await sender
        except (asyncio.CancelledError, ConnectionError, ssl.SSLError, OSError):
            pass
        writer.transport.abort()
        return received, closed_after

    return await asyncio.gather(*(trickle(r, w) for r, w in connections))


def test_thousand_trickling_heads_cost_bounded_memory_and_all_close_on_time(
        tmp_path: Path, start_quayfront) -> None:
    """1,000 TLS connections sending their heads at 1 byte/s: quayfront's RSS grows by a bounded amount per connection and every one gets 408 and a close at its deadline."""
    recorder = upstreams.start_upstream(tmp_path / "recorder", "record")
    try:
        config = write_config(tmp_path / "quayfront.toml", f"""
[http]
header_timeout_s = {SLOW_HEADER_TIMEOUT_S}
idle_timeout_s = 300.0
""")
        front = start_quayfront(f"http://{LOOPBACK}:{recorder.ports['http']}",
                                extra=("--config", str(config)))
        baseline = harness.rss_bytes(front.pid)
        with harness.RssSampler(front.pid) as sampler:
            results = asyncio.run(_slow_clients(front.ports["tls"], SLOW_CONNECTIONS))
        peak = sampler.max
        assert recorded(recorder) == []
    finally:
        recorder.stop()
    per_connection = (peak - baseline) / SLOW_CONNECTIONS
    print(f"{SLOW_CONNECTIONS} trickling TLS connections: RSS {baseline / 2**20:.1f} MiB ->"
          f" peak {peak / 2**20:.1f} MiB, {per_connection / 1024:.1f} KiB per connection")
    late = [after for _, after in results
            if after is None or not SLOW_HEADER_TIMEOUT_S - 0.5 <= after
            <= SLOW_HEADER_TIMEOUT_S + 5.0]
    assert not late, f"{len(late)} connections not closed on their deadline, e.g. {late[:5]}"
    statuses = [data.split(b" ", 2)[1] if data.startswith(b"HTTP/1.1 ") else data[:40]
                for data, _ in results]
    assert statuses == [b"408"] * SLOW_CONNECTIONS, {s: statuses.count(s) for s in statuses}
    assert per_connection < 128 * 1024, f"{per_connection / 1024:.1f} KiB per connection"


@pytest.mark.parametrize("kind, reason", [("header-flood", "upstream-head-too-large"),
                                          ("bad-status", "upstream-bad-status-line")])
def test_misbehaving_upstream_head_is_502(tmp_path: Path, start_quayfront, kind: str,
                                          reason: str) -> None:
    """A 100 MB header flood or an HTTX status line from the upstream: 502 at once, the upstream connection closed, quayfront's memory unchanged."""
    upstream = upstreams.start_upstream(tmp_path / "upstream", "misbehave", kind)
    try:
        front = start_quayfront(f"http://{LOOPBACK}:{upstream.ports['http']}")
        baseline = harness.rss_bytes(front.pid)
        with harness.RssSampler(front.pid, interval=0.05) as sampler:
            answer, seconds, _ = exchange(front.ports["tls"], b"GET /v2/ HTTP/1.1\r\nHost: h\r\n"
                                          b"Connection: close\r\n\r\n", timeout=20)
        status, _, body = parse(answer)
        assert status == 502 and reason.encode() in body, answer[:400]
        assert seconds < 5.0
        harness.wait_for(lambda: "peer closed" in upstream.output(), 10,
                         what="the upstream connection to be closed")
        growth = sampler.max - baseline
        print(f"{kind}: RSS growth {growth / 2**20:.1f} MiB; upstream: "
              f"{upstream.output().splitlines()[-1]}")
        assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    finally:
        upstream.stop()
