"""
Certificate checks at startup: every way a certificate can be unusable is
reported with the key, the path and the reason.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from quayfront.config import ConfigError, TLSConfig
from quayfront.tls import load_server_tls
from tests.unit.certs import make_certificate, write_pair

NOW = datetime.datetime.now(datetime.timezone.utc)


def load(cert: str, key: str):
    return load_server_tls(TLSConfig(cert=cert, key=key), "quayfront.toml")


def test_good_pair_loads(tmp_path: Path) -> None:
    """A matching, current certificate and key give TLS 1.2+ options offering http/1.1."""
    tls = load(*write_pair(tmp_path, *make_certificate()))
    assert tls.serverConnectionForTLS(None).get_context() is tls.store.default_context


@pytest.mark.parametrize(
    "case, key, reason",
    [
        ("missing-cert", "tls.cert", "cannot read"),
        ("missing-key", "tls.key", "cannot read"),
        ("not-pem-cert", "tls.cert", "no PEM certificate"),
        ("not-pem-key", "tls.key", "no PEM private key"),
        ("encrypted-key", "tls.key", "encrypted"),
        ("mismatch", "tls.key", "does not match"),
        ("expired", "tls.cert", "expired on"),
        ("not-yet-valid", "tls.cert", "not valid before"),
    ],
)
def test_bad_certificates_fail_with_key_and_reason(tmp_path: Path, case: str, key: str, reason: str) -> None:
    """Each unusable certificate case names the config key, the file and why."""
    cert_path, key_path = write_pair(tmp_path, *make_certificate())
    if case == "missing-cert":
        cert_path = str(tmp_path / "nope.crt")
    elif case == "missing-key":
        key_path = str(tmp_path / "nope.key")
    elif case == "not-pem-cert":
        Path(cert_path).write_text("hello")
    elif case == "not-pem-key":
        Path(key_path).write_text("hello")
    elif case == "encrypted-key":
        cert_path, key_path = write_pair(tmp_path, *make_certificate(), password=b"secret")
    elif case == "mismatch":
        _, key_path = write_pair(tmp_path, *make_certificate(), stem="other")
    elif case == "expired":
        cert_path, key_path = write_pair(
            tmp_path,
            *make_certificate(
                not_before=NOW - datetime.timedelta(days=90), not_after=NOW - datetime.timedelta(days=1)
            ),
        )
    elif case == "not-yet-valid":
        cert_path, key_path = write_pair(
            tmp_path, *make_certificate(not_before=NOW + datetime.timedelta(days=1))
        )
    with pytest.raises(ConfigError) as caught:
        load(cert_path, key_path)
    assert caught.value.key == key
    assert caught.value.source == "quayfront.toml"
    assert reason in caught.value.reason


from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from quayfront.config import CertificateFiles
from quayfront.tls import CertificateReloader, ServerTLS, load_store


def handshake(server_tls: ServerTLS, server_name: bytes | None):
    """A full in-memory handshake; returns the certificate's CN the client saw."""
    _, client = handshake_with(server_tls, SSL.Context(SSL.TLS_CLIENT_METHOD), server_name=server_name)
    cert = client.get_peer_certificate(as_cryptography=True)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, client


def sni_config(tmp_path: Path) -> TLSConfig:
    default = write_pair(tmp_path, *make_certificate(("default.example",)), stem="default")
    exact = write_pair(tmp_path, *make_certificate(("registry.example",)), stem="exact")
    wild = write_pair(tmp_path, *make_certificate(("*.apps.example",)), stem="wild")
    return TLSConfig(
        cert=default[0],
        key=default[1],
        certificates=(CertificateFiles(*exact), CertificateFiles(*wild)),
    )


@pytest.mark.parametrize(
    "server_name, expected",
    [
        (b"registry.example", "registry.example"),
        (b"REGISTRY.example", "registry.example"),
        (b"quay.apps.example", "*.apps.example"),
        (b"a.b.apps.example", "default.example"),  # a wildcard covers one label only
        (b"apps.example", "default.example"),
        (b"unknown.example", "default.example"),
        (None, "default.example"),
    ],
)
def test_sni_picks_certificate(tmp_path: Path, server_name, expected) -> None:
    """SNI chooses an exact name, then a one-label wildcard, else the default."""
    tls = ServerTLS(load_store(sni_config(tmp_path), "test"))
    seen, client = handshake(tls, server_name)
    assert seen == expected
    assert client.get_protocol_version_name() == "TLSv1.3"


