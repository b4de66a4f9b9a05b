"""
Scaling over cores: quayfront with 1 worker and with ``--workers auto``
beside nginx with ``worker_processes 1`` and ``auto``, the same PROXY + TLS
chain to the same upstream, in the same run:

  - small-request rate (BENCH_CONNECTIONS keep-alive connections, each
    making BENCH_REQUESTS_PER_CONNECTION requests) and front CPU per request;
  - the same with a new connection per request (Quay closes the connection
    after most registry responses), through HAProxy sending PROXY v2;
  - upload and download MB/s of BENCH_SCALING_BYTES and CPU per GiB;
  - memory per held connection (PROXY header and TLS handshake done, idle);
  - the scaling factor from 1 worker to ``auto``.

Then how evenly two quayfront workers share new connections through HAProxy,
with the one shared listening socket (adoptStreamPort) and with a
SO_REUSEPORT socket per worker.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import statistics
import subprocess
import time
from pathlib import Path

from tests.integration import harness
from tests.integration.harness import LOOPBACK, free_ports

from . import fronts
from .fronts import (
    CONNECTIONS,
    MB,
    REQUESTS_PER_CONNECTION,
    Front,
    Rate,
    Upstream,
    cpu_seconds,
    rss_bytes_of,
    small_concurrent,
    warm_up,
)
from .report import fmt, ratio, table

ROUNDS = fronts.ROUNDS
#: Transfer size here (smaller than the main comparison's: four fronts).
BYTES = int(os.environ.get("BENCH_SCALING_BYTES", str(256 << 20)))
#: Idle connections held to measure memory per connection.
HELD_CONNECTIONS = int(os.environ.get("BENCH_HELD_CONNECTIONS", "400"))
#: New-connection requests per curl process, and curl processes at once.
FRESH_REQUESTS = int(os.environ.get("BENCH_FRESH_REQUESTS", "300"))
FRESH_CLIENTS = 4


def cores() -> int:
    return len(os.sched_getaffinity(0))


def fresh_connections(front: Front, port: int, into: Rate) -> Rate:
    """
    FRESH_CLIENTS curl processes, each making FRESH_REQUESTS requests with
    ``Connection: close`` (so a TCP connection, PROXY header and TLS
    handshake each) to HAProxy's PROXY v2 frontend at C{port}.
    """
    timeout = 300
    before = cpu_seconds(front.all_pids)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [*fronts.curl_argv(timeout, proxy_protocol=False), "-H", "Connection: close",
             f"https://{LOOPBACK}:{port}/small?f={c}&n=[1-{FRESH_REQUESTS}]"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        for c in range(FRESH_CLIENTS)
    ]
    try:
        outputs = [p.communicate(timeout=timeout + 10) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(front.all_pids) - before
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"{front.name} fresh connections: curl exited {p.returncode}: {err}")
        transfers = fronts._parse_write_out(out)
        bad = [t for t in transfers if t.status != 200]
        if len(transfers) != FRESH_REQUESTS or bad:
            raise RuntimeError(f"{front.name} fresh connections: {len(transfers)} answers, "
                               f"{len(bad)} not 200")
    total = FRESH_CLIENTS * FRESH_REQUESTS
    into.rates.append(total / elapsed)
    into.cpu_s += cpu
    into.elapsed_s += elapsed
    into.requests += total
    return into


def held_connection_bytes(front: Front) -> float:
    """RSS growth of the front's processes per idle connection (PROXY + TLS done)."""
    ctx = harness.unverified_tls_context()
    held = []
    before = rss_bytes_of(front.all_pids)
    try:
        for n in range(HELD_CONNECTIONS):
            raw = socket.create_connection((LOOPBACK, front.port), timeout=10)
            raw.sendall(f"PROXY TCP4 192.0.2.{n % 250 + 1} 192.0.2.1 {10000 + n} 443\r\n".encode())
            held.append(ctx.wrap_socket(raw, server_hostname="localhost"))
        time.sleep(1.0)
        after = rss_bytes_of(front.all_pids)
    finally:
        for s in held:
            s.close()
    return (after - before) / HELD_CONNECTIONS


