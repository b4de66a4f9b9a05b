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
from OpenSSL import crypto
from twisted.internet import ssl

from quayfront.config import ConfigError, TLSConfig

# TLS 1.2 suites: ECDHE key exchange with an AEAD cipher only (Mozilla's
# "intermediate" profile); TLS 1.3 suites are all AEAD and not affected.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# ALPN: HTTP/2 stays off until its request bodies stream as HTTP/1.1's do.
ALPN_PROTOCOLS = (b"http/1.1",)


def load_certificate_options(
    config: TLSConfig, source: str, now: datetime.datetime | None = None
) -> ssl.CertificateOptions:
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
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(private_key),
        certificate=crypto.X509.from_cryptography(leaf),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        acceptableProtocols=list(ALPN_PROTOCOLS),
    )


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
