"""
PROXY protocol (haproxy's proxy-protocol.txt, versions 1 and 2) for
listeners behind load balancers.

L{ProxyHeaderParser} is sans-IO: it turns the first bytes of a connection
into a L{ProxyHeader} and the bytes that followed it, or raises
L{ProxyHeaderError} whose C{reason} is one of L{REASON_CODES}.  The rules it
enforces, the reason codes and the choices it makes where the specification
leaves room are documented in L{quayfront.proxyprotocol._parser}.
"""

from ._header import (
    REASON_CODES,
    TLV,
    Address,
    Command,
    Family,
    ProxyHeader,
    ProxyHeaderError,
    SSLInfo,
)
from ._parser import (
    DEFAULT_MAX_V2_LENGTH,
    HEADER_START_MAX_LENGTH,
    V1_MAX_LENGTH,
    ProxyHeaderParser,
    starts_with_header,
)

__all__ = [
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
]
