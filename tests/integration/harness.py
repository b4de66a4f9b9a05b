"""
Helpers for the integration tests: start real processes on 127.0.0.1,
wait for them with bounded deadlines, and stop them by PID.

Nothing here talks to anything but the loopback interface.  Every wait is
a poll of a condition with a deadline; every loop is bounded.

The module is also runnable: ``python harness.py echo-upstream PORT`` starts
a tiny HTTP/1.1 server that answers every request with the request line and
headers (in order, repeats kept) as JSON; the X-Forwarded-For tests use it
as quayfront's upstream.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

#: Seconds a started process gets to become ready.
STARTUP_TIMEOUT_S = 30.0
#: Seconds a stopped process gets between SIGTERM and SIGKILL.
STOP_TIMEOUT_S = 10.0

#: Extra command-line options every quayfront started by the tests gets.
#: HAProxy, curl --haproxy-protocol and the raw-socket tests all connect from
#: loopback and send a PROXY header, so loopback must be trusted to send one
#: (and must not be exempt from it, which is the built-in default).  Several
#: instances run at once, so none takes the default metrics port.  Nothing
#: balances on their health, so a stop closes the listeners at once (the
#: drain tests set their own delay).
QUAYFRONT_TEST_ARGS: tuple[str, ...] = (
    "--proxy-trusted", "127.0.0.0/8", "--metrics-listen", "off", "--drain-delay", "0",
)

T = TypeVar("T")


class HarnessError(AssertionError):
    """A test prerequisite failed: a binary is missing, a process died."""


# --------------------------------------------------------------------------
# Waiting


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    abort: Callable[[], str | None] | None = None,
) -> T:
    """
    Call ``condition`` until it returns something truthy and return that.

    Raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds.
    ``abort`` is called on each round; a non-empty string it returns stops
    the wait at once with a ``HarnessError`` carrying that text (used to
    notice a process that died while we wait for its port).
    """
    deadline = time.monotonic() + timeout
    # The count bound is a second guard in case the clock misbehaves.
    max_rounds = int(timeout / max(interval, 0.001)) + 2
    last_exc: BaseException | None = None
    for _ in range(max_rounds):
        if abort is not None:
            reason = abort()
            if reason:
                raise HarnessError(f"while waiting for {what}: {reason}")
        try:
            result = condition()
        except (OSError, ValueError) as e:  # e.g. connection refused
            last_exc = e
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    extra = f" (last error: {last_exc!r})" if last_exc else ""
    raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{extra}")


# --------------------------------------------------------------------------
# Binaries, ports


def require_binary(name: str) -> str:
    """Return the path of ``name`` or fail (never skip) with a clear message."""
    path = shutil.which(name)
    if path is None:
        raise HarnessError(
            f"required program {name!r} is not installed; "
            "run `make deps` (etc/dev/install-system-deps.sh) to install it"
        )
    return path


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    """Return one TCP port that is free on ``host`` right now."""
    return free_ports(1, host)[0]


def _listening_ports() -> set[int]:
    """Ports in LISTEN state on this host, from /proc/net/tcp{,6}."""
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


def port_listening(port: int) -> bool:
    """True when something listens on TCP ``port`` (no connection is made)."""
    return port in _listening_ports()


def unverified_tls_context() -> ssl.SSLContext:
    """A client context for the self-signed test certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_handshake(host: str, port: int, timeout: float = 5.0, preamble: bytes = b"") -> str:
    """Connect, send ``preamble`` in cleartext, do a TLS handshake; return the version."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        if preamble:
            raw.sendall(preamble)
        with unverified_tls_context().wrap_socket(raw, server_hostname="localhost") as s:
            return s.version() or "?"


# --------------------------------------------------------------------------
# Processes


@dataclass
class Process:
    """A started child process with its output in files under ``workdir``."""

    name: str
    popen: subprocess.Popen
    workdir: Path
    stdout_path: Path
    stderr_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        out = []
        for p in (self.stdout_path, self.stderr_path):
            try:
                out.append(p.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(out)

    def died(self) -> str | None:
        """A description of the exit if the process has exited, else None."""
        rc = self.popen.poll()
        if rc is None:
            return None
        return f"{self.name} (pid {self.pid}) exited with {rc}; output:\n{tail(self.output())}"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the process by PID, SIGKILL it after ``timeout``; return its exit code."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=timeout)
        return self.popen.returncode


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def spawn(
    name: str,
    argv: list[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Process:
    """Start ``argv`` with stdout/stderr going to files in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{name}.stdout"
    err = workdir / f"{name}.stderr"
    (workdir / f"{name}.argv").write_text(" ".join(argv) + "\n")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fo,
            stderr=fe,
            cwd=str(cwd or workdir),
            env=env,
            # Own session: a Ctrl-C meant for pytest is not delivered to it
            # directly; teardown stops it by PID.
            start_new_session=True,
        )
    return Process(name, popen, workdir, out, err)


