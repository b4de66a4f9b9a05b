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


# TLV types with a named field above (or none to show: CRC32C, NOOP).
_NAMED_TLV_TYPES = frozenset({0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x30})
# Vendor types whose value was decoded, by the field holding it.
_VENDOR_FIELDS = {0xE0: "gcp_psc_connection_id", 0xEA: "aws_vpce_id", 0xEE: "azure_link_id"}
# Raw TLVs shown per request at most, so a header full of them cannot
# bloat every log line.
MAX_RAW_TLV_FIELDS = 8


def _raw_tlvs(header: ProxyHeader) -> dict[str, str]:
    """
    TLVs kept raw by the parser (vendor TLVs of a foreign layout, types
    nobody registered), sanitised, as C{tlv_0xNN}: the first of each type.
    """
    raw: dict[str, str] = {}
    for tlv in header.tlvs:
        if tlv.type in _NAMED_TLV_TYPES:
            continue
        vendor_field = _VENDOR_FIELDS.get(tlv.type)
        if vendor_field is not None and getattr(header, vendor_field) is not None:
            continue
        key = f"tlv_0x{tlv.type:02x}"
        if key in raw:
            continue
        if len(raw) == MAX_RAW_TLV_FIELDS:
            break
        raw[key] = sanitise(tlv.value)
    return raw


def tlv_fields(header: ProxyHeader | None) -> dict[str, str]:
    """
    The sanitised TLV fields present in C{header}, then the TLVs it keeps
    raw (see L{_raw_tlvs}).
    """
    if header is None:
        return {}
    fields = {}
    for name, get in TLV_FIELDS.items():
        value = get(header)
        if value is not None:
            fields[name] = sanitise(value)
    fields.update(_raw_tlvs(header))
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
