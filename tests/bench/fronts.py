"""
Helpers shared by the benchmarks (processes, CPU and RSS from /proc, curl
transfers, the nginx configs, the certificate), and quayfront under
cProfile (``BENCH_ONLY=profile``): each workload (a download and an upload
of BENCH_BYTES, BENCH_SMALL_REQUESTS sequential ``GET /small`` on one
connection) against one quayfront, profiling only while it runs, and where
its CPU time goes by layer.

The comparison with nginx is in L{tests.bench.rig}.
"""

from __future__ import annotations

import grp
import math
import os
import pstats
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import (
    LOOPBACK,
    STARTUP_TIMEOUT_S,
    Process,
    free_ports,
    port_listening,
    require_binary,
    spawn,
    tls_handshake,
    twistd_command,
    wait_for,
)

from .report import fmt, table

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = REPO_ROOT / "etc" / "bench"


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    value = int(os.environ.get(name, str(default)))
    if value < minimum:
        raise SystemExit(f"{name} must be at least {minimum}, got {value}")
    return value


#: Size of the download and of the upload.
BYTES = _env_int("BENCH_BYTES", 1 << 30)
#: Sequential small requests on one connection.
SMALL_REQUESTS = _env_int("BENCH_SMALL_REQUESTS", 2000, minimum=2)
#: Concurrent connections, and requests on each.
CONNECTIONS = _env_int("BENCH_CONNECTIONS", 4)
REQUESTS_PER_CONNECTION = _env_int("BENCH_REQUESTS_PER_CONNECTION", 1000)
#: Every measurement is repeated this many rounds per front, alternating
#: which front goes first: transfers count their best round, small requests
#: pool their samples over the rounds.
ROUNDS = _env_int("BENCH_ROUNDS", 3)
#: Run quayfront again under cProfile and report its hotspots.
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
#: A transfer slower than this (bytes/s) is given up on.
SLOWEST_TRANSFER_BPS = 5_000_000
#: Seconds between RSS samples.
RSS_INTERVAL_S = 0.05
#: Requests that warm up each front (upstream pool, caches) before measuring.
WARMUP_REQUESTS = 50
#: The write-out line curl prints after each transfer.
CURL_MARK = "@@bench"
CURL_WRITE_OUT = (
    "\\n" + CURL_MARK + " %{http_code} %{size_download} %{size_upload} %{time_total} "
    "%{num_connects}\\n"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1e6


# --- processes --------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses; fields follow the last ")".
        return f.read().rsplit(")", 1)[1].split()


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is C{pid}, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry))[1]) == pid:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of C{pids} so far."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes_of(pids: list[int]) -> int:
    """Sum of VmRSS over C{pids}."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class PeakRss:
    """Samples the summed RSS of some processes in a thread; keeps the maximum."""

    def __init__(self, pids: list[int], max_seconds: float) -> None:
        self.pids = pids
        self.max_seconds = max_seconds
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.peak = max(self.peak, rss_bytes_of(self.pids))
            except OSError:
                return
            self._stop.wait(RSS_INTERVAL_S)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Front:
    """A front end under test: where to connect, which processes to watch."""

    name: str
    port: int
    process: Process
    #: The processes that do the work (RSS is summed over them).
    worker_pids: list[int]
    #: Every process of the front (CPU time is summed over them).
    all_pids: list[int]
    extra_pids: list[int] = field(default_factory=list)

    def stop(self) -> None:
        self.process.stop()
        # nginx's master stops its workers; make sure none outlived it.
        for pid in self.extra_pids:
            _kill_if_still(pid, b"nginx")


def _kill_if_still(pid: int, name: bytes) -> None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if name not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


def _fill(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise RuntimeError(f"{template}: placeholders left unfilled: {sorted(set(left))}")
    return text


def _worker_user() -> tuple[str, int, int] | None:
    """
    The unprivileged user nginx workers run as when nginx is started as
    root (None when it is not: then the workers are the current user).
    """
    if os.geteuid() != 0:
        return None
    for name in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return f"{name} {grp.getgrgid(entry.pw_gid).gr_name}", entry.pw_uid, entry.pw_gid
    raise RuntimeError("no unprivileged user (www-data, nobody) for the nginx workers")


NGINX_GLOBALS = "daemon off; master_process on; worker_processes 1;"


def start_nginx(name: str, template: str, values: dict[str, str], workdir: Path,
                port: int, globals_: str = NGINX_GLOBALS) -> Front:
    """Write the config, check it, start nginx in the foreground, wait for its worker."""
    nginx = require_binary("nginx")
    user = _worker_user()
    config = workdir / f"{name}.conf"
    text = _fill(template, values)
    if user is not None:
        text = f"user {user[0]};\n" + text
    config.write_text(text)
    argv = [nginx, "-p", str(workdir), "-e", "stderr", "-c", str(config), "-g", globals_]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected {config.name}:\n{check.stderr}")
    proc = spawn(name, argv, workdir)
    try:
        wait_for(lambda: port_listening(port), STARTUP_TIMEOUT_S,
                 what=f"{name} to listen on {port}", abort=proc.died)
        workers = wait_for(lambda: children_of(proc.pid), STARTUP_TIMEOUT_S,
                           what=f"{name}'s worker", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return Front(name, port, proc, worker_pids=workers, all_pids=[proc.pid, *workers],
                 extra_pids=list(workers))


def _has_option(name: str) -> bool:
    """Whether C{twistd quayfront} has the command-line option C{--name}."""
    from quayfront.tap import Options

    return any(parameter[0] == name for parameter in Options.optParameters)


def start_quayfront(workdir: Path, upstream_port: int, cert: Path, key: Path,
                    name: str = "quayfront", profile: Path | None = None,
                    extra: tuple[str, ...] = (), env_extra: dict[str, str] | None = None,
                    workers: int = 1) -> Front:
    """
    Start quayfront under twistd (optionally under cProfile, see
    L{tests.bench.profiled}); wait until it listens and completes a TLS
    handshake on its plain listener.
    """
    proxy_port, tls_port = free_ports(2)
    if profile is None:
        argv = [*twistd_command()]
    else:
        argv = [sys.executable, "-m", "tests.bench.profiled", str(profile)]
    argv += [
        "-n",
        "--pidfile=",
        "quayfront",
        "--proxy-listen", f"{LOOPBACK}:{proxy_port}",
        "--listen", f"{LOOPBACK}:{tls_port}",
        "--upstream", f"http://{LOOPBACK}:{upstream_port}",
        "--cert", str(cert),
        "--key", str(key),
        "--access-log", str(workdir / f"{name}-access.log"),
        *extra,
    ]
    if _has_option("metrics-listen"):
        # Its own port, not the default one another quayfront may hold.
        argv += ["--metrics-listen", f"{LOOPBACK}:{free_ports(1)[0]}"]
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(env_extra or {})
    proc = spawn(name, argv, workdir, env=env, cwd=REPO_ROOT)
    try:
        wait_for(lambda: port_listening(proxy_port) and port_listening(tls_port),
                 STARTUP_TIMEOUT_S, what=f"{name} to listen", abort=proc.died)
        wait_for(lambda: tls_handshake(LOOPBACK, tls_port), 10,
                 what=f"{name} TLS handshake", abort=proc.died)
        children = []
        if workers > 1:
            children = wait_for(lambda: (lambda c: c if len(c) == workers else None)(
                children_of(proc.pid)), STARTUP_TIMEOUT_S, what=f"{name}'s workers",
                abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    # With workers, the main process only supervises: like nginx's master,
    # its CPU counts, its RSS does not.
    return Front(name, proxy_port, proc, worker_pids=children or [proc.pid],
                 all_pids=[proc.pid, *children])


# --- clients ----------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    status: int
    size_download: int
    size_upload: int
    time_total_s: float
    num_connects: int


def _parse_write_out(stdout: str) -> list[Transfer]:
    transfers = []
    for line in stdout.splitlines():
        if line.startswith(CURL_MARK + " "):
            status, down, up, total, connects = line.split()[1:6]
            transfers.append(Transfer(int(status), int(down), int(up), float(total),
                                      int(connects)))
    return transfers


def curl_argv(timeout_s: float, proxy_protocol: bool = True) -> list[str]:
    argv = [require_binary("curl"), "-sS", "-k", "--max-time", str(int(timeout_s) + 1),
            "-w", CURL_WRITE_OUT]
    if proxy_protocol:
        argv.append("--haproxy-protocol")
    return argv


def run_curl(args: list[str], timeout_s: float, proxy_protocol: bool = True) -> list[Transfer]:
    argv = [*curl_argv(timeout_s, proxy_protocol), *args]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout_s + 10)
    transfers = _parse_write_out(done.stdout)
    if done.returncode != 0 or not transfers:
        raise RuntimeError(f"curl failed ({done.returncode}): {' '.join(argv)}\n{done.stderr}")
    return transfers


def transfer_timeout_s() -> float:
    return 60 + BYTES / SLOWEST_TRANSFER_BPS


@dataclass(frozen=True)
class TransferResult:
    mb_per_s: float
    peak_rss: int
    cpu_s_per_gib: float


def measure_transfer(front: Front | None, url: str, extra_args: list[str],
                     check: Callable[[Transfer], None], proxy_protocol: bool = True
                     ) -> TransferResult:
    """One big transfer with curl, watching the front's RSS and CPU time."""
    timeout = transfer_timeout_s()
    pids = front.worker_pids if front else []
    cpu_pids = front.all_pids if front else []
    cpu_before = cpu_seconds(cpu_pids)
    with PeakRss(pids, max_seconds=timeout + 10) as rss:
        (transfer,) = run_curl([*extra_args, url], timeout, proxy_protocol)
    cpu = cpu_seconds(cpu_pids) - cpu_before
    check(transfer)
    return TransferResult(BYTES / transfer.time_total_s / MB, rss.peak,
                          cpu * (1 << 30) / BYTES)