def start_fronts(workdir: Path, values: dict[str, str], upstream_port: int, cert: Path,
                 key: Path) -> list[Front]:
    n = cores()
    started = []
    try:
        started.append(fronts.start_quayfront(workdir, upstream_port, cert, key,
                                              name="quayfront-1", extra=("--workers", "1")))
        started.append(fronts.start_quayfront(workdir, upstream_port, cert, key,
                                              name="quayfront-auto",
                                              extra=("--workers", "auto"), workers=n))
        for label, processes in (("1", "1"), ("auto", "auto")):
            port = free_ports(1)[0]
            globals_ = f"daemon off; master_process on; worker_processes {processes};"
            started.append(fronts.start_nginx(
                f"nginx-{label}", "nginx-front.conf.template",
                {**values, "PROXY_PORT": str(port),
                 "WORKDIR": str(workdir / f"nginx-{label}")},
                workdir / f"nginx-{label}", port, globals_=globals_))
        return started
    except BaseException:
        for front in started:
            front.stop()
        raise


def measure(fronts_: list[Front], upstream: Upstream, source: Path, workdir: Path) -> str:
    names = [f.name for f in fronts_]
    keepalive = {name: Rate() for name in names}
    fresh = {name: Rate() for name in names}
    down: dict[str, fronts.TransferResult] = {}
    up: dict[str, fronts.TransferResult] = {}
    held: dict[str, float] = {}
    balancers = {}
    try:
        for front in fronts_:
            warm_up(front)
            balancers[front.name] = harness.start_haproxy(workdir / f"haproxy-{front.name}",
                                                          front.port)
        for round_ in range(ROUNDS):
            order = fronts_ if round_ % 2 == 0 else fronts_[::-1]
            for front in order:
                small_concurrent(front, keepalive[front.name])
            for front in order:
                fresh_connections(front, balancers[front.name].ports["v2"], fresh[front.name])
        for front in fronts_:
            down[front.name] = fronts.download(front, front.port)
            up[front.name] = fronts.upload(front, front.port, upstream, source)
            held[front.name] = held_connection_bytes(front)
    finally:
        for balancer in balancers.values():
            balancer.stop()

    q1, qa, n1, na = names
    gib = BYTES / (1 << 30)

    def median(rate: Rate) -> float:
        return statistics.median(rate.rates)

    def row(label, values, digits):
        return [label, *(fmt(v, digits) for v in values)]

    rows = [
        row(f"{CONNECTIONS} keep-alive conn, req/s", [median(keepalive[n]) for n in names], 0),
        row("  front CPU per request, us", [keepalive[n].cpu_us_per_request for n in names], 0),
        row(f"new conn per request via HAProxy ({FRESH_CLIENTS} clients), req/s",
            [median(fresh[n]) for n in names], 0),
        row("  front CPU per request, us", [fresh[n].cpu_us_per_request for n in names], 0),
        row(f"download {gib:g} GiB (1 conn), MB/s", [down[n].mb_per_s for n in names], 0),
        row("  front CPU per GiB, s", [down[n].cpu_s_per_gib for n in names], 2),
        row(f"upload {gib:g} GiB (1 conn), MB/s", [up[n].mb_per_s for n in names], 0),
        row("  front CPU per GiB, s", [up[n].cpu_s_per_gib for n in names], 2),
        row("memory per held connection, KB", [held[n] / 1e3 for n in names], 1),
    ]
    ratios = [
        ["keep-alive req/s", ratio(median(keepalive[q1]), median(keepalive[n1])),
         ratio(median(keepalive[qa]), median(keepalive[na])),
         ratio(median(keepalive[qa]), median(keepalive[q1])),
         ratio(median(keepalive[na]), median(keepalive[n1]))],
        ["new-connection req/s", ratio(median(fresh[q1]), median(fresh[n1])),
         ratio(median(fresh[qa]), median(fresh[na])),
         ratio(median(fresh[qa]), median(fresh[q1])),
         ratio(median(fresh[na]), median(fresh[n1]))],
        ["CPU per keep-alive request", ratio(keepalive[q1].cpu_us_per_request,
                                            keepalive[n1].cpu_us_per_request),
         ratio(keepalive[qa].cpu_us_per_request, keepalive[na].cpu_us_per_request), "", ""],
        ["CPU per GiB uploaded", ratio(up[q1].cpu_s_per_gib, up[n1].cpu_s_per_gib),
         ratio(up[qa].cpu_s_per_gib, up[na].cpu_s_per_gib), "", ""],
        ["CPU per GiB downloaded", ratio(down[q1].cpu_s_per_gib, down[n1].cpu_s_per_gib),
         ratio(down[qa].cpu_s_per_gib, down[na].cpu_s_per_gib), "", ""],
    ]
    return "\n".join([
        f"4. Scaling over cores ({cores()} here): 1 worker and auto, quayfront and nginx",
        "",
        table(["metric", *names], rows),
        "",
        table(["ratio", "q-1 / n-1", "q-auto / n-auto", "q: auto / 1", "n: auto / 1"], ratios),
        "",
        f"{ROUNDS} round(s) of the request rates (median), fronts alternating.  CPU counts",
        "every process of a front (master/main process included).  Clients, HAProxy, the",
        "upstream and the fronts share the cores, so 'auto / 1' is bounded well below the",
        "core count here.  Transfers are one connection, so one worker serves each.",
    ])


