"""
What a request may tell about its connection: the PROXY header's TLVs and
the TLS session, as named, sanitised text fields.

TLV bytes are attacker-influenced even from a trusted load balancer (an SNI
or a certificate CN is whatever the client chose), so every value leaves
here as printable ASCII of bounded length: safe in a log line and in an
HTTP header.
"""

from __future__ import annotations

from typing import Callable

from quayfront.proxyprotocol import ProxyHeader

# Enough for any SNI name, VPC endpoint id or TLS parameter; a longer value
# is cut, not rejected.
MAX_FIELD_LENGTH = 256


def sanitise(value: bytes | str | int, limit: int = MAX_FIELD_LENGTH) -> str:
    """
    Printable ASCII only: other bytes become C{\\xHH}, C{"} and C{\\} are
    escaped too, and the result is at most C{limit} characters.
    """
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        value = value.encode("utf-8", "replace")
    out = []
    length = 0
    for byte in value:
        piece = chr(byte) if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C) else "\\x%02X" % byte
        length += len(piece)
        if length > limit:
            break
        out.append(piece)
    return "".join(out)


def _ssl(attribute: str) -> Callable[[ProxyHeader], bytes | None]:
    def get(header: ProxyHeader) -> bytes | None:
        return None if header.ssl is None else getattr(header.ssl, attribute)

    return get


# The TLV fields an operator can name in the access log and in
# proxy_listener.tlv_headers.
TLV_FIELDS: dict[str, Callable[[ProxyHeader], bytes | int | None]] = {
    "alpn": lambda h: h.alpn,
    "authority": lambda h: h.authority,
    "unique_id": lambda h: h.unique_id,
    "netns": lambda h: h.netns,
    "ssl_version": _ssl("version"),
    "ssl_cn": _ssl("cn"),
    "ssl_cipher": _ssl("cipher"),
    "ssl_sig_alg": _ssl("sig_alg"),
    "ssl_key_alg": _ssl("key_alg"),
    "aws_vpce_id": lambda h: h.aws_vpce_id,
    "azure_link_id": lambda h: h.azure_link_id,
    "gcp_psc_connection_id": lambda h: h.gcp_psc_connection_id,
}


def tlv_fields(header: ProxyHeader | None) -> dict[str, str]:
    """
    The sanitised TLV fields present in C{header}.
    """
    if header is None:
        return {}
    fields = {}
    for name, get in TLV_FIELDS.items():
        value = get(header)
        if value is not None:
            fields[name] = sanitise(value)
    return fields


def tls_fields(transport: object) -> dict[str, str]:
    """
    Protocol version, cipher and SNI name of the TLS session under
    C{transport}, when there is one.
    """
    connection = getattr(transport, "getHandle", lambda: None)()
    if connection is None or not hasattr(connection, "get_protocol_version_name"):
        return {}
    fields = {}
    version = connection.get_protocol_version_name()
    cipher = connection.get_cipher_name()
    sni = connection.get_servername()
    if version:
        fields["version"] = sanitise(version)
    if cipher:
        fields["cipher"] = sanitise(cipher)
    if sni:
        fields["sni"] = sanitise(sni)
    return fields