# --------------------------------------------------------------------------
# Dev certificate


def make_cert(directory: Path) -> tuple[Path, Path]:
    """Create a self-signed certificate for localhost, 127.0.0.1 and ::1."""
    openssl = require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )
    return cert, key


# --------------------------------------------------------------------------
# docker-registry

REGISTRY_CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
"""


def registry_ready(port: int) -> bool:
    """True when ``GET /v2/`` on the registry answers 200."""
    with socket.create_connection((LOOPBACK, port), timeout=2) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = s.recv(64)
    return head.startswith(b"HTTP/1.1 200")


def start_registry(workdir: Path, port: int | None = None) -> Process:
    """Start ``docker-registry serve`` with filesystem storage under ``workdir``."""
    binary = require_binary("docker-registry")
    port = port or free_port()
    root = workdir / "storage"
    root.mkdir(parents=True, exist_ok=True)
    config = workdir / "registry.yml"
    config.write_text(REGISTRY_CONFIG.format(root=root, port=port))
    proc = spawn("registry", [binary, "serve", str(config)], workdir)
    proc.ports["http"] = port
    try:
        wait_for(lambda: registry_ready(port), STARTUP_TIMEOUT_S,
                 what=f"docker-registry GET /v2/ on port {port}", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc


def remove_registry_storage(proc: Process) -> None:
    """Delete a stopped registry's blobs (the memory test leaves 1 GiB); keep its logs."""
    shutil.rmtree(proc.workdir / "storage", ignore_errors=True)


# --------------------------------------------------------------------------
# quayfront


def twistd_command() -> list[str]:
    """twistd of the running interpreter: the venv's script, else via ``-c``."""
    script = Path(sys.executable).parent / "twistd"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def quayfront_env() -> dict[str, str]:
    """
    The environment quayfront runs in: the repository's plugin first on
    PYTHONPATH, and no default configuration file (a machine's
    /etc/quayfront/quayfront.toml must not leak into the tests).
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env["QUAYFRONT_CONFIG"] = ""
    return env


def quayfront_argv(
    proxy_port: int,
    tls_port: int,
    upstream: str,
    cert: Path,
    key: Path,
    access_log: Path,
    config: Path | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """The twistd command line for one quayfront instance on 127.0.0.1."""
    argv = [*twistd_command(), "-n", "--pidfile=", "quayfront"]
    if config is not None:
        argv += ["--config", str(config)]
    argv += [
        "--proxy-listen", f"{LOOPBACK}:{proxy_port}",
        "--listen", f"{LOOPBACK}:{tls_port}",
        "--upstream", upstream,
        "--cert", str(cert),
        "--key", str(key),
        "--access-log", str(access_log),
    ]
    argv += list(extra)
    return argv


def start_quayfront(
    workdir: Path,
    upstream: str,
    cert: Path,
    key: Path,
    config: Path | None = None,
    extra: Iterable[str] = (),
    name: str = "quayfront",
) -> Process:
    """
    Start quayfront under twistd on two free ports; wait until both listen
    and the plain listener completes a TLS handshake.

    The repository root goes first on PYTHONPATH so twistd finds the plugin
    in twisted/plugins/ whether or not it was installed.
    """
    proxy_port, tls_port = free_ports(2)
    access_log = workdir / f"{name}-access.log"
    argv = quayfront_argv(proxy_port, tls_port, upstream, cert, key, access_log, config, extra)
    env = quayfront_env()
    proc = spawn(name, argv, workdir, env=env, cwd=REPO_ROOT)
    proc.ports.update(proxy=proxy_port, tls=tls_port)
    proc.extra["access_log"] = access_log
    proc.extra["upstream"] = upstream
    try:
        wait_for(lambda: port_listening(proxy_port) and port_listening(tls_port),
                 STARTUP_TIMEOUT_S, what=f"{name} to listen on {proxy_port} and {tls_port}",
                 abort=proc.died)
        wait_for(lambda: tls_handshake(LOOPBACK, tls_port), 10,
                 what=f"{name} TLS handshake on {tls_port}", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc


# --------------------------------------------------------------------------
# HAProxy

HAPROXY_CONFIG = """\
global
    maxconn 256
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend fe_proxy_v2
    bind 127.0.0.1:{v2_port}
    default_backend be_proxy_v2

backend be_proxy_v2
    server quayfront 127.0.0.1:{backend_port} send-proxy-v2

frontend fe_proxy_v1
    bind 127.0.0.1:{v1_port}
    default_backend be_proxy_v1

backend be_proxy_v1
    server quayfront 127.0.0.1:{backend_port} send-proxy
