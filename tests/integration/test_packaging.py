"""
The Debian package and the container image, built and used for real: `make
deb`, lintian, `apt-get install`, the installed daemon started the way its
unit starts it (same command line, same user) with a NOTIFY_SOCKET this test
reads, socket activation with skopeo through HAProxy, `make image` and the
container, and a purge that leaves nothing behind.

Needs root (it installs a package and starts containers) and the tools
`make deps` installs.  The tests run in file order and share one package
build; the last one purges it.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration import harness
from tests.integration.harness import LOOPBACK, REPO_ROOT, Process

pytestmark = pytest.mark.integration

VERSION = re.search(
    r'^__version__ = "(.*)"$', (REPO_ROOT / "quayfront" / "__init__.py").read_text(), re.M
).group(1)
VENV = Path("/opt/venvs/quayfront")
UNIT_DIR = Path("/lib/systemd/system")
UNITS = (
    "quayfront.service",
    "quayfront.socket",
    "quayfront-tls.socket",
    "quayfront-metrics.socket",
    "quayfront-redirect.socket",
)
CONFFILE = Path("/etc/quayfront/quayfront.toml")
IMAGE = f"localhost/quayfront:{VERSION}"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(REPO_ROOT / "etc/docker/containers.conf")}
#: The package's drain timeout (http.drain_timeout_s); stops must end well within it.
DRAIN_TIMEOUT_S = 60.0
#: Exit statuses of a clean stop: twistd re-raises the SIGTERM it handled
#: once it has shut down, and systemd counts that as success; as a
#: container's PID 1 the re-raised signal is ignored and it exits 0.
CLEAN_STOP = (0, -signal.SIGTERM)
#: Bounds for the slow steps, on a loaded 2-core machine.
BUILD_TIMEOUT_S = 900


def run(argv: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n"
            f"{harness.tail(done.stdout, 30)}\n{harness.tail(done.stderr, 30)}"
        )
    return done


def deb_path() -> Path:
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    return REPO_ROOT / "dist" / f"quayfront_{VERSION}_{arch}.deb"


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    """Seconds each slow step took; the last test prints them."""
    return {}


@pytest.fixture(scope="module")
def deb(timings: dict[str, float]) -> Path:
    """`make deb`'s work: the package from a clean copy of the checkout, lintian-checked."""
    if os.geteuid() != 0:
        raise harness.HarnessError("the packaging tests install a package: run them as root")
    for tool in ("dpkg-buildpackage", "dh_virtualenv", "lintian", "systemd-analyze",
                 "systemd-socket-activate", "setpriv", "podman", "debootstrap"):
        harness.require_binary(tool)
    start = time.monotonic()
    # lintian runs in its own test below, once.
    run(["sh", str(REPO_ROOT / "etc/packaging/build-deb.sh")], timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "LINTIAN": "no"})
    timings["make deb"] = time.monotonic() - start
    path = deb_path()
    assert path.is_file(), f"{path} was not built"
    return path


@pytest.fixture(scope="module")
def installed(deb: Path, timings: dict[str, float]) -> Path:
    """The package installed with apt-get (its dependencies from Debian)."""
    start = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # An earlier run stopped before its purge leaves an edited conffile that
    # apt-get would keep: start from nothing, as on a fresh machine.
    if run(["dpkg-query", "-W", "-f=${db:Status-Status}", "quayfront"], check=False).stdout:
        run(["apt-get", "purge", "-y", "-q", "quayfront"], timeout=600, env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)],
        timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    timings["apt-get install"] = time.monotonic() - start
    return deb


# --------------------------------------------------------------------------
# The package


def test_lintian_reports_no_errors(deb: Path, timings: dict[str, float]) -> None:
    """lintian finds no error in the package (overrides are in debian/quayfront.lintian-overrides)."""
    start = time.monotonic()
    done = run(["lintian", "--fail-on", "error", str(deb)], timeout=600, check=False)
    timings["lintian"] = time.monotonic() - start
    errors = [line for line in done.stdout.splitlines() if line.startswith("E:")]
    assert done.returncode == 0 and not errors, "\n".join(errors[:30]) or done.stderr


