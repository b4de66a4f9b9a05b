"""
The lifecycle against real processes: quayfront under twistd (foreground
and daemonised), HAProxy, docker-registry and curl.  A drain loses nothing
(a slow download completes byte-exact, a slow upload gets the registry's
answer, every request is logged) and load balancers can see it coming
(health 503 while still serving, then the listeners close); daemon mode
fails loudly; the access log survives rotation; --check validates.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration import harness
from tests.integration.harness import LOOPBACK, Process, curl, wait_for
from tests.integration.test_registry_proxying import (
    finish,
    run_curl,
    upload_url,
    wait_for_output,
    write_config,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20


def write_blob(path: Path, size: int) -> str:
    """A file of ``size`` bytes built from random blocks; its ``sha256:`` digest."""
    blocks = harness.pattern_blocks(count=8)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for chunk in harness.blob_chunks(blocks, size):
            f.write(chunk)
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def push_blob(registry: Process, repository: str, path: Path, digest: str, workdir: Path) -> None:
    """Upload a blob straight to the registry (monolithic PUT)."""
    base = f"http://{LOOPBACK}:{registry.ports['http']}"
    started = curl("-X", "POST", f"{base}/v2/{repository}/blobs/uploads/", workdir=workdir)
    assert started.status == 202, started.describe()
    location = urlsplit(started.header("Location"))
    target = upload_url(f"{base}{location.path}?{location.query}".rstrip("?"), digest)
    done = curl("-X", "PUT", "-H", "Content-Type: application/octet-stream",
                "--data-binary", f"@{path}", target, workdir=workdir, timeout=120)
    assert done.status == 201, done.describe()


def drain_lines(proc: Process) -> list[str]:
    return [line for line in proc.output().splitlines() if "draining: " in line]


def wait_for_exit(proc: Process, timeout: float) -> int:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{proc.name} still running {timeout}s after SIGTERM:\n{harness.tail(proc.output())}"
        ) from None


def assert_phases_logged(proc: Process) -> None:
    lines = drain_lines(proc)
    order = ["health checks answer 503", "closing", "waiting up to", "done"]
    positions = [next((i for i, l in enumerate(lines) if needle in l), None) for needle in order]
    assert None not in positions and positions == sorted(positions), "\n".join(lines)


# --------------------------------------------------------------------------
# Drain


def test_sigterm_during_slow_download_completes_it(tmp_path: Path, registry: Process,
                                                    start_quayfront) -> None:
    """A 256 MiB download in flight at SIGTERM completes byte-exact, is logged, and quayfront exits 0."""
    blob = tmp_path / "blob.bin"
    size = 256 * MiB
    digest = write_blob(blob, size)
    push_blob(registry, "drain/download", blob, digest, tmp_path)
    blob.unlink()
    qf = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}",
                         extra=("--drain-delay", "1"))
    lb = harness.start_haproxy(tmp_path / "haproxy", qf.ports["proxy"])
    try:
        out = tmp_path / "download.bin"
        # About 7 s at this rate: well inside the drain timeout, long enough
        # for SIGTERM to land mid-transfer.
        download = run_curl(["--limit-rate", "40M", "-o", str(out), "-w", "%{http_code}",
                             f"https://{LOOPBACK}:{lb.ports['v2']}/v2/drain/download/blobs/{digest}"],
                            timeout=120)
        wait_for(lambda: out.exists() and out.stat().st_size > 16 * MiB, 30,
                 what="the download to be under way")
        os.kill(qf.pid, signal.SIGTERM)
        code, status, err = finish(download, 120)
        assert code == 0 and status == "200", f"curl exit {code}, status {status}: {err}"
        assert out.stat().st_size == size
        assert harness.sha256_file(out) == digest
        assert wait_for_exit(qf, 60) == 0, harness.tail(qf.output())
        lines = [harness.parse_access_line(l) for l in harness.read_access_log(qf.extra["access_log"])]
        [logged] = [l for l in lines if digest in l.path]
        assert logged.status == 200 and int(logged.fields["bytes_sent"]) == size, logged.raw
        assert_phases_logged(qf)
    finally:
        lb.stop()


def test_sigterm_during_slow_chunked_upload_gets_the_registry_answer(
        tmp_path: Path, registry: Process, start_quayfront) -> None:
    """A chunked PATCH in flight at SIGTERM gets the registry's 202 with the whole range."""
    blob = tmp_path / "chunk.bin"
    size = 64 * MiB
    write_blob(blob, size)
    qf = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}",
                         extra=("--drain-delay", "0"))
    base = f"https://{LOOPBACK}:{qf.ports['tls']}"
    started = curl("-X", "POST", f"{base}/v2/drain/upload/blobs/uploads/", workdir=tmp_path)
    assert started.status == 202, started.describe()
    uuid = started.header("Docker-Upload-UUID")
    location = urlsplit(started.header("Location"))
    upload = run_curl(["-X", "PATCH", "--limit-rate", "16M",
                       "-H", "Transfer-Encoding: chunked",
                       "-H", "Content-Type: application/octet-stream",
                       "--data-binary", f"@{blob}", "-D", "-", "-o", os.devnull,
                       f"{base}{location.path}?{location.query}"], timeout=120)
    data = (registry.workdir / "storage" / "docker" / "registry" / "v2" / "repositories"
            / "drain" / "upload" / "_uploads" / uuid / "data")
    wait_for(lambda: data.exists() and data.stat().st_size > 4 * MiB, 30,
             what="the upload to reach the registry")
    os.kill(qf.pid, signal.SIGTERM)
    code, head, err = finish(upload, 120)
    assert code == 0, f"curl exit {code}: {err}"
    assert "\r\nHTTP/1.1 202 Accepted\r\n" in "\r\n" + head, head
    assert f"range: 0-{size - 1}" in head.lower(), head
    assert wait_for_exit(qf, 60) == 0, harness.tail(qf.output())
    lines = [harness.parse_access_line(l) for l in harness.read_access_log(qf.extra["access_log"])]
    assert [l.status for l in lines if l.method == "PATCH"] == [202], lines
    assert_phases_logged(qf)


def refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_drain_delay_serves_new_connections_with_health_503(tmp_path: Path, registry: Process,
                                                            start_quayfront) -> None:
    """During the delay a new connection gets health 503 and proxied requests succeed; a second signal ends it; exit 0."""
    # A delay far longer than the checks take, however loaded the machine;
    # a second SIGTERM then ends it.
    qf = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}",
                         extra=("--drain-delay", "120"))
    assert curl(f"https://{LOOPBACK}:{qf.ports['tls']}/health/instance",
                workdir=tmp_path).status == 200
    os.kill(qf.pid, signal.SIGTERM)
    wait_for_output(qf, "draining: health checks answer 503")
    health = curl(f"https://{LOOPBACK}:{qf.ports['tls']}/health/instance", workdir=tmp_path)
    assert health.status == 503, health.describe()
    proxied = curl("--haproxy-protocol", f"https://{LOOPBACK}:{qf.ports['proxy']}/v2/",
                   workdir=tmp_path)
    assert proxied.status == 200, proxied.describe()
    assert proxied.header("Connection") == "close", proxied.describe()
    health_on_proxy = curl("--haproxy-protocol",
                           f"https://{LOOPBACK}:{qf.ports['proxy']}/health/instance",
                           workdir=tmp_path)
    assert health_on_proxy.status == 503, health_on_proxy.describe()
    assert "draining: closing" not in qf.output()
    os.kill(qf.pid, signal.SIGTERM)
    wait_for(lambda: refused(qf.ports["tls"]) and refused(qf.ports["proxy"]), 15,
             what="the listeners to close")
    assert wait_for_exit(qf, 30) == 0, harness.tail(qf.output())
    assert "delay skipped" in qf.output()
    assert_phases_logged(qf)
    logged = [harness.parse_access_line(l) for l in harness.read_access_log(qf.extra["access_log"])]
    assert [(l.path, l.status) for l in logged][-3:] == [
        ("/health/instance", 503), ("/v2/", 200), ("/health/instance", 503)]


