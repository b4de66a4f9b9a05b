"""
Tests for the PROXY header parser: one vector per rule of the specification,
each fed whole, byte by byte, split in two at every position, and followed by
application data.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from quayfront import proxyprotocol
from quayfront.proxyprotocol import (
    DEFAULT_MAX_V2_LENGTH,
    REASON_CODES,
    TLV,
    V1_MAX_LENGTH,
    Address,
    Command,
    Family,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    SSLInfo,
)
from quayfront.proxyprotocol import _parser
from quayfront.proxyprotocol._crc32c import crc32c, crc32c_python

from .proxy_encoder import (
    CLIENT_CERT_CONN,
    CLIENT_CERT_SESS,
    CLIENT_SSL,
    COMMAND_LOCAL,
    COMMAND_PROXY,
    FAMILY_TCP4,
    FAMILY_TCP6,
    FAMILY_UDP4,
    FAMILY_UDP6,
    FAMILY_UNIX,
    FAMILY_UNIX_DGRAM,
    FAMILY_UNSPEC,
    SUBTYPE_SSL_CIPHER,
    SUBTYPE_SSL_CLIENT_CERT,
    SUBTYPE_SSL_CN,
    SUBTYPE_SSL_GROUP,
    SUBTYPE_SSL_KEY_ALG,
    SUBTYPE_SSL_SIG_ALG,
    SUBTYPE_SSL_SIG_SCHEME,
    SUBTYPE_SSL_VERSION,
    TLS_CLIENT_HELLO_PREFIX,
    TYPE_ALPN,
    TYPE_AUTHORITY,
    TYPE_AWS,
    TYPE_AZURE,
    TYPE_CRC32C,
    TYPE_GCP,
    TYPE_NETNS,
    TYPE_NOOP,
    TYPE_SSL,
    TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    aws_vpce_value,
    azure_link_value,
    gcp_psc_value,
    ipv4_addresses,
    ipv6_addresses,
    ssl_value,
    tlvs_as_sent,
    v1_line,
    v2_header,
)

# Vectors longer than this are split at sampled positions only, to keep the
# run short; the property tests cover random splits of long headers.
EVERY_SPLIT_MAX_LENGTH = 600
SAMPLED_SPLITS = 64


def canonical(host: str) -> str:
    return str(ipaddress.ip_address(host))


def proxied(
    version: int,
    family: Family,
    source: tuple[str, int],
    destination: tuple[str, int],
    **fields: object,
) -> dict:
    return dict(
        version=version,
        command=Command.PROXY,
        family=family,
        source=Address(canonical(source[0]), source[1]),
        destination=Address(canonical(destination[0]), destination[1]),
        **fields,
    )


def unaddressed(version: int, command: Command, family: Family, **fields: object) -> dict:
    return dict(
        version=version, command=command, family=family, source=None, destination=None, **fields
    )


@dataclass(frozen=True)
class Valid:
    name: str
    data: bytes
    fields: dict

    @property
    def expected(self) -> ProxyHeader:
        return ProxyHeader(length=len(self.data), **self.fields)


@dataclass(frozen=True)
class Invalid:
    """
    C{accepted} is the longest prefix the parser must accept; the first byte
    of C{rest} is the one at which it must reject.
    """

    name: str
    accepted: bytes
    rest: bytes
    reason: str

    @property
    def data(self) -> bytes:
        return self.accepted + self.rest


def invalid_at_end(name: str, data: bytes, reason: str) -> Invalid:
    """
    A v2 header whose flaw shows only once all of it is in.
    """
    return Invalid(name, data[:-1], data[-1:], reason)


# --- Building blocks ---------------------------------------------------------

TCP4_ADDRESSES = ipv4_addresses("192.0.2.10", "198.51.100.20", 49152, 443)
TCP4_PROXIED = proxied(2, Family.TCP4, ("192.0.2.10", 49152), ("198.51.100.20", 443))
TCP6_ADDRESSES = ipv6_addresses("2001:db8::10", "2001:db8:1::20", 50000, 8443)
SIG_PROXY_TCP4 = V2_SIGNATURE + bytes([0x21, FAMILY_TCP4])
FULL_SSL_SUB_TLVS = [
    (SUBTYPE_SSL_VERSION, b"TLSv1.3"),
    (SUBTYPE_SSL_CN, b"client.example"),
    (SUBTYPE_SSL_CIPHER, b"TLS_AES_128_GCM_SHA256"),
    (SUBTYPE_SSL_SIG_ALG, b"RSA-SHA256"),
    (SUBTYPE_SSL_KEY_ALG, b"RSA2048"),
    (SUBTYPE_SSL_GROUP, b"X25519"),
    (SUBTYPE_SSL_SIG_SCHEME, b"rsa_pss_rsae_sha256"),
    (SUBTYPE_SSL_CLIENT_CERT, b"\x30\x82\x01\x0a"),
]
FULL_SSL_INFO = SSLInfo(
    client=CLIENT_SSL | CLIENT_CERT_CONN | CLIENT_CERT_SESS,
    verify=0,
    version=b"TLSv1.3",
    cn=b"client.example",
    cipher=b"TLS_AES_128_GCM_SHA256",
    sig_alg=b"RSA-SHA256",
    key_alg=b"RSA2048",
    group=b"X25519",
    sig_scheme=b"rsa_pss_rsae_sha256",
    client_cert=b"\x30\x82\x01\x0a",
    tlvs=tuple(TLV(t, v) for t, v in FULL_SSL_SUB_TLVS),
)
UNIQUE_ID_MAX = 128
UNIQUE_ID_128 = bytes(range(UNIQUE_ID_MAX))
IPV6_MAX = ":".join(["ffff"] * 8)

# An AWS NLB health check as captured on the wire (kubernetes/kubernetes
# issue 57250): LOCAL, family TCP4, no address block, then a CRC32C TLV and
# 74 bytes of NOOP padding.
AWS_NLB_HEALTH_CHECK = bytes.fromhex(
    "0d0a0d0a000d0a515549540a" "2011" "0054" "030004bce5951f" "04004a"
) + bytes(74)
AWS_VPCE_ID = b"vpce-08d2bf15fac5001c9"


AWS_NLB_VPC_ENDPOINT: dict = dict(
    addresses=TCP4_ADDRESSES,
    tlvs=[(TYPE_AWS, aws_vpce_value(AWS_VPCE_ID)), (TYPE_NOOP, bytes(5))],
    crc32c_at=0,
)


# --- Valid vectors -------------------------------------------------------------

V1_VALID = [
    Valid(
        "v1-tcp4-spec-example",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        proxied(1, Family.TCP4, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    Valid(
        "v1-tcp4-longest-56-bytes",
        v1_line("TCP4", "255.255.255.255", "255.255.255.255", 65535, 65535),
        proxied(1, Family.TCP4, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    Valid(
        "v1-tcp4-zero-addresses-and-ports",
        v1_line("TCP4", "0.0.0.0", "0.0.0.0", 0, 0),
        proxied(1, Family.TCP4, ("0.0.0.0", 0), ("0.0.0.0", 0)),
    ),
    Valid(
        "v1-tcp4-one-digit-octets",
        v1_line("TCP4", "1.0.2.3", "10.20.30.40", 1, 65),
        proxied(1, Family.TCP4, ("1.0.2.3", 1), ("10.20.30.40", 65)),
    ),
    Valid(
        "v1-tcp6-compressed",
        v1_line("TCP6", "2001:db8::1", "2001:db8::2", 12345, 443),
        proxied(1, Family.TCP6, ("2001:db8::1", 12345), ("2001:db8::2", 443)),
    ),
    Valid(
        "v1-tcp6-full-form-upper-case",
        v1_line("TCP6", "2001:0DB8:0000:0000:0000:0000:0000:0001", "FE80:0:0:0:0:0:0:A", 1, 2),
        proxied(1, Family.TCP6, ("2001:db8::1", 1), ("fe80::a", 2)),
    ),
    Valid(
        "v1-tcp6-longest-104-bytes",
        v1_line("TCP6", IPV6_MAX, IPV6_MAX, 65535, 65535),
        proxied(1, Family.TCP6, (IPV6_MAX, 65535), (IPV6_MAX, 65535)),
    ),
    Valid(
        "v1-tcp6-unspecified-and-loopback",
        v1_line("TCP6", "::", "::1", 0, 80),
        proxied(1, Family.TCP6, ("::", 0), ("::1", 80)),
    ),
    Valid(
        "v1-tcp6-double-colon-at-the-end",
        v1_line("TCP6", "fe80::", "1:2:3:4:5:6:7::", 1, 2),
        proxied(1, Family.TCP6, ("fe80::", 1), ("1:2:3:4:5:6:7:0", 2)),
    ),
    Valid(
        "v1-tcp6-double-colon-for-one-group",
        v1_line("TCP6", "1::3:4:5:6:7:8", "1:2:3:4:5:6::8", 1, 2),
        proxied(1, Family.TCP6, ("1:0:3:4:5:6:7:8", 1), ("1:2:3:4:5:6:0:8", 2)),
    ),
    Valid(
        "v1-tcp6-ipv4-mapped",
        v1_line("TCP6", "::ffff:192.0.2.1", "::FFFF:198.51.100.2", 40000, 443),
        proxied(1, Family.TCP6, ("::ffff:192.0.2.1", 40000), ("::ffff:198.51.100.2", 443)),
    ),
    Valid(
        "v1-tcp6-ipv4-tail-full-form",
        v1_line("TCP6", "0:0:0:0:0:ffff:192.0.2.1", "64:ff9b::198.51.100.7", 1, 2),
        proxied(1, Family.TCP6, ("::ffff:192.0.2.1", 1), ("64:ff9b::c633:6407", 2)),
    ),
    Valid(
        "v1-unknown-short-form", b"PROXY UNKNOWN\r\n", unaddressed(1, Command.PROXY, Family.UNSPEC)
    ),
    Valid(
        "v1-unknown-longest-107-bytes",
        v1_line("UNKNOWN", IPV6_MAX, IPV6_MAX, 65535, 65535),
        unaddressed(1, Command.PROXY, Family.UNSPEC),
    ),
    Valid(
        "v1-unknown-rest-ignored",
        b"PROXY UNKNOWN 999.1.1.1 not-an-address 99999  -1 ~!@#$%^&*()\r\n",
        unaddressed(1, Command.PROXY, Family.UNSPEC),
    ),
    Valid(
        "v1-unknown-then-space", b"PROXY UNKNOWN \r\n", unaddressed(1, Command.PROXY, Family.UNSPEC)
    ),
]


def v2_valid(
    name: str,
    fields: dict,
    *,
    tlvs_expected: tuple[TLV, ...] | None = None,
    command: int = COMMAND_PROXY,
    family: int = FAMILY_TCP4,
    addresses: bytes = b"",
    tlvs: Sequence[tuple[int, bytes]] = (),
    crc32c_at: int | None = None,
    tail: bytes = b"",
) -> Valid:
    """
    A valid v2 vector; unless given, the expected TLVs are those the encoder
    was asked to send, in order, with the CRC32C it computed.
    """
    data = v2_header(
        command=command,
        family=family,
        addresses=addresses,
        tlvs=tlvs,
        crc32c_at=crc32c_at,
        tail=tail,
    )
    if tlvs_expected is None:
        sent = tlvs_as_sent(data, addresses, tlvs, crc32c_at)
        tlvs_expected = tuple(TLV(t, v) for t, v in sent)
    return Valid(name, data, dict(fields, tlvs=tlvs_expected))


TCP6_PROXIED = proxied(2, Family.TCP6, ("2001:db8::10", 50000), ("2001:db8:1::20", 8443))
LOCAL_UNSPEC = unaddressed(2, Command.LOCAL, Family.UNSPEC)
PROXY_UNSPEC = unaddressed(2, Command.PROXY, Family.UNSPEC)
FULL_SSL_VALUE = ssl_value(CLIENT_SSL | CLIENT_CERT_CONN | CLIENT_CERT_SESS, 0, FULL_SSL_SUB_TLVS)
ODD_SSL_SUB_TLVS = [(0x2F, b"x"), (TYPE_SSL, b"\x20\x00\x09"), (0x2F, b"y")]

V2_VALID = [
    v2_valid("v2-proxy-tcp4", TCP4_PROXIED, addresses=TCP4_ADDRESSES),
    v2_valid("v2-proxy-tcp6", TCP6_PROXIED, family=FAMILY_TCP6, addresses=TCP6_ADDRESSES),
    v2_valid(
        "v2-proxy-tcp6-ipv4-mapped",
        proxied(2, Family.TCP6, ("::ffff:192.0.2.1", 1), ("::1", 2)),
        family=FAMILY_TCP6,
        addresses=ipv6_addresses("::ffff:192.0.2.1", "::1", 1, 2),
    ),
    v2_valid(
        "v2-proxy-tcp4-extreme-addresses-and-ports",
        proxied(2, Family.TCP4, ("0.0.0.0", 0), ("255.255.255.255", 65535)),
        addresses=ipv4_addresses("0.0.0.0", "255.255.255.255", 0, 65535),
    ),
    v2_valid("v2-proxy-unspec-empty", PROXY_UNSPEC, family=FAMILY_UNSPEC),
    v2_valid(
        "v2-proxy-unspec-tlvs-best-effort",
        dict(PROXY_UNSPEC, alpn=b"h2"),
        family=FAMILY_UNSPEC,
        tlvs=[(TYPE_ALPN, b"h2")],
        crc32c_at=1,
    ),
    v2_valid(
        "v2-proxy-unspec-unparseable-body-ignored",
        PROXY_UNSPEC,
        tlvs_expected=(),
        family=FAMILY_UNSPEC,
        tail=b"\x01\x00\x09abc",
    ),
    v2_valid("v2-local-unspec-empty", LOCAL_UNSPEC, command=COMMAND_LOCAL, family=FAMILY_UNSPEC),
    v2_valid(
        "v2-local-undefined-family-byte-ignored",
        LOCAL_UNSPEC,
        tlvs_expected=(),
        command=COMMAND_LOCAL,
        family=0xFF,
        tail=b"\xff" * 5,
    ),
    v2_valid(
        "v2-local-udp4-family-ignored",
        unaddressed(2, Command.LOCAL, Family.UDP4),
        command=COMMAND_LOCAL,
        family=FAMILY_UDP4,
    ),
    v2_valid(
        "v2-local-unix-family-ignored",
        unaddressed(2, Command.LOCAL, Family.UNIX),
        command=COMMAND_LOCAL,
        family=FAMILY_UNIX,
    ),
    v2_valid(
        "v2-local-tcp4-address-block-skipped",
        unaddressed(2, Command.LOCAL, Family.TCP4),
        command=COMMAND_LOCAL,
        addresses=ipv4_addresses("127.0.0.1", "127.0.0.2", 1, 2),
        tlvs=[(TYPE_NOOP, b"")],
    ),
    v2_valid(
        "v2-local-malformed-tlvs-ignored",
        LOCAL_UNSPEC,
        tlvs_expected=(),
        command=COMMAND_LOCAL,
        family=FAMILY_UNSPEC,
        tlvs=[(TYPE_ALPN, b"h2")],
        tail=b"\x04\x00",
    ),
    v2_valid(
        "v2-local-wrong-size-known-tlv-ignored",
        unaddressed(2, Command.LOCAL, Family.TCP4),
        tlvs_expected=(),
        command=COMMAND_LOCAL,
        tlvs=[(TYPE_CRC32C, b"abc")],
    ),
    v2_valid(
        "v2-local-tlvs-with-valid-crc32c",
        dict(LOCAL_UNSPEC, authority=b"r.example"),
        command=COMMAND_LOCAL,
        family=FAMILY_UNSPEC,
        tlvs=[(TYPE_AUTHORITY, b"r.example")],
        crc32c_at=0,
    ),
    Valid(
        "v2-aws-nlb-health-check",
        AWS_NLB_HEALTH_CHECK,
        unaddressed(
            2,
            Command.LOCAL,
            Family.TCP4,
            tlvs=(TLV(TYPE_CRC32C, bytes.fromhex("bce5951f")), TLV(TYPE_NOOP, bytes(74))),
        ),
    ),
    v2_valid(
        "v2-aws-nlb-through-vpc-endpoint",
        dict(TCP4_PROXIED, aws_vpce_id=AWS_VPCE_ID),
        **AWS_NLB_VPC_ENDPOINT,
    ),
    v2_valid(
        "v2-aws-other-subtype-kept-raw",
        TCP4_PROXIED,
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_AWS, b"\x02xyz"), (TYPE_AWS, b"\x02xyz")],
    ),
    v2_valid(
        "v2-azure-link-id",
        dict(TCP4_PROXIED, azure_link_id=0x12345678),
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_AZURE, b"\x01\x78\x56\x34\x12")],
    ),
    v2_valid(
        "v2-azure-other-subtype-kept-raw",
        TCP4_PROXIED,
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_AZURE, b"\x07")],
    ),
    v2_valid(
        "v2-gcp-psc-connection-id",
        dict(TCP4_PROXIED, gcp_psc_connection_id=0x0102030405060708),
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_GCP, bytes([1, 2, 3, 4, 5, 6, 7, 8]))],
    ),
    # Vendor TLVs (0xE0-0xEF) whose value does not have the layout of the
    # cloud that registered the type are kept raw, and the header accepted.
    *[
        v2_valid(f"v2-{name}-kept-raw", TCP4_PROXIED, addresses=TCP4_ADDRESSES, tlvs=tlvs)
        for name, tlvs in [
            ("azure-6-byte-link-id", [(TYPE_AZURE, b"\x01" + bytes(range(6)))]),
            ("azure-3-byte-link-id", [(TYPE_AZURE, b"\x01abc")]),
            ("azure-empty", [(TYPE_AZURE, b"")]),
            ("aws-empty", [(TYPE_AWS, b"")]),
            ("aws-subtype-only", [(TYPE_AWS, b"\x01")]),
            ("aws-binary-vpce-id", [(TYPE_AWS, b"\x01\x00\xff\x1b[2J")]),
            ("gcp-7-bytes", [(TYPE_GCP, bytes(7))]),
            ("gcp-9-bytes", [(TYPE_GCP, bytes(9))]),
            ("gcp-text", [(TYPE_GCP, b"tenant=blue;zone=a")]),
            (
                "haproxy-tlv-fmt-style",
                [(0xE1, b"10.0.0.1:443"), (0xE5, b"\x00\x01\x02"), (0xEF, b"x" * 300)],
            ),
        ]
    ],
    v2_valid(
        "v2-foreign-then-matching-vendor-layouts",
        dict(
            TCP4_PROXIED,
            aws_vpce_id=b"vpce-2",
            azure_link_id=7,
            gcp_psc_connection_id=9,
        ),
        addresses=TCP4_ADDRESSES,
        tlvs=[
            (TYPE_AWS, b"\x01\x00"),
            (TYPE_AWS, aws_vpce_value(b"vpce-2")),
            (TYPE_AZURE, b"\x01" + bytes(6)),
            (TYPE_AZURE, azure_link_value(7)),
            (TYPE_GCP, bytes(2)),
            (TYPE_GCP, gcp_psc_value(9)),
            (TYPE_GCP, gcp_psc_value(10)),
        ],
    ),
    # Repeated TLVs: accepted, the first one of a type wins (as in haproxy).
    *[
        v2_valid(
            f"v2-two-{name}-first-wins",
            dict(TCP4_PROXIED, **{field: expected}),
            addresses=TCP4_ADDRESSES,
            tlvs=[(tlv_type, first), (TYPE_NOOP, b""), (tlv_type, second)],
        )
        for name, field, expected, tlv_type, first, second in [
            ("alpn", "alpn", b"h2", TYPE_ALPN, b"h2", b"http/1.1"),
            ("authority", "authority", b"a.example", TYPE_AUTHORITY, b"a.example", b"b.example"),
            ("unique-id", "unique_id", b"id1", TYPE_UNIQUE_ID, b"id1", b"id2"),
            (
                "ssl",
                "ssl",
                SSLInfo(client=1, verify=0),
                TYPE_SSL,
                ssl_value(1, 0),
                ssl_value(3, 5),
            ),
            ("netns", "netns", b"blue", TYPE_NETNS, b"blue", b"red"),
            ("gcp", "gcp_psc_connection_id", 1, TYPE_GCP, gcp_psc_value(1), gcp_psc_value(2)),
            (
                "aws-vpce-id",
                "aws_vpce_id",
                b"vpce-1",
                TYPE_AWS,
                aws_vpce_value(b"vpce-1"),
                aws_vpce_value(b"vpce-2"),
            ),
            (
                "azure-link-id",
                "azure_link_id",
                1,
                TYPE_AZURE,
                azure_link_value(1),
                azure_link_value(2),
            ),
        ]
    ],
    v2_valid(
        "v2-two-crc32c-first-is-verified",
        TCP4_PROXIED,
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_CRC32C, b"\xde\xad\xbe\xef")],
        crc32c_at=0,
    ),
    v2_valid(
        "v2-two-ssl-cn-first-wins",
        dict(
            TCP4_PROXIED,
            ssl=SSLInfo(
                client=3,
                verify=0,
                cn=b"a",
                tlvs=(TLV(SUBTYPE_SSL_CN, b"a"), TLV(SUBTYPE_SSL_CN, b"b")),
            ),
        ),
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_SSL, ssl_value(3, 0, [(SUBTYPE_SSL_CN, b"a"), (SUBTYPE_SSL_CN, b"b")]))],
    ),
    # AUTHORITY carries a host name: 255 octets is the most there can be.
    v2_valid(
        "v2-authority-255-bytes",
        dict(TCP4_PROXIED, authority=b"a" * 255),
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_AUTHORITY, b"a" * 255)],
    ),
    v2_valid(
        "v2-local-authority-256-bytes-tlvs-ignored",
        LOCAL_UNSPEC,
        tlvs_expected=(),
        command=COMMAND_LOCAL,
        family=FAMILY_UNSPEC,
        tlvs=[(TYPE_AUTHORITY, b"a" * 256)],
    ),
    v2_valid(
        "v2-every-known-tlv-and-unknown-ones",
        dict(
            TCP6_PROXIED,
            alpn=b"h2",
            authority=b"registry.example.com",
            unique_id=UNIQUE_ID_128,
            ssl=FULL_SSL_INFO,
            netns=b"blue",
        ),
        family=FAMILY_TCP6,
        addresses=TCP6_ADDRESSES,
        tlvs=[
            (TYPE_ALPN, b"h2"),
            (TYPE_AUTHORITY, b"registry.example.com"),
            (0x06, b"unassigned"),
            (TYPE_UNIQUE_ID, UNIQUE_ID_128),
            (TYPE_NOOP, b""),
            (TYPE_SSL, FULL_SSL_VALUE),
            (TYPE_NETNS, b"blue"),
            (0xF0, b"experimental"),
            (TYPE_NOOP, b"pad"),
            (0xFF, b""),
            (0x06, b"repeated"),
        ],
    ),
    v2_valid(
        "v2-ssl-without-sub-tlvs",
        dict(TCP4_PROXIED, ssl=SSLInfo(client=CLIENT_SSL, verify=0)),
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_SSL, ssl_value(CLIENT_SSL, 0))],
    ),
    v2_valid(
        "v2-ssl-unknown-sub-tlvs-kept-not-recursed",
        dict(
            TCP4_PROXIED,
            ssl=SSLInfo(
                client=0, verify=0x01020304, tlvs=tuple(TLV(t, v) for t, v in ODD_SSL_SUB_TLVS)
            ),
        ),
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_SSL, ssl_value(0, 0x01020304, ODD_SSL_SUB_TLVS))],
    ),
    v2_valid(
        "v2-unique-id-empty",
        dict(TCP4_PROXIED, unique_id=b""),
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_UNIQUE_ID, b"")],
    ),
    v2_valid("v2-crc32c-only", TCP4_PROXIED, addresses=TCP4_ADDRESSES, crc32c_at=0),
    v2_valid(
        "v2-crc32c-last",
        dict(TCP4_PROXIED, alpn=b"http/1.1"),
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_ALPN, b"http/1.1")],
        crc32c_at=1,
    ),
    v2_valid(
        "v2-length-at-the-cap",
        TCP4_PROXIED,
        addresses=TCP4_ADDRESSES,
        tlvs=[(TYPE_NOOP, bytes(DEFAULT_MAX_V2_LENGTH - len(TCP4_ADDRESSES) - 3))],
    ),
]

VALID = V1_VALID + V2_VALID


# --- Invalid vectors ------------------------------------------------------------

V1_TCP4_REST = b" 5.6.7.8 1 2\r\n"
LONG_IPV6 = "0001:ffff:ffff:ffff:ffff:ffff:255.255.255.100"
LONG_TCP6_LINE = v1_line("TCP6", LONG_IPV6, LONG_IPV6, 0, 0)

NOT_PROXY_INVALID = [
    Invalid("http-request", b"", b"GET / HTTP/1.1\r\n", "not-proxy-protocol"),
    Invalid("tls-client-hello", b"", TLS_CLIENT_HELLO_PREFIX, "not-proxy-protocol"),
    Invalid("nul-byte", b"", b"\x00", "not-proxy-protocol"),
    Invalid("lower-case-proxy", b"", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not-proxy-protocol"),
    Invalid("proxy-misspelt", b"PROX", b"Z TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not-proxy-protocol"),
    Invalid("proxy-cut-short", b"PRO", b" TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not-proxy-protocol"),
    Invalid("crlf-crlf-then-http", b"\r\n\r\n", b"GET / HTTP/1.1\r\n", "not-proxy-protocol"),
    Invalid("v2-signature-last-byte", V2_SIGNATURE[:11], b"X" + bytes(8), "not-proxy-protocol"),
]

V1_INVALID = [
    # Characters and line endings.
    Invalid(
        "v1-non-ascii-in-address", b"PROXY TCP4 1.2.3.", b"\xff" + V1_TCP4_REST, "v1-bad-character"
    ),
    Invalid(
        "v1-non-ascii-after-unknown", b"PROXY UNKNOWN caf", b"\xc3\xa9\r\n", "v1-bad-character"
    ),
    Invalid("v1-nul-after-unknown", b"PROXY UNKNOWN ", b"\x00\r\n", "v1-bad-character"),
    Invalid("v1-tab-separator", b"PROXY TCP4", b"\t1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-character"),
    Invalid("v1-non-ascii-after-proxy", b"PROXY", b"\xa0TCP4", "v1-bad-syntax"),
    Invalid("v1-bare-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b"\nGET", "v1-bad-crlf"),
    Invalid("v1-cr-without-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", b"GET", "v1-bad-crlf"),
    Invalid("v1-cr-cr-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", b"\r\n", "v1-bad-crlf"),
    Invalid("v1-lf-cr", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b"\n\r", "v1-bad-crlf"),
    Invalid("v1-bare-lf-after-unknown", b"PROXY UNKNOWN", b"\n", "v1-bad-crlf"),
    Invalid("v1-bare-lf-in-unknown-rest", b"PROXY UNKNOWN abc", b"\ndef\r\n", "v1-bad-crlf"),
    Invalid("v1-no-crlf-in-107-bytes", b"PROXY UNKNOWN " + b"x" * 92, b"y\r\n", "v1-too-long"),
    Invalid("v1-crlf-at-bytes-107-and-108", b"PROXY UNKNOWN " + b"x" * 92, b"\r\n", "v1-too-long"),
    Invalid(
        "v1-tcp6-dotted-tails-over-107-bytes",
        LONG_TCP6_LINE[: V1_MAX_LENGTH - 1],
        LONG_TCP6_LINE[V1_MAX_LENGTH - 1 :],
        "v1-too-long",
    ),
    # Fields and separators.
    Invalid("v1-no-space-after-proxy", b"PROXY", b"TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-syntax"),
    Invalid("v1-line-ends-after-proxy", b"PROXY", b"\r\n", "v1-bad-syntax"),
    Invalid(
        "v1-two-spaces-after-proxy", b"PROXY ", b" TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-syntax"
    ),
    Invalid("v1-tcp4-without-addresses", b"PROXY TCP4", b"\r\n", "v1-bad-syntax"),
    Invalid(
        "v1-missing-destination-port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1", b"\r\n", "v1-bad-syntax"
    ),
    Invalid("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b" 3\r\n", "v1-bad-syntax"),
    Invalid("v1-space-before-crlf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b" \r\n", "v1-bad-syntax"),
    Invalid(
        "v1-two-spaces-between-addresses",
        b"PROXY TCP4 1.2.3.4 ",
        b" 5.6.7.8 1 2\r\n",
        "v1-bad-syntax",
    ),
    Invalid(
        "v1-two-spaces-between-ports", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 ", b" 2\r\n", "v1-bad-syntax"
    ),
    # Protocol word.
    Invalid("v1-tcp5", b"PROXY TCP", b"5 1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-family"),
    Invalid("v1-udp4", b"PROXY U", b"DP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-family"),
    Invalid("v1-tcp-without-digit", b"PROXY TCP", b" 1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-family"),
    Invalid("v1-lower-case-family", b"PROXY ", b"tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-family"),
    Invalid("v1-unknown-with-suffix", b"PROXY UNKNOWN", b"X\r\n", "v1-bad-family"),
    Invalid("v1-family-cut-by-crlf", b"PROXY UNKNOW", b"\r\n", "v1-bad-family"),
    # TCP4 addresses.
    Invalid("v1-octet-256", b"PROXY TCP4 1.2.3.25", b"6" + V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-octet-leading-zero", b"PROXY TCP4 0", b"1.2.3.4" + V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-octet-four-digits", b"PROXY TCP4 1.2.3.100", b"0" + V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-three-octets", b"PROXY TCP4 1.2.3", V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-five-octets", b"PROXY TCP4 1.2.3.4", b".5" + V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-empty-octet", b"PROXY TCP4 1.", b".2.3" + V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-leading-dot", b"PROXY TCP4 ", b".1.2.3" + V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-trailing-dot", b"PROXY TCP4 1.2.3.", V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-hex-ipv4", b"PROXY TCP4 0", b"x7f.0.0.1" + V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-integer-ipv4", b"PROXY TCP4 169", b"09060" + V1_TCP4_REST, "v1-bad-address"),
    Invalid("v1-ipv6-under-tcp4", b"PROXY TCP4 ", b"::1 ::1 1 2\r\n", "v1-bad-address"),
    Invalid(
        "v1-ipv4-mapped-under-tcp4",
        b"PROXY TCP4 ",
        b"::ffff:1.2.3.4 5.6.7.8 1 2\r\n",
        "v1-bad-address",
    ),
    Invalid(
        "v1-bad-destination-address", b"PROXY TCP4 1.2.3.4 5.6.7.", b"a 1 2\r\n", "v1-bad-address"
    ),
    # TCP6 addresses.
    Invalid("v1-ipv4-under-tcp6", b"PROXY TCP6 1", b".2.3.4 ::1 1 2\r\n", "v1-bad-address"),
    Invalid("v1-ipv6-zone-id", b"PROXY TCP6 fe80::1", b"%eth0 ::1 1 2\r\n", "v1-bad-address"),
    Invalid("v1-ipv6-two-double-colons", b"PROXY TCP6 1::2:", b":3 ::1 1 2\r\n", "v1-bad-address"),
    Invalid("v1-ipv6-triple-colon", b"PROXY TCP6 ::", b": ::1 1 2\r\n", "v1-bad-address"),
    Invalid(
        "v1-ipv6-nine-groups", b"PROXY TCP6 1:2:3:4:5:6:7:8", b":9 ::1 1 2\r\n", "v1-bad-address"
    ),
    Invalid("v1-ipv6-seven-groups", b"PROXY TCP6 1:2:3:4:5:6:7", b" ::1 1 2\r\n", "v1-bad-address"),
    Invalid(
        "v1-ipv6-double-colon-and-eight-groups",
        b"PROXY TCP6 1:2:3:4::5:6:7",
        b":8 ::1 1 2\r\n",
        "v1-bad-address",
    ),
    Invalid("v1-ipv6-five-digit-group", b"PROXY TCP6 1234", b"5::1 ::1 1 2\r\n", "v1-bad-address"),
    Invalid("v1-ipv6-leading-single-colon", b"PROXY TCP6 :", b"1::2 ::1 1 2\r\n", "v1-bad-address"),
    Invalid(
        "v1-ipv6-trailing-single-colon", b"PROXY TCP6 1::2:", b" ::1 1 2\r\n", "v1-bad-address"
    ),
    Invalid("v1-ipv6-not-hex", b"PROXY TCP6 2001:db8::", b"g ::1 1 2\r\n", "v1-bad-address"),
    Invalid(
        "v1-ipv6-ipv4-tail-too-many-groups",
        b"PROXY TCP6 1:2:3:4:5:6:7:1",
        b".2.3.4 ::1 1 2\r\n",
        "v1-bad-address",
    ),
    Invalid(
        "v1-ipv6-ipv4-tail-leading-zero",
        b"PROXY TCP6 ::ffff:1.2.3.0",
        b"4 ::1 1 2\r\n",
        "v1-bad-address",
    ),
    Invalid(
        "v1-ipv6-ipv4-tail-not-last", b"PROXY TCP6 ::1.2.3.4", b":1 ::1 1 2\r\n", "v1-bad-address"
    ),
    Invalid("v1-ipv6-bracketed", b"PROXY TCP6 ", b"[::1] ::1 1 2\r\n", "v1-bad-address"),
    # Ports.
    Invalid("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 0", b"80 443\r\n", "v1-bad-port"),
    Invalid("v1-port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 6553", b"6 443\r\n", "v1-bad-port"),
    Invalid("v1-port-six-digits", b"PROXY TCP4 1.2.3.4 5.6.7.8 10000", b"0 443\r\n", "v1-bad-port"),
    Invalid("v1-port-plus-sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 ", b"+80 443\r\n", "v1-bad-port"),
    Invalid("v1-port-minus-sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 ", b"-1 443\r\n", "v1-bad-port"),
    Invalid("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0", b"x50 443\r\n", "v1-bad-port"),
    Invalid("v1-port-letters", b"PROXY TCP4 1.2.3.4 5.6.7.8 80", b"a 443\r\n", "v1-bad-port"),
    Invalid(
        "v1-destination-port-double-zero",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 0",
        b"0\r\n",
        "v1-bad-port",
    ),
]

CHECKSUMMED_TCP4 = v2_header(addresses=TCP4_ADDRESSES, crc32c_at=0)

V2_INVALID = [
    # The 16 fixed bytes: rejected at the offending byte.
    Invalid("v2-version-1", V2_SIGNATURE, b"\x11\x11\x00\x0c" + TCP4_ADDRESSES, "v2-bad-version"),
    Invalid("v2-version-3", V2_SIGNATURE, b"\x31\x11\x00\x0c" + TCP4_ADDRESSES, "v2-bad-version"),
    Invalid("v2-version-0", V2_SIGNATURE, b"\x00\x00\x00\x00", "v2-bad-version"),
    Invalid("v2-command-2", V2_SIGNATURE, b"\x22\x11\x00\x0c" + TCP4_ADDRESSES, "v2-bad-command"),
    Invalid("v2-command-15", V2_SIGNATURE, b"\x2f\x00\x00\x00", "v2-bad-command"),
    Invalid(
        "v2-family-0x13", SIG_PROXY_TCP4[:13], b"\x13\x00\x0c" + TCP4_ADDRESSES, "v2-bad-family"
    ),
    Invalid("v2-family-0x41", SIG_PROXY_TCP4[:13], b"\x41\x00\x00", "v2-bad-family"),
    Invalid("v2-family-0x01", SIG_PROXY_TCP4[:13], b"\x01\x00\x00", "v2-bad-family"),
    Invalid(
        "v2-family-0x10", SIG_PROXY_TCP4[:13], b"\x10\x00\x0c" + TCP4_ADDRESSES, "v2-bad-family"
    ),
    Invalid("v2-family-0xff", SIG_PROXY_TCP4[:13], b"\xff\x00\x00", "v2-bad-family"),
    Invalid(
        "v2-udp4",
        SIG_PROXY_TCP4[:13],
        bytes([FAMILY_UDP4]) + b"\x00\x0c" + TCP4_ADDRESSES,
        "v2-dgram-not-supported",
    ),
    Invalid(
        "v2-udp6",
        SIG_PROXY_TCP4[:13],
        bytes([FAMILY_UDP6]) + b"\x00\x24" + TCP6_ADDRESSES,
        "v2-dgram-not-supported",
    ),
    Invalid(
        "v2-unix-dgram",
        SIG_PROXY_TCP4[:13],
        bytes([FAMILY_UNIX_DGRAM]) + b"\x00\xd8" + bytes(216),
        "v2-dgram-not-supported",
    ),
    Invalid(
        "v2-unix-stream",
        SIG_PROXY_TCP4[:13],
        bytes([FAMILY_UNIX]) + b"\x00\xd8" + bytes(216),
        "v2-unix-not-supported",
    ),
    Invalid("v2-length-over-cap", SIG_PROXY_TCP4 + b"\x10", b"\x01" + bytes(4097), "v2-too-long"),
    Invalid("v2-length-65535", SIG_PROXY_TCP4 + b"\xff", b"\xff", "v2-too-long"),
    Invalid("v2-local-length-over-cap", V2_SIGNATURE + b"\x20\x00\x10", b"\x01", "v2-too-long"),
    Invalid(
        "v2-tcp4-length-11",
        SIG_PROXY_TCP4 + b"\x00",
        b"\x0b" + TCP4_ADDRESSES[:11],
        "v2-short-address-block",
    ),
    Invalid("v2-tcp4-length-0", SIG_PROXY_TCP4 + b"\x00", b"\x00", "v2-short-address-block"),
    Invalid(
        "v2-tcp6-length-35",
        V2_SIGNATURE + bytes([0x21, FAMILY_TCP6, 0x00]),
        b"\x23" + TCP6_ADDRESSES[:35],
        "v2-short-address-block",
    ),
    # TLV structure: rejected once the whole header is in.
    invalid_at_end(
        "v2-tlv-overrun-by-one",
        v2_header(addresses=TCP4_ADDRESSES, tail=b"\x01\x00\x0a" + b"h" * 9),
        "v2-tlv-overrun",
    ),
    invalid_at_end(
        "v2-tlv-length-65535",
        v2_header(addresses=TCP4_ADDRESSES, tail=b"\x04\xff\xff" + bytes(20)),
        "v2-tlv-overrun",
    ),
    invalid_at_end(
        "v2-tlv-one-stray-byte",
        v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_ALPN, b"h2")], tail=b"\x04"),
        "v2-tlv-truncated",
    ),
    invalid_at_end(
        "v2-tlv-two-stray-bytes",
        v2_header(addresses=TCP4_ADDRESSES, tail=b"\x04\x00"),
        "v2-tlv-truncated",
    ),
    # Known TLVs of the wrong size or layout.
    invalid_at_end(
        "v2-crc32c-3-bytes",
        v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_CRC32C, b"abc")]),
        "v2-bad-tlv",
    ),
    invalid_at_end(
        "v2-crc32c-5-bytes",
        v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_CRC32C, b"abcde")]),
        "v2-bad-tlv",
    ),
    invalid_at_end(
        "v2-unique-id-129-bytes",
        v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_UNIQUE_ID, bytes(129))]),
        "v2-bad-tlv",
    ),
    invalid_at_end(
        "v2-ssl-4-bytes",
        v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_SSL, b"\x01\x00\x00\x00")]),
        "v2-bad-tlv",
    ),
    invalid_at_end(
        "v2-ssl-sub-tlv-overrun",
        v2_header(
            addresses=TCP4_ADDRESSES, tlvs=[(TYPE_SSL, ssl_value(1, 0) + b"\x21\x00\x08TLSv1.3")]
        ),
        "v2-bad-tlv",
    ),
    invalid_at_end(
        "v2-ssl-stray-sub-tlv-bytes",
        v2_header(
            addresses=TCP4_ADDRESSES,
            tlvs=[(TYPE_SSL, ssl_value(1, 0, [(SUBTYPE_SSL_VERSION, b"TLSv1.3")]) + b"\x22\x00")],
        ),
        "v2-bad-tlv",
    ),
    # AUTHORITY is a host name: at most 255 octets.
    invalid_at_end(
        "v2-authority-256-bytes",
        v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_AUTHORITY, b"a" * 256)]),
        "v2-authority-too-long",
    ),
    invalid_at_end(
        "v2-second-authority-256-bytes",
        v2_header(
            addresses=TCP4_ADDRESSES,
            tlvs=[(TYPE_AUTHORITY, b"r.example"), (TYPE_AUTHORITY, b"b" * 256)],
        ),
        "v2-authority-too-long",
    ),
    # A repeat of a TLV with a layout must have it too.
    invalid_at_end(
        "v2-second-crc32c-3-bytes",
        v2_header(
            addresses=TCP4_ADDRESSES, tlvs=[(TYPE_CRC32C, bytes(4)), (TYPE_CRC32C, bytes(3))]
        ),
        "v2-bad-tlv",
    ),
    invalid_at_end(
        "v2-second-unique-id-129-bytes",
        v2_header(
            addresses=TCP4_ADDRESSES,
            tlvs=[(TYPE_UNIQUE_ID, b"id"), (TYPE_UNIQUE_ID, bytes(UNIQUE_ID_MAX + 1))],
        ),
        "v2-bad-tlv",
    ),
    # Checksums.
    invalid_at_end(
        "v2-crc32c-mismatch-address-changed",
        CHECKSUMMED_TCP4[:16] + b"\xc1" + CHECKSUMMED_TCP4[17:],
        "v2-crc-mismatch",
    ),
    invalid_at_end(
        "v2-crc32c-all-zero",
        v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_CRC32C, bytes(4))]),
        "v2-crc-mismatch",
    ),
    invalid_at_end(
        "v2-aws-nlb-health-check-corrupted", AWS_NLB_HEALTH_CHECK[:-1] + b"\x01", "v2-crc-mismatch"
    ),
    invalid_at_end(
        "v2-proxy-unspec-crc32c-mismatch",
        v2_header(family=FAMILY_UNSPEC, tlvs=[(TYPE_CRC32C, b"\xde\xad\xbe\xef")]),
        "v2-crc-mismatch",
    ),
]

INVALID = NOT_PROXY_INVALID + V1_INVALID + V2_INVALID


# --- Helpers ---------------------------------------------------------------------


def feed_all(chunks: list[bytes]) -> tuple[ProxyHeader, bytes] | None:
    """
    Feed C{chunks} until the parser answers; the chunks left over after a
    result are appended to its leftover, as a caller would pass them on.
    """
    parser = ProxyHeaderParser()
    for index, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not None:
            header, leftover = result
            return header, leftover + b"".join(chunks[index + 1 :])
    return None


def split_positions(length: int) -> list[int]:
    if length <= EVERY_SPLIT_MAX_LENGTH:
        return list(range(1, length))
    step = max(1, length // SAMPLED_SPLITS)
    return sorted({1, 2, 15, 16, 17, length - 2, length - 1, *range(1, length, step)})


def by_name(vectors: list) -> dict:
    return dict(argvalues=vectors, ids=[vector.name for vector in vectors])


# --- Valid headers ---------------------------------------------------------------


@pytest.mark.parametrize("vector", **by_name(VALID))
def test_valid_whole(vector: Valid) -> None:
    """A valid header fed in one piece parses to the expected fields."""
    assert ProxyHeaderParser().feed(vector.data) == (vector.expected, b"")


@pytest.mark.parametrize("vector", **by_name(VALID))
def test_valid_byte_by_byte(vector: Valid) -> None:
    """A valid header fed one byte at a time completes exactly at its last byte."""
    parser = ProxyHeaderParser()
    for offset in range(len(vector.data) - 1):
        assert parser.feed(vector.data[offset : offset + 1]) is None
    assert parser.feed(vector.data[-1:]) == (vector.expected, b"")


@pytest.mark.parametrize("vector", **by_name(VALID))
def test_valid_every_split(vector: Valid) -> None:
    """A valid header split in two at any position parses the same."""
    for position in split_positions(len(vector.data)):
        parser = ProxyHeaderParser()
        assert parser.feed(vector.data[:position]) is None
        assert parser.feed(vector.data[position:]) == (vector.expected, b"")


@pytest.mark.parametrize("vector", **by_name(VALID))
def test_valid_then_tls_in_one_feed(vector: Valid) -> None:
    """Bytes after the header in the same feed come back untouched as leftover."""
    data = vector.data + TLS_CLIENT_HELLO_PREFIX
    assert ProxyHeaderParser().feed(data) == (vector.expected, TLS_CLIENT_HELLO_PREFIX)


@pytest.mark.parametrize("vector", **by_name(VALID))
def test_valid_then_tls_every_split(vector: Valid) -> None:
    """Whatever the split, the parser returns exactly the bytes after the header."""
    data = vector.data + TLS_CLIENT_HELLO_PREFIX
    for position in split_positions(len(data)):
        assert feed_all([data[:position], data[position:]]) == (
            vector.expected,
            TLS_CLIENT_HELLO_PREFIX,
        )


SECOND_HEADERS = [
    pytest.param(b"PROXY TCP4 10.0.0.1 10.0.0.2 1111 2222\r\n", id="second-v1"),
    pytest.param(CHECKSUMMED_TCP4, id="second-v2"),
    pytest.param(b"PROXY garbage", id="second-invalid"),
]


@pytest.mark.parametrize("second", SECOND_HEADERS)
@pytest.mark.parametrize("vector", **by_name(VALID))
def test_second_header_is_leftover(vector: Valid, second: bytes) -> None:
    """A second PROXY header after the first is application data, returned as leftover."""
    assert ProxyHeaderParser().feed(vector.data + second) == (vector.expected, second)


def test_v1_followed_by_v1() -> None:
    """A v1 header fed together with another v1 line parses the first and leaves the second."""
    data = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 443\r\nPROXY TCP4 6.6.6.6 192.0.2.2 1 443\r\n"
    header, leftover = ProxyHeaderParser().feed(data)
    assert header.source == Address("192.0.2.1", 1000)
    assert header.destination == Address("192.0.2.2", 443)
    assert header.length == 41
    assert leftover == b"PROXY TCP4 6.6.6.6 192.0.2.2 1 443\r\n"


# --- Invalid headers -------------------------------------------------------------


@pytest.mark.parametrize("vector", **by_name(INVALID))
def test_invalid_whole(vector: Invalid) -> None:
    """An invalid header fed in one piece raises the expected reason."""
    with pytest.raises(ProxyHeaderError) as caught:
        ProxyHeaderParser().feed(vector.data)
    assert caught.value.reason == vector.reason


@pytest.mark.parametrize("vector", **by_name(INVALID))
def test_invalid_rejected_at_first_wrong_byte(vector: Invalid) -> None:
    """Fed byte by byte, an invalid header is rejected at the first byte that proves it invalid."""
    parser = ProxyHeaderParser()
    for offset in range(len(vector.accepted)):
        assert parser.feed(vector.accepted[offset : offset + 1]) is None
    with pytest.raises(ProxyHeaderError) as caught:
        parser.feed(vector.rest[:1])
    assert caught.value.reason == vector.reason


@pytest.mark.parametrize("vector", **by_name(INVALID))
def test_invalid_every_split(vector: Invalid) -> None:
    """An invalid header split in two at any position raises the same reason."""
    for position in split_positions(len(vector.data)):
        with pytest.raises(ProxyHeaderError) as caught:
            feed_all([vector.data[:position], vector.data[position:]])
        assert caught.value.reason == vector.reason


@pytest.mark.parametrize("vector", **by_name(INVALID))
def test_invalid_followed_by_data(vector: Invalid) -> None:
    """Bytes after an invalid header do not change the verdict."""
    with pytest.raises(ProxyHeaderError) as caught:
        ProxyHeaderParser().feed(vector.data + TLS_CLIENT_HELLO_PREFIX)
    assert caught.value.reason == vector.reason


@pytest.mark.parametrize("vector", **by_name(INVALID))
def test_invalid_detail_is_printable_ascii(vector: Invalid) -> None:
    """Every error's detail is a bounded line of printable ASCII; str() is "reason: detail"."""
    with pytest.raises(ProxyHeaderError) as caught:
        ProxyHeaderParser().feed(vector.data)
    error = caught.value
    assert re.fullmatch(r"[\x20-\x7e]{1,240}", error.detail)
    assert str(error) == f"{error.reason}: {error.detail}"