def worker_shares(front: Front, before: dict[int, float]) -> list[float]:
    used = {pid: cpu_seconds([pid]) - before[pid] for pid in front.worker_pids}
    total = sum(used.values()) or 1.0
    return sorted(100 * v / total for v in used.values())


def spread(workdir: Path, upstream_port: int, cert: Path, key: Path) -> str:
    """
    Each worker's share of the work (CPU) under new-connection load through
    HAProxy, for the shared socket and for SO_REUSEPORT sockets.
    """
    rows = []
    for mode in ("shared", "reuseport"):
        shares = []
        rates = []
        front = fronts.start_quayfront(workdir, upstream_port, cert, key,
                                       name=f"quayfront-{mode}", extra=("--workers", "2"),
                                       env_extra={"QUAYFRONT_ACCEPT_MODE": mode}, workers=2)
        balancer = harness.start_haproxy(workdir / f"haproxy-{mode}", front.port)
        try:
            warm_up(front)
            for _ in range(ROUNDS):
                before = {pid: cpu_seconds([pid]) for pid in front.worker_pids}
                rate = fresh_connections(front, balancer.ports["v2"], Rate())
                rates.append(rate.rates[0])
                shares.append(worker_shares(front, before))
        finally:
            balancer.stop()
            front.stop()
        rows.append([mode, ", ".join(f"{low:.0f}/{high:.0f}" for low, high in shares),
                     fmt(statistics.median(rates), 0)])
    return "\n".join([
        "5. How two workers share new connections through HAProxy (PROXY v2 + TLS):",
        "   each round's CPU split between the two workers, %, and the request rate",
        "",
        table(["listening socket", "worker CPU split per round", "req/s"], rows),
        "",
        "shared: one socket bound by the main process, adopted by every worker",
        "(adoptStreamPort); reuseport: a SO_REUSEPORT socket per worker (the kernel",
        "hashes each connection's addresses to one of them).",
    ])


def run(workdir: Path) -> str:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # Four fronts: smaller transfers than the main comparison's.
    saved_bytes, fronts.BYTES = fronts.BYTES, BYTES
    datadir = fronts.make_datadir()
    started: list[Front] = []
    try:
        cert, key = fronts.make_cert(workdir)
        upstream_port, unused_port = free_ports(2)
        values = {"WORKDIR": str(workdir), "DATADIR": str(datadir), "CERT": str(cert),
                  "KEY": str(key), "UPSTREAM_PORT": str(upstream_port),
                  "PROXY_PORT": str(unused_port)}
        upstream_front = fronts.start_nginx("upstream-nginx", "nginx-upstream.conf.template",
                                            values, workdir, upstream_port)
        started.append(upstream_front)
        upstream = Upstream(upstream_port, datadir, upstream_front)
        for label in ("1", "auto"):
            (workdir / f"nginx-{label}").mkdir()
        four = start_fronts(workdir, values, upstream_port, cert, key)
        started += four
        sections = [measure(four, upstream, datadir / "upload-source", workdir)]
        for front in four:
            front.stop()
        sections.append(spread(workdir, upstream_port, cert, key))
        return "\n\n".join(sections)
    finally:
        for front in reversed(started):
            front.stop()
        shutil.rmtree(datadir, ignore_errors=True)
        fronts.BYTES = saved_bytes