@dataclass
class Upstream:
    port: int
    datadir: Path
    front: Front

    @property
    def upload_dir(self) -> Path:
        return self.datadir / "www" / "upload"


def download(front: Front | None, port: int, proxy_protocol: bool = True) -> TransferResult:
    scheme = "https" if proxy_protocol else "http"

    def check(t: Transfer) -> None:
        if t.status != 200 or t.size_download != BYTES:
            raise RuntimeError(f"download through {port}: status {t.status}, "
                               f"{t.size_download} of {BYTES} bytes")

    return measure_transfer(front, f"{scheme}://{LOOPBACK}:{port}/big", ["-o", os.devnull],
                            check, proxy_protocol)


_upload_count = 0


def upload(front: Front | None, port: int, upstream: Upstream, source: Path,
           proxy_protocol: bool = True) -> TransferResult:
    """
    PUT BENCH_BYTES; the upstream answers after storing the last byte, and
    the stored file must have exactly that size.
    """
    global _upload_count
    _upload_count += 1
    name = f"blob-{_upload_count}"
    scheme = "https" if proxy_protocol else "http"
    stored = upstream.upload_dir / name

    def check(t: Transfer) -> None:
        size = stored.stat().st_size if stored.exists() else None
        if t.status not in (201, 204) or t.size_upload != BYTES or size != BYTES:
            raise RuntimeError(f"upload through {port}: status {t.status}, sent "
                               f"{t.size_upload}, upstream stored {size} of {BYTES} bytes")

    try:
        # No "Expect: 100-continue": the body follows the head at once.
        return measure_transfer(
            front, f"{scheme}://{LOOPBACK}:{port}/upload/{name}",
            ["-T", str(source), "-H", "Expect:", "-o", os.devnull], check, proxy_protocol)
    finally:
        stored.unlink(missing_ok=True)