def test_every_reason_code_has_an_invalid_vector() -> None:
    """Each documented reason code is produced by at least one vector, and no other code is."""
    assert {vector.reason for vector in INVALID} == REASON_CODES


def test_reason_codes_listed_in_parser_docstring() -> None:
    """The parser module's docstring documents exactly the reason codes the error type allows."""
    documented = set(re.findall(r"^  - C\{([a-z0-9-]+)\}:", _parser.__doc__, re.MULTILINE))
    assert documented == REASON_CODES


# --- Early rejection ----------------------------------------------------------------


@pytest.mark.parametrize("first", [b"G", b"\x16", b"\x00", b"\n", b"p", b"\xff"])
def test_first_byte_rejected_at_once(first: bytes) -> None:
    """A first byte that is neither 'P' nor 0x0D is rejected without waiting for more."""
    with pytest.raises(ProxyHeaderError) as caught:
        ProxyHeaderParser().feed(first)
    assert caught.value.reason == "not-proxy-protocol"


def test_v2_oversize_rejected_after_16_bytes() -> None:
    """A v2 length field above the cap is rejected as soon as the 16 fixed bytes are in."""
    parser = ProxyHeaderParser()
    assert parser.feed(SIG_PROXY_TCP4 + b"\x10") is None
    with pytest.raises(ProxyHeaderError) as caught:
        parser.feed(b"\x01")
    assert caught.value.reason == "v2-too-long"


