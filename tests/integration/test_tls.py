"""
TLS termination against real clients: openssl s_client for versions, SNI
and ALPN, testssl.sh for a full scan, and certificate reload under load.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration import harness
from tests.integration.harness import LOOPBACK, curl, wait_for

pytestmark = pytest.mark.integration

NOW = datetime.datetime.now(datetime.timezone.utc)


class ScratchCA:
    """A certificate authority of the test's own, so scanners can verify the chain."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quayfront test CA")])
        self.name = name
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=800))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.pem"
        directory.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, names: list[str]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=365))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in names]
                    + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            [x509.UniformResourceIdentifier("http://127.0.0.1/quayfront-test.crl")],
                            None,
                            None,
                            None,
                        )
                    ]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.directory / f"{stem}.crt"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(
            leaf.public_bytes(serialization.Encoding.PEM) + self.cert.public_bytes(serialization.Encoding.PEM)
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path


@pytest.fixture
def ca(tmp_path: Path) -> ScratchCA:
    return ScratchCA(tmp_path / "ca")


def s_client(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [harness.require_binary("openssl"), "s_client", "-connect", f"{LOOPBACK}:{port}", *args],
        input=b"",
        capture_output=True,
        timeout=30,
    )


def peer_cn(done: subprocess.CompletedProcess) -> str:
    match = re.search(rb"subject=.*?CN ?= ?([^,\n/]+)", done.stdout)
    assert match, done.stdout.decode(errors="replace")
    return match.group(1).decode().strip()


@pytest.fixture
def sni_quayfront(tmp_path, ca, start_quayfront, echo_upstream):
    default = ca.issue("default", ["default.example"])
    exact = ca.issue("exact", ["registry.example"])
    wild = ca.issue("wild", ["*.apps.example"])
    config = tmp_path / "quayfront.toml"
    config.write_text(
        "[tls]\n"
        f"certificates = [ {{ cert = '{exact[0]}', key = '{exact[1]}' }},"
        f" {{ cert = '{wild[0]}', key = '{wild[1]}' }} ]\n"
    )
    return start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
        extra=("--config", str(config), "--cert", str(default[0]), "--key", str(default[1])),
    )


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
def test_old_protocols_refused(sni_quayfront, flag):
    """TLS 1.0 and 1.1 handshakes fail even when the client allows weak suites."""
    done = s_client(sni_quayfront.ports["tls"], flag, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert done.returncode != 0
    assert b"Cipher is (NONE)" in done.stdout or b"alert" in done.stderr or b"no protocols" in done.stderr


@pytest.mark.parametrize("flag, version", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_modern_protocols_accepted(sni_quayfront, flag, version):
    """TLS 1.2 and 1.3 handshakes succeed, with an AEAD suite."""
    done = s_client(sni_quayfront.ports["tls"], flag, "-brief")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"Protocol version: {version}".encode() in output
    cipher = re.search(rb"Ciphersuite: (\S+)", output).group(1)
    assert b"GCM" in cipher or b"CHACHA20" in cipher, cipher


@pytest.mark.parametrize(
    "server_name, expected",
    [
        ("registry.example", "registry.example"),
        ("quay.apps.example", "*.apps.example"),
        ("unknown.example", "default.example"),
    ],
)
def test_sni_selects_certificate(sni_quayfront, server_name, expected):
    """SNI picks the exact name, the wildcard, or the default for an unknown name."""
    done = s_client(sni_quayfront.ports["tls"], "-servername", server_name)
    assert done.returncode == 0, done.stderr
    assert peer_cn(done) == expected


def test_no_sni_gets_default(sni_quayfront):
    """A client that sends no SNI gets the default certificate."""
    done = s_client(sni_quayfront.ports["tls"], "-noservername")
    assert peer_cn(done) == "default.example"


def test_alpn_answers_http11(sni_quayfront):
    """ALPN negotiates http/1.1; a client offering only h2 still connects, without ALPN."""
    done = s_client(sni_quayfront.ports["tls"], "-alpn", "h2,http/1.1")
    assert b"ALPN protocol: http/1.1" in done.stdout
    done = s_client(sni_quayfront.ports["tls"], "-alpn", "h2")
    assert done.returncode == 0
    assert b"No ALPN negotiated" in done.stdout


def test_hsts_header(sni_quayfront, tmp_path):
    """Responses carry Strict-Transport-Security by default."""
    result = curl(f"https://127.0.0.1:{sni_quayfront.ports['tls']}/v2/", workdir=tmp_path)
    assert result.header("Strict-Transport-Security") == "max-age=63072000"


def test_testssl_scan_finds_nothing_high(sni_quayfront, ca, tmp_path):
    """testssl.sh: no protocol below TLS 1.2, only AEAD suites, no HIGH or CRITICAL finding."""
    report = tmp_path / "testssl.json"
    done = subprocess.run(
        [
            harness.require_binary("testssl"),
            "--quiet", "--color", "0", "--warnings", "off",
            "--openssl", harness.require_binary("openssl"),
            "--add-ca", str(ca.path),
            "--jsonfile", str(report),
            "--protocols", "--std", "--each-cipher", "--vulnerable", "--headers", "--server-defaults",
            f"127.0.0.1:{sni_quayfront.ports['tls']}",
        ],
        capture_output=True,
        timeout=400,
        stdin=subprocess.DEVNULL,
    )
    findings = json.loads(report.read_text())
    by_id = {f["id"]: f for f in findings}
    severe = [f for f in findings if f["severity"] in ("HIGH", "CRITICAL")]
    assert not severe, json.dumps(severe, indent=1)
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert by_id[old]["finding"].startswith("not offered"), by_id[old]
    assert by_id["TLS1_2"]["finding"].startswith("offered")
    assert by_id["TLS1_3"]["finding"].startswith("offered")
    offered_ciphers = [f["finding"] for f in findings if f["id"].startswith("cipher_x")]
    assert offered_ciphers, "testssl.sh listed no ciphers: " + done.stdout.decode(errors="replace")[-2000:]
    for finding in offered_ciphers:
        assert re.search(r"GCM|CHACHA20|POLY1305", finding), finding
        assert not re.search(r"NULL|EXP|RC4|CBC|\bDES|3DES|MD5|anon|SHA\s", finding), finding


def test_reload_on_sighup_keeps_transfers_and_survives_bad_files(tmp_path, ca, start_quayfront, echo_upstream):
    """SIGHUP swaps the certificate for new connections while an upload continues; a broken one is refused."""
    cert, key = ca.issue("live", ["before.example"])
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}",
        extra=("--cert", str(cert), "--key", str(key)),
    )
    port = qf.ports["tls"]
    assert peer_cn(s_client(port)) == "before.example"

    # A 1 GiB upload (a sparse file: no disk), paced to last several
    # seconds, in flight across both reloads.
    size = 1024 * 1024 * 1024
    blob = tmp_path / "blob.bin"
    with open(blob, "wb") as f:
        f.truncate(size)
    upload_result: list = []

    def upload() -> None:
        upload_result.append(
            curl(
                "--limit-rate", "100M", "-X", "PUT", "-T", str(blob),
                "-H", "Content-Type: application/octet-stream",
                f"https://127.0.0.1:{port}/v2/slow-upload",
                workdir=tmp_path / "upload", timeout=120,
            )
        )

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        new_cert, new_key = ca.issue("next", ["after.example"])
        os.replace(new_cert, cert)
        os.replace(new_key, key)
        os.kill(qf.pid, signal.SIGHUP)
        wait_for(lambda: "certificates reloaded (SIGHUP)" in qf.output(), 10, what="the reload log line")
        assert peer_cn(s_client(port)) == "after.example"

        key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        os.kill(qf.pid, signal.SIGHUP)
        wait_for(lambda: "certificate reload (SIGHUP) failed" in qf.output(), 10, what="the failure log line")
        failure = [l for l in qf.output().splitlines() if "certificate reload (SIGHUP) failed" in l][0]
        assert "tls.key" in failure and str(key) in failure
        assert peer_cn(s_client(port)) == "after.example"
        assert uploader.is_alive(), "the upload finished before the reloads; it proves nothing"
    finally:
        uploader.join(timeout=120)
    [result] = upload_result
    assert result.status == 200, result.describe()
    assert json.loads(result.body)["body_length"] == size
    assert "Traceback" not in qf.output()