@dataclass
class Latency:
    """Sequential small requests, pooled over rounds."""

    firsts_ms: list[float] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    requests: int = 0

    @property
    def first_ms(self) -> float:
        return statistics.median(self.firsts_ms)

    def percentile_ms(self, p: float) -> float:
        ordered = sorted(self.times_ms)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s * 1e6 / self.requests


def _check_small(transfers: list[Transfer], expected: int, what: str) -> None:
    bad = [t for t in transfers if t.status != 200]
    if len(transfers) != expected or bad:
        raise RuntimeError(f"{what}: {len(transfers)} of {expected} answers, "
                           f"{len(bad)} not 200 (first: {bad[:1]})")
    reconnects = sum(t.num_connects for t in transfers[1:])
    if reconnects:
        raise RuntimeError(f"{what}: the connection was not kept alive "
                           f"({reconnects} reconnections)")


def small_sequential(front: Front, into: Latency | None = None) -> Latency:
    """
    SMALL_REQUESTS GETs on one connection, added to C{into}: the first pays
    for TCP, the PROXY header and the TLS handshake, the others are timed
    one by one.
    """
    into = into if into is not None else Latency()
    url = f"https://{LOOPBACK}:{front.port}/small?seq=[1-{SMALL_REQUESTS}]"
    before = cpu_seconds(front.all_pids)
    transfers = run_curl([url], timeout_s=120)
    into.cpu_s += cpu_seconds(front.all_pids) - before
    _check_small(transfers, SMALL_REQUESTS, f"{front.name} sequential")
    into.requests += len(transfers)
    into.firsts_ms.append(transfers[0].time_total_s * 1000)
    into.times_ms += [t.time_total_s * 1000 for t in transfers[1:]]
    return into


