"""
Several replicas behaving as one: two quayfront instances behind one
HAProxy (round-robin, PROXY v2) in front of docker-registry share their
rate limits through a real redis-server, and resume each other's TLS
sessions with shared ticket keys.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from quayfront.redisstore import TOKEN_BUCKET_SCRIPT
from tests.integration import harness
from tests.integration.harness import LOOPBACK, Process

# The zone under test: tokens per second and burst.  A client at twice the
# rate over RUN_S seconds gets burst + rate * RUN_S of 2 * rate * RUN_S
# requests through: a little over half.
RATE_PER_S = 1.5
BURST = 2
RUN_S = 12.0

# Client addresses (as the PROXY header reports them): one over its rate,
# one well under it, one used to probe for Redis' return.
FAST_CLIENT = "127.0.0.2"
SLOW_CLIENT = "127.0.0.3"
PROBE_CLIENT = "127.0.0.4"

# Each replica runs as it would be deployed on a multi-core node: the
# shared store and the ticket keys must hold across workers and replicas.
WORKERS_PER_REPLICA = 2

CONFIG = """\
[[routes]]
prefix = "/v2/"
rate_limit = "registry"

[[routes]]
prefix = "/v2/_catalog"
rate_limit = "strict"

[[routes]]
prefix = "/"

[rate_limits.registry]
requests_per_s = {rate}
burst = {burst}
store = "redis"
on_store_error = "allow"

[rate_limits.strict]
requests_per_s = {rate}
burst = {burst}
store = "redis"
on_store_error = "deny"

[redis]
url = "redis://127.0.0.1:{redis_port}/0"
op_timeout_s = 0.5
"""

ROUND_ROBIN_HAPROXY = """\
global
    maxconn 256
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m

frontend fe
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    server a 127.0.0.1:{a} send-proxy-v2
    server b 127.0.0.1:{b} send-proxy-v2