def test_package_depends_only_on_debian_packages(deb: Path) -> None:
    """Depends names Debian packages only: python3 and the venv's shared-library deps."""
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    names = {d.strip().split()[0] for d in depends.replace("|", ",").split(",") if d.strip()}
    assert "python3" in names and "adduser" in names
    for name in names:
        policy = run(["apt-cache", "policy", name]).stdout
        assert "Candidate:" in policy and "Candidate: (none)" not in policy, (name, policy)


def test_installs_files_user_and_conffile(installed: Path) -> None:
    """The venv, the commands, the units, the conffile, the user and the log directory."""
    assert (VENV / "bin" / "twistd").is_file()
    assert not (VENV / "bin" / "pip").exists(), "pip is not needed at run time"
    # Built against Debian's interpreter, not the builder's.
    assert os.path.realpath(VENV / "bin" / "python").startswith("/usr/bin/python3")
    help_text = run(["quayfront", "--help"]).stdout
    assert "--proxy-listen" in help_text and "--check" in help_text
    assert shutil.which("quayfront-entrypoint") == "/usr/bin/quayfront-entrypoint"
    for unit in UNITS:
        assert (UNIT_DIR / unit).is_file(), unit
    assert Path("/etc/logrotate.d/quayfront").is_file()
    assert "certificate" in Path("/usr/share/doc/quayfront/README.Debian").read_text()

    conffiles = run(["dpkg-query", "--showformat=${Conffiles}", "--show", "quayfront"]).stdout
    assert str(CONFFILE) in conffiles
    # The packaged configuration is etc/quayfront.toml with production values.
    packaged = CONFFILE.read_text().splitlines()
    documented = (REPO_ROOT / "etc" / "quayfront.toml").read_text().splitlines()
    differences = [(a, b) for a, b in zip(documented, packaged) if a != b]
    assert len(packaged) == len(documented)
    assert differences == [
        ('path = "-"', 'path = "/var/log/quayfront/access.log"'),
        ('workers = 1', 'workers = "auto"'),
    ]

    user = pwd.getpwnam("quayfront")
    assert user.pw_uid < 1000, "a system user"
    assert grp.getgrgid(user.pw_gid).gr_name == "quayfront"
    log_dir = os.stat("/var/log/quayfront")
    assert log_dir.st_uid == user.pw_uid and oct(log_dir.st_mode & 0o777) == "0o750"
    tls_dir = os.stat("/etc/quayfront/tls")
    assert tls_dir.st_gid == user.pw_gid and oct(tls_dir.st_mode & 0o777) == "0o750"
    # The plugin cache exists, so twistd never tries to write into the venv.
    assert list(VENV.glob("lib/python3*/site-packages/twisted/plugins/dropin.cache"))
    assert not (VENV / "bin" / "pip").exists()


def test_units_verify_and_security_score(installed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """systemd-analyze verify accepts every installed unit; the service's exposure score is recorded."""
    done = run(["systemd-analyze", "verify", *(str(UNIT_DIR / u) for u in UNITS)],
               check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # Anything it says about our own units is a finding, even with exit 0.
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "quayfront" in line]
    assert ours == [], "\n".join(ours)
    security = run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                    str(UNIT_DIR / "quayfront.service")], check=False, timeout=120)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", security.stdout)
    assert match, security.stdout + security.stderr
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=true quayfront.service: "
              f"{match.group(1)} {match.group(2)}")
    assert float(match.group(1)) < 5.0, security.stdout


# --------------------------------------------------------------------------
# The installed daemon, started the way its unit starts it