@dataclass
class Rate:
    """Concurrent small requests, over rounds."""

    rates: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    elapsed_s: float = 0.0
    requests: int = 0

    @property
    def requests_per_s(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s * 1e6 / self.requests

    @property
    def busy_percent(self) -> float:
        """The front's CPU time as a share of one core over the runs."""
        return 100 * self.cpu_s / self.elapsed_s


def small_concurrent(front: Front, into: Rate | None = None) -> Rate:
    """
    CONNECTIONS curl processes at once, each making REQUESTS_PER_CONNECTION
    requests on its own connection; added to C{into}.
    """
    into = into if into is not None else Rate()
    timeout = 120
    procs: list[subprocess.Popen] = []
    before = cpu_seconds(front.all_pids)
    started = time.monotonic()
    try:
        for c in range(CONNECTIONS):
            url = f"https://{LOOPBACK}:{front.port}/small?c={c}&n=[1-{REQUESTS_PER_CONNECTION}]"
            procs.append(subprocess.Popen(
                [*curl_argv(timeout), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL, text=True))
        outputs = [p.communicate(timeout=timeout + 10) for p in procs]
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    cpu = cpu_seconds(front.all_pids) - before
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"{front.name} concurrent: curl exited {p.returncode}: {err}")
        _check_small(_parse_write_out(out), REQUESTS_PER_CONNECTION, f"{front.name} concurrent")
    total = CONNECTIONS * REQUESTS_PER_CONNECTION
    into.rates.append(total / elapsed)
    into.cpu_s += cpu
    into.elapsed_s += elapsed
    into.requests += total
    return into


def warm_up(front: Front) -> None:
    transfers = run_curl([f"https://{LOOPBACK}:{front.port}/small?warmup=[1-{WARMUP_REQUESTS}]"],
                         timeout_s=60)
    _check_small(transfers, WARMUP_REQUESTS, f"{front.name} warm-up")


# --- setup ------------------------------------------------------------------


def make_datadir() -> Path:
    """
    A private directory for the upstream's file, the uploads and nginx's
    temporary files: in /dev/shm when it has room (so the upload sink and
    the download source are memory, not disk), else the default temp dir.
    """
    parent = None
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 3 * BYTES + (256 << 20):
        parent = str(shm)
    datadir = Path(tempfile.mkdtemp(prefix="quayfront-bench-", dir=parent))
    datadir.chmod(0o755)  # nginx workers run unprivileged
    (datadir / "www" / "upload").mkdir(parents=True)
    (datadir / "www").chmod(0o755)
    user = _worker_user()
    if user is not None:
        os.chown(datadir / "www" / "upload", user[1], user[2])
    # Sparse files: zeros, read from memory.  Nothing on the path compresses.
    for path in (datadir / "www" / "big", datadir / "upload-source"):
        with open(path, "wb") as f:
            f.truncate(BYTES)
        path.chmod(0o644)
    return datadir


def make_cert(directory: Path) -> tuple[Path, Path]:
    """The ECDSA P-256 certificate both fronts serve."""
    from .parsecost import make_ecdsa_certificate, write_pem

    certificate, key = make_ecdsa_certificate()
    cert, key_path = write_pem(certificate, key, str(directory))
    return Path(cert), Path(key_path)


def tool_versions() -> str:
    nginx = subprocess.run([require_binary("nginx"), "-v"], capture_output=True, text=True,
                           timeout=30).stderr.strip().replace("nginx version: ", "")
    curl = subprocess.run([require_binary("curl"), "--version"], capture_output=True, text=True,
                          timeout=30).stdout.split("\n")[0].split(" ")[1]
    return f"{nginx}, curl {curl}"


# --- profile ----------------------------------------------------------------

#: Where CPU time goes, by the file (or C function) it is spent in; the first
#: matching rule wins.  Built-in functions (len, isinstance, ...) count for
#: the layer of their caller.
PROFILE_LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("socket send/recv (kernel, incl. loopback delivery)",
     ("<method 'send' of '_socket", "<method 'recv' of '_socket")),
    ("epoll (wait + register/unregister)", ("select.epoll",)),
    ("TLS: OpenSSL + pyOpenSSL wrappers", ("_openssl.", "OpenSSL/")),
    ("TLS: Twisted memory-BIO glue", ("twisted/protocols/tls.py", "twisted/internet/_newtls.py")),
    ("HTTP server side (twisted.web http/server/headers)",
     ("twisted/web/http.py", "twisted/web/server.py", "twisted/web/http_headers.py")),
    ("HTTP client side (twisted.web Agent, _newclient)",
     ("twisted/web/_newclient.py", "twisted/web/client.py")),
    ("quayfront's own code", ("quayfront/",)),
    ("Deferreds", ("twisted/internet/defer.py",)),
    ("reactor, transports, log context",
     ("twisted/internet/", "twisted/python/", "twisted/logger/")),
    ("protocol wrappers, LineReceiver", ("twisted/protocols/",)),
]
OTHER_LAYER = "other (stdlib, ...)"


