"""
What a parsed PROXY header says, and the error raised for an invalid one.

Everything here is an immutable value: a L{ProxyHeader} is built once by the
parser and then only read by the layers above it.  TLV values are kept as the
peer sent them (C{bytes}); they are attacker-influenced even when the sender
is a trusted load balancer, so consumers escape them before logging them or
putting them in HTTP headers.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

# The stable codes of ProxyHeaderError.reason; _parser's module docstring
# says when each one is raised.  Metrics label values come from this set, so
# a code is never renamed, only added.
REASON_CODES: Final = frozenset(
    {
        "not-proxy-protocol",
        "v1-bad-character",
        "v1-bad-crlf",
        "v1-too-long",
        "v1-bad-syntax",
        "v1-bad-family",
        "v1-bad-address",
        "v1-bad-port",
        "v2-bad-version",
        "v2-bad-command",
        "v2-bad-family",
        "v2-dgram-not-supported",
        "v2-unix-not-supported",
        "v2-too-long",
        "v2-short-address-block",
        "v2-tlv-overrun",
        "v2-tlv-truncated",
        "v2-bad-tlv",
        "v2-authority-too-long",
        "v2-crc-mismatch",
    }
)
# Codes no longer raised.  They stay reserved so that a metrics label never
# changes meaning: "v2-duplicate-tlv" (repeated TLVs are accepted, the first
# one wins).
RETIRED_REASON_CODES: Final = frozenset({"v2-duplicate-tlv"})

# A detail quotes peer bytes; the bound keeps one log line one line.
ERROR_DETAIL_MAX_LENGTH: Final = 240
_REASON_FORM: Final = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_NOT_PRINTABLE_ASCII: Final = re.compile(r"[^\x20-\x7e]")


class ProxyHeaderError(Exception):
    """
    The peer sent bytes that are not a valid PROXY protocol header.

    The connection must be closed (proxy-protocol.txt section 2.1: "abort the
    connection as soon as possible").  This is the peer's fault; misuse of
    the parser's API raises C{RuntimeError} instead, which is not a subclass.

    @ivar reason: a short kebab-case code from L{REASON_CODES}, stable across
        releases, for metrics labels and log fields.
    @ivar detail: one sentence for humans, printable ASCII only, at most
        L{ERROR_DETAIL_MAX_LENGTH} characters; peer bytes in it are escaped.
    """

    reason: str
    detail: str

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASON_CODES or not _REASON_FORM.fullmatch(reason):
            raise ValueError(f"unknown PROXY header error reason {reason!r}")
        # The parser already escapes what it quotes; this makes the promise
        # hold for any caller of the constructor as well.
        detail = _NOT_PRINTABLE_ASCII.sub("?", detail)
        if len(detail) > ERROR_DETAIL_MAX_LENGTH:
            detail = detail[: ERROR_DETAIL_MAX_LENGTH - 3] + "..."
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class Command(enum.Enum):
    """
    The v2 command nibble (section 2.2); a v1 header is always C{PROXY}.
    """

    # Members are singletons compared by identity; Enum's own hash runs
    # Python code on every dict or set lookup the parser makes.
    __hash__ = object.__hash__

    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.Enum):
    """
    Address family and transport, valued as the v2 family/transport byte.

    A v1 C{UNKNOWN} line is reported as C{UNSPEC}.  The parser accepts only
    C{UNSPEC}, C{TCP4} and C{TCP6} for a C{PROXY} command; the others can
    appear only on C{LOCAL} headers, whose family carries no meaning.
    """

    # Members are singletons compared by identity; Enum's own hash runs
    # Python code on every dict or set lookup the parser makes.
    __hash__ = object.__hash__

    UNSPEC = 0x00
    TCP4 = 0x11
    UDP4 = 0x12
    TCP6 = 0x21
    UDP6 = 0x22
    UNIX = 0x31
    UNIX_DGRAM = 0x32


@dataclass(frozen=True, slots=True)
class Address:
    """
    One endpoint of the proxied connection.

    @ivar host: the IP address in its canonical text form (C{str()} of an
        C{ipaddress} address: lower case, IPv6 compressed).
    @ivar port: the TCP port, 0-65535.
    """

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class TLV:
    """
    One v2 type-length-value record, exactly as received.
    """

    type: int
    value: bytes


# PP2_CLIENT_* bits of the SSL TLV's client field (section 2.2.6).
SSL_CLIENT_SSL: Final = 0x01
SSL_CLIENT_CERT_CONN: Final = 0x02
SSL_CLIENT_CERT_SESS: Final = 0x04


@dataclass(frozen=True, slots=True, kw_only=True)
class SSLInfo:
    """
    The C{PP2_TYPE_SSL} TLV: how the client talked TLS to the load balancer.

    @ivar client: the C{PP2_CLIENT_*} bit field.
    @ivar verify: the certificate verification result; zero means success
        when a certificate was presented (see L{client_cert_verified}).
    @ivar version: C{PP2_SUBTYPE_SSL_VERSION}, e.g. C{b"TLSv1.3"}.
    @ivar cn: C{PP2_SUBTYPE_SSL_CN}, the client certificate's Common Name.
    @ivar cipher: C{PP2_SUBTYPE_SSL_CIPHER}.
    @ivar sig_alg: C{PP2_SUBTYPE_SSL_SIG_ALG}.
    @ivar key_alg: C{PP2_SUBTYPE_SSL_KEY_ALG}.
    @ivar group: C{PP2_SUBTYPE_SSL_GROUP}.
    @ivar sig_scheme: C{PP2_SUBTYPE_SSL_SIG_SCHEME}.
    @ivar client_cert: C{PP2_SUBTYPE_SSL_CLIENT_CERT}, the DER certificate.
    @ivar tlvs: every sub-TLV in order, including unknown ones.
    """

    client: int
    verify: int
    version: bytes | None = None
    cn: bytes | None = None
    cipher: bytes | None = None
    sig_alg: bytes | None = None
    key_alg: bytes | None = None
    group: bytes | None = None
    sig_scheme: bytes | None = None
    client_cert: bytes | None = None
    tlvs: tuple[TLV, ...] = ()

    @property
    def connected_over_tls(self) -> bool:
        """
        Whether the client's connection to the load balancer used TLS.
        """
        return bool(self.client & SSL_CLIENT_SSL)

    @property
    def client_cert_presented(self) -> bool:
        """
        Whether the client presented a certificate on this connection or
        earlier in its TLS session.
        """
        return bool(self.client & (SSL_CLIENT_CERT_CONN | SSL_CLIENT_CERT_SESS))

    @property
    def client_cert_verified(self) -> bool:
        """
        Whether a client certificate was presented and verified; C{verify}
        alone is also zero when no certificate was presented at all.
        """
        return self.client_cert_presented and self.verify == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """
    A complete, valid PROXY header.

    @ivar version: 1 (text) or 2 (binary).
    @ivar command: L{Command.LOCAL} (a load balancer's own connection, e.g. a
        health check) or L{Command.PROXY}.
    @ivar family: the address family and transport; C{UNSPEC} for a v1
        C{UNKNOWN} line and for v2 family bytes the spec leaves undefined on
        a C{LOCAL} header.
    @ivar source: the original client, or C{None} when the connection's own
        addresses apply (C{LOCAL}, v1 C{UNKNOWN}, C{UNSPEC}).
    @ivar destination: the address the client connected to, or C{None}
        exactly when C{source} is.
    @ivar tlvs: every v2 TLV in order, including unknown, repeated and
        C{NOOP} ones and vendor TLVs whose layout did not match; SSL
        sub-TLVs stay inside their TLV's value.  The fields below come from
        the first TLV of their type.
    @ivar alpn: C{PP2_TYPE_ALPN}.
    @ivar authority: C{PP2_TYPE_AUTHORITY}, the SNI the client sent to the
        load balancer.
    @ivar unique_id: C{PP2_TYPE_UNIQUE_ID}, at most 128 bytes.
    @ivar netns: C{PP2_TYPE_NETNS}.
    @ivar ssl: C{PP2_TYPE_SSL}.
    @ivar aws_vpce_id: the AWS VPC endpoint id (type 0xEA, subtype 0x01).
    @ivar azure_link_id: the Azure private endpoint link id (type 0xEE,
        subtype 0x01).
    @ivar gcp_psc_connection_id: the Google Cloud Private Service Connect
        connection id (type 0xE0).  The three vendor fields are set only
        when the TLV has that vendor's layout; see the parser's notes.
    @ivar length: how many bytes the header occupied on the wire.
    """

    version: int
    command: Command
    family: Family
    source: Address | None
    destination: Address | None
    tlvs: tuple[TLV, ...] = ()
    alpn: bytes | None = None
    authority: bytes | None = None
    unique_id: bytes | None = None
    netns: bytes | None = None
    ssl: SSLInfo | None = None
    aws_vpce_id: bytes | None = None
    azure_link_id: int | None = None
    gcp_psc_connection_id: int | None = None
    length: int