def test_listeners_stay_open_for_the_whole_delay(tmp_path: Path, registry: Process,
                                                 start_quayfront) -> None:
    """Without a second signal the listeners close only once drain_delay_s has passed; exit 0."""
    qf = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}",
                         extra=("--drain-delay", "3"))
    signalled = time.monotonic()
    os.kill(qf.pid, signal.SIGTERM)
    wait_for(lambda: refused(qf.ports["tls"]), 30, interval=0.02, what="the listeners to close")
    assert time.monotonic() - signalled >= 3.0
    assert wait_for_exit(qf, 30) == 0, harness.tail(qf.output())
    assert_phases_logged(qf)


# --------------------------------------------------------------------------
# Daemon mode


def daemon_argv(tmp_path: Path, cert: Path, key: Path, *args: str) -> list[str]:
    return [*harness.twistd_command(), f"--pidfile={tmp_path / 'quayfront.pid'}",
            f"--logfile={tmp_path / 'twistd.log'}", "quayfront", "--cert", str(cert),
            "--key", str(key), "--metrics-listen", "off", *args]


def run_daemon(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=15,
                          stdin=subprocess.DEVNULL, cwd=harness.REPO_ROOT,
                          env=harness.quayfront_env())
    return done, time.monotonic() - began


@pytest.mark.parametrize("how", ["port held by another process", "two listeners on one port",
                                 "config key", "certificate", "access-log path"])
def test_daemon_startup_errors_fail_loudly(tmp_path: Path, dev_cert, how: str) -> None:
    """Daemonised, a startup error (a port in use above all) ends the start within 15 s with exit 1, the line on the terminal, no pid file."""
    cert, key = dev_cert
    taken = socket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen()
    busy = taken.getsockname()[1]
    proxy_port, tls_port = harness.free_ports(2)
    ports = ("--proxy-listen", f"{LOOPBACK}:{proxy_port}", "--listen", f"{LOOPBACK}:{tls_port}")
    bad = write_config(tmp_path / "bad.toml", "[http]\ndrain_delay = 1\n")
    args, expected = {
        "port held by another process": (
            ("--proxy-listen", f"{LOOPBACK}:{busy}", "--listen", f"{LOOPBACK}:{tls_port}"),
            f"--proxy-listen: proxy_listener.address: cannot listen on {LOOPBACK}:{busy}:"
            " Address already in use"),
        "two listeners on one port": (
            ("--proxy-listen", f"{LOOPBACK}:{proxy_port}", "--listen", f"{LOOPBACK}:{proxy_port}"),
            f"--listen: tls_listener.address: {LOOPBACK}:{proxy_port} is also taken by"
            f" proxy_listener.address ({LOOPBACK}:{proxy_port})"),
        "config key": ((*ports, "--config", str(bad)), f"{bad}: http.drain_delay: unknown key"),
        "certificate": ((*ports, "--cert", str(tmp_path / "missing.pem")),
                        f"--cert: tls.cert: cannot read {tmp_path / 'missing.pem'}"),
        "access-log path": ((*ports, "--access-log", str(tmp_path / "no" / "access.log")),
                            f"--access-log: access_log.path: directory {tmp_path / 'no'}"
                            " does not exist"),
    }[how]
    try:
        done, elapsed = run_daemon(daemon_argv(tmp_path, cert, key, *args))
    finally:
        taken.close()
    assert done.returncode == 1, done
    assert elapsed < 15
    [line] = done.stderr.splitlines()
    assert line.startswith(f"quayfront: {expected}"), done.stderr
    assert not (tmp_path / "quayfront.pid").exists()
    assert not harness.port_listening(proxy_port) and not harness.port_listening(tls_port)