def test_max_v2_length_is_configurable() -> None:
    """A smaller cap accepts a length equal to it and rejects one byte more, after 16 bytes."""
    header = v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_NOOP, bytes(5))])
    assert ProxyHeaderParser(max_v2_length=20).feed(header)[0].length == len(header)
    parser = ProxyHeaderParser(max_v2_length=19)
    with pytest.raises(ProxyHeaderError) as caught:
        parser.feed(header[:16])
    assert caught.value.reason == "v2-too-long"


def test_max_v2_length_above_field_range_is_no_cap() -> None:
    """A cap above 65535 lets the largest possible v2 header through."""
    header = v2_header(addresses=TCP4_ADDRESSES, tlvs=[(TYPE_NOOP, bytes(0xFFFF - 12 - 3))])
    assert ProxyHeaderParser(max_v2_length=100_000).feed(header)[0].length == 16 + 0xFFFF


@pytest.mark.parametrize("bad", [-1, -4096])
def test_negative_max_v2_length_is_refused(bad: int) -> None:
    """A negative cap is a programming error."""
    with pytest.raises(ValueError):
        ProxyHeaderParser(max_v2_length=bad)


def test_limits() -> None:
    """The exported limits are the documented values."""
    assert DEFAULT_MAX_V2_LENGTH == 4096
    assert V1_MAX_LENGTH == 107
    assert len(v1_line("UNKNOWN", IPV6_MAX, IPV6_MAX, 65535, 65535)) == V1_MAX_LENGTH


