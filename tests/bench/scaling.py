"""
How evenly two quayfront workers share new connections through HAProxy
(``BENCH_ONLY=spread``), with the one shared listening socket
(adoptStreamPort) and with a SO_REUSEPORT socket per worker.

The scaling figures themselves (1 worker and ``auto`` beside nginx) are in
L{tests.bench.rig}.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from tests.integration import harness
from tests.integration.harness import LOOPBACK, free_ports

from . import fronts
from .fronts import Front, Rate, cpu_seconds, warm_up
from .report import fmt, table

ROUNDS = fronts.ROUNDS
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
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    datadir = fronts.make_datadir()
    started: list[Front] = []
    try:
        cert, key = fronts.make_cert(workdir)
        (upstream_port,) = free_ports(1)
        values = {"WORKDIR": str(workdir), "DATADIR": str(datadir), "CERT": str(cert),
                  "KEY": str(key), "UPSTREAM_PORT": str(upstream_port), "PROXY_PORT": "0"}
        started.append(fronts.start_nginx("upstream-nginx", "nginx-upstream.conf.template",
                                          values, workdir, upstream_port))
        return spread(workdir, upstream_port, cert, key)
    finally:
        for front in reversed(started):
            front.stop()
        shutil.rmtree(datadir, ignore_errors=True)