"""


def start_redis(workdir: Path, port: int) -> Process:
    """redis-server on loopback, nothing persisted."""
    binary = harness.require_binary("redis-server")
    proc = harness.spawn(
        "redis",
        [binary, "--bind", LOOPBACK, "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        workdir,
    )
    proc.ports["redis"] = port
    try:
        harness.wait_for(lambda: harness.port_listening(port), harness.STARTUP_TIMEOUT_S,
                         what="redis-server", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[[int], Process]]:
    """Start redis-server on a given port (again, after a stop); all stopped at teardown."""
    started: list[Process] = []

    def start(port: int) -> Process:
        proc = start_redis(tmp_path / f"redis{len(started)}", port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def start_round_robin(workdir: Path, a: int, b: int) -> Process:
    binary = harness.require_binary("haproxy")
    port = harness.free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "haproxy.cfg"
    config.write_text(ROUND_ROBIN_HAPROXY.format(port=port, a=a, b=b))
    proc = harness.spawn("haproxy", [binary, "-db", "-f", str(config)], workdir)
    proc.ports["front"] = port
    try:
        harness.wait_for(lambda: harness.port_listening(port), harness.STARTUP_TIMEOUT_S,
                         what="haproxy", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc


def https_status(port: int, path: str, source: str) -> int:
    """One request on a new connection from ``source``: the status code."""
    context = harness.unverified_tls_context()
    with socket.create_connection((LOOPBACK, port), timeout=10, source_address=(source, 0)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                head += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    assert match, f"no HTTP status line from {source} for {path}: {head[:200]!r}"
    return int(match.group(1))


def timed_status(port: int, path: str, source: str) -> tuple[int, float]:
    status = https_status(port, path, source)
    return status, time.monotonic()


@dataclass
class Tally:
    statuses: list[int] = field(default_factory=list)
    # When each answer arrived (monotonic seconds): the bucket decided just before.
    answered_at: list[float] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return self.statuses.count(429)

    @property
    def refused_fraction(self) -> float:
        return self.refused / len(self.statuses)

    def expected_refused_fraction(self, rate_per_s: float, burst: int) -> float:
        """
        What a shared bucket refuses of these requests as they really
        reached it: a loaded machine delivers them later and more spread
        out than planned, which leaves the bucket more time to refill.
        """
        span_s = max(self.answered_at) - min(self.answered_at)
        allowed = min(len(self.statuses), burst + rate_per_s * span_s)
        return 1 - allowed / len(self.statuses)

    def check_about_half_refused(self, what: str) -> None:
        """
        Refused within 20 % of half, measured against the bucket's
        expectation for the pace the requests really had (which is half
        when the machine keeps the planned pace).
        """
        expected = self.expected_refused_fraction(RATE_PER_S, BURST)
        print(f"{what}: refused {self.refused}/{len(self.statuses)} ({self.refused_fraction:.0%}),"
              f" expected {expected:.0%} at the pace achieved")
        assert expected >= 0.3, f"{what}: the client did not reach twice its rate ({expected:.0%})"
        assert abs(self.refused_fraction - expected) <= 0.1, (what, self.statuses)


def paced(port: int, duration_s: float, schedule: dict[tuple[str, str], float]) -> dict:
    """
    Send requests for ``duration_s``: each (client, path) at its rate in
    requests per second, on a fixed timetable kept by starting each request
    on time in a pool of threads (one request takes longer than the gap
    between two on a busy machine).
    """
    start = time.monotonic()
    events = sorted(
        (index / rate, who)
        for who, rate in schedule.items()
        for index in range(int(duration_s * rate))
    )
    started: list[tuple[tuple[str, str], Future]] = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        for at, (client, path) in events:
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            started.append(((client, path), pool.submit(timed_status, port, path, client)))
        tallies = {who: Tally() for who in schedule}
        for who, future in started:
            status, answered_at = future.result(timeout=30)
            tallies[who].statuses.append(status)
            tallies[who].answered_at.append(answered_at)
    late_s = time.monotonic() - start - duration_s
    print(f"paced: {len(events)} requests in {duration_s}s, the last answered {late_s:.2f}s after")
    return tallies


def metric(port: int, name: str, label: str) -> int:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    # prometheus_client's multiprocess mode writes counters as floats ("2.0").
    match = re.search(rf"^quayfront_{name}_total\{{[a-z]+=\"{label}\"\}} ([0-9.e+]+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


def client_statuses(proc: Process, client: str) -> set[int]:
    lines = harness.read_access_log(proc.extra["access_log"])
    return {
        entry.status
        for entry in map(harness.parse_access_line, lines)
        if entry.client.startswith(client)
    }


def test_rate_limit_shared_through_redis_across_replicas(
    tmp_path: Path, registry: Process, start_quayfront, redis_servers, request
) -> None:
    """A client at twice its rate is refused about half the time whichever replica serves it;
    with Redis down the zones allow or deny as configured (logged once, counted); back, limits apply."""
    redis_port = harness.free_port()
    redis = redis_servers(redis_port)
    config = tmp_path / "quayfront.toml"
    config.write_text(CONFIG.format(rate=RATE_PER_S, burst=BURST, redis_port=redis_port))
    metrics_ports = harness.free_ports(2)
    replicas = [
        start_quayfront(
            f"http://127.0.0.1:{registry.ports['http']}",
            extra=(
                "--config", str(config), "--metrics-listen", f"{LOOPBACK}:{port}",
                "--workers", str(WORKERS_PER_REPLICA),
            ),
        )
        for port in metrics_ports
    ]
    haproxy = start_round_robin(tmp_path / "haproxy", *(r.ports["proxy"] for r in replicas))
    request.addfinalizer(haproxy.stop)
    front = haproxy.ports["front"]
    harness.wait_for(lambda: https_status(front, "/v2/", PROBE_CLIENT) == 200, 10,
                     what="the first request through both replicas")

    # Both replicas draw from one bucket per client.
    tallies = paced(front, RUN_S, {
        (FAST_CLIENT, "/v2/"): 2 * RATE_PER_S,
        (SLOW_CLIENT, "/v2/"): RATE_PER_S / 6,
    })
    fast, slow = tallies[(FAST_CLIENT, "/v2/")], tallies[(SLOW_CLIENT, "/v2/")]
    fast.check_about_half_refused("shared limit, client at twice its rate")
    assert set(fast.statuses) <= {200, 429}
    assert slow.statuses and set(slow.statuses) == {200}
    for replica in replicas:
        assert client_statuses(replica, FAST_CLIENT) == {200, 429}, replica.name

    # Redis gone: "registry" allows, "strict" denies.
    assert redis.stop() is not None
    tallies = paced(front, 2.0, {
        (FAST_CLIENT, "/v2/"): 2 * RATE_PER_S,
        (FAST_CLIENT, "/v2/_catalog"): RATE_PER_S,
    })
    allowed, denied = tallies[(FAST_CLIENT, "/v2/")], tallies[(FAST_CLIENT, "/v2/_catalog")]
    assert set(allowed.statuses) == {200}, allowed.statuses
    assert set(denied.statuses) == {429}, denied.statuses
    # Every replica, asked directly (its plain TLS listener, no balancer
    # choosing), allows back to back past the rate and denies the strict zone.
    for replica in replicas:
        statuses = [https_status(replica.ports["tls"], "/v2/", FAST_CLIENT) for _ in range(4)]
        assert statuses == [200] * 4, (replica.name, statuses)
        assert https_status(replica.ports["tls"], "/v2/_catalog", FAST_CLIENT) == 429
    for replica, port in zip(replicas, metrics_ports):
        output = replica.output()
        for zone in ("registry", "strict"):
            # Each worker keeps its own connection to Redis: it logs the
            # transition once, when it first finds the store failing.
            logged = output.count(f"rate limit zone {zone}: the shared store failed")
            assert 1 <= logged <= WORKERS_PER_REPLICA, output
            for worker in range(WORKERS_PER_REPLICA):
                line = f"[worker {worker}] rate limit zone {zone}: the shared store failed"
                assert output.count(line) <= 1, output
        assert 2 <= metric(port, "rate_limit_store_transitions", "down") <= 2 * WORKERS_PER_REPLICA
        assert metric(port, "rate_limit_store_errors", "registry") >= 1
        assert metric(port, "rate_limit_store_errors", "strict") >= 1

    # Redis back (empty): once each replica has reconnected, limits apply again.
    redis_servers(redis_port)

    def both_answer_again() -> bool:
        https_status(front, "/v2/", PROBE_CLIENT)
        return all(
            "rate limit zone registry: the shared store answers again" in r.output()
            for r in replicas
        )

    harness.wait_for(both_answer_again, 20, interval=0.2, what="both replicas to reach Redis again")
    tallies = paced(front, RUN_S, {(SLOW_CLIENT, "/v2/"): 2 * RATE_PER_S})
    again = tallies[(SLOW_CLIENT, "/v2/")]
    again.check_about_half_refused("after Redis came back")
    for replica, port in zip(replicas, metrics_ports):
        # Only the zone that has seen a request since knows Redis is back.
        answered = replica.output().count("zone registry: the shared store answers again")
        assert 1 <= answered <= WORKERS_PER_REPLICA
        assert metric(port, "rate_limit_store_transitions", "up") == answered


def test_token_bucket_script_arithmetic_in_a_real_redis(tmp_path: Path, redis_servers) -> None:
    """The Lua bucket: a burst, then refusals with the right wait, refill at the rate, an expiring key."""
    redis = redis_servers(harness.free_port())
    cli = harness.require_binary("redis-cli")

    def take(key: str, rate: float, burst: int) -> tuple[int, float]:
        done = subprocess.run(
            [cli, "-h", LOOPBACK, "-p", str(redis.ports["redis"]), "--no-raw",
             "EVAL", TOKEN_BUCKET_SCRIPT, "1", key, repr(rate), str(burst)],
            capture_output=True, text=True, timeout=10, check=True,
        )
        taken, wait = re.findall(r'^\s*\d\) (?:\(integer\) )?"?([0-9.e-]+)"?$', done.stdout, re.M)
        return int(taken), float(wait)

    assert [take("b", 2.0, 3)[0] for _ in range(3)] == [1, 1, 1]
    taken, wait_s = take("b", 2.0, 3)
    assert taken == 0 and 0.3 < wait_s <= 0.5
    ttl = subprocess.run([cli, "-h", LOOPBACK, "-p", str(redis.ports["redis"]), "PTTL", "b"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    # Empty bucket: full again after burst / rate = 1.5 s, plus a second.
    assert 2000 < int(ttl) <= 2500
    started = time.monotonic()
    harness.wait_for(lambda: take("b", 2.0, 3)[0] == 1, 3, interval=0.05, what="a refilled token")
    assert time.monotonic() - started >= 0.2
    # Another key (client) has its own full bucket.
    assert take("other", 2.0, 3)[0] == 1


# Shared session ticket keys.


def s_client(port: int, *args: str) -> str:
    """openssl s_client: the "New," / "Reused," line of one short session."""
    binary = harness.require_binary("openssl")
    done = subprocess.run(
        [binary, "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", "localhost",
         "-ign_eof", *args],
        input=b"GET /health/instance HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True, timeout=30,
    )
    out = done.stdout.decode(errors="replace")
    lines = [line for line in out.splitlines() if line.startswith(("New,", "Reused,"))]
    assert lines, f"s_client printed no session line:\n{harness.tail(out)}\n{done.stderr.decode()}"
    return lines[-1]


def worker_reloads(replica: Process) -> int:
    """How many certificate reloads the replica's workers have logged."""
    return len(re.findall(r"\[worker \d+\] certificates reloaded \(SIGHUP\)", replica.output()))


