"""
A test-only PROXY header encoder: builds v1 lines and v2 headers byte by
byte, including headers that are invalid in one chosen way.

It is written from the specification, independently of the parser, so the
tests compare two readings of the spec; only the CRC32C function is shared
(and checked on its own against the RFC 3720/4960 vectors).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from quayfront.proxyprotocol._crc32c import crc32c

V2_SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
V2_FIXED_LENGTH = 16

COMMAND_LOCAL = 0x0
COMMAND_PROXY = 0x1

FAMILY_UNSPEC = 0x00
FAMILY_TCP4 = 0x11
FAMILY_UDP4 = 0x12
FAMILY_TCP6 = 0x21
FAMILY_UDP6 = 0x22
FAMILY_UNIX = 0x31
FAMILY_UNIX_DGRAM = 0x32

TYPE_ALPN = 0x01
TYPE_AUTHORITY = 0x02
TYPE_CRC32C = 0x03
TYPE_NOOP = 0x04
TYPE_UNIQUE_ID = 0x05
TYPE_SSL = 0x20
TYPE_NETNS = 0x30
TYPE_GCP = 0xE0
TYPE_AWS = 0xEA
TYPE_AZURE = 0xEE

SUBTYPE_SSL_VERSION = 0x21
SUBTYPE_SSL_CN = 0x22
SUBTYPE_SSL_CIPHER = 0x23
SUBTYPE_SSL_SIG_ALG = 0x24
SUBTYPE_SSL_KEY_ALG = 0x25
SUBTYPE_SSL_GROUP = 0x26
SUBTYPE_SSL_SIG_SCHEME = 0x27
SUBTYPE_SSL_CLIENT_CERT = 0x28

SUBTYPE_AWS_VPCE_ID = 0x01
SUBTYPE_AZURE_LINK_ID = 0x01

CLIENT_SSL = 0x01
CLIENT_CERT_CONN = 0x02
CLIENT_CERT_SESS = 0x04

# The start of a TLS 1.x ClientHello record: what follows the header on a
# quayfront listener.
TLS_CLIENT_HELLO_PREFIX = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))


def v1_line(
    family: str,
    source: str = "",
    destination: str = "",
    source_port: int | str = "",
    destination_port: int | str = "",
) -> bytes:
    """
    A v1 line; with only C{family}, the short form ("PROXY UNKNOWN\\r\\n").
    """
    fields = ["PROXY", family]
    if source or destination or source_port != "" or destination_port != "":
        fields += [source, destination, str(source_port), str(destination_port)]
    return (" ".join(fields) + "\r\n").encode("ascii")


def tlv(tlv_type: int, value: bytes) -> bytes:
    return struct.pack("!BH", tlv_type, len(value)) + value


def ipv4_addresses(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address(destination).packed
        + struct.pack("!HH", source_port, destination_port)
    )


def ipv6_addresses(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return (
        ipaddress.IPv6Address(source).packed
        + ipaddress.IPv6Address(destination).packed
        + struct.pack("!HH", source_port, destination_port)
    )


def ssl_value(client: int, verify: int, sub_tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    return struct.pack("!BI", client, verify) + b"".join(tlv(t, v) for t, v in sub_tlvs)


def aws_vpce_value(vpce_id: bytes) -> bytes:
    return bytes([SUBTYPE_AWS_VPCE_ID]) + vpce_id


def azure_link_value(link_id: int) -> bytes:
    return bytes([SUBTYPE_AZURE_LINK_ID]) + struct.pack("<I", link_id)


def gcp_psc_value(connection_id: int) -> bytes:
    return struct.pack("!Q", connection_id)


def v2_header(
    *,
    command: int = COMMAND_PROXY,
    family: int = FAMILY_TCP4,
    addresses: bytes = b"",
    tlvs: Sequence[tuple[int, bytes]] = (),
    crc32c_at: int | None = None,
    tail: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """
    A v2 header.

    @param tlvs: (type, value) pairs, in order.
    @param crc32c_at: where to insert a CRC32C TLV among C{tlvs} (C{None}:
        no checksum); its value is computed over the finished header.
    @param tail: raw bytes after the TLVs (to build stray bytes).
    @param length: the length field, if it must differ from the real one.
    """
    items = [tlv(t, v) for t, v in tlvs]
    crc_value_offset = None
    if crc32c_at is not None:
        before = V2_FIXED_LENGTH + len(addresses) + sum(len(item) for item in items[:crc32c_at])
        crc_value_offset = before + 3
        items.insert(crc32c_at, tlv(TYPE_CRC32C, bytes(4)))
    body = addresses + b"".join(items) + tail
    header = bytearray(
        V2_SIGNATURE
        + bytes([(version << 4) | command, family])
        + struct.pack("!H", len(body) if length is None else length)
        + body
    )
    if crc_value_offset is not None:
        header[crc_value_offset : crc_value_offset + 4] = struct.pack("!I", crc32c(header))
    return bytes(header)


def tlvs_as_sent(
    header: bytes,
    addresses: bytes,
    tlvs: Sequence[tuple[int, bytes]],
    crc32c_at: int | None,
) -> list[tuple[int, bytes]]:
    """
    The (type, value) pairs of a header built by L{v2_header}, in wire
    order, with the CRC32C TLV and its computed value where it was inserted.
    """
    sent = list(tlvs)
    if crc32c_at is not None:
        offset = V2_FIXED_LENGTH + len(addresses) + sum(3 + len(v) for _, v in tlvs[:crc32c_at]) + 3
        sent.insert(crc32c_at, (TYPE_CRC32C, header[offset : offset + 4]))
    return sent
