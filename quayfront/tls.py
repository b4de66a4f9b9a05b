"""
The TLS layer: certificates, SNI selection, the OpenSSL context policy and
reloading without a restart.

Everything that can be wrong with a certificate is found when it is loaded
and reported as a L{ConfigError} with the key, the path and the reason: at
startup this stops quayfront; on reload it keeps the certificates that are
serving and logs why.

Certificates are chosen by SNI from an in-memory map built at load time
(exact names, then one-label wildcards, then the default); an unknown name
never causes a disk read, which would let any client make the server work.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from quayfront.config import CertificateFiles, ConfigError, TLSConfig
from quayfront.ticketkeys import install_ticket_keys, load_ticket_key_files, process_ticket_keys

# ALPN: HTTP/2 stays off until its request bodies stream as HTTP/1.1's do.
ALPN_PROTOCOLS = (b"http/1.1",)

# Distinguishes this server's session cache entries for resumption; the same
# for every certificate, so a resumed session may cross SNI contexts.
SESSION_ID_CONTEXT = b"quayfront"

_MIN_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

# How long a made-up development certificate is valid.
SELF_SIGNED_DAYS = 30


@dataclass(frozen=True)
class LoadedCertificate:
    """
    A certificate chain with its key, checked, and the DNS names it serves.
    """

    label: str
    chain: tuple[x509.Certificate, ...]
    private_key: object
    names: tuple[str, ...]

    @property
    def not_after(self) -> datetime.datetime:
        return self.chain[0].not_valid_after_utc


def _read(path: str, key: str, source: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(source, key, f"cannot read {path}: {e.strerror}") from None


def _parse_chain(pem: bytes, path: str, key: str, source: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(pem))
    except ValueError:
        raise ConfigError(source, key, f"{path} holds no PEM certificate") from None


def _parse_key(pem: bytes, path: str, key: str, source: str):
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(
            source, key, f"{path} is encrypted; quayfront needs an unencrypted key"
        ) from None
    except (ValueError, x509.UnsupportedGeneralNameType):
        raise ConfigError(source, key, f"{path} holds no PEM private key") from None


def _dns_names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        # RFC 6125 falls back to the CN only without a SAN extension.
        names = [
            a.value
            for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(a.value, str)
        ]
    return tuple(name.lower().rstrip(".") for name in names)


def check_certificate(
    chain: tuple[x509.Certificate, ...],
    private_key,
    *,
    label: str,
    cert_key: str,
    key_key: str,
    source: str,
    now: datetime.datetime,
    allow_expired: bool,
) -> LoadedCertificate:
    """
    Check that C{private_key} belongs to the leaf and that the leaf is valid
    at C{now}.

    @raise ConfigError: naming the config key and the reason.
    """
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if leaf.public_key().public_bytes(encoding, public) != private_key.public_key().public_bytes(
        encoding, public
    ):
        raise ConfigError(source, key_key, f"{label}: the key does not match the certificate")
    if leaf.not_valid_after_utc < now and not allow_expired:
        raise ConfigError(
            source,
            cert_key,
            f"{label} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
            " (tls.allow_expired = true serves it anyway)",
        )
    if leaf.not_valid_before_utc > now:
        raise ConfigError(
            source,
            cert_key,
            f"{label} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
        )
    return LoadedCertificate(label, chain, private_key, _dns_names(leaf))


def load_certificate(
    files: CertificateFiles,
    *,
    cert_key: str,
    key_key: str,
    source: str,
    now: datetime.datetime,
    allow_expired: bool,
) -> LoadedCertificate:
    chain = _parse_chain(_read(files.cert, cert_key, source), files.cert, cert_key, source)
    private_key = _parse_key(_read(files.key, key_key, source), files.key, key_key, source)
    label = files.cert if files.cert == files.key else f"{files.cert} (key {files.key})"
    return check_certificate(
        chain,
        private_key,
        label=label,
        cert_key=cert_key,
        key_key=key_key,
        source=source,
        now=now,
        allow_expired=allow_expired,
    )


def certificates_in_directory(
    directory: str, *, source: str, now: datetime.datetime, allow_expired: bool
) -> list[LoadedCertificate]:
    """
    Every C{*.pem} in C{directory}, each holding a chain and its key.
    """
    try:
        paths = sorted(Path(directory).glob("*.pem"))
    except OSError as e:
        raise ConfigError(source, "tls.certificate_dir", f"cannot read {directory}: {e}") from None
    if not Path(directory).is_dir():
        raise ConfigError(source, "tls.certificate_dir", f"{directory} is not a directory")
    return [
        load_certificate(
            CertificateFiles(str(path), str(path)),
            cert_key="tls.certificate_dir",
            key_key="tls.certificate_dir",
            source=source,
            now=now,
            allow_expired=allow_expired,
        )
        for path in paths
    ]


def self_signed_certificate(now: datetime.datetime) -> LoadedCertificate:
    """
    A throw-away certificate for localhost, 127.0.0.1 and ::1.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return LoadedCertificate("self-signed development certificate", (leaf,), key, ("localhost",))


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    for protocol in ALPN_PROTOCOLS:
        if protocol in offered:
            return protocol
    # A client offering only h2 still gets HTTP/1.1 without ALPN rather
    # than a failed handshake.
    return SSL.NO_OVERLAPPING_PROTOCOLS