def test_tls_session_resumes_on_the_other_replica_and_across_a_key_rotation(
    tmp_path: Path, registry: Process, start_quayfront
) -> None:
    """A session from replica A resumes on B; after a rotation the old ticket still resumes."""
    current, previous = tmp_path / "ticket-current.key", tmp_path / "ticket-previous.key"
    old_key, new_key, spare_key = (os.urandom(80) for _ in range(3))
    current.write_bytes(old_key)
    previous.write_bytes(spare_key)
    config = tmp_path / "quayfront.toml"
    config.write_text(f'[tls]\nsession_ticket_key_files = ["{current}", "{previous}"]\n')
    upstream = f"http://127.0.0.1:{registry.ports['http']}"
    a, b = (
        start_quayfront(
            upstream, extra=("--config", str(config), "--workers", str(WORKERS_PER_REPLICA))
        )
        for _ in range(2)
    )
    a_port, b_port = a.ports["tls"], b.ports["tls"]

    for version in ("-tls1_3", "-tls1_2"):
        session = tmp_path / f"session{version}.pem"
        assert s_client(a_port, version, "-sess_out", str(session)).startswith("New,")
        assert s_client(b_port, version, "-sess_in", str(session)).startswith("Reused,"), version

    # Rotation on B: a new current key, the old one kept second.
    session = tmp_path / "before-rotation.pem"
    assert s_client(a_port, "-sess_out", str(session)).startswith("New,")
    current.write_bytes(new_key)
    previous.write_bytes(old_key)
    os.kill(b.pid, signal.SIGHUP)
    harness.wait_for(lambda: worker_reloads(b) == WORKERS_PER_REPLICA, 10,
                     what="every worker of replica B to reload", abort=b.died)
    assert s_client(b_port, "-sess_in", str(session)).startswith("Reused,")

    # The control: once the old key is gone its tickets no longer resume.
    previous.write_bytes(spare_key)
    os.kill(b.pid, signal.SIGHUP)
    harness.wait_for(lambda: worker_reloads(b) == 2 * WORKERS_PER_REPLICA, 10,
                     what="every worker of replica B to reload again", abort=b.died)
    assert s_client(b_port, "-sess_in", str(session)).startswith("New,")