def test_tls12_floor_and_aead_only(tmp_path: Path) -> None:
    """A TLS 1.1 client is refused; a TLS 1.2 client gets an ECDHE AEAD suite."""
    tls = ServerTLS(load_store(sni_config(tmp_path), "test"))
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    _, client = handshake_with(tls, context)
    assert client.get_protocol_version_name() == "TLSv1.2"
    cipher = client.get_cipher_name()
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    old = SSL.Context(SSL.TLS_CLIENT_METHOD)
    old.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    old.set_max_proto_version(SSL.TLS1_1_VERSION)
    old.set_min_proto_version(SSL.TLS1_VERSION)
    with pytest.raises(SSL.Error):
        handshake_with(tls, old, raise_errors=True)


def test_every_context_releases_idle_buffers(tmp_path: Path) -> None:
    """
    Every certificate's context (the default and those SNI switches to) frees
    a connection's record buffers while they are empty: an idle connection
    holds none.
    """
    store = load_store(sni_config(tmp_path), "test")
    contexts = {store.default_context, *store._exact.values(), *store._wildcard.values()}
    assert len(contexts) == 3
    for context in contexts:
        # set_mode ORs its argument in and returns the mode now set.
        assert context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS


def handshake_with(server_tls: ServerTLS, client_context, raise_errors: bool = False, server_name=None):
    """Pump a handshake between memory BIOs (bounded: a few rounds suffice)."""
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    if server_name:
        client.set_tlsext_host_name(server_name)
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                if raise_errors:
                    raise
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return None, client


def test_reload_swaps_store_and_keeps_it_on_failure(tmp_path: Path) -> None:
    """A good reload serves the new certificate; a broken one keeps the old and counts the failure."""
    from twisted.internet.testing import MemoryReactorClock

    cert_path, key_path = write_pair(tmp_path, *make_certificate(("old.example",)))
    config = TLSConfig(cert=cert_path, key=key_path, reload_check_s=10)
    tls = ServerTLS(load_store(config, "test"))
    clock = MemoryReactorClock()
    reloader = CertificateReloader(tls, config, "test", clock)

    write_pair(tmp_path, *make_certificate(("new.example",)))
    assert reloader.reload("test")
    assert handshake(tls, None)[0] == "new.example"

    Path(key_path).write_text("not a key")
    assert not reloader.reload("test")
    assert reloader.failures == 1
    assert handshake(tls, None)[0] == "new.example"


def test_file_change_check_reloads(tmp_path: Path) -> None:
    """The periodic check reloads once the certificate files change, and not before."""
    import os

    from twisted.internet.testing import MemoryReactorClock

    cert_path, key_path = write_pair(tmp_path, *make_certificate(("old.example",)))
    config = TLSConfig(cert=cert_path, key=key_path, reload_check_s=10)
    tls = ServerTLS(load_store(config, "test"))
    clock = MemoryReactorClock()
    reloader = CertificateReloader(tls, config, "test", clock)
    reloader.startService()
    try:
        clock.advance(10)
        assert reloader.reloads == 0
        write_pair(tmp_path, *make_certificate(("new.example",)))
        os.utime(cert_path, ns=(1, 1))  # a distinct mtime even within one clock tick
        clock.advance(10)
        assert reloader.reloads == 1
        assert handshake(tls, None)[0] == "new.example"
    finally:
        reloader.stopService()


def test_allow_expired_and_self_signed(tmp_path: Path) -> None:
    """An expired certificate loads only when allowed; no certificate needs self_signed_dev."""
    expired = write_pair(
        tmp_path,
        *make_certificate(
            not_before=NOW - datetime.timedelta(days=90), not_after=NOW - datetime.timedelta(days=1)
        ),
    )
    load_store(TLSConfig(cert=expired[0], key=expired[1], allow_expired=True), "test")
    with pytest.raises(ConfigError, match="no certificate configured"):
        load_store(TLSConfig(cert="", key=""), "test")
    store = load_store(TLSConfig(cert="", key="", self_signed_dev=True), "test")
    assert store.default.names == ("localhost",)
