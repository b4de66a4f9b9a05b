"""
Routing, upstream faults, upstream concurrency caps and rate limits, against
real processes: docker-registry, skopeo, curl, HAProxy, and the small
upstreams of ``upstreams.py`` (a UNIX-socket web app, and ones that truncate,
stall or answer early).  Each fault test checks both what the client got and
what the upstream saw.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration import harness
from tests.integration.harness import LOOPBACK, CurlResult, Process, curl, wait_for
from tests.integration.upstreams import EARLY_401_BODY, start_upstream

pytestmark = pytest.mark.integration

KiB = 1 << 10
MiB = 1 << 20

JSON_ACCESS_LOG = '[access_log]\nformat = "json"\n'


# --------------------------------------------------------------------------
# Helpers


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def json_access_entries(proc: Process) -> list[dict]:
    """Every line of a quayfront's JSON access log so far, parsed."""
    return [json.loads(line) for line in harness.read_access_log(proc.extra["access_log"])]


def wait_for_json_entry(proc: Process, predicate, timeout: float = 15.0) -> dict:
    """The first JSON access log entry that satisfies ``predicate``, waiting for it."""
    def found() -> dict | None:
        return next((e for e in json_access_entries(proc) if predicate(e)), None)
    try:
        return wait_for(found, timeout, interval=0.1, what="a JSON access log entry")
    except TimeoutError:
        lines = harness.read_access_log(proc.extra["access_log"])
        raise AssertionError("no matching access log entry; last lines:\n"
                             + "\n".join(lines[-20:])) from None


def wait_for_output(proc: Process, needle: str | tuple[str, ...], timeout: float = 15.0) -> str:
    """Wait until ``needle`` (or any of several) appears in a process's output; return its line."""
    needles = (needle,) if isinstance(needle, str) else needle

    def found() -> str | None:
        return next((l for l in proc.output().splitlines() if any(n in l for n in needles)),
                    None)
    try:
        return wait_for(found, timeout, interval=0.05, what=f"{needle!r} in {proc.name}'s output")
    except TimeoutError:
        raise AssertionError(f"{needle!r} not in {proc.name}'s output within {timeout}s:\n"
                             + harness.tail(proc.output())) from None


def registry_error(status: int, headers: list[tuple[str, str]], body: bytes, expect_status: int,
                   code: str, reason: str | tuple[str, ...], describe: str) -> dict:
    """Assert quayfront's own registry JSON error (``reason``: one or any of several)."""
    assert status == expect_status, describe
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    assert "application/json" in content_type, describe
    doc = json.loads(body)
    assert isinstance(doc.get("errors"), list) and len(doc["errors"]) == 1, describe
    [error] = doc["errors"]
    assert error["code"] == code, describe
    assert isinstance(error["message"], str) and error["message"], describe
    reasons = (reason,) if isinstance(reason, str) else reason
    assert error["detail"]["reason"] in reasons, describe
    return error


def assert_registry_error(r: CurlResult, status: int, code: str, reason: str) -> dict:
    return registry_error(r.status, r.headers, r.body, status, code, reason, r.describe())


def run_curl(args: list[str], timeout: float = 60.0, **popen) -> subprocess.Popen:
    """Start curl (``-sS -k``, bounded by ``--max-time``) with output captured."""
    argv = [harness.require_binary("curl"), "-sS", "-k", "--max-time", str(timeout), *args]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)