def test_tls_details_forwarded_upstream(tmp_path, start_quayfront, echo_upstream):
    """Configured TLS headers carry the negotiated version, cipher and SNI; client copies are dropped."""
    config = tmp_path / "quayfront.toml"
    config.write_text(
        '[tls]\nheaders = { version = "X-TLS-Version", cipher = "X-TLS-Cipher", sni = "X-TLS-SNI" }\n'
    )
    qf = start_quayfront(
        f"http://{LOOPBACK}:{echo_upstream.ports['http']}", extra=("--config", str(config))
    )
    port = qf.ports["tls"]
    result = curl(
        "--tlsv1.2", "--tls-max", "1.2",
        "--resolve", f"registry.example:{port}:127.0.0.1",
        "-H", "X-TLS-Version: forged",
        f"https://registry.example:{port}/v2/tls", workdir=tmp_path,
    )
    assert result.status == 200, result.describe()
    echoed = {}
    for name, value in json.loads(result.body)["headers"]:
        echoed.setdefault(name.lower(), []).append(value)
    assert echoed["x-tls-version"] == ["TLSv1.2"]
    assert echoed["x-tls-sni"] == ["registry.example"]
    assert "GCM" in echoed["x-tls-cipher"][0] or "CHACHA20" in echoed["x-tls-cipher"][0]


def test_redirect_listener(tmp_path, start_quayfront, echo_upstream):
    """The plain-HTTP listener redirects to https, also behind a PROXY header when configured."""
    plain, proxied = harness.free_ports(2)
    for port, proxy_protocol in ((plain, "off"), (proxied, "required")):
        config = tmp_path / f"redirect-{port}.toml"
        config.write_text(
            "[redirect_listener]\nenabled = true\n"
            f'address = "127.0.0.1:{port}"\nproxy_protocol = "{proxy_protocol}"\n'
            'trusted_sources = ["127.0.0.0/8"]\nhttps_port = 8443\n'
        )
        start_quayfront(
            f"http://{LOOPBACK}:{echo_upstream.ports['http']}", extra=("--config", str(config))
        )
        wait_for(lambda: harness.port_listening(port), 30, what="the redirect listener")
    got = curl("-H", "Host: registry.example", f"http://127.0.0.1:{plain}/v2/x?y=1", workdir=tmp_path)
    assert got.status == 301
    assert got.header("Location") == "https://registry.example:8443/v2/x?y=1"
    put = curl("-X", "PUT", "-H", "Host: registry.example", f"http://127.0.0.1:{plain}/v2/x", workdir=tmp_path)
    assert put.status == 308
    behind = curl("--haproxy-protocol", "-H", "Host: registry.example", f"http://127.0.0.1:{proxied}/", workdir=tmp_path)
    assert behind.status == 301
    without_header = curl("-H", "Host: registry.example", f"http://127.0.0.1:{proxied}/", workdir=tmp_path)
    assert without_header.status == 0