"""


def start_haproxy(workdir: Path, backend_port: int) -> Process:
    """
    Start HAProxy in the foreground (``-db``) in TCP mode with two
    frontends to ``backend_port``: one sends PROXY v2, the other v1.
    """
    binary = require_binary("haproxy")
    v2_port, v1_port = free_ports(2)
    config = workdir / "haproxy.cfg"
    workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(HAPROXY_CONFIG.format(v2_port=v2_port, v1_port=v1_port,
                                            backend_port=backend_port))
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=30)
    if check.returncode != 0:
        raise HarnessError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}")
    proc = spawn("haproxy", [binary, "-db", "-f", str(config)], workdir)
    proc.ports.update(v2=v2_port, v1=v1_port)
    try:
        wait_for(lambda: port_listening(v2_port) and port_listening(v1_port),
                 STARTUP_TIMEOUT_S, what="haproxy frontends", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc


# --------------------------------------------------------------------------
# Echo upstream


def start_echo_upstream(workdir: Path) -> Process:
    """Start this module as an HTTP server that echoes request headers as JSON."""
    port = free_port()
    proc = spawn("echo-upstream", [sys.executable, __file__, "echo-upstream", str(port)], workdir)
    proc.ports["http"] = port
    try:
        wait_for(lambda: port_listening(port), STARTUP_TIMEOUT_S,
                 what="echo upstream", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc


def _serve_echo(port: int) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body_length(self) -> int:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                total = 0
                for _ in range(1_000_000):
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        # trailers, then the empty line
                        for _ in range(100):
                            if self.rfile.readline() in (b"\r\n", b"\n", b""):
                                break
                        return total
                    self.rfile.read(size)
                    self.rfile.readline()
                    total += size
                return total
            length = int(self.headers.get("Content-Length") or 0)
            remaining = length
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
            return length

        def _echo(self) -> None:
            body_len = self._body_length()
            payload = json.dumps({
                "method": self.command,
                "path": self.path,
                "version": self.request_version,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_length": body_len,
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _echo

        def log_message(self, fmt: str, *args: object) -> None:
            sys.stderr.write("echo-upstream: " + (fmt % args) + "\n")

    server = ThreadingHTTPServer((LOOPBACK, port), Echo)
    server.daemon_threads = True
    server.serve_forever()


# --------------------------------------------------------------------------
# curl


@dataclass
class CurlResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stderr: str
    argv: list[str]

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[-1] if values else None

    def describe(self) -> str:
        heads = "\n".join(f"  {k}: {v}" for k, v in self.headers)
        return (f"{' '.join(self.argv)}\n-> {self.status}\n{heads}\n"
                f"  body: {self.body[:500]!r}\n  stderr: {self.stderr.strip()}")


def curl(*args: str, workdir: Path, timeout: float = 60.0,
         stdin: bytes | None = None) -> CurlResult:
    """
    Run curl (``-k``, no retries, bounded by ``timeout``) and return the
    status, the final response's headers in order, and the body.
    """
    binary = require_binary("curl")
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("curl-*.headers")))
    head_path = workdir / f"curl-{n}.headers"
    body_path = workdir / f"curl-{n}.body"
    argv = [binary, "-sS", "-k", "--max-time", str(timeout), "-D", str(head_path),
            "-o", str(body_path), "-w", "%{http_code}", *args]
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout + 10,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    try:
        status = int(done.stdout.decode().strip() or "0")
    except ValueError:
        status = 0
    headers: list[tuple[str, str]] = []
    try:
        raw = head_path.read_bytes().decode("latin-1")
    except FileNotFoundError:
        raw = ""
    # -D writes every response (100 Continue, redirects); keep the last one.
    blocks = [b for b in raw.split("\r\n\r\n") if b.strip()]
    if blocks:
        for line in blocks[-1].split("\r\n")[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers.append((k.strip(), v.strip()))
    body = body_path.read_bytes() if body_path.exists() else b""
    return CurlResult(status, headers, body, done.stderr.decode(errors="replace"), argv)


# --------------------------------------------------------------------------
# Access log

ACCESS_LOG_RE = re.compile(
    r'^(?P<peer>\S+) \((?P<client>[^)]*)\) - (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes_sent>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)" '
    r'\((?P<request_time>\S+) (?P<request_length>\S+) (?P<upstream_time>\S+)\)$'
)


@dataclass(frozen=True)
class AccessLine:
    raw: str
    peer: str
    client: str
    request: str
    status: int
    fields: dict

    @property
    def method(self) -> str:
        return self.request.split(" ", 1)[0]

    @property
    def path(self) -> str:
        parts = self.request.split(" ")
        return parts[1] if len(parts) > 1 else ""


def read_access_log(path: Path) -> list[str]:
    """All complete lines of an access log file so far (no trailing partial line)."""
    try:
        data = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = data.split("\n")
    return [line for line in lines[:-1] if line]


def parse_access_line(line: str) -> AccessLine:
    """Parse one lb_logs-format line; raise AssertionError naming the line if it does not match."""
    m = ACCESS_LOG_RE.match(line)
    if m is None:
        raise AssertionError(f"access log line is not in the lb_logs format: {line!r}")
    d = m.groupdict()
    return AccessLine(line, d["peer"], d["client"], d["request"], int(d["status"]), d)


def wait_for_access_line(path: Path, predicate: Callable[[str], bool],
                         timeout: float = 10.0) -> list[str]:
    """Wait until some access log line satisfies ``predicate``; return the matching lines."""
    def found() -> list[str]:
        return [line for line in read_access_log(path) if predicate(line)]
    try:
        return wait_for(found, timeout, interval=0.1, what=f"an access log line in {path}")
    except TimeoutError:
        lines = read_access_log(path)
        raise AssertionError(
            f"no matching access log line within {timeout}s; last lines:\n"
            + "\n".join(lines[-20:])
        ) from None


# --------------------------------------------------------------------------
# Memory


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes, from /proc/PID/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.2, max_seconds: float = 600.0):
        self.pid = pid
        self.interval = interval
        self.max_seconds = max_seconds
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.samples.append(rss_bytes(self.pid))
            except (OSError, ValueError):
                return  # process gone
            self._stop.wait(self.interval)

    @property
    def max(self) -> int:
        return max(self.samples, default=0)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------
# OCI image layout

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class OciImage:
    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digest: str
    layer_size: int

    @property
    def reference(self) -> str:
        """The skopeo source reference, ``oci:DIR:TAG``."""
        return f"oci:{self.layout}:{self.tag}"


def _write_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


def _write_random_tar_layer(blobs: Path, payload_size: int, chunk: int = 1 << 20) -> tuple[str, int]:
    """Write an uncompressed tar with one file of ``payload_size`` random bytes, streaming."""
    info = tarfile.TarInfo("payload.bin")
    info.size = payload_size
    info.mode = 0o644
    info.mtime = 0
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    h = hashlib.sha256()
    tmp = blobs / ".layer.tmp"
    size = 0
    with open(tmp, "wb") as f:
        def put(b: bytes) -> None:
            nonlocal size
            f.write(b)
            h.update(b)
            size += len(b)
        put(header)
        remaining = payload_size
        while remaining > 0:
            n = min(chunk, remaining)
            put(os.urandom(n))
            remaining -= n
        pad = (-payload_size) % tarfile.BLOCKSIZE
        put(b"\0" * pad)
        put(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    digest = "sha256:" + h.hexdigest()
    tmp.rename(blobs / digest.split(":", 1)[1])
    return digest, size


def build_oci_image(layout: Path, payload_size: int, tag: str = "latest") -> OciImage:
    """
    Build an OCI image layout directory with one uncompressed tar layer
    holding ``payload_size`` random bytes; return its digests.
    """
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layer_digest, layer_size = _write_random_tar_layer(blobs, payload_size)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "quayfront integration test"}],
    }
    config_digest, config_size = _write_blob(blobs, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = _write_blob(blobs, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return OciImage(layout, tag, manifest_digest, config_digest, layer_digest, layer_size)


def sha256_file(path: Path, uncompress: bool = False) -> str:
    """``sha256:HEX`` of a file's bytes (gunzipped first when ``uncompress`` and gzip)."""
    import gzip

    h = hashlib.sha256()
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        f: io.BufferedIOBase = gzip.open(raw) if uncompress and magic == b"\x1f\x8b" else raw
        for _ in range(1 << 24):
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------
# Streamed blob data for the memory test


def pattern_blocks(count: int = 16, size: int = 1 << 20) -> list[bytes]:
    """A few random blocks that a large blob is built from by repetition."""
    return [os.urandom(size) for _ in range(count)]


def blob_chunks(blocks: list[bytes], total: int) -> Iterator[bytes]:
    """Yield ``total`` bytes made of ``blocks`` in a fixed order, one block at a time."""
    sent = 0
    i = 0
    while sent < total:
        b = blocks[(i * 7) % len(blocks)]
        if sent + len(b) > total:
            b = b[: total - sent]
        yield b
        sent += len(b)
        i += 1


def blob_digest(blocks: list[bytes], total: int) -> str:
    h = hashlib.sha256()
    for b in blob_chunks(blocks, total):
        h.update(b)
    return "sha256:" + h.hexdigest()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo-upstream":
        _serve_echo(int(sys.argv[2]))
    else:
        sys.exit("usage: harness.py echo-upstream PORT")