def finish(popen: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait (bounded) for a process started by ``run_curl``; return code, stdout, stderr."""
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate(timeout=10)
        raise AssertionError(f"{popen.args} did not finish within {timeout}s") from None
    return popen.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def upload_url(location: str, digest: str) -> str:
    sep = "&" if "?" in location else "?"
    return f"{location}{sep}digest={digest}"


# --------------------------------------------------------------------------
# Routing with a real registry and skopeo


def short_socket_dir(tmp_path: Path) -> Path:
    """A directory whose paths fit a UNIX socket address (108 bytes)."""
    if len(str(tmp_path / "web.sock")) < 100:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="qf-sock-"))


def test_routes_registry_unix_web_static_and_ping_with_skopeo(
        tmp_path: Path, registry: Process, start_quayfront) -> None:
    """With [[routes]] /v2/ -> registry, / -> a UNIX-socket upstream and /static/ -> a directory, skopeo pushes and pulls and every route answers from its own backend."""
    skopeo = harness.require_binary("skopeo")
    sock_dir = short_socket_dir(tmp_path)
    sock = sock_dir / "web.sock"
    web = start_upstream(tmp_path / "web", "unix-web", str(sock))
    static = tmp_path / "static"
    static.mkdir()
    static_bytes = os.urandom(3000) + b"\x00end"
    (static / "file.bin").write_bytes(static_bytes)
    (static / "two words.txt").write_bytes(b"percent-decoded")
    config = write_config(tmp_path / "quayfront.toml", JSON_ACCESS_LOG + f"""
[upstreams.web]
url = "unix:{sock}"

[[routes]]
prefix = "/v2/"
upstream = "default"

[[routes]]
prefix = "/"
upstream = "web"

[[routes]]
prefix = "/static/"
directory = "{static}"
""")
    try:
        qf = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}",
                             extra=("--config", str(config)))
        base = f"https://{LOOPBACK}:{qf.ports['tls']}"

        # skopeo push and pull through the /v2/ route.
        image = harness.build_oci_image(tmp_path / "oci", 256 * KiB + 17, tag="v1")
        remote = f"docker://{LOOPBACK}:{qf.ports['tls']}/routes/skopeo:v1"
        env = {**os.environ, "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
        push = subprocess.run(
            [skopeo, "copy", "--insecure-policy", "--dest-tls-verify=false",
             "--retry-times", "0", image.reference, remote],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
        assert push.returncode == 0, f"skopeo push failed:\n{harness.tail(push.stderr, 30)}"
        pulled = tmp_path / "pulled"
        pull = subprocess.run(
            [skopeo, "copy", "--insecure-policy", "--src-tls-verify=false",
             "--retry-times", "0", remote, f"dir:{pulled}"],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
        assert pull.returncode == 0, f"skopeo pull failed:\n{harness.tail(pull.stderr, 30)}"
        manifest = json.loads((pulled / "manifest.json").read_text())
        [layer] = manifest["layers"]
        layer_file = pulled / layer["digest"].split(":", 1)[1]
        assert harness.sha256_file(layer_file) == layer["digest"]
        assert harness.sha256_file(layer_file, uncompress=True) == image.layer_digest

        # /v2/ is the registry's own answer.
        r = curl(f"{base}/v2/", workdir=tmp_path)
        assert r.status == 200, r.describe()
        assert r.header("Docker-Distribution-Api-Version") == "registry/2.0", r.describe()

        # Anything else under / reaches the UNIX-socket upstream, path and query intact.
        r = curl(f"{base}/api/x?q=1", workdir=tmp_path)
        assert r.status == 200, r.describe()
        answer = json.loads(r.body)
        assert (answer["upstream"], answer["method"], answer["path"]) == ("web", "GET", "/api/x?q=1")
        forwarded = [v for k, v in answer["headers"] if k.lower() == "x-forwarded-for"]
        assert forwarded == [LOOPBACK], answer
        wait_for_output(web, "request: GET /api/x?q=1")

        # /static/ is served from the directory, byte for byte, and not forwarded.
        r = curl(f"{base}/static/file.bin", workdir=tmp_path)
        assert r.status == 200, r.describe()
        assert r.body == static_bytes
        r = curl(f"{base}/static/two%20words.txt", workdir=tmp_path)
        assert r.status == 200 and r.body == b"percent-decoded", r.describe()
        r = curl(f"{base}/static/missing.bin", workdir=tmp_path)
        assert r.status == 404, r.describe()

        # /v1/_ping is answered by quayfront itself.
        r = curl(f"{base}/v1/_ping", workdir=tmp_path)
        assert r.status == 200, r.describe()
        assert r.body == b"true", r.describe()
        assert r.header("X-Docker-Registry-Version") == "0.6.0", r.describe()

        # The web upstream saw exactly the one request meant for it.
        seen = [l for l in web.output().splitlines() if l.startswith("request: ")]
        assert seen == ["request: GET /api/x?q=1"], seen
        # And every /v2/ request of the push went to the registry through quayfront.
        entries = json_access_entries(qf)
        puts = [e for e in entries if e["method"] == "PUT"
                and e["uri"].startswith("/v2/routes/skopeo/")]
        assert puts and all(e["status"] == 201 for e in puts), puts
    finally:
        web.stop()
        if sock_dir != tmp_path:
            sock.unlink(missing_ok=True)
            sock_dir.rmdir()


# --------------------------------------------------------------------------
# Upstream faults


def test_upstream_killed_mid_download_fails_the_client_transfer(
        tmp_path: Path, start_quayfront) -> None:
    """An upstream SIGKILLed after part of a Content-Length body makes curl fail with a transfer error and quayfront log upstream-truncated."""
    total, sent = 8 * MiB, 1 * MiB
    upstream = start_upstream(tmp_path / "up", "truncate", str(total), str(sent))
    try:
        config = write_config(tmp_path / "quayfront.toml", JSON_ACCESS_LOG)
        qf = start_quayfront(f"http://{LOOPBACK}:{upstream.ports['http']}",
                             extra=("--config", str(config)))
        path = "/v2/faults/truncated/blobs/sha256:" + "ab" * 32
        out = tmp_path / "download"
        client = run_curl(["-o", str(out), "-w", "%{http_code} %{size_download}",
                           f"https://{LOOPBACK}:{qf.ports['tls']}{path}"], timeout=60)
        try:
            wait_for_output(upstream, f"request: GET {path} HTTP/1.1")
            wait_for_output(upstream, f"sent {sent} of {total}")
            # The client has the head and some of the body before the upstream dies.
            wait_for(lambda: out.exists() and out.stat().st_size > 0, 15,
                     what="curl to receive part of the body")
            os.kill(upstream.pid, signal.SIGKILL)
            upstream.popen.wait(timeout=10)
            code, stdout, stderr = finish(client, 30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(timeout=10)
        status, size = stdout.split()
        described = f"curl exit {code}, stdout {stdout!r}, stderr {stderr.strip()!r}"
        assert code in (18, 56), f"expected a transfer error (18 or 56): {described}"
        assert status == "200", described
        assert int(size) < total and out.stat().st_size < total, described

        entry = wait_for_json_entry(qf, lambda e: e["uri"] == path)
        assert entry["outcome"] == "upstream-truncated", entry
        assert entry["status"] == 200 and entry["body_bytes_sent"] < total, entry
        wait_for_output(qf, "ended early")
    finally:
        upstream.stop()


def test_upstream_stalling_past_response_timeout_gets_504(tmp_path: Path, start_quayfront) -> None:
    """An upstream that never answers gets the client a registry-JSON 504 after the route's 2 s response timeout, and its connection closed."""
    upstream = start_upstream(tmp_path / "up", "stall")
    try:
        config = write_config(tmp_path / "quayfront.toml", JSON_ACCESS_LOG + """
[[routes]]
prefix = "/v2/"
response_timeout_s = 2.0
""")
        qf = start_quayfront(f"http://{LOOPBACK}:{upstream.ports['http']}",
                             extra=("--config", str(config)))
        path = "/v2/faults/stall/manifests/latest"
        started = time.monotonic()
        r = curl(f"https://{LOOPBACK}:{qf.ports['tls']}{path}", workdir=tmp_path, timeout=30)
        elapsed = time.monotonic() - started
        assert_registry_error(r, 504, "UNAVAILABLE", "upstream-timeout")
        assert 1.8 <= elapsed < 10, f"504 after {elapsed:.2f}s, expected about 2 s"

        # The upstream had the request, and quayfront gave up on it.
        wait_for_output(upstream, f"request: GET {path} HTTP/1.1")
        closed = wait_for_output(upstream, ("peer closed after", "peer gone after"), timeout=10)
        assert float(closed.split(" after ")[1].split("s")[0]) < 10, closed
        assert "upstream-timeout" in wait_for_output(qf, f"504 for GET {path}")
        entry = wait_for_json_entry(qf, lambda e: e["uri"] == path)
        assert (entry["status"], entry["outcome"]) == (504, "upstream-timeout"), entry
    finally:
        upstream.stop()


def test_refused_upstream_gives_502_unavailable(tmp_path: Path, start_quayfront) -> None:
    """An upstream port that refuses connections gets a registry-JSON 502 UNAVAILABLE on /v2/ and plain text elsewhere."""
    closed = harness.free_port()
    qf = start_quayfront(f"http://{LOOPBACK}:{closed}")
    base = f"https://{LOOPBACK}:{qf.ports['tls']}"
    path = "/v2/faults/refused/tags/list"
    started = time.monotonic()
    r = curl(f"{base}{path}", workdir=tmp_path, timeout=30)
    assert_registry_error(r, 502, "UNAVAILABLE", "upstream-unreachable")
    assert time.monotonic() - started < 10
    assert "upstream-unreachable" in wait_for_output(qf, f"502 for GET {path}")

    r = curl(f"{base}/api/refused", workdir=tmp_path, timeout=30)
    assert r.status == 502, r.describe()
    assert (r.header("Content-Type") or "").startswith("text/plain"), r.describe()
    assert b"upstream-unreachable" in r.body, r.describe()


def test_client_abort_mid_upload_leaves_no_blob(tmp_path: Path, registry: Process,
                                                quayfront: Process) -> None:
    """A curl killed in the middle of a 64 MiB monolithic PUT leaves no blob, docker-registry sees its request cut off at once, and the access log has a 499 line."""
    size = 64 * MiB
    blob = tmp_path / "blob"
    h = hashlib.sha256()
    with open(blob, "wb") as f:
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            h.update(chunk)
            f.write(chunk)
    digest = "sha256:" + h.hexdigest()
    name = f"faults/abort-{os.getpid()}"
    base = f"https://{LOOPBACK}:{quayfront.ports['tls']}"

    start = curl("-X", "POST", f"{base}/v2/{name}/blobs/uploads/", workdir=tmp_path)
    assert start.status == 202, start.describe()
    uuid = start.header("Docker-Upload-UUID")
    assert uuid, start.describe()
    target = upload_url(start.header("Location") or "", digest)
    data_file = (registry.workdir / "storage/docker/registry/v2/repositories" / name
                 / "_uploads" / uuid / "data")

    client = run_curl(["-X", "PUT", "-T", str(blob), "-H", "Expect:", "--limit-rate", "4M",
                       "-H", "Content-Type: application/octet-stream", "-o", "/dev/null",
                       target], timeout=120)
    try:
        # The registry has started writing the body when the client dies.
        wait_for(lambda: data_file.exists() and data_file.stat().st_size >= 6 * MiB, 30,
                 what="the registry to receive 6 MiB of the upload",
                 abort=lambda: None if client.poll() is None else "curl exited early")
        os.kill(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)

    upload_path = urlsplit(target).path
    [line] = harness.wait_for_access_line(
        quayfront.extra["access_log"], lambda l: f'"PUT {upload_path}?' in l, timeout=15)
    entry = harness.parse_access_line(line)
    assert entry.status == 499, line
    assert int(entry.fields["request_length"]) < size, line

    head = curl("-I", f"{base}/v2/{name}/blobs/{digest}", workdir=tmp_path)
    assert head.status == 404, head.describe()
    # Nothing the registry kept is the whole blob ...
    assert not data_file.exists() or data_file.stat().st_size < size
    # ... and it learns within seconds, while quayfront runs on, that the request
    # was cut off: quayfront aborted its upstream connection.
    def upload_cut_off() -> str | None:
        return next((l for l in registry.output().splitlines()
                     if uuid in l and ("disconnected" in l or "unexpected EOF" in l)), None)
    try:
        wait_for(upload_cut_off, 10, interval=0.1, what="the registry to see the upload end")
    except TimeoutError:
        raise AssertionError(
            "10 s after the client died, the registry still had not seen its PUT end; registry "
            "log lines for the upload:\n" + "\n".join(
                l[:300] for l in registry.output().splitlines() if uuid in l)) from None
    assert quayfront.alive()


@pytest.mark.parametrize("expect", ["no-expect", "expect-100"])
def test_early_401_stops_large_upload(tmp_path: Path, start_quayfront, expect: str) -> None:
    """An upstream answering 401 on the request head reaches a curl uploading 256 MiB long before the body could have been sent."""
    total = 256 * MiB
    rate = 32 * MiB  # curl's cap: the whole body would take 8 s
    upstream = start_upstream(tmp_path / "up", "early-401")
    try:
        config = write_config(tmp_path / "quayfront.toml", JSON_ACCESS_LOG)
        qf = start_quayfront(f"http://{LOOPBACK}:{upstream.ports['http']}",
                             extra=("--config", str(config)))
        body = tmp_path / "zeros"
        with open(body, "wb") as f:
            f.truncate(total)  # sparse: no disk used
        path = "/v2/faults/early401/blobs/uploads/some-uuid?digest=sha256:" + "cd" * 32
        expect_header = ["-H", "Expect:"] if expect == "no-expect" else \
            ["-H", "Expect: 100-continue", "--expect100-timeout", "30"]
        out = tmp_path / "answer"
        started = time.monotonic()
        client = run_curl(["-X", "PUT", "-T", str(body), *expect_header,
                           "--limit-rate", str(rate), "-o", str(out),
                           "-w", "%{http_code} %{size_upload}",
                           "-D", str(tmp_path / "headers"),
                           f"https://{LOOPBACK}:{qf.ports['tls']}{path}"], timeout=60)
        code, stdout, stderr = finish(client, 70)
        elapsed = time.monotonic() - started
        described = (f"curl exit {code} after {elapsed:.2f}s, stdout {stdout!r}, "
                     f"stderr {stderr.strip()!r}")
        status, uploaded = stdout.split()
        assert status == "401", described
        headers = (tmp_path / "headers").read_text(errors="replace").lower()
        assert 'www-authenticate: bearer realm="https://auth.example/token"' in headers, headers
        assert "connection: close" in headers, headers
        assert out.read_bytes() == EARLY_401_BODY
        assert int(uploaded) < 32 * MiB, described
        assert elapsed < 4, described

        # The upstream saw the head, answered without reading, and was let go.
        wait_for_output(upstream, f"request: PUT {path} HTTP/1.1 content-length={total}")
        wait_for_output(upstream, "answered 401 before reading the body")
        closed = wait_for_output(upstream, "body bytes that arrived after the answer", timeout=15)
        assert int(closed.rsplit(" ", 1)[1]) < 32 * MiB, closed
        entry = wait_for_json_entry(qf, lambda e: e["uri"] == path)
        assert entry["status"] == 401 and entry["request_length"] < 32 * MiB, entry
    finally:
        upstream.stop()


def test_expect_100_continue_upload_gets_its_100(tmp_path: Path, quayfront: Process) -> None:
    """A PUT with Expect: 100-continue, sent over a kept-alive upstream connection, gets its 100 Continue and completes without waiting out the client's expect timeout."""
    data = os.urandom(8 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    base = f"https://{LOOPBACK}:{quayfront.ports['tls']}"
    name = f"faults/expect-{os.getpid()}"
    # The POST leaves an idle connection in quayfront's upstream pool for the PUT.
    start = curl("-X", "POST", f"{base}/v2/{name}/blobs/uploads/", workdir=tmp_path)
    assert start.status == 202, start.describe()

    started = time.monotonic()
    r = curl("-X", "PUT", "-T", str(blob), "-H", "Expect: 100-continue",
             "--expect100-timeout", "10", "-H", "Content-Type: application/octet-stream",
             upload_url(start.header("Location") or "", digest), workdir=tmp_path, timeout=40)
    elapsed = time.monotonic() - started
    heads = Path(r.argv[r.argv.index("-D") + 1]).read_text(errors="replace")
    assert r.status == 201, r.describe()
    assert r.header("Docker-Content-Digest") == digest, r.describe()
    assert heads.startswith("HTTP/1.1 100"), (
        f"no 100 Continue before the final answer (after {elapsed:.1f}s):\n{heads}")
    assert elapsed < 8, f"the upload took {elapsed:.1f}s: curl waited for a 100 that never came"


# --------------------------------------------------------------------------
# Many concurrent uploads through HAProxy with an upstream concurrency cap


@dataclass
class UploadOutcome:
    index: int
    kind: str  # "ok", "503" or "bad"
    detail: str = ""


def _https(port: int, timeout: float) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(LOOPBACK, port, context=harness.unverified_tls_context(),
                                       timeout=timeout)


QUEUE_REASONS = ("upstream-queue-full", "upstream-queue-timeout")


def _check_503(resp: http.client.HTTPResponse, body: bytes, what: str) -> str | None:
    """None when this is quayfront's 503 UNAVAILABLE JSON for a full queue, else what is wrong."""
    try:
        registry_error(resp.status, resp.getheaders(), body, 503, "UNAVAILABLE", QUEUE_REASONS,
                       what)
    except (AssertionError, ValueError, KeyError) as e:
        return f"{what}: not a registry 503: {resp.status} {body[:300]!r} ({e!r})"
    return None


#: What a gated PUT sends before it waits at the gate.
GATED_PREFIX_BYTES = 32 * KiB


class Gate:
    """
    A point every upload passes once: each arrives (or is counted as arrived
    when it ends before getting there) and then waits until the gate is
    opened.
    """

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self._arrived = 0
        self._cond = threading.Condition()
        self.opened = threading.Event()

    def arrive(self) -> None:
        with self._cond:
            self._arrived += 1
            self._cond.notify_all()

    def wait_all_arrived(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._arrived >= self.parties, timeout)


class GatePasses:
    """One upload's passage through a sequence of gates, each arrived at once."""

    def __init__(self, gates: tuple[Gate, ...], timeout: float) -> None:
        self._gates = list(gates)
        self._timeout = timeout

    def pass_next(self) -> None:
        if self._gates:
            gate = self._gates.pop(0)
            gate.arrive()
            gate.opened.wait(self._timeout)

    def leave(self) -> None:
        """Count this upload as arrived at every gate it has not reached."""
        for gate in self._gates:
            gate.arrive()
        self._gates = []


def monolithic_upload(port: int, name: str, index: int, size: int, timeout: float,
                      gates: tuple[Gate, ...] = ()) -> UploadOutcome:
    """
    POST then PUT ?digest= one blob of ``size`` random bytes, then HEAD it.
    A 503 from quayfront at either step is an outcome, not an error; the
    503 may arrive while the PUT body is still being sent.  With ``gates``
    (two), the upload waits after its POST, and after the first few KiB of
    its PUT body.
    """
    passes = GatePasses(gates, timeout)
    try:
        return _monolithic_upload(port, name, index, size, timeout, passes)
    finally:
        passes.leave()


def _monolithic_upload(port: int, name: str, index: int, size: int, timeout: float,
                       passes: GatePasses) -> UploadOutcome:
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        conn = _https(port, timeout)
        try:
            conn.request("POST", f"/v2/{name}/blobs/uploads/", headers={"Content-Length": "0"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status == 503:
            problem = _check_503(resp, body, "POST")
            return UploadOutcome(index, "bad" if problem else "503", problem or "POST")
        if resp.status != 202:
            return UploadOutcome(index, "bad", f"POST: {resp.status} {body[:300]!r}")
        target = urlsplit(upload_url(resp.getheader("Location") or "", digest))
        passes.pass_next()

        conn = _https(port, timeout)
        send_error = None
        try:
            conn.putrequest("PUT", f"{target.path}?{target.query}", skip_accept_encoding=True)
            conn.putheader("Content-Length", str(size))
            conn.putheader("Content-Type", "application/octet-stream")
            conn.endheaders()
            try:
                # A gated upload's first bytes are few enough to fit in socket
                # buffers while quayfront, holding it in its queue, is not reading.
                conn.send(data[:GATED_PREFIX_BYTES])
                passes.pass_next()
                conn.send(data[GATED_PREFIX_BYTES:])
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as e:
                send_error = e  # answered early (503) and closed: read the answer
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status == 503:
            problem = _check_503(resp, body, "PUT")
            return UploadOutcome(index, "bad" if problem else "503", problem or "PUT")
        if send_error is not None:
            return UploadOutcome(index, "bad", f"PUT: send failed ({send_error!r}), "
                                 f"then {resp.status}")
        if resp.status != 201 or resp.getheader("Docker-Content-Digest") != digest:
            return UploadOutcome(index, "bad", f"PUT: {resp.status} {resp.getheaders()} "
                                 f"{body[:300]!r}")

        conn = _https(port, timeout)
        try:
            conn.request("HEAD", f"/v2/{name}/blobs/{digest}")
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        if resp.status != 200 or resp.getheader("Content-Length") != str(size):
            return UploadOutcome(index, "bad", f"HEAD: {resp.status} {resp.getheaders()}")
        return UploadOutcome(index, "ok")
    except (OSError, http.client.HTTPException) as e:
        return UploadOutcome(index, "bad", f"{type(e).__name__}: {e}")


def run_uploads(port: int, name: str, count: int, size: int, workers: int,
                deadline_s: float, request_timeout_s: float,
                gated: bool = False) -> list[UploadOutcome]:
    """
    ``count`` uploads on ``workers`` threads; fail if any is unfinished at the
    deadline.  ``gated`` (needs ``count == workers``): all POSTs end before
    any PUT starts, and every PUT waits early in its body until all PUTs
    have got that far (or ended), so they all want an upstream slot at once.
    """
    assert not gated or count == workers
    gates = (Gate(count), Gate(count)) if gated else ()
    started = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(monolithic_upload, port, name, i, size, request_timeout_s, gates)
                   for i in range(count)]
        for number, gate in enumerate(gates, 1):
            arrived = gate.wait_all_arrived(deadline_s / 3)
            gate.opened.set()
            assert arrived, f"not all {count} uploads reached gate {number} in {deadline_s / 3}s"
        remaining = max(0.0, deadline_s - (time.monotonic() - started))
        done, pending = concurrent.futures.wait(futures, timeout=remaining)
        assert not pending, (f"{len(pending)} of {count} uploads still unfinished after "
                             f"{deadline_s}s")
        return [f.result() for f in futures]
    finally:
        for gate in gates:
            gate.opened.set()
        pool.shutdown(wait=False, cancel_futures=True)


def summarize(outcomes: list[UploadOutcome]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for o in outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    return kinds


def capped_quayfront(tmp_path: Path, start_quayfront, registry: Process,
                     queue_size: int) -> tuple[Process, Process]:
    config = write_config(tmp_path / f"quayfront-q{queue_size}.toml", f"""
[upstream]
max_connections = 8
queue_size = {queue_size}
queue_timeout_s = 60.0
""")
    qf = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}",
                         extra=("--config", str(config), "--proxy-trusted", "127.0.0.0/8"))
    lb = harness.start_haproxy(tmp_path / f"haproxy-q{queue_size}", qf.ports["proxy"])
    return qf, lb


def test_200_concurrent_uploads_through_haproxy_with_upstream_cap(
        tmp_path: Path, start_registry, start_quayfront) -> None:
    """200 concurrent 8 MiB uploads through HAProxy to a registry capped at 8 requests in flight each end with the right digest or a 503 JSON, none hanging."""
    registry = start_registry()
    qf, lb = capped_quayfront(tmp_path, start_quayfront, registry, queue_size=64)
    try:
        started = time.monotonic()
        outcomes = run_uploads(lb.ports["v2"], "load/many", count=200, size=8 * MiB,
                               workers=50, deadline_s=180, request_timeout_s=90)
        elapsed = time.monotonic() - started
    finally:
        lb.stop()
    kinds = summarize(outcomes)
    print(f"200 x 8 MiB uploads through HAProxy: {kinds} in {elapsed:.1f}s")
    bad = [o for o in outcomes if o.kind == "bad"]
    assert not bad, f"{len(bad)} uploads went wrong ({kinds}); first: " + \
        "; ".join(f"#{o.index}: {o.detail}" for o in bad[:5])
    assert kinds.get("ok", 0) >= 150, kinds
    assert qf.alive()


def test_small_queue_gives_503s_and_no_hangs(tmp_path: Path, start_registry,
                                             start_quayfront) -> None:
    """With queue_size = 8, 48 uploads holding their PUTs open at once get 503 JSON beyond 8 active + 8 queued; the rest succeed and none hangs."""
    registry = start_registry()
    qf, lb = capped_quayfront(tmp_path, start_quayfront, registry, queue_size=8)
    try:
        outcomes = run_uploads(lb.ports["v2"], "load/queue", count=48, size=1 * MiB,
                               workers=48, deadline_s=90, request_timeout_s=60, gated=True)
    finally:
        lb.stop()
    kinds = summarize(outcomes)
    print(f"48 x 1 MiB gated uploads, queue_size 8: {kinds}")
    bad = [o for o in outcomes if o.kind == "bad"]
    assert not bad, f"{len(bad)} uploads went wrong ({kinds}); first: " + \
        "; ".join(f"#{o.index}: {o.detail}" for o in bad[:5])
    # 8 PUTs hold the slots and 8 wait: the other 32 are turned away (a few
    # may slip in if quayfront reads their heads only after slots free up).
    assert kinds.get("503", 0) >= 24, f"too few 503s for 48 PUTs, 8 slots + 8 queued: {kinds}"
    # The 8 active and the 8 queued ones all get through once the bodies flow.
    assert kinds.get("ok", 0) >= 16, kinds
    assert "upstream-queue-full" in qf.output()


# --------------------------------------------------------------------------
# Rate limits by the PROXY header's client address


def test_rate_limit_keys_on_proxy_client_address(tmp_path: Path, registry: Process,
                                                  start_quayfront) -> None:
    """A client over its burst gets 429 TOOMANYREQUESTS with Retry-After, a spoofed X-Forwarded-For does not help it, and another client is unaffected."""
    config = write_config(tmp_path / "quayfront.toml", """
[rate_limits.api]
requests_per_s = 0.5
burst = 3

[[routes]]
prefix = "/v2/"
upstream = "default"
rate_limit = "api"
""")
    qf = start_quayfront(f"http://{LOOPBACK}:{registry.ports['http']}",
                         extra=("--config", str(config)))
    url = f"https://{LOOPBACK}:{qf.ports['proxy']}/v2/"
    marker = f"rl{os.getpid()}x"

    statuses: list[int] = []
    limited: CurlResult | None = None
    for i in range(10):
        r = curl("--haproxy-protocol", "--interface", "127.0.0.31", f"{url}?n={marker}{i}",
                 workdir=tmp_path, timeout=20)
        statuses.append(r.status)
        if r.status == 429:
            limited = r
            break
        assert r.status == 200, r.describe()
    assert limited is not None, f"no 429 in {len(statuses)} requests: {statuses}"
    assert statuses[:3] == [200, 200, 200], f"the burst of 3 was not honoured: {statuses}"
    assert_registry_error(limited, 429, "TOOMANYREQUESTS", "rate-limited")
    retry_after = limited.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 3, \
        limited.describe()
    last = len(statuses) - 1

    # X-Forwarded-For from the client is not the key: still limited.
    r = curl("--haproxy-protocol", "--interface", "127.0.0.31", "-H", "X-Forwarded-For: 127.0.0.99",
             f"{url}?n={marker}spoof", workdir=tmp_path, timeout=20)
    assert_registry_error(r, 429, "TOOMANYREQUESTS", "rate-limited")

    # Another client address has its own bucket.
    r = curl("--haproxy-protocol", "--interface", "127.0.0.32", f"{url}?n={marker}other",
             workdir=tmp_path, timeout=20)
    assert r.status == 200, r.describe()
    assert r.header("Docker-Distribution-Api-Version") == "registry/2.0", r.describe()

    # The registry saw the admitted requests and not the limited ones.
    wait_for_output(registry, f"n={marker}other")
    registry_log = registry.output()
    assert f"n={marker}0 " in registry_log
    assert f"n={marker}{last}" not in registry_log
    assert f"n={marker}spoof" not in registry_log
    assert "rate-limited" in wait_for_output(qf, f"429 for GET /v2/?n={marker}{last}")
    lines = harness.wait_for_access_line(qf.extra["access_log"],
                                         lambda l: f"n={marker}{last} " in l)
    entry = harness.parse_access_line(lines[0])
    assert (entry.client, entry.status) == ("127.0.0.31", 429), lines[0]