def unit_settings(unit: str) -> dict[str, list[str]]:
    """KEY -> values of a unit file's lines (repeated keys keep every value)."""
    settings: dict[str, list[str]] = {}
    for line in (UNIT_DIR / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def as_unit_user(argv: list[str]) -> list[str]:
    """Run ``argv`` as the unit's User=/Group= with its AmbientCapabilities=."""
    settings = unit_settings("quayfront.service")
    assert settings["User"] == ["quayfront"] and settings["Group"] == ["quayfront"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    return [
        "/usr/bin/setpriv", "--reuid=quayfront", "--regid=quayfront", "--init-groups",
        "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service", "--", *argv,
    ]


class NotifySocket:
    """The systemd side of NOTIFY_SOCKET: an abstract datagram socket (any user may send)."""

    def __init__(self) -> None:
        self.name = f"@quayfront-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.received: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float, proc: Process) -> dict[str, str]:
        """The next message carrying ``key``; every message is kept in ``received``."""
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(min(remaining, 0.5))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                reason = proc.died()
                if reason:
                    raise harness.HarnessError(f"waiting for {key}: {reason}")
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.received.append(message)
            if key in message:
                return message
        raise TimeoutError(f"no {key} within {timeout}s; received {self.received}")

    def close(self) -> None:
        self.sock.close()


def write_test_config(proxy_port: int, tls_port: int, metrics_port: int, upstream: str) -> None:
    """Point the installed configuration at loopback ports and the test registry."""
    text = CONFFILE.read_text()
    replacements = [
        ('address = "0.0.0.0:8443"', f'address = "{LOOPBACK}:{proxy_port}"'),
        ('address = "0.0.0.0:443"', f'address = "{LOOPBACK}:{tls_port}"'),
        ('address = "127.0.0.1:9091"', f'address = "{LOOPBACK}:{metrics_port}"'),
        ('url = "http://127.0.0.1:5000"', f'url = "{upstream}"'),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    CONFFILE.write_text(text)


@pytest.fixture(scope="module")
def configured(installed: Path, registry: Process, dev_cert: tuple[Path, Path]) -> dict[str, int]:
    """Certificates where README.Debian says, and loopback ports in the configuration."""
    cert, key = dev_cert
    gid = grp.getgrnam("quayfront").gr_gid
    for source, target in ((cert, "cert.pem"), (key, "key.pem")):
        path = Path("/etc/quayfront/tls") / target
        shutil.copyfile(source, path)
        os.chown(path, 0, gid)
        os.chmod(path, 0o640)
    proxy_port, tls_port, metrics_port = harness.free_ports(3)
    write_test_config(proxy_port, tls_port, metrics_port, f"http://{LOOPBACK}:{registry.ports['http']}")
    return {"proxy": proxy_port, "tls": tls_port, "metrics": metrics_port}


def exec_lines() -> tuple[list[str], list[str]]:
    settings = unit_settings("quayfront.service")
    [pre] = settings["ExecStartPre"]
    [start] = settings["ExecStart"]
    return pre.split(), start.split()


def test_unit_command_lines(installed: Path) -> None:
    """ExecStart is twistd from the venv in the foreground without a pid file; ExecStartPre checks."""
    pre, start = exec_lines()
    assert start == [str(VENV / "bin/twistd"), "--nodaemon", "--pidfile=", "quayfront",
                     "--config", str(CONFFILE)]
    assert pre == [*start[:4], "--check", *start[4:]]
    settings = unit_settings("quayfront.service")
    assert settings["Type"] == ["notify"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["Restart"] == ["on-failure"]
    assert float(settings["TimeoutStopSec"][0]) > DRAIN_TIMEOUT_S
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules"):
        assert settings[key] == ["yes"], key
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in settings["SystemCallFilter"]
    assert int(settings["LimitNOFILE"][0]) >= 65536


def test_daemon_notifies_ready_reloading_stopping(
    configured: dict[str, int], tmp_path: Path, quayfront_instances: list[Process],
    timings: dict[str, float],
) -> None:
    """As its unit runs it: the check passes, READY=1 once both ports accept, SIGHUP gives RELOADING=1 then READY=1, SIGTERM gives STOPPING=1 and a clean exit."""
    pre, start = exec_lines()
    check = run(as_unit_user(pre), timeout=60, check=False, cwd="/")
    assert check.returncode == 0 and check.stdout.strip() == f"{CONFFILE}: OK", check.stdout + check.stderr

    notify = NotifySocket()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": notify.name, "LANG": "C.UTF-8"}
    began = time.monotonic()
    proc = harness.spawn("quayfront-unit", as_unit_user(start), tmp_path, env=env, cwd=Path("/"))
    quayfront_instances.append(proc)
    try:
        ready = notify.wait_for("READY", harness.STARTUP_TIMEOUT_S, proc)
        # At READY=1 both listeners already accept: no poll, no retry.
        for port in (configured["proxy"], configured["tls"]):
            socket.create_connection((LOOPBACK, port), timeout=2).close()
        timings["daemon start to READY=1"] = time.monotonic() - began
        assert "request" in ready["STATUS"]
        health = harness.curl(f"https://{LOOPBACK}:{configured['tls']}/health/instance",
                              workdir=tmp_path / "curl")
        assert health.status == 200, health.describe()
        # The access log goes to the packaged place, written by the service user.
        log = Path("/var/log/quayfront/access.log")
        harness.wait_for_access_line(log, lambda line: "/health/instance" in line)
        assert log.stat().st_uid == pwd.getpwnam("quayfront").pw_uid

        os.kill(proc.pid, signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", 10, proc)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert "READY" in notify.wait_for("READY", 10, proc)

        os.kill(proc.pid, signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", 10, proc)
        assert "draining" in stopping["STATUS"]
        assert proc.popen.wait(timeout=DRAIN_TIMEOUT_S) in CLEAN_STOP, proc.output()
    finally:
        proc.stop()
        notify.close()
    ordered = [next(iter(m)) for m in notify.received if m.keys() & {"READY", "RELOADING", "STOPPING"}]
    assert ordered == ["READY", "RELOADING", "READY", "STOPPING"], notify.received


def socket_activated(tmp_path: Path, names: str, ports: list[int], name: str) -> Process:
    """quayfront under systemd-socket-activate with named sockets, as the service user."""
    _, start = exec_lines()
    argv = [harness.require_binary("systemd-socket-activate")]
    for port in ports:
        argv += ["-l", f"{LOOPBACK}:{port}"]
    argv += [f"--fdname={names}", *as_unit_user([*start, "--metrics-listen", "off"])]
    proc = harness.spawn(name, argv, tmp_path, env={"PATH": "/usr/bin:/bin"}, cwd=Path("/"))
    harness.wait_for(lambda: all(harness.port_listening(p) for p in ports), 10,
                     what="systemd-socket-activate to listen", abort=proc.died)
    return proc


def test_socket_activation_serves_skopeo_through_haproxy(
    configured: dict[str, int], tmp_path: Path, quayfront_instances: list[Process],
) -> None:
    """With named sockets proxy and tls, quayfront adopts them (binding nothing itself) and skopeo pushes and pulls through HAProxy -> quayfront -> docker-registry."""
    skopeo = harness.require_binary("skopeo")
    proxy_port, tls_port = harness.free_ports(2)
    proc = socket_activated(tmp_path, "proxy:tls", [proxy_port, tls_port], "quayfront-activated")
    quayfront_instances.append(proc)
    haproxy = harness.start_haproxy(tmp_path / "haproxy", proxy_port)
    try:
        # The first connection starts quayfront (systemd-socket-activate waits for one).
        harness.wait_for(lambda: harness.tls_handshake(LOOPBACK, tls_port), 30,
                         what="quayfront on the activated tls socket", abort=proc.died)
        # The configured addresses are not used: the sockets came from outside.
        assert not harness.port_listening(configured["proxy"])
        assert not harness.port_listening(configured["tls"])

        image = harness.build_oci_image(tmp_path / "oci", 2 << 20)
        remote = f"docker://{LOOPBACK}:{haproxy.ports['v2']}/packaging/activated:v1"
        push = run([skopeo, "copy", "--insecure-policy", "--dest-tls-verify=false",
                    "--retry-times", "0", image.reference, remote], timeout=120, check=False)
        assert push.returncode == 0, f"skopeo push failed:\n{harness.tail(push.stderr, 30)}"
        pulled = tmp_path / "pulled"
        pull = run([skopeo, "copy", "--insecure-policy", "--src-tls-verify=false",
                    "--retry-times", "0", remote, f"dir:{pulled}"], timeout=120, check=False)
        assert pull.returncode == 0, f"skopeo pull failed:\n{harness.tail(pull.stderr, 30)}"
        manifest = json.loads((pulled / "manifest.json").read_text())
        [remote_layer] = [layer["digest"] for layer in manifest["layers"]]
        layer_file = pulled / remote_layer.split(":", 1)[1]
        assert harness.sha256_file(layer_file) == remote_layer
        # The layer we built (skopeo may gzip it on push).
        assert harness.sha256_file(layer_file, uncompress=True) == image.layer_digest
        # The real client came through the PROXY header of the activated socket.
        harness.wait_for_access_line(Path("/var/log/quayfront/access.log"),
                                     lambda line: "/v2/packaging/activated/" in line)
    finally:
        haproxy.stop()
        assert proc.stop(timeout=DRAIN_TIMEOUT_S) in CLEAN_STOP, proc.output()


def test_socket_activation_unknown_name_is_a_startup_error(configured: dict[str, int], tmp_path: Path) -> None:
    """A socket named something quayfront does not know stops it with the name and the known ones."""
    ports = harness.free_ports(2)
    proc = socket_activated(tmp_path, "proxy:bogus", ports, "quayfront-bogus")
    try:
        with socket.create_connection((LOOPBACK, ports[0]), timeout=5):
            proc.popen.wait(timeout=30)
        assert proc.popen.returncode != 0
        assert "passed a socket named 'bogus'; quayfront knows proxy, tls" in proc.output()
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()


# --------------------------------------------------------------------------
# The container image


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run([harness.require_binary("podman"), *args], timeout=timeout, check=check, env=PODMAN_ENV)


@pytest.fixture(scope="module")
def image(deb: Path, timings: dict[str, float]) -> str:
    """`make image`'s work: the image from the Dockerfile and the package, in podman's storage."""
    start = time.monotonic()
    run(["sh", str(REPO_ROOT / "etc/docker/build-image.sh")], timeout=BUILD_TIMEOUT_S, env=PODMAN_ENV)
    timings["make image"] = time.monotonic() - start
    for tag in (IMAGE, "localhost/quayfront:latest"):
        assert podman("image", "exists", tag, check=False).returncode == 0, tag
    return IMAGE


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of the containers a test started; removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        podman("rm", "--force", "--volumes", "--time", "0", name, check=False)


def test_image_metadata(image: str) -> None:
    """UID 1001, the health check, the entrypoint, the documented ports."""
    [info] = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == "1001:0"
    assert config["Entrypoint"] == ["quayfront-entrypoint"]
    assert set(config["ExposedPorts"]) == {"8443/tcp", "8444/tcp"}
    assert info["Healthcheck"]["Test"] == [
        "CMD", "quayfront-entrypoint", "--healthcheck"]


def test_container_read_only_serves_and_stops_within_drain(
    image: str, registry: Process, dev_cert: tuple[Path, Path], tmp_path: Path,
    containers: list[str],
) -> None:
    """Read-only root, a mounted certificate and QUAYFRONT_* variables: it proxies to the host's registry, /health/instance answers 200, the health check passes, and podman stop drains and exits 0."""
    cert, key = dev_cert
    certs = tmp_path / "certs"
    certs.mkdir()
    for source, target in ((cert, "cert.pem"), (key, "key.pem")):
        shutil.copyfile(source, certs / target)
        (certs / target).chmod(0o644)  # the container's UID 1001 reads them
    certs.chmod(0o755)
    proxy_port, tls_port, metrics_port = harness.free_ports(3)
    name = f"quayfront-test-{uuid.uuid4().hex[:8]}"
    containers.append(name)
    podman(
        "run", "--detach", "--name", name, "--read-only", "--network=host",
        "--health-interval=disable",
        "--volume", f"{certs}:/etc/quayfront/tls:ro",
        "--env", f"QUAYFRONT_UPSTREAM=http://{LOOPBACK}:{registry.ports['http']}",
        "--env", f"QUAYFRONT_PROXY_LISTEN={LOOPBACK}:{proxy_port}",
        "--env", f"QUAYFRONT_LISTEN={LOOPBACK}:{tls_port}",
        "--env", f"QUAYFRONT_METRICS_LISTEN={LOOPBACK}:{metrics_port}",
        "--env", "QUAYFRONT_PROXY_TRUSTED=127.0.0.0/8",
        image,
    )

    def container_died() -> str | None:
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state in ("exited", "stopped"):
            return f"container {state}:\n{podman('logs', name, check=False).stderr}"
        return None

    harness.wait_for(lambda: harness.tls_handshake(LOOPBACK, tls_port), harness.STARTUP_TIMEOUT_S,
                     what="the container's TLS listener", abort=container_died)
    health = harness.curl(f"https://{LOOPBACK}:{tls_port}/health/instance", workdir=tmp_path / "curl")
    assert health.status == 200, health.describe()
    proxied = harness.curl("--haproxy-protocol", f"https://{LOOPBACK}:{proxy_port}/v2/",
                           workdir=tmp_path / "curl")
    assert proxied.status == 200, proxied.describe()
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    top = podman("top", name, "pid", "user", "args").stdout
    assert re.search(r"^\s*1\s+1001\s+.*twistd --nodaemon --pidfile= quayfront", top, re.M), top

    began = time.monotonic()
    stop = podman("stop", "--time", str(int(DRAIN_TIMEOUT_S) + 10), name,
                  timeout=DRAIN_TIMEOUT_S + 30, check=False)
    stopped_in = time.monotonic() - began
    assert stop.returncode == 0, stop.stderr
    assert stopped_in < DRAIN_TIMEOUT_S, stopped_in
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    logs = podman("logs", name)
    # The access log went to standard output.
    assert "GET /health/instance" in logs.stdout + logs.stderr
    assert "Traceback" not in logs.stdout + logs.stderr


def test_container_bad_variable_exits_with_reason(image: str, containers: list[str]) -> None:
    """A misspelt QUAYFRONT_* variable stops the container, non-zero, saying which."""
    name = f"quayfront-test-{uuid.uuid4().hex[:8]}"
    containers.append(name)
    podman("run", "--name", name, "--read-only", "--network=host",
           "--env", "QUAYFRONT_UPSTREM=http://127.0.0.1:5000", image, check=False, timeout=120)
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() not in ("", "0")
    logs = podman("logs", name)
    assert "unknown variable QUAYFRONT_UPSTREM" in logs.stdout + logs.stderr


# --------------------------------------------------------------------------
# Purge


def test_purge_leaves_nothing(installed: Path, timings: dict[str, float],
                              capsys: pytest.CaptureFixture[str]) -> None:
    """Purging removes the venv, units, commands, configuration and logs; the user stays."""
    with capsys.disabled():
        print("\npackaging timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    run(["apt-get", "purge", "-y", "-q", "quayfront"], timeout=300,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    status = run(["dpkg-query", "-W", "-f=${db:Status-Status}", "quayfront"], check=False)
    assert status.stdout.strip() in ("", "not-installed"), status.stdout
    leftovers = [str(p) for p in (
        VENV, Path("/opt/venvs"), Path("/etc/quayfront"), Path("/var/log/quayfront"),
        Path("/usr/bin/quayfront"), Path("/usr/bin/quayfront-entrypoint"),
        Path("/etc/logrotate.d/quayfront"), Path("/usr/share/doc/quayfront"),
        *(UNIT_DIR / u for u in UNITS),
    ) if p.exists()]
    assert leftovers == []
    assert pwd.getpwnam("quayfront"), "the system user stays (Debian policy)"