# --- API misuse and small behaviours -------------------------------------------------


def test_feed_after_completion_raises_runtime_error() -> None:
    """Feeding a parser that already returned a header is API misuse."""
    parser = ProxyHeaderParser()
    parser.feed(b"PROXY UNKNOWN\r\n")
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_feed_after_error_raises_runtime_error() -> None:
    """Feeding a parser that already rejected its input is API misuse, not a ProxyHeaderError."""
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"X")
    with pytest.raises(RuntimeError) as caught:
        parser.feed(b"PROXY UNKNOWN\r\n")
    assert not isinstance(caught.value, ProxyHeaderError)


def test_error_families_are_distinct() -> None:
    """ProxyHeaderError and RuntimeError do not catch each other."""
    assert not issubclass(ProxyHeaderError, RuntimeError)
    assert not issubclass(RuntimeError, ProxyHeaderError)


def test_empty_feed_needs_more() -> None:
    """Feeding no bytes answers 'need more' in any incomplete phase."""
    parser = ProxyHeaderParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY TCP4 1") is None
    assert parser.feed(b"") is None
    assert parser.feed(b".2.3.4 5.6.7.8 1 2\r\n")[0].source == Address("1.2.3.4", 1)


def test_bytearray_and_memoryview_are_accepted() -> None:
    """feed() takes any bytes-like object and always returns leftover as bytes."""
    parser = ProxyHeaderParser()
    assert parser.feed(bytearray(b"PROXY UNKNOWN")) is None
    header, leftover = parser.feed(memoryview(b"\r\nabc"))
    assert header.family is Family.UNSPEC
    assert type(leftover) is bytes and leftover == b"abc"


