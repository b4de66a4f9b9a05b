"""
Memory per held idle TLS connection only (``BENCH_ONLY=held``): quayfront
(1 worker) and nginx (1 worker) as the same PROXY v2 + TLS front behind
HAProxy, as in L{tests.bench.rig}, measuring nothing but
L{rig.held_connection_bytes}, BENCH_HELD_ROUNDS times each on freshly
started fronts, taking turns.  About a minute, where the whole rig takes
several.

Each front is warmed up first with a few hundred short connections
(handshake and close), so that both start the measurement with their
allocators past their first growth, as in the full rig where the held
measurement comes after the load runs.
"""

from __future__ import annotations

import shutil
import socket
import statistics
from pathlib import Path

from tests.integration import harness
from tests.integration.harness import LOOPBACK

from . import fronts, rig
from .fronts import _env_int
from .report import fmt, ratio, table

#: Rounds of the held-connection measurement per front.
ROUNDS = _env_int("BENCH_HELD_ROUNDS", 3)
#: Short connections (handshake, close) that warm up each front.
WARMUP_CONNECTIONS = _env_int("BENCH_HELD_WARMUP", 200)


def _warm_up(subject: rig.Subject) -> None:
    ctx = harness.unverified_tls_context()
    for _ in range(WARMUP_CONNECTIONS):
        raw = socket.create_connection((LOOPBACK, subject.port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost"):
            pass


def _one_round(workdir: Path, name: str, start) -> float:
    """
    One measurement on a freshly started front: memory freed by an earlier
    round would otherwise be reused and hide what connections cost.
    """
    started: list = []
    try:
        front = start(name)
        started.append(front)
        balancer = rig.start_balancer(workdir / f"haproxy-{name}", front.port)
        started.append(balancer)
        subject = rig.Subject(name, front, balancer, "1")
        _warm_up(subject)
        return rig.held_connection_bytes(subject)
    finally:
        for proc in reversed(started):
            proc.stop()


def run(workdir: Path) -> str:
    """Start the upstream, both fronts and their balancers; measure; stop all."""
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # No transfers here: the upstream's files need no size.
    saved_bytes, fronts.BYTES = fronts.BYTES, 1
    datadir = fronts.make_datadir()
    started: list = []
    try:
        cert, key, values, upstream = rig.start_null_upstream(workdir, datadir)
        started.append(upstream)
        upstream_port = upstream.port
        starters = {
            "quayfront-1": lambda n: rig.start_quayfront(workdir / n, n, upstream_port,
                                                         cert, key, "1"),
            "nginx-1": lambda n: rig.start_nginx(workdir / n, n, values, "1"),
        }
        held: dict[str, list[float]] = {name: [] for name in starters}
        for round_ in range(ROUNDS):
            names = list(starters) if round_ % 2 == 0 else list(starters)[::-1]
            for name in names:
                held[name].append(_one_round(workdir / f"round-{round_}", name,
                                             starters[name]))
        subjects = list(starters)
        q, n = (statistics.median(held[name]) / 1024 for name in subjects)
        rows = [["memory per held idle TLS connection, KiB (median)", fmt(q, 1), fmt(n, 1),
                 ratio(q, n), "<= 2x"]]
        for name in subjects:
            rows.append([f"  {name}, each round",
                         " ".join(fmt(x / 1024, 1) for x in held[name]), "", "", ""])
        return "\n".join([
            "Memory per held idle TLS connection: quayfront (1 worker) vs nginx (1 worker),",
            "PROXY v2 + TLS behind HAProxy; summed RSS growth from "
            f"{rig.HELD_CONNECTIONS // 2} to {rig.HELD_CONNECTIONS} held",
            f"connections per added connection, {ROUNDS} round(s), after "
            f"{WARMUP_CONNECTIONS} warm-up connections each.",
            "",
            table(["metric", "quayfront", "nginx", "ratio q/n", "issue 11 asks"], rows),
        ])
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(datadir, ignore_errors=True)
        fronts.BYTES = saved_bytes
