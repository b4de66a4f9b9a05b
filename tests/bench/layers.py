"""
What a request costs below the HTTP layer, one change at a time
(``BENCH_ONLY=layers``): the reactor's per-event log context and Twisted's
deferred write path, against the stock epoll reactor.

Two measurements through the same rig as L{tests.bench.rig} (wrk, a
one-thread HAProxy sending PROXY v2, nginx as the null upstream):

  - quayfront's listener chain (TCP -> PROXY -> TLS) with the thinnest
    relay on top (L{tests.bench.layers_server}), once per reactor variant:
    with almost nothing above it, a change of a few microseconds per
    request is above the noise;
  - the whole of quayfront (one worker, the bench config) on the same
    reactor variants (L{tests.bench.variant_twistd}).

CPU per request is the server's utime + stime over all rounds / requests;
the variants take turns round by round, in alternating order.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.integration import harness
from tests.integration.harness import STARTUP_TIMEOUT_S, free_ports, port_listening

from . import fronts, rig
from .fronts import Front
from .layers_server import VARIANTS

#: The whole of quayfront on: the stock reactor, each change alone, all of them.
WHOLE_VARIANTS = ("stock", "no-log-context", "eager-writes", "lean")
from .report import fmt, ratio, table

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_chain(workdir: Path, variant: str, upstream_port: int, cert: Path,
                key: Path) -> Front:
    (port,) = free_ports(1)
    proc = harness.spawn(f"chain-{variant}", [
        sys.executable, "-m", "tests.bench.layers_server", variant, str(port),
        str(upstream_port), str(cert), str(key)], workdir, env=harness.quayfront_env(),
        cwd=REPO_ROOT)
    try:
        harness.wait_for(lambda: port_listening(port), STARTUP_TIMEOUT_S,
                         what=f"the {variant} chain to listen", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return Front(f"chain-{variant}", port, proc, worker_pids=[proc.pid], all_pids=[proc.pid])


def _measure(subjects: list[rig.Subject], upstream: Front) -> dict[str, rig.Rate]:
    rates = {s.label: rig.Rate() for s in subjects}
    for s in subjects:
        rig.run_wrk(s.port, rig.WARMUP_SECONDS, rig.CONNECTIONS)
    for round_ in range(rig.ROUNDS):
        order = subjects if round_ % 2 == 0 else subjects[::-1]
        for s in order:
            rig.small_requests(s, upstream, rates[s.label])
    return rates


def run(workdir: Path) -> str:
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    datadir = fronts.make_datadir()
    started: list = []
    try:
        cert, key, values, upstream = rig.start_null_upstream(workdir, datadir)
        started.append(upstream)
        upstream_port = upstream.port

        def subject(front: Front, label: str) -> rig.Subject:
            started.append(front)
            balancer = rig.start_balancer(workdir / f"haproxy-{label}", front.port)
            started.append(balancer)
            return rig.Subject(label, front, balancer, "1")

        chains = [subject(start_chain(workdir, v, upstream_port, cert, key), v)
                  for v in VARIANTS]
        chain_rates = _measure(chains, upstream)
        for s in chains:
            s.stop()
        whole = [subject(rig.start_quayfront(workdir / f"q-{v}", f"quayfront-{v}",
                                             upstream_port, cert, key, "1", variant=v), v)
                 for v in WHOLE_VARIANTS]
        whole_rates = _measure(whole, upstream)
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(datadir, ignore_errors=True)

    base = chain_rates["stock"].front_us
    rows = [[v, fmt(chain_rates[v].front_us, 1),
             fmt(None if base is None or chain_rates[v].front_us is None
                 else base - chain_rates[v].front_us, 1),
             fmt(chain_rates[v].requests_per_s, 0)] for v in VARIANTS]
    whole_base = whole_rates["stock"].front_us
    whole_rows = [[v, fmt(whole_rates[v].front_us, 1),
                   fmt(None if whole_base is None or whole_rates[v].front_us is None
                       else whole_base - whole_rates[v].front_us, 1),
                   fmt(whole_rates[v].requests_per_s, 0)] for v in WHOLE_VARIANTS]
    return "\n".join([
        "4. Below HTTP, one change at a time: quayfront's listener chain (TCP -> PROXY ->",
        "   TLS) with a minimal relay to the upstream, per reactor variant; then the whole",
        "   of quayfront (1 worker) on the same variants",
        "",
        table(["chain on reactor", "CPU per request, us", "saved vs stock, us", "req/s"], rows),
        "",
        table(["quayfront on reactor", "CPU per request, us", "saved vs stock, us", "req/s"],
              whole_rows),
        f"  lean / stock: {ratio(whole_rates['lean'].front_us, whole_rates['stock'].front_us)}",
        "",
        f"wrk -t1 -c{rig.CONNECTIONS} -d{rig.SECONDS}s through HAProxy (PROXY v2), "
        f"{rig.ROUNDS} round(s), variants alternating;",
        "CPU per request = the server process's CPU over all rounds / all requests.",
        "no-log-context: without Twisted's per-event callWithLogger; eager-writes: send()",
        "at once when nothing is buffered; lean: both (what quayfront installs).",
    ])