def _layer(filename: str, function: str) -> str | None:
    where = f"{filename}:{function}"
    for layer, needles in PROFILE_LAYERS:
        if any(needle in where for needle in needles):
            return layer
    if filename == "~":
        return None  # a built-in: charged to its caller
    return OTHER_LAYER


def layer_times(stats: pstats.Stats) -> dict[str, float]:
    """Own CPU seconds per layer, built-ins charged to their callers' layers."""
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, callers) in stats.stats.items():
        layer = _layer(filename, function)
        if layer is not None:
            totals[layer] = totals.get(layer, 0.0) + own
            continue
        edge_total = sum(edge[2] for edge in callers.values())
        for (caller_file, _, caller_function), edge in callers.items():
            share = own * edge[2] / edge_total if edge_total else own / len(callers)
            caller_layer = _layer(caller_file, caller_function) or OTHER_LAYER
            totals[caller_layer] = totals.get(caller_layer, 0.0) + share
        if not callers:
            totals[OTHER_LAYER] = totals.get(OTHER_LAYER, 0.0) + own
    return totals


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", str(REPO_ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    if "/lib/python3" in filename:
        return filename.rsplit("/", 1)[1]
    return filename


def top_functions(stats: pstats.Stats, count: int) -> list[list[str]]:
    total = stats.total_tt
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:count]
    rows = []
    for (filename, line, function), (_, calls, own, cumulative, _) in entries:
        name = function if filename == "~" else f"{_short_path(filename)}:{line}({function})"
        rows.append([name, f"{calls}", f"{100 * own / total:.1f} %", fmt(cumulative, 3)])
    return rows