def server_context(
    certificate: LoadedCertificate, config: TLSConfig, ticket_keys: Sequence[bytes] = ()
) -> SSL.Context:
    """
    One certificate's OpenSSL context: TLS 1.2 (or the configured minimum)
    and 1.3, AEAD suites in the server's order, no compression or
    renegotiation, session resumption (with C{ticket_keys} when given, so
    that other replicas holding them resume it too), ALPN, and no record
    buffers held by idle connections.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(_MIN_VERSIONS[config.min_version])
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    context.set_cipher_list(config.ciphers_tls12.encode("ascii"))
    context.use_certificate(certificate.chain[0])
    for intermediate in certificate.chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(certificate.private_key)
    context.check_privatekey()
    context.set_session_id(SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_alpn_select_callback(_select_alpn)
    # Frees a connection's record buffers (about 17 KiB each way) whenever
    # they are empty, so an idle connection holds none; nginx does the same.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if ticket_keys:
        install_ticket_keys(context, ticket_keys)
    return context


class CertificateStore:
    """
    An immutable set of certificates with their contexts and the SNI map.
    A reload builds a new store and swaps it in whole.
    """

    def __init__(
        self,
        default: LoadedCertificate,
        others: list[LoadedCertificate],
        config: TLSConfig,
        ticket_keys: Sequence[bytes] = (),
        shared_ticket_keys: bool = False,
    ) -> None:
        self.default = default
        self.certificates = (default, *others)
        self.ticket_keys = tuple(ticket_keys)
        self.shared_ticket_keys = shared_ticket_keys
        self.default_context = server_context(default, config, ticket_keys)
        self._exact: dict[str, SSL.Context] = {}
        self._wildcard: dict[str, SSL.Context] = {}
        for certificate in others:
            context = server_context(certificate, config, ticket_keys)
            for name in certificate.names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], context)
                else:
                    self._exact.setdefault(name, context)
        self.default_context.set_tlsext_servername_callback(self._choose_by_sni)

    def context_for(self, server_name: bytes | None) -> SSL.Context:
        if not server_name:
            return self.default_context
        name = server_name.decode("ascii", "replace").lower().rstrip(".")
        context = self._exact.get(name)
        if context is None:
            # A wildcard covers exactly one label (RFC 6125 6.4.3).
            _, _, parent = name.partition(".")
            context = self._wildcard.get(parent, self.default_context)
        return context

    def _choose_by_sni(self, connection: SSL.Connection) -> None:
        context = self.context_for(connection.get_servername())
        if context is not self.default_context:
            connection.set_context(context)

    def describe(self) -> str:
        described = "; ".join(
            f"{c.label} [{', '.join(c.names) or 'no DNS names'}] until {c.not_after:%Y-%m-%d}"
            for c in self.certificates
        )
        if self.shared_ticket_keys:
            described += f"; {len(self.ticket_keys)} shared session ticket key(s)"
        return described


def certificate_files(config: TLSConfig) -> list[str]:
    """
    Every file a reload would read, for change detection.
    """
    paths = []
    if config.cert:
        paths += [config.cert, config.key]
    for files in config.certificates:
        paths += [files.cert, files.key]
    if config.certificate_dir:
        try:
            paths += sorted(str(p) for p in Path(config.certificate_dir).glob("*.pem"))
        except OSError:
            pass
    # A rotated ticket key is picked up like a renewed certificate.
    paths += config.session_ticket_key_files
    return paths


def load_store(
    config: TLSConfig, source: str, now: datetime.datetime | None = None
) -> CertificateStore:
    """
    Load and check every configured certificate.

    @raise ConfigError: for the first one that cannot be served.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    common = dict(source=source, now=now, allow_expired=config.allow_expired)
    if config.cert:
        default = load_certificate(
            CertificateFiles(config.cert, config.key), cert_key="tls.cert", key_key="tls.key", **common
        )
    elif config.self_signed_dev:
        default = self_signed_certificate(now)
    else:
        raise ConfigError(
            source,
            "tls.cert",
            "no certificate configured (set tls.cert and tls.key, or"
            " tls.self_signed_dev = true for development)",
        )
    others = [
        load_certificate(
            files,
            cert_key=f"tls.certificates[{index}].cert",
            key_key=f"tls.certificates[{index}].key",
            **common,
        )
        for index, files in enumerate(config.certificates)
    ]
    if config.certificate_dir:
        others += certificates_in_directory(config.certificate_dir, **common)
    ticket_keys = load_ticket_key_files(config.session_ticket_key_files, source)
    shared = bool(ticket_keys)
    if not shared:
        # Still the same key across reloads, so sessions keep resuming.
        ticket_keys = process_ticket_keys()
    try:
        return CertificateStore(default, others, config, ticket_keys, shared)
    except SSL.Error as e:
        raise ConfigError(source, "tls", f"OpenSSL refused the configuration: {e}") from None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Hands each new connection an C{SSL.Connection} on the current store's
    default context (SNI may switch it during the handshake).

    Established connections keep the context they started with, so the
    store can be replaced without touching them.
    """

    def __init__(self, store: CertificateStore) -> None:
        self.store = store

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return SSL.Connection(self.store.default_context, None)


def load_server_tls(
    config: TLSConfig, source: str, now: datetime.datetime | None = None
) -> ServerTLS:
    return ServerTLS(load_store(config, source, now))


def _fingerprint(paths: list[str]) -> tuple:
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
            stamps.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append((path, None, None, None))
    return tuple(stamps)


class CertificateReloader(Service):
    """
    Reloads the certificates on SIGHUP and, every C{reload_check_s}, when
    their files changed.  A failed reload keeps the serving certificates and
    logs exactly why.
    """

    _log = Logger()

    def __init__(self, server_tls: ServerTLS, config: TLSConfig, source: str, reactor) -> None:
        self._server_tls = server_tls
        self._config = config
        self._source = source
        self._reactor = reactor
        self._check: LoopingCall | None = None
        self._previous_handler = None
        self._last_fingerprint = _fingerprint(certificate_files(config))
        self.reloads = 0
        self.failures = 0
        self._observers: list[Callable[[str], object]] = []

    def observe(self, callback: Callable[[str], object]) -> None:
        """
        Call C{callback(event)} around every reload: C{"reloading"} before,
        then C{"reloaded"} or C{"failed"} (sd_notify's RELOADING=1/READY=1).
        """
        self._observers.append(callback)

    def _tell(self, event: str) -> None:
        for callback in self._observers:
            callback(event)

    def reload(self, why: str) -> bool:
        self._tell("reloading")
        ok = self._reload(why)
        self._tell("reloaded" if ok else "failed")
        return ok

    def _reload(self, why: str) -> bool:
        self._last_fingerprint = _fingerprint(certificate_files(self._config))
        try:
            store = load_store(self._config, self._source)
        except ConfigError as e:
            self.failures += 1
            self._log.error(
                "certificate reload ({why}) failed; the current certificates keep serving: {error}",
                why=why,
                error=str(e),
            )
            return False
        self._server_tls.store = store
        self.reloads += 1
        self._log.info(
            "certificates reloaded ({why}): {certificates}", why=why, certificates=store.describe()
        )
        return True

    def check_files(self) -> None:
        if _fingerprint(certificate_files(self._config)) != self._last_fingerprint:
            self.reload("files changed")

    def _on_sighup(self, signum, frame) -> None:
        # Signal handlers run between any two bytecodes; hand the work to
        # the reactor loop.
        self._reactor.callFromThread(self.reload, "SIGHUP")

    def startService(self) -> None:
        super().startService()
        self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if self._config.reload_check_s > 0:
            self._check = LoopingCall(self.check_files)
            self._check.clock = self._reactor
            self._check.start(self._config.reload_check_s, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._check is not None and self._check.running:
            self._check.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
