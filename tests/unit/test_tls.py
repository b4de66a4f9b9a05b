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
    assert tls.serverConnectionForTLS(None).get_context() is tls.context


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