def test_daemon_starts_logs_access_to_twistd_log_and_drains(tmp_path: Path, dev_cert,
                                                            registry: Process) -> None:
    """Daemonised with access_log.path = "-", lines go to twistd's log; SIGTERM drains and removes the pid file."""
    cert, key = dev_cert
    proxy_port, tls_port = harness.free_ports(2)
    done, elapsed = run_daemon(daemon_argv(
        tmp_path, cert, key, "--proxy-listen", f"{LOOPBACK}:{proxy_port}",
        "--listen", f"{LOOPBACK}:{tls_port}", "--access-log", "-", "--drain-delay", "0",
        "--upstream", f"http://{LOOPBACK}:{registry.ports['http']}"))
    assert done.returncode == 0, done
    assert done.stdout + done.stderr == ""
    pid = int((tmp_path / "quayfront.pid").read_text())
    log = tmp_path / "twistd.log"
    try:
        wait_for(lambda: harness.port_listening(tls_port), 15, what="the daemon to listen")
        assert curl(f"https://{LOOPBACK}:{tls_port}/v2/", workdir=tmp_path).status == 200
        wait_for(lambda: '"GET /v2/ HTTP/1.1" 200' in log.read_text(), 10,
                 what="the access line in twistd's log")
        text = log.read_text()
        assert f"listening on {LOOPBACK}:{tls_port}: TLS" in text
        assert "Starting factory" not in text
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, what="the daemon to exit")
    assert not (tmp_path / "quayfront.pid").exists()
    assert "draining: done" in log.read_text()


# --------------------------------------------------------------------------
# Access log rotation


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP])
def test_mv_and_signal_moves_new_lines_to_a_new_file(tmp_path: Path, start_quayfront,
                                                     echo_upstream: Process, signum) -> None:
    """After mv access.log access.log.1 and SIGUSR1 (or SIGHUP), new lines go to a new access.log."""
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}")
    log: Path = qf.extra["access_log"]
    assert curl(f"https://{LOOPBACK}:{qf.ports['tls']}/before", workdir=tmp_path).status == 200
    harness.wait_for_access_line(log, lambda l: "/before" in l)
    rotated = log.with_name(log.name + ".1")
    log.rename(rotated)
    os.kill(qf.pid, signum)
    wait_for_output(qf, f"access log reopened ({signal.Signals(signum).name})")
    assert curl(f"https://{LOOPBACK}:{qf.ports['tls']}/after", workdir=tmp_path).status == 200
    harness.wait_for_access_line(log, lambda l: "/after" in l)
    assert [l for l in harness.read_access_log(log) if "/before" in l] == []
    assert [l for l in harness.read_access_log(rotated) if "/after" in l] == []
    assert qf.alive()


def test_shipped_logrotate_snippet_rotates_without_losing_lines(tmp_path: Path, start_quayfront,
                                                               echo_upstream: Process) -> None:
    """logrotate with etc/logrotate.d/quayfront (paths pointed at the test) rotates; quayfront reopens."""
    logrotate = harness.require_binary("logrotate")
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}")
    log: Path = qf.extra["access_log"]
    pidfile = tmp_path / "quayfront.pid"
    pidfile.write_text(str(qf.pid))
    snippet = (harness.REPO_ROOT / "etc" / "logrotate.d" / "quayfront").read_text()
    assert "/var/log/quayfront/*.log" in snippet and "/run/quayfront/quayfront.pid" in snippet
    conf = tmp_path / "logrotate.conf"
    # The test's own log, pid file and (absent) unit; the files belong to
    # the user running the test, not to the package's quayfront user.
    conf.write_text(snippet.replace("/var/log/quayfront/*.log", str(log))
                    .replace("/run/quayfront/quayfront.pid", str(pidfile))
                    .replace("quayfront.service", "quayfront-test-absent.service")
                    .replace("su quayfront adm", ""))
    conf.chmod(0o644)
    assert curl(f"https://{LOOPBACK}:{qf.ports['tls']}/before", workdir=tmp_path).status == 200
    harness.wait_for_access_line(log, lambda l: "/before" in l)
    done = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(conf)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done
    wait_for_output(qf, "access log reopened (SIGUSR1)")
    assert curl(f"https://{LOOPBACK}:{qf.ports['tls']}/after", workdir=tmp_path).status == 200
    harness.wait_for_access_line(log, lambda l: "/after" in l)
    rotated = harness.read_access_log(log.with_name(log.name + ".1"))
    assert [l for l in rotated if "/before" in l] and not [l for l in rotated if "/after" in l]
    assert qf.alive()


