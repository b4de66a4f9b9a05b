"""
The TLS layer: server certificate loading and the OpenSSL context policy.

Everything that can be wrong with a certificate is found here at startup and
reported as a L{ConfigError} with the file and the reason, so a broken
deployment never starts and then fails every handshake.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from quayfront.config import ConfigError, TLSConfig

# TLS 1.2 suites: ECDHE key exchange with an AEAD cipher only (Mozilla's
# "intermediate" profile); TLS 1.3 suites are all AEAD and not affected.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# ALPN: HTTP/2 stays off until its request bodies stream as HTTP/1.1's do.
ALPN_PROTOCOLS = (b"http/1.1",)


# Distinguishes this server's session cache entries for resumption.
SESSION_ID_CONTEXT = b"quayfront"


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Hands each new connection an C{SSL.Connection} on the current context.

    Established connections keep the context they started with, so the
    context can be replaced (certificate reload) without touching them.
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    for protocol in ALPN_PROTOCOLS:
        if protocol in offered:
            return protocol
    # A client offering only h2 still gets HTTP/1.1 without ALPN rather
    # than a failed handshake.
    return SSL.NO_OVERLAPPING_PROTOCOLS


def server_context(chain: list[x509.Certificate], private_key) -> SSL.Context:
    """
    The OpenSSL context: TLS 1.2 and 1.3 only, AEAD suites in the server's
    order, no compression or renegotiation, session resumption, ALPN.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    context.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    context.use_certificate(chain[0])
    for certificate in chain[1:]:
        context.add_extra_chain_cert(certificate)
    context.use_privatekey(private_key)
    context.check_privatekey()
    context.set_session_id(SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_alpn_select_callback(_select_alpn)
    return context


def load_server_tls(
    config: TLSConfig, source: str, now: datetime.datetime | None = None
) -> ServerTLS:
    """
    Load C{config.cert} (leaf, then chain) and C{config.key} and check that
    they belong together and that the leaf is valid now.

    @param source: the configuration file's name, for error messages.
    @raise ConfigError: naming the key (C{tls.cert} or C{tls.key}), the path
        and the reason.
    """
    chain = _load_chain(config.cert, source)
    private_key = _load_key(config.key, source)
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if leaf.public_key().public_bytes(encoding, public) != private_key.public_key().public_bytes(
        encoding, public
    ):
        raise ConfigError(
            source, "tls.key", f"{config.key} does not match the certificate in {config.cert}"
        )
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        raise ConfigError(
            source,
            "tls.cert",
            f"{config.cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
        )
    if leaf.not_valid_before_utc > now:
        raise ConfigError(
            source,
            "tls.cert",
            f"{config.cert} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
        )
    return ServerTLS(server_context(chain, private_key))


def _read(path: str, key: str, source: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(source, key, f"cannot read {path}: {e.strerror}") from None


def _load_chain(path: str, source: str) -> list[x509.Certificate]:
    pem = _read(path, "tls.cert", source)
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigError(source, "tls.cert", f"{path} holds no PEM certificate") from None
    return chain


def _load_key(path: str, source: str):
    pem = _read(path, "tls.key", source)
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(
            source, "tls.key", f"{path} is encrypted; quayfront needs an unencrypted key"
        ) from None
    except (ValueError, x509.UnsupportedGeneralNameType):
        raise ConfigError(source, "tls.key", f"{path} holds no PEM private key") from None