def test_str_is_refused() -> None:
    """Text instead of bytes is a programming error."""
    with pytest.raises(TypeError):
        ProxyHeaderParser().feed("PROXY UNKNOWN\r\n")  # type: ignore[arg-type]


def test_results_are_frozen() -> None:
    """The parsed header and its parts cannot be modified."""
    header, _ = ProxyHeaderParser().feed(V2_VALID[0].data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.source = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.destination.port = 1  # type: ignore[union-attr]


def test_detail_escapes_peer_bytes() -> None:
    """Peer bytes quoted in a detail are escaped, never copied raw."""
    with pytest.raises(ProxyHeaderError) as caught:
        ProxyHeaderParser().feed(b"PROXY TCP4 1.2.3.\xff\x1b[31m")
    assert "\\xff" in caught.value.detail
    assert "\x1b" not in str(caught.value)


def test_error_constructor_sanitises_and_bounds_detail() -> None:
    """The error type itself keeps details printable and bounded."""
    error = ProxyHeaderError("v1-bad-port", "bad\r\nline\x00" + "x" * 1000)
    assert re.fullmatch(r"[\x20-\x7e]{1,240}", error.detail)
    assert error.args == ("v1-bad-port", error.detail)


def test_error_constructor_refuses_unknown_reason() -> None:
    """Only documented reason codes can be raised."""
    with pytest.raises(ValueError):
        ProxyHeaderError("Something Else", "detail")


def test_ssl_info_flags() -> None:
    """SSLInfo's properties read the client bits and the verify result."""
    verified = SSLInfo(client=CLIENT_SSL | CLIENT_CERT_CONN, verify=0)
    assert (
        verified.connected_over_tls
        and verified.client_cert_presented
        and verified.client_cert_verified
    )
    failed = SSLInfo(client=CLIENT_SSL | CLIENT_CERT_SESS, verify=20)
    assert failed.client_cert_presented and not failed.client_cert_verified
    no_cert = SSLInfo(client=CLIENT_SSL, verify=0)
    assert not no_cert.client_cert_presented and not no_cert.client_cert_verified


def test_public_names() -> None:
    """The package exports the documented names."""
    assert set(proxyprotocol.__all__) == {
        "DEFAULT_MAX_V2_LENGTH",
        "HEADER_START_MAX_LENGTH",
        "REASON_CODES",
        "TLV",
        "V1_MAX_LENGTH",
        "Address",
        "Command",
        "Family",
        "ProxyHeader",
        "ProxyHeaderError",
        "ProxyHeaderParser",
        "SSLInfo",
        "starts_with_header",
    }


@pytest.mark.parametrize(
    "data, verdict",
    [
        (b"", None),
        (b"P", None),
        (b"PROXY", None),
        (b"PROXY ", True),
        (b"PROXY TCP4 1.2.3.4", True),
        (b"POST / HTTP/1.1", False),
        (b"PROXYZ", False),
        (V2_SIGNATURE[:11], None),
        (V2_SIGNATURE, True),
        (V2_SIGNATURE + b"\x21", True),
        (b"\r\n\r\n\x00\r\nQUIX", False),
        (b"\r\n", None),
        (TLS_CLIENT_HELLO_PREFIX, False),
        (b"GET / HTTP/1.1\r\n", False),
    ],
)
def test_starts_with_header(data: bytes, verdict: bool | None) -> None:
    """A header where none is expected is recognised from its first 6 (v1) or 12 (v2) bytes."""
    assert proxyprotocol.starts_with_header(data) is verdict


# --- Load balancer layouts and CRC32C ----------------------------------------------------


def test_aws_nlb_health_check_layout() -> None:
    """The encoder rebuilds the captured NLB health check byte for byte, CRC32C included."""
    rebuilt = v2_header(
        command=COMMAND_LOCAL, family=FAMILY_TCP4, tlvs=[(TYPE_NOOP, bytes(74))], crc32c_at=0
    )
    assert rebuilt == AWS_NLB_HEALTH_CHECK
    zeroed = AWS_NLB_HEALTH_CHECK[:19] + bytes(4) + AWS_NLB_HEALTH_CHECK[23:]
    assert crc32c(zeroed) == 0xBCE5951F


def test_aws_nlb_vpc_endpoint_layout() -> None:
    """An NLB header through a VPC endpoint carries addresses, CRC32C, the 0xEA TLV and padding."""
    data = v2_header(**AWS_NLB_VPC_ENDPOINT)
    crc_value = crc32c(data[:31] + bytes(4) + data[35:])
    assert data == (
        V2_SIGNATURE
        + b"\x21\x11"
        + struct.pack("!H", 12 + 7 + 3 + 1 + len(AWS_VPCE_ID) + 3 + 5)
        + TCP4_ADDRESSES
        + b"\x03\x00\x04"
        + struct.pack("!I", crc_value)
        + b"\xea"
        + struct.pack("!H", 1 + len(AWS_VPCE_ID))
        + b"\x01"
        + AWS_VPCE_ID
        + b"\x04\x00\x05"
        + bytes(5)
    )
    header, leftover = ProxyHeaderParser().feed(data + TLS_CLIENT_HELLO_PREFIX)
    assert header.aws_vpce_id == AWS_VPCE_ID
    assert header.source == Address("192.0.2.10", 49152)
    assert leftover == TLS_CLIENT_HELLO_PREFIX


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(bytes(32), 0x8A9136AA, id="32-zero-bytes"),
        pytest.param(b"\xff" * 32, 0x62A8AB43, id="32-ff-bytes"),
        pytest.param(bytes(range(32)), 0x46DD794E, id="32-incrementing"),
        pytest.param(bytes(range(31, -1, -1)), 0x113FDB5C, id="32-decrementing"),
        pytest.param(b"123456789", 0xE3069283, id="check-string"),
        pytest.param(b"", 0x00000000, id="empty"),
    ],
)
@pytest.mark.parametrize("implementation", [crc32c, crc32c_python], ids=["in-use", "python"])
def test_crc32c_vectors(data: bytes, expected: int, implementation) -> None:
    """CRC32C (the C library and the table fallback) matches the RFC 3720 / RFC 4960 vectors."""
    assert implementation(data) == expected


@pytest.mark.parametrize("implementation", [crc32c, crc32c_python], ids=["in-use", "python"])
def test_crc32c_in_pieces(implementation) -> None:
    """Checksumming a message in pieces gives the checksum of the whole."""
    data = b"The quick brown fox jumps over the lazy dog"
    assert implementation(data[20:], implementation(data[:20])) == implementation(data)


def test_crc32c_uses_the_c_library() -> None:
    """The dependency's C implementation is the one in use, not the fallback."""
    assert crc32c is not crc32c_python