def test_sighup_names_edited_keys_needing_restart(tmp_path: Path, start_quayfront,
                                                  echo_upstream: Process) -> None:
    """SIGHUP re-reads the file and logs which edited keys need a restart."""
    config = write_config(tmp_path / "q.toml", "[http]\nidle_timeout_s = 60.0\n")
    qf = start_quayfront(f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
                         extra=("--config", str(config)))
    config.write_text("[http]\nidle_timeout_s = 30.0\n")
    os.kill(qf.pid, signal.SIGHUP)
    line = wait_for_output(qf, "take effect only after a restart")
    assert "http.idle_timeout_s" in line
    config.write_text("[http]\nidle_timeout = 30.0\n")
    os.kill(qf.pid, signal.SIGHUP)
    line = wait_for_output(qf, "configuration not re-read")
    assert "http.idle_timeout: unknown key" in line
    assert qf.alive()


# --------------------------------------------------------------------------
# --check


def check(*args: str, twistd: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # The default PROXY listener (0.0.0.0) must name its load balancers.
    return subprocess.run([*harness.twistd_command(), "--pidfile=", *twistd, "quayfront", "--check",
                           *args, "--proxy-trusted", "10.0.0.0/8"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          cwd=harness.REPO_ROOT, env=harness.quayfront_env())


def test_check_accepts_a_good_config_next_to_a_running_instance(tmp_path: Path, dev_cert,
                                                                quayfront: Process) -> None:
    """--check validates a config whose ports a running quayfront holds, binding nothing: FILE: OK, 0."""
    cert, key = dev_cert
    config = write_config(tmp_path / "q.toml", (
        f'[proxy_listener]\naddress = "{LOOPBACK}:{quayfront.ports["proxy"]}"\n'
        f'[tls_listener]\naddress = "{LOOPBACK}:{quayfront.ports["tls"]}"\n'
        f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
        f'[access_log]\npath = "{tmp_path / "access.log"}"\n'
    ))
    done = check("--config", str(config))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{config}: OK\n", ""), done
    assert quayfront.alive()
    assert not (tmp_path / "access.log").exists(), "--check must not create the log"


def test_check_reports_each_kind_of_error(tmp_path: Path, dev_cert) -> None:
    """Syntax, key, type, route, certificate, key and log path errors: one line each, exit 2."""
    from tests.unit.certs import make_certificate, write_pair

    cert, key = dev_cert
    _, other_key = write_pair(tmp_path, *make_certificate(), stem="other")
    good_tls = f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    cases = {
        "syntax": (good_tls + "[http\n", "-: not valid TOML"),
        "key": (good_tls + "[http]\ndrain_dealy_s = 1\n", "http.drain_dealy_s: unknown key"),
        "type": (good_tls + '[http]\ndrain_delay_s = "soon"\n', "http.drain_delay_s: must be a number"),
        "route": (good_tls + '[[routes]]\nprefix = "/"\nupstream = "nowhere"\n',
                  "routes[0].upstream: no upstream named 'nowhere'"),
        "certificate": (f'[tls]\ncert = "{tmp_path / "missing.pem"}"\nkey = "{key}"\n',
                        "tls.cert: cannot read"),
        "private key": (f'[tls]\ncert = "{cert}"\nkey = "{other_key}"\n',
                        "the key does not match the certificate"),
        "log path": (good_tls + f'[access_log]\npath = "{tmp_path / "no" / "access.log"}"\n',
                     "access_log.path: directory"),
    }
    for kind, (text, expected) in cases.items():
        config = write_config(tmp_path / f"{kind.replace(' ', '-')}.toml", text)
        done = check("--config", str(config))
        assert done.returncode == 2, (kind, done)
        assert done.stdout == "", (kind, done)
        [line] = done.stderr.splitlines()
        assert line.startswith(f"quayfront: {config}: ") and expected in line, (kind, line)
    # The access log as the user twistd -u/-g will switch to: the test's
    # private directory is not writable by nobody.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    config = write_config(tmp_path / "dropped.toml",
                          good_tls + f'[access_log]\npath = "{private / "access.log"}"\n')
    done = check("--config", str(config), twistd=("-u", "65534", "-g", "65534"))
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"quayfront: {config}: access_log.path: directory {private}"
                                  " is not searchable by uid 65534"), done
