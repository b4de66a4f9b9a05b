"""
Worker processes (``--workers 2``) with real processes: pushes and pulls
through HAProxy to docker-registry, a worker killed mid-load, certificate
reload, drain, TLS session resumption across workers, a rate limit shared by
the workers, and one /metrics summing them.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration import harness
from tests.integration.harness import LOOPBACK, Process, curl, wait_for
# Imported under another name, so pytest does not collect it here a second time.
from tests.integration.test_end_to_end import (
    test_skopeo_push_and_pull_through_haproxy_v2 as skopeo_push_and_pull,
)
from tests.integration.test_registry_proxying import run_uploads, summarize
from tests.integration.test_tls import ScratchCA, peer_cn, s_client

pytestmark = pytest.mark.integration

MiB = 1 << 20
WORKERS = ("--workers", "2")


# --------------------------------------------------------------------------
# Who serves what: the main process's children, and which one holds a
# server-side connection (from /proc, no connection of our own).


def children(pid: int) -> set[int]:
    """The pids whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command may hold spaces and parentheses: fields follow the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def wait_for_workers(qf: Process, count: int = 2, timeout: float = 20.0) -> set[int]:
    return wait_for(lambda: (lambda c: c if len(c) == count else None)(children(qf.pid)),
                    timeout, what=f"{count} workers of pid {qf.pid}", abort=qf.died)


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def server_connections(port: int) -> dict[int, int]:
    """Established connections accepted on ``port``: client port -> socket inode."""
    found = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            if local_port == port and parts[3] == "01":
                found[remote_port] = int(parts[9])
    return found


def owner_of(client_port: int, server_port: int, workers: set[int]) -> int | None:
    """The worker holding the server side of the connection from ``client_port``."""
    inode = server_connections(server_port).get(client_port)
    if inode is None:
        return None
    for pid in workers:
        if inode in socket_inodes(pid):
            return pid
    return None


def tls_connection(port: int, timeout: float = 10.0) -> http.client.HTTPSConnection:
    ctx = harness.unverified_tls_context()
    conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=timeout, context=ctx)
    conn.connect()
    return conn


def get(conn: http.client.HTTPSConnection, path: str) -> int:
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def metrics_args() -> tuple[tuple[str, ...], int]:
    port = harness.free_port()
    return ("--metrics-listen", f"{LOOPBACK}:{port}"), port


def scrape(port: int) -> str:
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        for _ in range(10_000):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def sample(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
    return sum(values)


# --------------------------------------------------------------------------


@pytest.fixture
def registry_front(tmp_path: Path, registry: Process, start_quayfront):
    """Two workers in front of the session registry, HAProxy in front of them."""
    qf = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}", extra=WORKERS)
    wait_for_workers(qf)
    lb = harness.start_haproxy(tmp_path / "haproxy", qf.ports["proxy"])
    yield qf, lb
    lb.stop()


def test_two_workers_push_pull_and_64_concurrent_uploads(tmp_path: Path, registry_front) -> None:
    """Through HAProxy and two workers: a skopeo push and pull, then 64 concurrent 8 MiB uploads, every digest verified; every access log line whole."""
    qf, lb = registry_front
    skopeo_push_and_pull(tmp_path / "skopeo", lb, qf)
    outcomes = run_uploads(lb.ports["v2"], "workers/many", count=64, size=8 * MiB,
                           workers=64, deadline_s=180, request_timeout_s=120)
    kinds = summarize(outcomes)
    bad = [o for o in outcomes if o.kind != "ok"]
    assert not bad, f"{kinds}; first: " + "; ".join(f"#{o.index}: {o.detail}" for o in bad[:5])
    lines = harness.read_access_log(qf.extra["access_log"])
    for line in lines:
        harness.parse_access_line(line)
    # POST, PUT and HEAD per upload: every one is logged exactly once.
    uploads = [line for line in lines if "/v2/workers/many/" in line]
    assert len(uploads) == 3 * 64, len(uploads)
    assert len(children(qf.pid)) == 2