def profile_quayfront(workdir: Path, upstream: Upstream, cert: Path, key: Path,
                      source: Path) -> str:
    """
    Run each workload against one quayfront under cProfile (CPU clock),
    profiling only while the workload runs, and report where the time goes.
    cProfile slows quayfront down several times and inflates code that makes
    many calls: these runs are not part of the comparison.
    """
    workloads: list[tuple[str, Callable[[Front], object]]] = [
        ("download", lambda f: download(f, f.port)),
        ("upload", lambda f: upload(f, f.port, upstream, source)),
        ("small", small_sequential),
    ]
    profiles: dict[str, pstats.Stats] = {}
    front = start_quayfront(workdir, upstream.port, cert, key, name="quayfront-profiled",
                            profile=workdir / "quayfront-profile.pstats")
    try:
        warm_up(front)
        for label, workload in workloads:
            stats_path = workdir / f"quayfront-{label}.pstats"
            # The launcher writes to the path it was given; rename per workload.
            shared = workdir / "quayfront-profile.pstats"
            shared.unlink(missing_ok=True)
            os.kill(front.process.pid, signal.SIGUSR1)
            workload(front)
            os.kill(front.process.pid, signal.SIGUSR2)
            wait_for(shared.exists, 60, what=f"the {label} profile", abort=front.process.died)
            shared.rename(stats_path)
            profiles[label] = pstats.Stats(str(stats_path))
    finally:
        front.stop()

    layers = {label: layer_times(stats) for label, stats in profiles.items()}
    names = [name for name, _ in PROFILE_LAYERS] + [OTHER_LAYER]
    rows = []
    for name in names:
        cells = [name]
        for label, stats in profiles.items():
            cells.append(f"{100 * layers[label].get(name, 0.0) / stats.total_tt:.1f} %")
        rows.append(cells)
    rows.append(["quayfront CPU seconds under the profiler",
                 *(fmt(stats.total_tt, 2) for stats in profiles.values())])
    headers = ["layer (own CPU time)",
               f"download {BYTES / (1 << 30):g} GiB", f"upload {BYTES / (1 << 30):g} GiB",
               f"{SMALL_REQUESTS} x GET /small"]
    sections = [
        "6. Where quayfront's CPU time goes (cProfile, CPU clock, only while each",
        "   workload runs).  Profiling slows quayfront several times and inflates",
        "   call-heavy code, so read the shares, not the seconds; these runs are",
        "   not part of the comparison above.",
        "",
        table(headers, rows),
    ]
    for label, stats in profiles.items():
        sections += ["", f"top functions by own time, {label}:",
                     table(["function", "calls", "own %", "cumulative s"],
                           top_functions(stats, 10))]
    return "\n".join(sections)


# --- entry ------------------------------------------------------------------


def run(workdir: Path) -> str:
    """
    Start the upstream and quayfront under cProfile, profile each workload,
    stop everything; return the report.  C{workdir} (configs, logs) is
    emptied first and kept afterwards.
    """
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started: list[Front] = []
    datadir = make_datadir()
    try:
        cert, key = make_cert(workdir)
        (upstream_port,) = free_ports(1)
        values = {"WORKDIR": str(workdir), "DATADIR": str(datadir), "CERT": str(cert),
                  "KEY": str(key), "UPSTREAM_PORT": str(upstream_port), "PROXY_PORT": "0"}
        upstream_front = start_nginx("upstream-nginx", "nginx-upstream.conf.template", values,
                                     workdir, upstream_port)
        started.append(upstream_front)
        upstream = Upstream(upstream_port, datadir, upstream_front)
        return profile_quayfront(workdir, upstream, cert, key, datadir / "upload-source")
    finally:
        for front in reversed(started):
            front.stop()
        shutil.rmtree(datadir, ignore_errors=True)
