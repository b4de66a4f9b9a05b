"""
Shared session ticket keys: a session one server context started resumes on
another holding the same keys, across a rotation, and never on one without
them.  The client is the standard library's TLS over memory BIOs, so the
handshakes run in memory.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

import pytest
from OpenSSL import SSL

from quayfront.config import CertificateFiles, ConfigError, TLSConfig
from quayfront.ticketkeys import TicketKey, install_ticket_keys, load_ticket_key_files
from quayfront.tls import CertificateReloader, load_server_tls, self_signed_certificate, server_context
from tests.unit.certs import make_certificate, write_pair

CERTIFICATE = self_signed_certificate(datetime.datetime.now(datetime.timezone.utc))


def client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = version
    return context


def handshake(client: ssl.SSLContext, server: SSL.Context, session=None):
    """
    One full handshake in memory plus one byte of application data (which
    carries TLS 1.3's tickets): whether it resumed, and the session to keep.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(incoming, outgoing, session=session)
    tls_server = SSL.Connection(server, None)
    tls_server.set_accept_state()
    for _ in range(10):
        try:
            tls_client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if outgoing.pending:
            tls_server.bio_write(outgoing.read())
        try:
            tls_server.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(tls_server.bio_read(65536))
        except SSL.WantReadError:
            pass
    tls_server.send(b"x")
    incoming.write(tls_server.bio_read(65536))
    assert tls_client.read(1) == b"x"
    return tls_client.session_reused, tls_client.session


def server(keys) -> SSL.Context:
    return server_context(CERTIFICATE, TLSConfig(), keys)


VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.3", "tls1.2"])
def test_session_resumes_on_another_context_with_the_same_key(version) -> None:
    """A ticket from one server resumes on another holding the same key."""
    client = client_context(version)
    key = TicketKey.generate()
    reused, session = handshake(client, server([key]))
    assert not reused
    assert handshake(client, server([key]), session)[0]


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.3", "tls1.2"])
def test_previous_key_still_decrypts_after_rotation(version) -> None:
    """After a rotation the previous key (second) still resumes its tickets; dropped, it does not."""
    client = client_context(version)
    old, new = TicketKey.generate(), TicketKey.generate()
    _, session = handshake(client, server([old]))
    assert handshake(client, server([new, old]), session)[0]
    assert not handshake(client, server([new]), session)[0]


def test_without_shared_keys_no_cross_context_resumption() -> None:
    """The control: two contexts with their own random keys do not resume each other's sessions."""
    client = client_context(ssl.TLSVersion.TLSv1_3)
    _, session = handshake(client, server(()))
    assert not handshake(client, server(()), session)[0]


def test_first_key_encrypts_new_tickets() -> None:
    """A ticket made with [new, old] resumes where only new is held."""
    client = client_context(ssl.TLSVersion.TLSv1_3)
    old, new = TicketKey.generate(), TicketKey.generate()
    _, session = handshake(client, server([new, old]))
    assert handshake(client, server([new]), session)[0]


def test_48_byte_keys_work() -> None:
    """nginx's older 48-byte keys (AES-128) resume too."""
    client = client_context(ssl.TLSVersion.TLSv1_3)
    key = os.urandom(48)
    _, session = handshake(client, server([key]))
    assert handshake(client, server([key]), session)[0]


def test_nginx_layouts() -> None:
    """80 bytes: name, HMAC, AES; 48 bytes: name, AES, HMAC (nginx's order)."""
    raw80 = bytes(range(80))
    assert TicketKey.from_bytes(raw80) == TicketKey(raw80[:16], raw80[16:48], raw80[48:])
    raw48 = bytes(range(48))
    assert TicketKey.from_bytes(raw48) == TicketKey(raw48[:16], raw48[32:48], raw48[16:32])


@pytest.mark.parametrize(
    "keys, reason",
    [([], "at least one"), ([b"x" * 79], "80 or 48"), ([b"a" * 80, b"a" * 16 + b"b" * 64], "same name")],
)
def test_bad_key_lists_are_refused(keys, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        install_ticket_keys(SSL.Context(SSL.TLS_SERVER_METHOD), keys)


def test_key_files_load_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    first.write_bytes(b"1" * 80)
    second.write_bytes(b"2" * 48)
    assert load_ticket_key_files([str(first), str(second)], "q.toml") == [b"1" * 80, b"2" * 48]


@pytest.mark.parametrize(
    "content, reason",
    [(None, "cannot read"), (b"short", "holds 5 bytes"), (b"x" * 81, "holds 81 bytes")],
)
def test_bad_key_files_fail_with_key_and_reason(tmp_path: Path, content, reason) -> None:
    path = tmp_path / "ticket.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_ticket_key_files([str(path)], "q.toml")
    assert caught.value.key == "tls.session_ticket_key_files"
    assert reason in caught.value.reason


def test_duplicate_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ticket.key"
    path.write_bytes(b"k" * 80)
    with pytest.raises(ConfigError, match="same key name"):
        load_ticket_key_files([str(path), str(path)], "q.toml")


def test_reload_picks_up_a_rotated_key(tmp_path: Path) -> None:
    """A certificate reload rereads the key files: every context, SNI ones included, gets the new keys."""
    cert, key = write_pair(tmp_path, *make_certificate())
    other_cert, other_key = write_pair(tmp_path, *make_certificate(("other.test",)), stem="other")
    current, previous = tmp_path / "current.key", tmp_path / "previous.key"
    old, new = TicketKey.generate(), TicketKey.generate()
    current.write_bytes(old)
    config = TLSConfig(
        cert=cert,
        key=key,
        certificates=(CertificateFiles(other_cert, other_key),),
        session_ticket_key_files=(str(current), str(previous)),
    )
    previous.write_bytes(TicketKey.generate())
    tls = load_server_tls(config, "q.toml")
    assert tls.store.ticket_keys[0] == old
    client = client_context(ssl.TLSVersion.TLSv1_3)
    _, session = handshake(client, tls.store.default_context)
    reloader = CertificateReloader(tls, config, "q.toml", reactor=None)

    # Rotation: the new key first, the old one second.
    current.write_bytes(new)
    previous.write_bytes(old)
    reloader.check_files()
    assert reloader.reloads == 1
    assert tls.store.ticket_keys == (new, old)
    assert handshake(client, tls.store.default_context, session)[0]
    assert handshake(client, tls.store.context_for(b"other.test"), session)[0]
    # A ticket made now uses the new key.
    _, fresh = handshake(client, tls.store.default_context)
    assert handshake(client, server([new]), fresh)[0]


def test_without_key_files_sessions_survive_a_reload(tmp_path: Path) -> None:
    """No key files: one random key per process, kept across reloads, so a reload ends no session."""
    cert, key = write_pair(tmp_path, *make_certificate())
    config = TLSConfig(cert=cert, key=key)
    tls = load_server_tls(config, "q.toml")
    assert not tls.store.shared_ticket_keys and len(tls.store.ticket_keys) == 1
    client = client_context(ssl.TLSVersion.TLSv1_3)
    _, session = handshake(client, tls.store.default_context)
    reloader = CertificateReloader(tls, config, "q.toml", reactor=None)
    old_context = tls.store.default_context
    assert reloader.reload("test")
    assert tls.store.default_context is not old_context
    assert handshake(client, tls.store.default_context, session)[0]


def test_an_image_without_the_symbols_is_reported_not_guessed(tmp_path: Path) -> None:
    """A file that is not ELF, or an ELF without OpenSSL's symbols (a stripped build), is 'unsupported'."""
    from quayfront.ticketkeys import TicketKeysUnsupported, _OpenSSLFunctions

    not_elf = tmp_path / "not.so"
    not_elf.write_bytes(b"hello")
    with pytest.raises(TicketKeysUnsupported, match="cannot read the symbols"):
        _OpenSSLFunctions._read_symbols(str(not_elf), {"SSL_CTX_ctrl"})
    import sys

    assert _OpenSSLFunctions._read_symbols(sys.executable, {"SSL_CTX_set_tlsext_ticket_key_evp_cb"}) == {}


def test_unsupported_build_makes_key_files_a_config_error(tmp_path: Path, monkeypatch) -> None:
    """Asking for shared keys where they cannot be installed stops startup with the reason."""
    from quayfront import ticketkeys

    monkeypatch.setattr(ticketkeys, "_functions", None)
    monkeypatch.setattr(
        ticketkeys, "_unsupported", ticketkeys.TicketKeysUnsupported("no symbol table entries for X")
    )
    path = tmp_path / "ticket.key"
    path.write_bytes(TicketKey.generate())
    with pytest.raises(ConfigError) as caught:
        load_ticket_key_files([str(path)], "q.toml")
    assert caught.value.key == "tls.session_ticket_key_files"
    assert "cannot take shared ticket keys: no symbol table entries for X" in caught.value.reason