def test_kill_9_one_worker_mid_load(tmp_path: Path, start_quayfront, echo_upstream) -> None:
    """A worker killed with SIGKILL under load: its connections fail, every other request succeeds, a new worker takes its place and serves."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}", extra=WORKERS)
    workers = wait_for_workers(qf)
    port = qf.ports["tls"]

    # Kept-alive connections until each worker holds some (bounded).
    held: dict[int, list[http.client.HTTPSConnection]] = {pid: [] for pid in workers}
    opened = []
    for _ in range(200):
        if all(len(conns) >= 2 for conns in held.values()):
            break
        conn = tls_connection(port)
        opened.append(conn)
        assert get(conn, "/v2/held") == 200
        owner = wait_for(lambda: owner_of(conn.sock.getsockname()[1], port, workers), 5,
                         what="the owner of a connection")
        held[owner].append(conn)
    assert all(held.values()), {pid: len(c) for pid, c in held.items()}
    victim, survivor = sorted(workers)

    # Background load on fresh connections, before, during and after the kill.
    stop = threading.Event()
    results: list[tuple[float, float, bool]] = []

    def load() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            started = time.monotonic()
            try:
                conn = tls_connection(port)
                ok = get(conn, "/v2/load") == 200
                conn.close()
            except (OSError, http.client.HTTPException):
                ok = False
            results.append((started, time.monotonic(), ok))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        new = wait_for(lambda: (children(qf.pid) - workers) or None, 20,
                       what="a new worker", abort=qf.died)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    # The victim's connections are gone; the survivor's still serve.
    for conn in held[victim]:
        with pytest.raises((OSError, http.client.HTTPException)):
            get(conn, "/v2/after")
    for conn in held[survivor]:
        assert get(conn, "/v2/after") == 200
    for conn in opened:
        conn.close()
    # Requests started after the kill never fail; only those in flight on
    # the victim when it died may have.
    after = [ok for started, _, ok in results if started > killed_at]
    assert after and all(after), f"{after.count(False)} of {len(after)} failed after the kill"
    during = [ok for started, ended, ok in results if started <= killed_at]
    assert during.count(False) <= len(threads), during.count(False)
    assert "worker 0 (pid" in qf.output() or "worker 1 (pid" in qf.output()
    assert "ended: killed by SIGKILL; restarting it" in qf.output()

    # The new worker serves: some fresh connection lands on it (bounded).
    (new_pid,) = new
    workers = children(qf.pid)
    for _ in range(200):
        conn = tls_connection(port)
        assert get(conn, "/v2/new") == 200
        owner = owner_of(conn.sock.getsockname()[1], port, workers)
        conn.close()
        if owner == new_pid:
            break
    else:
        pytest.fail("the new worker served none of 200 connections")


@pytest.fixture
def ca(tmp_path: Path) -> ScratchCA:
    return ScratchCA(tmp_path / "ca")


def test_sighup_new_certificate_reaches_every_worker(tmp_path, ca, start_quayfront,
                                                     echo_upstream) -> None:
    """After SIGHUP with a new certificate, every new connection, whichever worker takes it, sees it; a broken one is refused everywhere."""
    cert, key = ca.issue("live", ["before.example"])
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
                         extra=(*WORKERS, "--cert", str(cert), "--key", str(key)))
    wait_for_workers(qf)
    port = qf.ports["tls"]
    assert peer_cn(s_client(port)) == "before.example"
    session = tmp_path / "session.pem"
    saved = subprocess.run(
        [harness.require_binary("openssl"), "s_client", "-connect", f"{LOOPBACK}:{port}",
         "-ign_eof", "-sess_out", str(session)],
        input=b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True, timeout=30)
    assert session.exists(), saved.stdout[-2000:]

    new_cert, new_key = ca.issue("next", ["after.example"])
    os.replace(new_cert, cert)
    os.replace(new_key, key)
    os.kill(qf.pid, signal.SIGHUP)
    wait_for(lambda: all(f"[worker {i}] certificates reloaded (SIGHUP)" in qf.output()
                         for i in (0, 1)), 10, what="both workers' reload lines")
    assert [peer_cn(s_client(port)) for _ in range(20)] == ["after.example"] * 20
    # A session from before the reload still resumes, on either worker.
    resumed = [s_client(port, "-sess_in", str(session)).stdout for _ in range(10)]
    assert all(re.search(rb"^Reused, TLSv1\.[23]", out, re.M) for out in resumed), resumed[0]

    key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    os.kill(qf.pid, signal.SIGHUP)
    wait_for(lambda: "certificate reload (SIGHUP) failed" in qf.output(), 10,
             what="the refusal line")
    time.sleep(0.5)
    refusals = [line for line in qf.output().splitlines()
                if "certificate reload (SIGHUP) failed" in line]
    # Refused by the main process alone: no worker tried.
    assert len(refusals) == 1 and "[worker" not in refusals[0], refusals
    assert [peer_cn(s_client(port)) for _ in range(10)] == ["after.example"] * 10


def test_sigterm_under_load_loses_nothing(tmp_path: Path, start_quayfront, echo_upstream) -> None:
    """SIGTERM while uploads run on both workers: every upload completes, then every process exits and the port closes."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}", extra=WORKERS)
    workers = wait_for_workers(qf)
    port = qf.ports["tls"]
    size = 64 * MiB
    blob = tmp_path / "blob.bin"
    with open(blob, "wb") as f:
        f.truncate(size)
    uploads = [
        subprocess.Popen(
            [harness.require_binary("curl"), "-sS", "-k", "--max-time", "120", "--limit-rate",
             "20M", "-X", "PUT", "-T", str(blob), "-o", str(tmp_path / f"up{i}.json"),
             "-w", "%{http_code}", f"https://{LOOPBACK}:{port}/v2/drain/{i}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        for i in range(6)
    ]
    try:
        # Every upload is in flight before the signal.
        wait_for(lambda: len(server_connections(port)) >= len(uploads), 20,
                 what="all uploads connected")
        time.sleep(0.5)
        os.kill(qf.pid, signal.SIGTERM)
        outcomes = [p.communicate(timeout=130) for p in uploads]
    finally:
        for p in uploads:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    for i, (out, err) in enumerate(outcomes):
        assert out.decode() == "200", (i, out, err)
        assert json.loads((tmp_path / f"up{i}.json").read_text())["body_length"] == size
    code = qf.popen.wait(30)
    # twistd ends by SIGTERM after a clean drain, with 1 after a failed one.
    assert code in (0, -signal.SIGTERM), code
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    assert not harness.port_listening(port)
    assert "ended: exit status 0" in qf.output()


def test_session_resumes_on_any_worker(tmp_path: Path, start_quayfront, echo_upstream) -> None:
    """A session saved from one connection resumes on 20 further connections spread over two workers."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}", extra=WORKERS)
    workers = wait_for_workers(qf)
    port = qf.ports["tls"]
    openssl = harness.require_binary("openssl")
    session = tmp_path / "session.pem"

    def s_client_held(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [openssl, "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", "localhost",
             *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    first = s_client_held("-ign_eof", "-sess_out", str(session))
    # A TLS 1.3 ticket follows the handshake: ask for something, then close.
    out, _ = first.communicate(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                               timeout=20)
    assert session.exists(), out.decode(errors="replace")[-2000:]

    resumed = [s_client_held("-sess_in", str(session)) for _ in range(20)]
    try:
        # Held open together: see which worker holds each.
        wait_for(lambda: len(server_connections(port)) >= 20, 20, what="20 connections")
        owners = {pid: 0 for pid in workers}
        for inode in server_connections(port).values():
            for pid in workers:
                if inode in socket_inodes(pid):
                    owners[pid] += 1
        outputs = [p.communicate(b"", timeout=20)[0].decode(errors="replace") for p in resumed]
    finally:
        for p in resumed:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    reused = [bool(re.search(r"^Reused, TLSv1\.[23]", o, re.M)) for o in outputs]
    assert all(reused), f"{reused.count(False)} of 20 did a full handshake"
    assert all(owners.values()), f"connections per worker: {owners}"


def test_rate_limit_holds_across_workers(tmp_path: Path, start_quayfront, echo_upstream) -> None:
    """A zone of 10 req/s burst 10 with two workers lets 30 +- 20 % of 100 requests over 2 s from one PROXY source through."""
    config = write_config(tmp_path / "quayfront.toml", """
[rate_limits.z]
requests_per_s = 10.0
burst = 10

[[routes]]
prefix = "/v2/"
upstream = "default"
rate_limit = "z"
""")
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
                         extra=(*WORKERS, "--config", str(config)))
    wait_for_workers(qf)
    port = qf.ports["proxy"]
    ctx = harness.unverified_tls_context()

    def one(index: int, at: float) -> int:
        time.sleep(max(0.0, at - time.monotonic()))
        with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
            raw.sendall(b"PROXY TCP4 192.0.2.77 192.0.2.1 40000 8443\r\n")
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(f"GET /v2/rl/{index} HTTP/1.1\r\nHost: localhost\r\n"
                          "Connection: close\r\n\r\n".encode())
                head = s.recv(64)
        return int(head.split(b" ", 2)[1])

    start = time.monotonic() + 0.2
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(lambda i: one(i, start + i * 0.02), range(100)))
    assert set(statuses) <= {200, 429}, statuses
    passed = statuses.count(200)
    assert 24 <= passed <= 36, f"{passed} of 100 passed"


def test_metrics_count_every_request_once(tmp_path: Path, start_quayfront, echo_upstream) -> None:
    """/metrics on the main process counts each request of each worker exactly once, and reports the workers."""
    extra, metrics_port = metrics_args()
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
                         extra=(*WORKERS, *extra))
    workers = wait_for_workers(qf)
    port = qf.ports["tls"]
    served_by: set[int] = set()
    for i in range(60):
        conn = tls_connection(port)
        assert get(conn, f"/v2/m/{i}") == 200
        owner = owner_of(conn.sock.getsockname()[1], port, workers)
        if owner:
            served_by.add(owner)
        conn.close()
    wait_for(lambda: len(harness.read_access_log(qf.extra["access_log"])) >= 60, 10,
             what="60 access log lines")
    text = scrape(metrics_port)
    assert sample(text, "quayfront_http_responses_total", 'status="200"') == 60, text
    assert sample(text, "quayfront_request_duration_seconds_count",
                  'route="/v2/",status_class="2xx"') == 60, text
    assert sample(text, "quayfront_workers_alive") == 2
    assert "quayfront_certificate_expiry_timestamp_seconds" in text
    assert served_by == workers, "one worker served all 60: the sum proves nothing"
    assert len(harness.read_access_log(qf.extra["access_log"])) == 60


def test_one_worker_is_the_single_process(tmp_path: Path, start_quayfront, echo_upstream) -> None:
    """--workers 1 serves from the twistd process itself, with no children."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
                         extra=("--workers", "1"))
    r = curl(f"https://{LOOPBACK}:{qf.ports['tls']}/v2/one", workdir=tmp_path)
    assert r.status == 200, r.describe()
    assert children(qf.pid) == set()
