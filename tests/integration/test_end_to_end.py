"""
End-to-end tests: real HAProxy, quayfront (under twistd) and docker-registry
processes on 127.0.0.1, driven by skopeo, curl, openssl and raw sockets.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration import harness
from tests.integration.harness import Process, curl

pytestmark = pytest.mark.integration

MiB = 1 << 20
GiB = 1 << 30


def _upload_url(location: str, digest: str) -> str:
    """The registry's upload Location with ``digest`` added to its query."""
    sep = "&" if "?" in location else "?"
    return f"{location}{sep}digest={digest}"


def _check_health_json(body: bytes, status: int) -> dict:
    """Assert the Quay health JSON shape and that ``status_code`` equals ``status``."""
    doc = json.loads(body)
    assert set(doc) >= {"data", "status_code"}, doc
    services = doc["data"]["services"]
    assert isinstance(services, dict) and services, doc
    assert all(isinstance(v, bool) for v in services.values()), doc
    assert doc["status_code"] == status, doc
    if status == 200:
        assert all(services.values()), doc
    else:
        assert not all(services.values()), doc
    return doc


# --------------------------------------------------------------------------
# Pushing and pulling


def test_skopeo_push_and_pull_through_haproxy_v2(tmp_path: Path, haproxy: Process,
                                                 quayfront: Process) -> None:
    """skopeo pushes a 64 MiB image through HAProxy (PROXY v2) and quayfront and pulls it back intact."""
    skopeo = harness.require_binary("skopeo")
    image = harness.build_oci_image(tmp_path / "oci", 64 * MiB + 4097, tag="v1")
    remote = f"docker://127.0.0.1:{haproxy.ports['v2']}/e2e/skopeo:v1"
    env = {**os.environ, "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}

    push = subprocess.run(
        [skopeo, "--debug", "copy", "--insecure-policy", "--dest-tls-verify=false",
         "--retry-times", "0", image.reference, remote],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=240)
    (tmp_path / "push.log").write_text(push.stdout + push.stderr)
    assert push.returncode == 0, f"skopeo push failed:\n{harness.tail(push.stderr, 30)}"

    pulled = tmp_path / "pulled"
    pull = subprocess.run(
        [skopeo, "copy", "--insecure-policy", "--src-tls-verify=false", "--retry-times", "0",
         remote, f"dir:{pulled}"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=240)
    assert pull.returncode == 0, f"skopeo pull failed:\n{harness.tail(pull.stderr, 30)}"

    manifest = json.loads((pulled / "manifest.json").read_text())
    assert len(manifest["layers"]) == 1, manifest
    remote_layer = manifest["layers"][0]["digest"]
    layer_file = pulled / remote_layer.split(":", 1)[1]
    # The bytes came back as the registry stored them ...
    assert harness.sha256_file(layer_file) == remote_layer
    # ... and they are the layer we built (skopeo may gzip it on push).
    assert harness.sha256_file(layer_file, uncompress=True) == image.layer_digest

    # The registry's Location URLs led back through quayfront, not around it.
    log = quayfront.extra["access_log"]
    upload = "/v2/e2e/skopeo/blobs/uploads/"
    lines = harness.wait_for_access_line(log, lambda l: f'"PUT {upload}' in l)
    patches = [l for l in harness.read_access_log(log) if f'"PATCH {upload}' in l]
    assert patches, "no PATCH of the push in quayfront's access log"
    for line in lines + patches:
        entry = harness.parse_access_line(line)
        assert entry.client == "127.0.0.1", line
        assert entry.status in (201, 202), line


@pytest.mark.parametrize("style", ["put-chunked", "patch-chunked-then-put"])
def test_chunked_blob_upload(tmp_path: Path, quayfront: Process, style: str) -> None:
    """A blob uploaded with Transfer-Encoding: chunked arrives intact and gets the right digest."""
    data = os.urandom(3 * MiB + 12345)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    base = f"https://127.0.0.1:{quayfront.ports['tls']}"
    name = f"e2e/chunked-{style}"

    start = curl("-X", "POST", f"{base}/v2/{name}/blobs/uploads/", workdir=tmp_path)
    assert start.status == 202, start.describe()
    location = start.header("Location")
    assert location and location.startswith(base + "/"), start.describe()

    chunked = ["-H", "Transfer-Encoding: chunked", "-H", "Content-Type: application/octet-stream",
               "--data-binary", f"@{blob}"]
    if style == "put-chunked":
        done = curl("-X", "PUT", *chunked, _upload_url(location, digest), workdir=tmp_path)
    else:
        patch = curl("-X", "PATCH", *chunked, location, workdir=tmp_path)
        assert patch.status == 202, patch.describe()
        assert patch.header("Range") == f"0-{len(data) - 1}", patch.describe()
        location = patch.header("Location") or location
        done = curl("-X", "PUT", "-H", "Content-Length: 0", _upload_url(location, digest),
                    workdir=tmp_path)
    assert done.status == 201, done.describe()
    assert done.header("Docker-Content-Digest") == digest, done.describe()

    back = curl(f"{base}/v2/{name}/blobs/{digest}", workdir=tmp_path)
    assert back.status == 200, back.describe()
    assert hashlib.sha256(back.body).hexdigest() == digest.split(":", 1)[1]
    assert len(back.body) == len(data)


# --------------------------------------------------------------------------
# Client addresses and forwarded headers


@pytest.mark.parametrize("frontend,client_ip", [("v2", "127.0.0.7"), ("v1", "127.0.0.8")])
def test_access_log_shows_client_address_through_haproxy(
        tmp_path: Path, haproxy: Process, quayfront: Process,
        frontend: str, client_ip: str) -> None:
    """The access log names HAProxy as socket peer and the PROXY header's source as client."""
    marker = f"addr-{frontend}-{os.getpid()}"
    r = curl("--interface", client_ip,
             f"https://127.0.0.1:{haproxy.ports[frontend]}/v2/?probe={marker}", workdir=tmp_path)
    assert r.status == 200, r.describe()
    [line] = harness.wait_for_access_line(quayfront.extra["access_log"], lambda l: marker in l)
    entry = harness.parse_access_line(line)
    assert (entry.peer, entry.client) == ("127.0.0.1", client_ip), line
    assert entry.status == 200 and entry.method == "GET", line


def test_access_log_shows_client_address_from_curl_proxy_header(
        tmp_path: Path, quayfront: Process) -> None:
    """A PROXY v1 header sent by curl itself sets the logged client address."""
    marker = f"addr-curl-{os.getpid()}"
    r = curl("--haproxy-protocol", "--interface", "127.0.0.9",
             f"https://127.0.0.1:{quayfront.ports['proxy']}/v2/?probe={marker}", workdir=tmp_path)
    assert r.status == 200, r.describe()
    [line] = harness.wait_for_access_line(quayfront.extra["access_log"], lambda l: marker in l)
    entry = harness.parse_access_line(line)
    assert (entry.peer, entry.client) == ("127.0.0.9", "127.0.0.9"), line


HOP_BY_HOP = ("keep-alive", "x-hop-secret", "proxy-authorization", "proxy-connection", "te",
              "trailer", "upgrade")


@pytest.mark.parametrize("listener,client_ip", [("tls", "127.0.0.5"), ("proxy", "127.0.0.6")])
def test_forwarded_headers_reach_upstream(tmp_path: Path, echo_upstream: Process,
                                          start_quayfront, listener: str,
                                          client_ip: str) -> None:
    """X-Forwarded-For is replaced by the real client, hop-by-hop headers are dropped, repeats kept in order."""
    qf = start_quayfront(f"http://127.0.0.1:{echo_upstream.ports['http']}")
    port = qf.ports[listener]
    extra = ["--haproxy-protocol"] if listener == "proxy" else []
    r = curl(*extra, "--interface", client_ip,
             "-H", "X-Forwarded-For: 6.6.6.6",
             "-H", "Accept: application/x-first",
             "-H", "Accept: application/x-second",
             "-H", "Connection: keep-alive, X-Hop-Secret",
             "-H", "X-Hop-Secret: must-not-pass",
             "-H", "Keep-Alive: timeout=5",
             "-H", "Proxy-Authorization: Basic bXVzdDpub3RwYXNz",
             "-H", "Proxy-Connection: keep-alive",
             "-H", "TE: trailers",
             "-H", "X-End-To-End: kept",
             f"https://127.0.0.1:{port}/v2/echo/manifests/latest?x=1", workdir=tmp_path)
    assert r.status == 200, r.describe()
    echoed = json.loads(r.body)
    headers = [(k.lower(), v) for k, v in echoed["headers"]]

    def values(name: str) -> list[str]:
        return [v for k, v in headers if k == name]

    assert echoed["path"] == "/v2/echo/manifests/latest?x=1", echoed
    assert values("x-forwarded-for") == [client_ip], headers
    assert not any("6.6.6.6" in v for _, v in headers), headers
    assert values("x-forwarded-proto") == ["https"], headers
    assert values("host") == [f"127.0.0.1:{port}"], headers
    accept = [part.strip() for v in values("accept") for part in v.split(",")]
    assert accept == ["application/x-first", "application/x-second"], headers
    assert values("x-end-to-end") == ["kept"], headers
    for name in HOP_BY_HOP:
        assert not values(name), f"hop-by-hop header {name} reached the upstream: {headers}"
    assert all("x-hop-secret" not in v.lower() for v in values("connection")), headers


# --------------------------------------------------------------------------
# Memory


def test_memory_stays_bounded_for_1gib_blob(tmp_path: Path, quayfront: Process) -> None:
    """quayfront's RSS stays under 100 MiB while a 1 GiB blob is uploaded and downloaded through it."""
    size = GiB
    blocks = harness.pattern_blocks()
    digest = harness.blob_digest(blocks, size)
    port = quayfront.ports["tls"]
    ctx = harness.unverified_tls_context()
    name = "e2e/memory"

    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
    conn.request("POST", f"/v2/{name}/blobs/uploads/", headers={"Content-Length": "0"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 202, (resp.status, resp.getheaders())
    location = urlsplit(_upload_url(resp.getheader("Location"), digest))
    conn.close()

    with harness.RssSampler(quayfront.pid, interval=0.2, max_seconds=300) as sampler:
        up = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=120)
        up.putrequest("PUT", f"{location.path}?{location.query}", skip_accept_encoding=True)
        up.putheader("Content-Length", str(size))
        up.putheader("Content-Type", "application/octet-stream")
        up.endheaders()
        for chunk in harness.blob_chunks(blocks, size):
            up.send(chunk)
        resp = up.getresponse()
        body = resp.read()
        assert resp.status == 201, (resp.status, resp.getheaders(), body[:300])
        assert resp.getheader("Docker-Content-Digest") == digest
        up.close()

        down = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=120)
        down.request("GET", f"/v2/{name}/blobs/{digest}")
        resp = down.getresponse()
        assert resp.status == 200, (resp.status, resp.getheaders())
        h = hashlib.sha256()
        received = 0
        for _ in range(size // MiB + 2):
            chunk = resp.read(MiB)
            if not chunk:
                break
            h.update(chunk)
            received += len(chunk)
        down.close()

    assert received == size
    assert "sha256:" + h.hexdigest() == digest
    assert sampler.samples, "no RSS samples taken"
    print(f"quayfront RSS during 1 GiB up+down: max {sampler.max / MiB:.1f} MiB, "
          f"start {sampler.samples[0] / MiB:.1f} MiB, {len(sampler.samples)} samples")
    assert sampler.max < 100 * MiB, (
        f"quayfront max RSS {sampler.max / MiB:.1f} MiB during a 1 GiB upload+download "
        f"({len(sampler.samples)} samples, first {sampler.samples[0] / MiB:.1f} MiB)")


# --------------------------------------------------------------------------
# Health and upstream failures


def test_health_instance_follows_registry(tmp_path: Path, start_registry,
                                          start_quayfront) -> None:
    """/health/instance answers 200 with the registry up and 503 (same JSON shape) soon after it dies."""
    registry = start_registry()
    qf = start_quayfront(f"http://127.0.0.1:{registry.ports['http']}")
    base = f"https://127.0.0.1:{qf.ports['tls']}"

    for path in ("/health/instance", "/health"):
        r = curl(f"{base}{path}", workdir=tmp_path, timeout=10)
        assert r.status == 200, r.describe()
        _check_health_json(r.body, 200)
    assert "json" in (r.header("Content-Type") or ""), r.describe()

    registry.stop()

    def unhealthy() -> harness.CurlResult | None:
        res = curl(f"{base}/health/instance", workdir=tmp_path, timeout=10)
        return res if res.status == 503 else None

    r = harness.wait_for(unhealthy, 15, interval=0.5, what="/health/instance to answer 503")
    _check_health_json(r.body, 503)


def test_unreachable_upstream_gives_502(tmp_path: Path, start_quayfront) -> None:
    """quayfront pointed at a closed port answers 502 on /v2/ and 503 on /health/instance."""
    closed = harness.free_port()
    qf = start_quayfront(f"http://127.0.0.1:{closed}")
    base = f"https://127.0.0.1:{qf.ports['tls']}"
    r = curl(f"{base}/v2/", workdir=tmp_path, timeout=20)
    assert r.status == 502, r.describe()
    r = curl(f"{base}/health/instance", workdir=tmp_path, timeout=20)
    assert r.status == 503, r.describe()
    _check_health_json(r.body, 503)


# --------------------------------------------------------------------------
# PROXY header errors, TLS


def test_invalid_proxy_header_is_rejected_and_logged(tmp_path: Path, quayfront: Process) -> None:
    """A PROXY v1 header with port 99999 gets the connection closed and one log line; serving goes on."""
    before = len(quayfront.output())
    with socket.create_connection(("127.0.0.1", quayfront.ports["proxy"]), timeout=10) as s:
        s.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n")
        try:
            reply = s.recv(4096)
        except ConnectionResetError:
            reply = b""
    assert reply == b"", f"expected the connection to be closed, got {reply!r}"

    def reason_lines() -> list[str]:
        new = quayfront.output()[before:]
        return [l for l in new.splitlines() if re.search(r"proxy", l, re.I)]

    harness.wait_for(reason_lines, 10, interval=0.1,
                     what="a log line about the invalid PROXY header")
    # Only what was logged before the next (valid) connection belongs to the bad one.
    lines = reason_lines()

    r = curl("--haproxy-protocol", f"https://127.0.0.1:{quayfront.ports['proxy']}/v2/",
             workdir=tmp_path)
    assert r.status == 200, r.describe()
    assert quayfront.alive()

    assert len(lines) == 1, "expected one log line for the bad header, got:\n" + "\n".join(lines)
    assert "127.0.0.1" in lines[0], f"the line does not name the socket peer: {lines[0]}"
    assert re.search(r"port|99999", lines[0], re.I), f"the line does not name the reason: {lines[0]}"
    assert "Traceback" not in quayfront.output()[before:]


def test_openssl_handshake_on_plain_listener(tmp_path: Path, quayfront: Process,
                                             dev_cert: tuple[Path, Path]) -> None:
    """openssl s_client completes a verified TLS 1.2+ handshake on the plain TLS listener."""
    openssl = harness.require_binary("openssl")
    cert, _ = dev_cert
    done = subprocess.run(
        [openssl, "s_client", "-brief", "-connect", f"127.0.0.1:{quayfront.ports['tls']}",
         "-servername", "localhost", "-CAfile", str(cert), "-verify_ip", "127.0.0.1",
         "-verify_return_error"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert re.search(r"Protocol version: TLSv1\.[23]\b", out), out
    assert "Verification: OK" in out, out


# --------------------------------------------------------------------------
# conftest.py runs this test after all others: it checks the whole session's output.


def test_zz_no_traceback_in_quayfront_output(quayfront: Process,
                                             quayfront_instances: list[Process]) -> None:
    """No quayfront process started in this session printed a Traceback."""
    bad = [p for p in quayfront_instances if "Traceback" in p.output()]
    details = "\n\n".join(f"{p.name} ({p.stdout_path}):\n{harness.tail(p.output(), 60)}"
                          for p in bad)
    assert not bad, f"Traceback in quayfront output:\n{details}"
