"""
quayfront beside nginx 1.22 as the same front, through the same load
balancer, to the same upstream, in the same run: the figures of issues 11
(one worker) and 12 (one worker and ``auto``).

The chain, for every front::

    wrk / curl / a Python socket holder          (the client)
      -> HAProxy, TCP mode, nbthread 1, send-proxy-v2
      -> the front: PROXY v2 header, TLS, HTTP/1.1      (what is measured)
      -> nginx serving /small, /big and WebDAV PUT     (the null upstream)

The rig is made as cheap as it can be so that the front is what saturates:
the load generator is C (wrk), the load balancer has one thread, the
upstream is nginx.  quayfront runs with every feature on (routes, a
rate-limit zone that never refuses, an access log file, metrics, timeouts:
etc/bench/quayfront.toml.template); nginx has the same (a limit_req zone,
an access log: etc/bench/nginx-front.conf.template).

Front CPU is utime + stime from /proc of the front's own processes only
(main + workers, nginx master + workers), read before and after each
measurement.  The rig's processes are read the same way (wrk from its
rusage), which gives the split of the machine's CPU between client,
HAProxy, upstream and front.

Measured per front, the fronts taking turns round by round:
  - small requests: ``wrk -t1 -c RIG_CONNECTIONS`` keep-alive GET /small for
    RIG_SECONDS (rate, front CPU per request, the CPU split);
  - the same with ``Connection: close`` (a TCP connection, PROXY header and
    full TLS handshake per request);
  - download and upload of BENCH_BYTES on one connection with curl (MB/s,
    front CPU per GiB);
  - memory per held idle connection (PROXY header and TLS handshake done):
    the growth of the front's summed RSS over BENCH_HELD_CONNECTIONS.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration import harness
from tests.integration.harness import (
    LOOPBACK,
    STARTUP_TIMEOUT_S,
    free_ports,
    port_listening,
    require_binary,
    spawn,
    tls_handshake,
    wait_for,
)

from . import fronts
from .fronts import (
    Front,
    Transfer,
    Upstream,
    _env_int,
    _fill,
    children_of,
    cpu_seconds,
    rss_bytes_of,
)
from .report import fmt, ratio, table

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Concurrent keep-alive connections of the small-request load.
CONNECTIONS = _env_int("BENCH_RIG_CONNECTIONS", 32)
#: Seconds of each wrk run (after its warm-up run).
SECONDS = _env_int("BENCH_RIG_SECONDS", 5)
#: Rounds of every measurement; the fronts' order alternates.
ROUNDS = _env_int("BENCH_ROUNDS", 3)
#: Rounds of the transfers: more than of the rest, as a 0.5 GiB transfer
#: takes about a second and its CPU per GiB varies more between rounds
#: than a 5 s load does.
TRANSFER_ROUNDS = _env_int("BENCH_TRANSFER_ROUNDS", max(ROUNDS, 5))
#: Idle connections held to measure memory per connection.
HELD_CONNECTIONS = _env_int("BENCH_HELD_CONNECTIONS", 400)
#: Download and upload size.
BYTES = _env_int("BENCH_BYTES", 512 << 20)
#: Seconds of wrk warm-up before a front's first measurement.
WARMUP_SECONDS = 2
MB = 1e6
GIB = 1 << 30


def cores() -> int:
    return len(os.sched_getaffinity(0))


# --- the machine's CPU ---------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(x) for x in fields]
    # user nice system idle iowait irq softirq steal (guest is in user)
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    return busy / fronts.CLK_TCK


@dataclass
class Cpu:
    """CPU seconds spent by each part of the rig during one measurement."""

    front: float = 0.0
    client: float = 0.0
    balancer: float = 0.0
    upstream: float = 0.0
    machine: float = 0.0
    elapsed_s: float = 0.0

    def add(self, other: Cpu) -> None:
        for name in ("front", "client", "balancer", "upstream", "machine", "elapsed_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class CpuWatch:
    """Reads the CPU of the front, the balancer and the upstream around a run."""

    def __init__(self, front: Front, balancer: harness.Process, upstream: Front) -> None:
        self.groups = {
            "front": front.all_pids,
            "balancer": [balancer.pid],
            "upstream": upstream.all_pids,
        }

    def __enter__(self) -> CpuWatch:
        self.before = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        self.machine_before = machine_busy_seconds()
        self.started = time.monotonic()
        self.cpu = Cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu.elapsed_s = time.monotonic() - self.started
        self.cpu.machine = machine_busy_seconds() - self.machine_before
        for name, pids in self.groups.items():
            setattr(self.cpu, name, cpu_seconds(pids) - self.before[name])


# --- processes ------------------------------------------------------------------


@dataclass
class Subject:
    """A front under test with its own load balancer in front of it."""

    label: str
    front: Front
    balancer: harness.Process
    workers: str

    @property
    def port(self) -> int:
        """Where clients connect: the balancer."""
        return self.balancer.ports["v2"]

    def stop(self) -> None:
        self.balancer.stop()
        self.front.stop()


def start_balancer(workdir: Path, front_port: int) -> harness.Process:
    """HAProxy, one thread, TCP mode, PROXY v2 to C{front_port}."""
    binary = require_binary("haproxy")
    (listen_port,) = free_ports(1)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "haproxy.cfg"
    config.write_text(_fill("haproxy.cfg.template", {"LISTEN_PORT": str(listen_port),
                                                     "FRONT_PORT": str(front_port)}))
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejected {config}:\n{check.stdout}{check.stderr}")
    proc = spawn("haproxy", [binary, "-db", "-f", str(config)], workdir)
    proc.ports["v2"] = listen_port
    try:
        wait_for(lambda: port_listening(listen_port), STARTUP_TIMEOUT_S,
                 what="haproxy to listen", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_quayfront(workdir: Path, name: str, upstream_port: int, cert: Path, key: Path,
                    workers: str, variant: str | None = None) -> Front:
    """
    quayfront under twistd with the bench config and C{workers} workers;
    C{variant}: on that reactor variant (L{tests.bench.variant_twistd}).
    """
    proxy_port, tls_port, metrics_port = free_ports(3)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.toml"
    config.write_text(_fill("quayfront.toml.template", {
        "PROXY_PORT": str(proxy_port), "TLS_PORT": str(tls_port),
        "METRICS_PORT": str(metrics_port), "UPSTREAM_PORT": str(upstream_port),
        "CERT": str(cert), "KEY": str(key), "ACCESS_LOG": str(workdir / f"{name}-access.log"),
        "WORKERS": '"auto"' if workers == "auto" else workers,
    }))
    twistd = harness.twistd_command()
    if variant is not None:
        twistd = [sys.executable, "-m", "tests.bench.variant_twistd", variant]
    argv = [*twistd, "-n", "--pidfile=", "quayfront", "--config", str(config)]
    proc = spawn(name, argv, workdir, env=harness.quayfront_env(), cwd=REPO_ROOT)
    expected = cores() if workers == "auto" else int(workers)
    try:
        wait_for(lambda: port_listening(proxy_port) and port_listening(tls_port),
                 STARTUP_TIMEOUT_S, what=f"{name} to listen", abort=proc.died)
        wait_for(lambda: tls_handshake(LOOPBACK, tls_port), 10,
                 what=f"{name} TLS handshake", abort=proc.died)
        children: list[int] = []
        if expected > 1:
            children = wait_for(
                lambda: (lambda c: c if len(c) == expected else None)(children_of(proc.pid)),
                STARTUP_TIMEOUT_S, what=f"{name}'s workers", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    # With workers, the main process only supervises: its CPU counts, and
    # its RSS is summed too (it does not grow with connections).
    return Front(name, proxy_port, proc, worker_pids=children or [proc.pid],
                 all_pids=[proc.pid, *children])


def start_nginx(workdir: Path, name: str, values: dict[str, str], workers: str) -> Front:
    (port,) = free_ports(1)
    workdir.mkdir(parents=True, exist_ok=True)
    globals_ = f"daemon off; master_process on; worker_processes {workers};"
    front = fronts.start_nginx(name, "nginx-front.conf.template",
                               {**values, "PROXY_PORT": str(port), "WORKDIR": str(workdir)},
                               workdir, port, globals_=globals_)
    expected = cores() if workers == "auto" else int(workers)
    if len(front.worker_pids) != expected:
        workers_ = wait_for(
            lambda: (lambda c: c if len(c) == expected else None)(children_of(front.process.pid)),
            STARTUP_TIMEOUT_S, what=f"{name}'s workers", abort=front.process.died)
        front = Front(name, port, front.process, worker_pids=workers_,
                      all_pids=[front.process.pid, *workers_], extra_pids=list(workers_))
    return front


# --- the client: wrk --------------------------------------------------------------


@dataclass(frozen=True)
class WrkRun:
    requests: int
    seconds: float
    client_cpu_s: float


_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.MULTILINE)
_WRK_BAD = re.compile(r"^\s*(Non-2xx or 3xx responses|Socket errors):.*$", re.MULTILINE)
_WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def run_wrk(port: int, seconds: int, connections: int, close: bool = False) -> WrkRun:
    """
    One wrk run against C{port}; every answer must be a 2xx without a socket
    error (a refused or failed request fails the benchmark).  Returns the
    request count and wrk's own CPU time (from its rusage).
    """
    argv = [require_binary("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s",
            "--timeout", "10s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"https://{LOOPBACK}:{port}/small")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    # communicate() has reaped wrk; its CPU is in our children's rusage.
    client_cpu = _reaped_child_cpu()
    total = _WRK_TOTAL.search(out)
    bad = _WRK_BAD.search(out)
    if proc.returncode != 0 or total is None or bad is not None:
        raise RuntimeError(f"wrk against {port} failed ({proc.returncode}): {' '.join(argv)}\n"
                           f"{out}{err}")
    elapsed = float(total.group(2)) * _WRK_UNITS[total.group(3)]
    return WrkRun(int(total.group(1)), elapsed, client_cpu)


_children_cpu_seen = 0.0


def _reaped_child_cpu() -> float:
    """CPU of the children reaped since the last call (the wrk just run)."""
    global _children_cpu_seen
    times = os.times()
    total = times.children_user + times.children_system
    used, _children_cpu_seen = total - _children_cpu_seen, total
    return used


@dataclass
class Rate:
    """Small requests with wrk, over rounds."""

    rates: list[float] = field(default_factory=list)
    requests: int = 0
    cpu: Cpu = field(default_factory=Cpu)

    @property
    def requests_per_s(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    def per_request_us(self, seconds: float) -> float | None:
        return seconds * 1e6 / self.requests if self.requests else None

    @property
    def front_us(self) -> float | None:
        return self.per_request_us(self.cpu.front)


def small_requests(subject: Subject, upstream: Front, into: Rate, close: bool = False) -> None:
    connections = CONNECTIONS if not close else min(CONNECTIONS, 8)
    _reaped_child_cpu()
    with CpuWatch(subject.front, subject.balancer, upstream) as watch:
        done = run_wrk(subject.port, SECONDS, connections, close)
    watch.cpu.client = done.client_cpu_s
    into.rates.append(done.requests / done.seconds)
    into.requests += done.requests
    into.cpu.add(watch.cpu)


# --- transfers -----------------------------------------------------------------------


@dataclass
class Transfers:
    mb_per_s: list[float] = field(default_factory=list)
    cpu_s_per_gib: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        return statistics.median(self.mb_per_s) if self.mb_per_s else None

    @property
    def cpu(self) -> float | None:
        return statistics.median(self.cpu_s_per_gib) if self.cpu_s_per_gib else None


def _transfer(subject: Subject, args: list[str], check) -> tuple[float, float]:
    timeout = fronts.transfer_timeout_s()
    before = cpu_seconds(subject.front.all_pids)
    (transfer,) = fronts.run_curl(args, timeout, proxy_protocol=False)
    cpu = cpu_seconds(subject.front.all_pids) - before
    check(transfer)
    return BYTES / transfer.time_total_s / MB, cpu * GIB / BYTES


def download(subject: Subject, into: Transfers) -> None:
    def check(t: Transfer) -> None:
        if t.status != 200 or t.size_download != BYTES:
            raise RuntimeError(f"download through {subject.label}: status {t.status}, "
                               f"{t.size_download} of {BYTES} bytes")

    rate, cpu = _transfer(subject, ["-o", os.devnull,
                                    f"https://{LOOPBACK}:{subject.port}/big"], check)
    into.mb_per_s.append(rate)
    into.cpu_s_per_gib.append(cpu)


_uploads = 0


def upload(subject: Subject, upstream: Upstream, source: Path, into: Transfers) -> None:
    """PUT BENCH_BYTES; the upstream answers after the last byte is stored."""
    global _uploads
    _uploads += 1
    stored = upstream.upload_dir / f"blob-{_uploads}"

    def check(t: Transfer) -> None:
        size = stored.stat().st_size if stored.exists() else None
        if t.status not in (201, 204) or t.size_upload != BYTES or size != BYTES:
            raise RuntimeError(f"upload through {subject.label}: status {t.status}, sent "
                               f"{t.size_upload}, upstream stored {size} of {BYTES} bytes")

    try:
        rate, cpu = _transfer(subject, [
            "-T", str(source), "-H", "Expect:", "-o", os.devnull,
            f"https://{LOOPBACK}:{subject.port}/upload/{stored.name}"], check)
    finally:
        stored.unlink(missing_ok=True)
    into.mb_per_s.append(rate)
    into.cpu_s_per_gib.append(cpu)


# --- held connections ----------------------------------------------------------------


def _settled_rss(pids: list[int]) -> int:
    """
    The summed RSS of C{pids} once it stops moving (the front has finished
    the last handshakes), bounded by a deadline.
    """
    deadline = time.monotonic() + 5
    rss = rss_bytes_of(pids)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_bytes_of(pids)
        if now == rss:
            break
        rss = now
    return rss


def held_connection_bytes(subject: Subject) -> float:
    """
    Memory per idle connection held through the balancer, with the PROXY
    header read and the TLS handshake done: the growth of the front's
    summed RSS from holding half of BENCH_HELD_CONNECTIONS to holding all
    of them, divided by the other half.  The first half takes up whatever
    the allocators kept free from earlier load (which would otherwise hide
    the cost of a connection); the second is what connections cost.
    """
    ctx = harness.unverified_tls_context()
    held = []
    pids = subject.front.all_pids
    half = max(1, HELD_CONNECTIONS // 2)

    def hold(count: int) -> None:
        for _ in range(count):
            raw = socket.create_connection((LOOPBACK, subject.port), timeout=10)
            held.append(ctx.wrap_socket(raw, server_hostname="localhost"))

    try:
        hold(half)
        before = _settled_rss(pids)
        hold(half)
        after = _settled_rss(pids)
    finally:
        for s in held:
            s.close()
    return (after - before) / half


# --- the run ---------------------------------------------------------------------------


@dataclass
class Results:
    keepalive: dict[str, Rate] = field(default_factory=dict)
    fresh: dict[str, Rate] = field(default_factory=dict)
    down: dict[str, Transfers] = field(default_factory=dict)
    up: dict[str, Transfers] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)


def measure(subjects: list[Subject], upstream: Upstream, source: Path) -> Results:
    results = Results()
    for s in subjects:
        results.keepalive[s.label] = Rate()
        results.fresh[s.label] = Rate()
        results.down[s.label] = Transfers()
        results.up[s.label] = Transfers()
        # Warm up: upstream pool, caches, the TLS session code.
        run_wrk(s.port, WARMUP_SECONDS, CONNECTIONS)
    for round_ in range(ROUNDS):
        order = subjects if round_ % 2 == 0 else subjects[::-1]
        for s in order:
            small_requests(s, upstream.front, results.keepalive[s.label])
        for s in order:
            small_requests(s, upstream.front, results.fresh[s.label], close=True)
    for round_ in range(TRANSFER_ROUNDS):
        order = subjects if round_ % 2 == 0 else subjects[::-1]
        for s in order:
            download(s, results.down[s.label])
        for s in order:
            upload(s, upstream, source, results.up[s.label])
    for s in subjects:
        results.held[s.label] = held_connection_bytes(s)
    return results


def _issue11(r: Results, q: str, n: str) -> str:
    k, d, u = r.keepalive, r.down, r.up

    def row(label, a, b, digits, limit=""):
        return [label, fmt(a, digits), fmt(b, digits), ratio(a, b), limit]

    rows = [
        row(f"front CPU per small GET, {CONNECTIONS} keep-alive conn, us",
            k[q].front_us, k[n].front_us, 1, "<= 4x and <= 100 us"),
        row("front CPU per GiB uploaded, s", u[q].cpu, u[n].cpu, 2, "<= 1.3x"),
        row("front CPU per GiB downloaded, s", d[q].cpu, d[n].cpu, 2, "<= 1.2x"),
        row("memory per held idle TLS connection, KiB", r.held[q] / 1024, r.held[n] / 1024, 1,
            "<= 2x"),
        row("small GET rate, req/s", k[q].requests_per_s, k[n].requests_per_s, 0, ""),
        row("upload / download, MB/s",  u[q].rate, u[n].rate, 0, ""),
        row("", d[q].rate, d[n].rate, 0, ""),
    ]
    return "\n".join([
        "2. Issue 11: quayfront (1 worker, every feature on) vs nginx (1 worker), the",
        "   same PROXY v2 + TLS front behind HAProxy, null upstream",
        "",
        table(["metric", "quayfront", "nginx", "ratio q/n", "issue 11 asks"], rows),
        "",
        "   CPU per GiB in each transfer round, s (the table gives the medians):",
        *(f"   {label:<10} {name}: " + " ".join(fmt(x, 2) for x in by[name].cpu_s_per_gib)
          for label, by in (("uploaded", u), ("downloaded", d)) for name in (q, n)),
    ])


def _split(r: Results, labels: list[str]) -> str:
    rows = []
    for label in labels:
        for kind, rates in (("keep-alive", r.keepalive), ("new conn", r.fresh)):
            rate = rates[label]
            cpu = rate.cpu
            if not rate.requests:
                continue
            rig = cpu.client + cpu.balancer + cpu.upstream
            other = cpu.machine - rig - cpu.front
            rows.append([f"{label}, {kind}", *(fmt(rate.per_request_us(x), 1) for x in (
                cpu.client, cpu.balancer, cpu.upstream, cpu.front)),
                fmt(max(0.0, other) / cpu.elapsed_s, 2),
                fmt(cpu.machine / cpu.elapsed_s, 2)])
    return table(["front, load", "wrk us/req", "haproxy us/req", "upstream us/req",
                  "front us/req", "other cores", "busy cores"], rows)


def _issue12(r: Results, labels: list[str]) -> str:
    q1, qa, n1, na = labels
    k, f, d, u = r.keepalive, r.fresh, r.down, r.up
    gib = BYTES / GIB

    def row(label, values, digits):
        return [label, *(fmt(v, digits) for v in values)]

    rows = [
        row(f"{CONNECTIONS} keep-alive conn, req/s", [k[x].requests_per_s for x in labels], 0),
        row("  front CPU per request, us", [k[x].front_us for x in labels], 1),
        row("new conn per request (full handshake), req/s",
            [f[x].requests_per_s for x in labels], 0),
        row("  front CPU per request, us", [f[x].front_us for x in labels], 1),
        row(f"upload {gib:g} GiB (1 conn), MB/s", [u[x].rate for x in labels], 0),
        row("  front CPU per GiB, s", [u[x].cpu for x in labels], 2),
        row(f"download {gib:g} GiB (1 conn), MB/s", [d[x].rate for x in labels], 0),
        row("  front CPU per GiB, s", [d[x].cpu for x in labels], 2),
        row("memory per held idle TLS connection, KiB", [r.held[x] / 1024 for x in labels], 1),
    ]

    def rr(a, b):
        return ratio(a.requests_per_s, b.requests_per_s)

    ratios = [
        ["keep-alive req/s", rr(k[q1], k[n1]), rr(k[qa], k[na]), rr(k[qa], k[q1]),
         rr(k[na], k[n1])],
        ["new-connection req/s", rr(f[q1], f[n1]), rr(f[qa], f[na]), rr(f[qa], f[q1]),
         rr(f[na], f[n1])],
        ["CPU per keep-alive request", ratio(k[q1].front_us, k[n1].front_us),
         ratio(k[qa].front_us, k[na].front_us), "", ""],
        ["CPU per new-connection request", ratio(f[q1].front_us, f[n1].front_us),
         ratio(f[qa].front_us, f[na].front_us), "", ""],
        ["upload MB/s", ratio(u[q1].rate, u[n1].rate), ratio(u[qa].rate, u[na].rate), "", ""],
        ["CPU per GiB uploaded", ratio(u[q1].cpu, u[n1].cpu), ratio(u[qa].cpu, u[na].cpu),
         "", ""],
        ["download MB/s", ratio(d[q1].rate, d[n1].rate), ratio(d[qa].rate, d[na].rate), "", ""],
        ["CPU per GiB downloaded", ratio(d[q1].cpu, d[n1].cpu), ratio(d[qa].cpu, d[na].cpu),
         "", ""],
        ["memory per held connection", ratio(r.held[q1], r.held[n1]),
         ratio(r.held[qa], r.held[na]), "", ""],
    ]
    return "\n".join([
        f"3. Issue 12: 1 worker and auto ({cores()} here), quayfront and nginx, same chain",
        "",
        table(["metric", *labels], rows),
        "",
        table(["ratio", "q-1 / n-1", "q-auto / n-auto", "q: auto / 1", "n: auto / 1"], ratios),
    ])


def _notes(labels: list[str]) -> str:
    return "\n".join([
        f"wrk -t1 -c{CONNECTIONS} -d{SECONDS}s (new connections: -c{min(CONNECTIONS, 8)}"
        " -H 'Connection: close'),",
        f"  {ROUNDS} round(s), the fronts' order alternating; rates are the median round,",
        "  CPU per request is the front's CPU over all rounds / all requests.  Every answer",
        "  must be 2xx (wrk's non-2xx and socket-error counts abort the run).",
        "Front CPU: utime + stime of the front's processes only (quayfront main + workers,",
        "  nginx master + workers), from /proc.  Transfers: curl, one connection, "
        f"{TRANSFER_ROUNDS} rounds,",
        "  median round.  Memory per held connection: summed RSS growth from "
        f"{HELD_CONNECTIONS // 2} to {HELD_CONNECTIONS} idle",
        "  connections (PROXY header read, TLS handshake done), through HAProxy, per",
        "  added connection.",
        "KiB = 1024 bytes, MB = 10^6 bytes.",
    ])


def _rig_note(r: Results, labels: list[str]) -> str:
    lines = [
        "Where the machine's CPU went during the small-request runs (per request, and",
        "cores busy on average; 'other' is what no process of the rig used: the",
        "kernel's softirq work for loopback, and anything else running on the machine):",
        "",
        _split(r, labels),
    ]
    if "quayfront-auto" in labels and "quayfront-1" in labels:
        q1, qa = r.keepalive["quayfront-1"], r.keepalive["quayfront-auto"]
        busy = qa.cpu.machine / qa.cpu.elapsed_s if qa.cpu.elapsed_s else 0.0
        rig_cores = (qa.cpu.client + qa.cpu.balancer + qa.cpu.upstream) / max(
            qa.cpu.elapsed_s, 1e-9)
        rig_us = qa.per_request_us(qa.cpu.client + qa.cpu.balancer + qa.cpu.upstream) or 0.0
        front_us = q1.front_us or 0.0
        # With every core busy and nothing else running, auto can serve at
        # most cores / (front + rig CPU per request).
        bound = cores() * 1e6 / (front_us + rig_us) if front_us + rig_us else None
        lines += [
            "",
            f"quayfront-auto keep-alive: the machine was {busy:.2f} of {cores()} cores busy;"
            f" the rig (wrk, HAProxy,",
            f"  upstream) used {rig_cores:.2f} cores ({rig_us:.0f} us per request).  With all"
            f" {cores()} cores and the",
            f"  1-worker front cost ({front_us:.0f} us), auto could serve at most"
            f" {fmt(bound, 0)} req/s,",
            f"  {ratio(bound, q1.requests_per_s)} the 1-worker rate; measured: "
            f"{ratio(qa.requests_per_s, q1.requests_per_s)}.",
            "  " + ("The machine was saturated: the scaling is bounded by the cores the rig and"
                    " other load take, not by the workers."
                    if busy > 0.9 * cores() else
                    "Cores were left idle: the rig did not limit the scaling."),
        ]
    return "\n".join(lines)


def start_null_upstream(workdir: Path, datadir: Path) -> tuple[Path, Path, dict[str, str], Front]:
    """
    The bench certificate (in C{workdir}) and the nginx null upstream
    serving C{datadir}: the certificate, its key, the values the config
    templates are filled with, and the upstream.
    """
    cert, key = fronts.make_cert(workdir)
    (upstream_port,) = free_ports(1)
    values = {"WORKDIR": str(workdir), "DATADIR": str(datadir), "CERT": str(cert),
              "KEY": str(key), "UPSTREAM_PORT": str(upstream_port), "PROXY_PORT": "0"}
    upstream = fronts.start_nginx("upstream-nginx", "nginx-upstream.conf.template",
                                  values, workdir, upstream_port)
    return cert, key, values, upstream


def run(workdir: Path, scaling: bool = True) -> str:
    """
    Start the upstream and the fronts, measure, stop everything; return the
    report.  C{scaling}: also quayfront and nginx with ``auto`` workers.
    """
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    saved_bytes, fronts.BYTES = fronts.BYTES, BYTES
    datadir = fronts.make_datadir()
    started: list = []
    try:
        cert, key, values, upstream_front = start_null_upstream(workdir, datadir)
        started.append(upstream_front)
        upstream_port = upstream_front.port
        upstream = Upstream(upstream_port, datadir, upstream_front)
        counts = ("1", "auto") if scaling else ("1",)
        subjects: list[Subject] = []
        for workers in counts:
            name = f"quayfront-{workers}"
            front = start_quayfront(workdir / name, name, upstream_port, cert, key, workers)
            started.append(front)
            balancer = start_balancer(workdir / f"haproxy-{name}", front.port)
            started.append(balancer)
            subjects.append(Subject(name, front, balancer, workers))
        for workers in counts:
            name = f"nginx-{workers}"
            front = start_nginx(workdir / name, name, values, workers)
            started.append(front)
            balancer = start_balancer(workdir / f"haproxy-{name}", front.port)
            started.append(balancer)
            subjects.append(Subject(name, front, balancer, workers))
        results = measure(subjects, upstream, datadir / "upload-source")
        labels = [s.label for s in subjects]
        sections = [_issue11(results, "quayfront-1", "nginx-1")]
        if scaling:
            sections.append(_issue12(results, labels))
        sections.append(_rig_note(results, labels))
        sections.append(_notes(labels) + "\n" + fronts.tool_versions() + ", " + _wrk_version())
        return "\n\n".join(sections)
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(datadir, ignore_errors=True)
        fronts.BYTES = saved_bytes


def _wrk_version() -> str:
    out = subprocess.run([require_binary("wrk"), "-v"], capture_output=True, text=True,
                         timeout=30)
    first = (out.stdout + out.stderr).split("\n")[0]
    return first.split(" [")[0]
