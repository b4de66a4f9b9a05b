"""
A sans-IO parser for PROXY protocol headers, versions 1 and 2.

The specification is haproxy's doc/proxy-protocol.txt (revision 2020/03/05,
plus the SSL sub-types 0x26-0x28 and the cloud vendors' TLVs registered
since).  L{ProxyHeaderParser.feed} takes bytes as they arrive and answers
C{None} (more bytes needed), C{(header, leftover)}, or raises
L{ProxyHeaderError} as soon as the bytes seen so far prove that the input
cannot become a valid header.  The verdict and its reason do not depend on how
the input was split into pieces.  The parser never consumes a byte past the
header: the bytes after it (a TLS ClientHello, or a second PROXY header sent
by the client itself) are returned as C{leftover}.

Error reasons (L{ProxyHeaderError.reason}):

  - C{not-proxy-protocol}: the input starts with neither C{PROXY} nor the
    12-byte v2 signature (rejected at the first byte that differs).
  - C{v1-bad-character}: a byte outside printable US-ASCII (other than the
    final CRLF), anywhere in the line, including after C{UNKNOWN}.
  - C{v1-bad-crlf}: a LF not preceded by CR, or a CR not followed by LF.
  - C{v1-too-long}: no CRLF within the first 107 bytes.
  - C{v1-bad-syntax}: anything but exactly one space between fields, or too
    few or too many fields.
  - C{v1-bad-family}: a protocol word other than TCP4, TCP6 or UNKNOWN.
  - C{v1-bad-address}: an address that is not in the strict form of its
    family: dotted decimal with four octets 0-255 and no leading zeros for
    TCP4; the RFC 4291 section 2.2 text form for TCP6 (full 128 bits, C{::}
    at most once, hex groups of 1-4 digits, an optional dotted IPv4 tail,
    no zone id).
  - C{v1-bad-port}: a port that is not decimal 0-65535 without leading
    zeros or sign.
  - C{v2-bad-version}: the version nibble is not 2.
  - C{v2-bad-command}: the command nibble is neither 0 (LOCAL) nor 1 (PROXY).
  - C{v2-bad-family}: on a PROXY header, a family/transport byte the spec
    does not define (anything but 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32).
  - C{v2-dgram-not-supported}: a PROXY header for a datagram transport (0x12,
    0x22, 0x32): the connection being served is a TCP stream, so the header
    cannot describe it.
  - C{v2-unix-not-supported}: a PROXY header for a UNIX stream (0x31): it has
    no network client address to log, filter on or put in
    X-Forwarded-For, and treating it as "unknown" would hide a
    misconfigured load balancer.
  - C{v2-too-long}: the length field exceeds the configured cap (rejected as
    soon as the 16 fixed bytes are in, before waiting for the rest).
  - C{v2-short-address-block}: the length field does not cover the address
    block of a PROXY header's family (also rejected after 16 bytes).
  - C{v2-tlv-overrun}: a TLV's length runs past the end of the header.
  - C{v2-tlv-truncated}: one or two bytes left after the last TLV, too few
    for a TLV's type and length.
  - C{v2-bad-tlv}: a TLV of a type this parser knows, of the wrong size or
    layout: CRC32C not 4 bytes, UNIQUE_ID over 128 bytes, SSL shorter than
    5 bytes or with sub-TLVs that overrun it or leave stray bytes.  Vendor
    TLVs (0xE0-0xEF) never cause it: see below.
  - C{v2-authority-too-long}: an AUTHORITY TLV over 255 bytes, which cannot
    be a host name (RFC 1035 section 2.3.4 bounds one to 255 octets).
  - C{v2-crc-mismatch}: the CRC32C TLV does not match the header.

Decisions beyond the letter of the specification:

  - PROXY with family 0x00 (UNSPEC) is accepted without addresses; the
    connection's own endpoints apply (section 2.2 lets the receiver choose).
  - LOCAL is accepted whatever the family byte, and exactly C{length} bytes
    are skipped (section 2.2: "discard the protocol block including the
    family").  The family is reported when it is a defined value, else
    UNSPEC; source and destination are C{None}.
  - Where the address block's layout is unknown (LOCAL, and PROXY UNSPEC) the
    TLVs are parsed on a best-effort basis: first from the start of the
    block, which is where an AWS NLB puts them in its LOCAL TCP4 health
    checks (CRC32C + NOOP, no addresses); failing that, after an address
    block of the announced family, if one fits.  If neither parses, the
    header is still accepted with C{tlvs=()} and no TLV fields.  If the
    parse that succeeded holds a CRC32C TLV, it is verified and a mismatch
    rejects the header: a checksum that does not match means corruption
    whatever the command.  Address bytes that happen to read as TLVs are
    reported as such, so nothing should act on these TLVs beyond logging.
  - PROXY headers for TCP4 and TCP6 have their TLVs parsed strictly.
  - Address values are not judged (0.0.0.0, multicast, port 0 all pass):
    which peers to believe is policy for the layer above.  IPv4-mapped IPv6
    addresses stay IPv6 (family TCP6); unwrapping them is also left to it.
  - The bytes of an C{UNKNOWN} line after the family are ignored, but must
    still be printable ASCII.
  - The 107-byte bound holds for every v1 line, so a TCP6 line whose two
    addresses are both written long with dotted IPv4 tails (up to 45
    characters each, which section 2.1's arithmetic does not count) is
    rejected as C{v1-too-long}.
  - Vendor TLVs (0xE0-0xEF) are decoded only when their value has the
    layout of the cloud that registered the type: AWS (0xEA) subtype 0x01
    and a non-empty printable ASCII VPC endpoint id, Azure (0xEE) subtype
    0x01 and a 4-byte link id, GCP (0xE0) an 8-byte connection id.  The
    specification reserves the range for applications, and load balancers
    other than those clouds' put their own data there (haproxy's
    C{set-proxy-v2-tlv-fmt}), so any other value is kept in C{tlvs} as
    received and the header is accepted.  Types nobody registered are kept
    the same way.
  - Repeated TLVs are accepted, as the specification does not forbid them:
    the first one of a type gives the decoded field (haproxy's choice: its
    lookup returns the first match; for a vendor type, the first with the
    vendor's layout), later ones stay in C{tlvs}.  Each one
    of a type with a layout must still have that layout; for CRC32C the
    first is the checksum verified, and later ones are bytes it covers.  A
    repeated SSL sub-TLV likewise yields its first value.  The reason code
    C{v2-duplicate-tlv} is retired (L{RETIRED_REASON_CODES}).
  - TLV values are stored as received.  The length cap
    (L{DEFAULT_MAX_V2_LENGTH} by default) bounds their total size and count.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Final

from ._crc32c import crc32c
from ._header import (
    TLV,
    Address,
    Command,
    Family,
    ProxyHeader,
    ProxyHeaderError,
    SSLInfo,
)

# --- Limits -----------------------------------------------------------------

# Section 2.1: the longest valid v1 line ("PROXY UNKNOWN" with two full IPv6
# addresses and ports), CRLF included.
V1_MAX_LENGTH: Final = 107
# The cap on v2's 16-bit length field unless the caller sets another one.
# Real headers are tens of bytes; a TLS client certificate in the SSL TLV is
# the only large item, and 4 KiB leaves room for one.
DEFAULT_MAX_V2_LENGTH: Final = 4096
# Section 2.2.5.
UNIQUE_ID_MAX_LENGTH: Final = 128
# AUTHORITY carries a host name (section 2.2.2), at most 255 octets (RFC 1035
# section 2.3.4).
AUTHORITY_MAX_LENGTH: Final = 255
# How many peer bytes an error detail quotes.
QUOTED_BYTES_MAX: Final = 24

# --- Version 1 (section 2.1) ---------------------------------------------------

V1_KEYWORD: Final = "PROXY"
V1_FAMILIES: Final = {"TCP4": Family.TCP4, "TCP6": Family.TCP6, "UNKNOWN": Family.UNSPEC}
_CR: Final = 0x0D
_LF: Final = 0x0A
_SPACE: Final = 0x20
_PRINTABLE_FIRST: Final = 0x20
_PRINTABLE_LAST: Final = 0x7E
_DECIMAL_DIGITS: Final = frozenset("0123456789")
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_IPV4_OCTET_COUNT: Final = 4
_IPV4_OCTET_MAX: Final = 255
_IPV6_GROUP_COUNT: Final = 8
_IPV6_GROUP_MAX_DIGITS: Final = 4
# RFC 4291 section 2.2: a dotted IPv4 tail stands for the last two groups.
_IPV6_GROUPS_IN_IPV4_TAIL: Final = 2
_PORT_MAX: Final = 65535

# --- Version 2 (section 2.2) ---------------------------------------------------

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16
_V2_VERSION_COMMAND_OFFSET: Final = 12
_V2_FAMILY_OFFSET: Final = 13
_V2_LENGTH_OFFSET: Final = 14
# Bytes 13 and 14 each hold two 4-bit fields: version and command, then
# address family and transport.
_NIBBLE_BITS: Final = 4
_LOW_NIBBLE: Final = 0x0F
_V2_VERSION: Final = 0x2
_TRANSPORT_DGRAM: Final = 0x2
_FAMILY_UNIX: Final = 0x3
# Address block sizes: two addresses, then two 16-bit ports for IP.
_ADDRESS_BLOCK_LENGTH: Final = {
    Family.UNSPEC: 0,
    Family.TCP4: 12,
    Family.UDP4: 12,
    Family.TCP6: 36,
    Family.UDP6: 36,
    Family.UNIX: 216,
    Family.UNIX_DGRAM: 216,
}
_FAMILY_VALUES: Final = frozenset(family.value for family in Family)
_FAMILY_BY_BYTE: Final = {family.value: family for family in Family}
_IPV4_ADDRESS_LENGTH: Final = 4
_IPV6_ADDRESS_LENGTH: Final = 16
_PORT_LENGTH: Final = 2

_TLV_HEADER_LENGTH: Final = 3
TLV_TYPE_ALPN: Final = 0x01
TLV_TYPE_AUTHORITY: Final = 0x02
TLV_TYPE_CRC32C: Final = 0x03
TLV_TYPE_NOOP: Final = 0x04
TLV_TYPE_UNIQUE_ID: Final = 0x05
TLV_TYPE_SSL: Final = 0x20
TLV_TYPE_NETNS: Final = 0x30
TLV_TYPE_GCP: Final = 0xE0
TLV_TYPE_AWS: Final = 0xEA
TLV_TYPE_AZURE: Final = 0xEE
_CRC32C_LENGTH: Final = 4
_GCP_PSC_CONNECTION_ID_LENGTH: Final = 8
_AWS_SUBTYPE_VPCE_ID: Final = 0x01
_AZURE_SUBTYPE_LINK_ID: Final = 0x01
_AZURE_LINK_ID_LENGTH: Final = 4
_VENDOR_SUBTYPE_LENGTH: Final = 1
# Section 2.2.7: types reserved for application-specific data.
TLV_TYPE_VENDOR_FIRST: Final = 0xE0
TLV_TYPE_VENDOR_LAST: Final = 0xEF
# Section 2.2.6: one byte of client flags, then the 32-bit verify result.
_SSL_FIXED_LENGTH: Final = 5
SSL_SUBTYPE_VERSION: Final = 0x21
SSL_SUBTYPE_CN: Final = 0x22
SSL_SUBTYPE_CIPHER: Final = 0x23
SSL_SUBTYPE_SIG_ALG: Final = 0x24
SSL_SUBTYPE_KEY_ALG: Final = 0x25
SSL_SUBTYPE_GROUP: Final = 0x26
SSL_SUBTYPE_SIG_SCHEME: Final = 0x27
SSL_SUBTYPE_CLIENT_CERT: Final = 0x28

_SSL_SUBTYPE_FIELDS: Final = {
    SSL_SUBTYPE_VERSION: "version",
    SSL_SUBTYPE_CN: "cn",
    SSL_SUBTYPE_CIPHER: "cipher",
    SSL_SUBTYPE_SIG_ALG: "sig_alg",
    SSL_SUBTYPE_KEY_ALG: "key_alg",
    SSL_SUBTYPE_GROUP: "group",
    SSL_SUBTYPE_SIG_SCHEME: "sig_scheme",
    SSL_SUBTYPE_CLIENT_CERT: "client_cert",
}


def _quote(data: bytes | bytearray | str) -> str:
    """
    Render peer bytes as printable ASCII for an error detail, bounded.
    """
    # Field texts are built with chr() of received bytes, so latin-1 gives
    # the bytes back.
    raw = data.encode("latin-1") if isinstance(data, str) else bytes(data)
    shown = raw[:QUOTED_BYTES_MAX]
    text = "".join(
        (
            chr(byte)
            if _PRINTABLE_FIRST <= byte <= _PRINTABLE_LAST and byte not in b"\\'"
            else f"\\x{byte:02x}"
        )
        for byte in shown
    )
    ellipsis = "..." if len(raw) > QUOTED_BYTES_MAX else ""
    return f"'{text}{ellipsis}'"


# --- Version 1 field checks ----------------------------------------------------
#
# The address and family checks take a field's text and whether the field is
# complete.  For an incomplete field they answer whether some continuation
# could still be valid, which is what lets a line be rejected at its first
# wrong byte.  They return a description of the problem, or None.


def _family_problem(text: str, complete: bool) -> str | None:
    if complete:
        valid = text in V1_FAMILIES
    else:
        valid = any(name.startswith(text) for name in V1_FAMILIES)
    if not valid:
        return f"protocol must be TCP4, TCP6 or UNKNOWN, got {_quote(text)}"
    return None


def _decimal_problem(digits: str, maximum: int) -> str | None:
    if not _DECIMAL_DIGITS.issuperset(digits):
        return "not decimal digits"
    # Section 2.1: "heading zeroes are not permitted", to rule out octal.
    if len(digits) > 1 and digits[0] == "0":
        return "leading zero"
    if digits and int(digits) > maximum:
        return f"greater than {maximum}"
    return None


def _ipv4_problem(text: str, complete: bool) -> str | None:
    octets = text.split(".")
    if len(octets) > _IPV4_OCTET_COUNT:
        return f"more than {_IPV4_OCTET_COUNT} octets"
    for index, octet in enumerate(octets):
        still_open = not complete and index == len(octets) - 1
        if not octet and not still_open:
            return "empty octet"
        problem = _decimal_problem(octet, _IPV4_OCTET_MAX)
        if problem:
            return f"octet {_quote(octet)}: {problem}"
    if complete and len(octets) != _IPV4_OCTET_COUNT:
        return f"fewer than {_IPV4_OCTET_COUNT} octets"
    return None


def _ipv6_problem(text: str, complete: bool) -> str | None:
    if not complete and text == ":":
        return None  # the start of "::"
    if ":::" in text:
        return "':::' is not allowed"
    halves = text.split("::")
    if len(halves) > 2:
        return "'::' may appear only once"
    compressed = len(halves) == 2
    groups = [group for half in halves if half for group in half.split(":")]
    group_count = 0
    for index, group in enumerate(groups):
        is_last = index == len(groups) - 1
        still_open = not complete and is_last
        if "." in group:
            if not is_last:
                return "a dotted IPv4 part must come last"
            problem = _ipv4_problem(group, complete)
            if problem:
                return f"IPv4 part: {problem}"
            group_count += _IPV6_GROUPS_IN_IPV4_TAIL
            continue
        if not group and not still_open:
            return "empty group"
        if not _HEX_DIGITS.issuperset(group):
            return f"group {_quote(group)} is not hexadecimal"
        if len(group) > _IPV6_GROUP_MAX_DIGITS:
            return f"group {_quote(group)} has more than {_IPV6_GROUP_MAX_DIGITS} digits"
        group_count += 1
    # '::' stands for at least one group of zeros.
    room = _IPV6_GROUP_COUNT - 1 if compressed else _IPV6_GROUP_COUNT
    if group_count > room:
        return "more than 128 bits"
    # Nothing can follow a dotted tail, so the count is final once one starts.
    ends_with_ipv4 = bool(groups) and "." in groups[-1]
    if not compressed and (complete or ends_with_ipv4) and group_count != room:
        return "fewer than 128 bits"
    return None


_V1_WHOLE_LINE_FAMILIES: Final = {
    b"TCP4": (Family.TCP4, ipaddress.IPv4Address),
    b"TCP6": (Family.TCP6, ipaddress.IPv6Address),
}
_V1_WHOLE_LINE_FIELDS: Final = 6


# Section 2.1's TCP4 line, whole: octets 0-255 and ports 0-65535, each
# without leading zeros (the port range's upper end is checked after).
_OCTET: Final = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_TEXT: Final = _OCTET + rb"(?:\." + _OCTET + rb"){3}"
_PORT_TEXT: Final = rb"(?:0|[1-9][0-9]{0,4})"
_WHOLE_TCP4_LINE: Final = re.compile(
    rb"PROXY TCP4 (" + _IPV4_TEXT + rb") (" + _IPV4_TEXT + rb") (" + _PORT_TEXT + rb") ("
    + _PORT_TEXT + rb")"
)


def _whole_v1_line(line: bytes) -> ProxyHeader | None:
    """
    The header of a complete TCP4/TCP6 line (without its CRLF) that passes
    every check, or C{None} when it does not (or is UNKNOWN): the byte
    scanner then decides, and names the fault.
    """
    tcp4 = _WHOLE_TCP4_LINE.fullmatch(line)
    if tcp4 is not None:
        source, destination, source_port, destination_port = tcp4.groups()
        if int(source_port) > _PORT_MAX or int(destination_port) > _PORT_MAX:
            return None
        # Text that matches is already the canonical dotted quad.
        return ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=Family.TCP4,
            source=Address(source.decode("ascii"), int(source_port)),
            destination=Address(destination.decode("ascii"), int(destination_port)),
            length=len(line) + 2,
        )
    fields = line.split(b" ")
    if len(fields) != _V1_WHOLE_LINE_FIELDS or fields[0] != V1_KEYWORD.encode("ascii"):
        return None
    family_and_type = _V1_WHOLE_LINE_FAMILIES.get(fields[1])
    if family_and_type is None:
        return None
    family, address_type = family_and_type
    address_problem = _ipv4_problem if family is Family.TCP4 else _ipv6_problem
    try:
        source, destination, source_port, destination_port = (f.decode("ascii") for f in fields[2:])
    except UnicodeDecodeError:
        return None
    if (
        not source_port
        or not destination_port
        or _decimal_problem(source_port, _PORT_MAX)
        or _decimal_problem(destination_port, _PORT_MAX)
        or not source
        or not destination
        or address_problem(source, True)
        or address_problem(destination, True)
    ):
        return None
    return ProxyHeader(
        version=1,
        command=Command.PROXY,
        family=family,
        source=Address(str(address_type(source)), int(source_port)),
        destination=Address(str(address_type(destination)), int(destination_port)),
        length=len(line) + 2,
    )


class _V1Field(enum.IntEnum):
    KEYWORD = 0
    FAMILY = 1
    SOURCE_ADDRESS = 2
    DESTINATION_ADDRESS = 3
    SOURCE_PORT = 4
    DESTINATION_PORT = 5


class _V1LineState(enum.Enum):
    READING_FIELD = "reading-field"
    IGNORING_REST = "ignoring-rest"  # after UNKNOWN (section 2.1)
    AWAITING_LF = "awaiting-lf"
    COMPLETE = "complete"


_V1_FIELD_NAMES: Final = {
    _V1Field.KEYWORD: "keyword",
    _V1Field.FAMILY: "protocol",
    _V1Field.SOURCE_ADDRESS: "source address",
    _V1Field.DESTINATION_ADDRESS: "destination address",
    _V1Field.SOURCE_PORT: "source port",
    _V1Field.DESTINATION_PORT: "destination port",
}


class _V1LineScanner:
    """
    Reads a v1 line one byte at a time, checking each byte as it arrives.

    Work and memory are bounded by L{V1_MAX_LENGTH}: the scanner stops at the
    CRLF or fails at byte 107.
    """

    def __init__(self) -> None:
        self._state = _V1LineState.READING_FIELD
        self._field = _V1Field.KEYWORD
        self._text = ""
        self._fields: list[str] = []
        self._length = 0
        self._whole_line_header: ProxyHeader | None = None

    def scan(self, buffer: bytearray) -> int | None:
        """
        Consume the bytes of C{buffer} not seen yet.

        @return: the line's length once its CRLF is in, else C{None}.
        @raise ProxyHeaderError: at the first byte that makes the line invalid.
        """
        if self._length == 0:
            # The usual case: the whole line came in one read.  A line that
            # passes every check at once needs no byte-by-byte scan; any
            # other goes through the scanner, which names its exact fault.
            end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
            if end != -1:
                header = _whole_v1_line(bytes(buffer[:end]))
                if header is not None:
                    self._whole_line_header = header
                    self._length = end + 2
                    self._state = _V1LineState.COMPLETE
                    return self._length
        while self._state is not _V1LineState.COMPLETE and self._length < len(buffer):
            self._consume(buffer[self._length])
        return self._length if self._state is _V1LineState.COMPLETE else None

    def header(self) -> ProxyHeader:
        if self._whole_line_header is not None:
            return self._whole_line_header
        family = V1_FAMILIES[self._fields[_V1Field.FAMILY]]
        if family is Family.UNSPEC:
            return ProxyHeader(
                version=1,
                command=Command.PROXY,
                family=family,
                source=None,
                destination=None,
                length=self._length,
            )
        address_type = ipaddress.IPv4Address if family is Family.TCP4 else ipaddress.IPv6Address
        source = Address(
            str(address_type(self._fields[_V1Field.SOURCE_ADDRESS])),
            int(self._fields[_V1Field.SOURCE_PORT]),
        )
        destination = Address(
            str(address_type(self._fields[_V1Field.DESTINATION_ADDRESS])),
            int(self._fields[_V1Field.DESTINATION_PORT]),
        )
        return ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=family,
            source=source,
            destination=destination,
            length=self._length,
        )

    def _consume(self, byte: int) -> None:
        self._length += 1
        if self._state is _V1LineState.AWAITING_LF:
            if byte != _LF:
                raise ProxyHeaderError(
                    "v1-bad-crlf", f"CR not followed by LF (got {_quote(bytes([byte]))})"
                )
            self._state = _V1LineState.COMPLETE
            return
        if self._field is _V1Field.KEYWORD:
            # Until "PROXY" is complete the input may be another protocol
            # altogether, so every mismatch means "not PROXY protocol".
            self._consume_keyword_byte(byte)
        elif byte == _LF:
            raise ProxyHeaderError("v1-bad-crlf", "LF without CR before it")
        elif byte == _CR:
            self._end_line()
        elif not _PRINTABLE_FIRST <= byte <= _PRINTABLE_LAST:
            raise ProxyHeaderError(
                "v1-bad-character",
                f"byte {_quote(bytes([byte]))} at offset {self._length - 1} "
                "is not printable US-ASCII",
            )
        elif self._state is _V1LineState.IGNORING_REST:
            pass
        elif byte == _SPACE:
            self._end_field()
        else:
            self._text += chr(byte)
            self._check_field(complete=False)
        # Section 2.1: the CRLF must be found within the first 107 bytes.
        if self._length >= V1_MAX_LENGTH and self._state is not _V1LineState.COMPLETE:
            raise ProxyHeaderError("v1-too-long", f"no CRLF within the first {V1_MAX_LENGTH} bytes")

    def _consume_keyword_byte(self, byte: int) -> None:
        if byte == _SPACE and self._text == V1_KEYWORD:
            self._end_field()
            return
        candidate = self._text + chr(byte)
        if len(candidate) > len(V1_KEYWORD) and candidate.startswith(V1_KEYWORD):
            raise ProxyHeaderError(
                "v1-bad-syntax",
                f"expected a space after {V1_KEYWORD!r}, got {_quote(bytes([byte]))}",
            )
        if not V1_KEYWORD.startswith(candidate):
            raise ProxyHeaderError(
                "not-proxy-protocol", f"expected {V1_KEYWORD!r}, got {_quote(candidate)}"
            )
        self._text = candidate

    def _check_field(self, complete: bool) -> None:
        name = _V1_FIELD_NAMES[self._field]
        if complete and not self._text:
            # Two spaces in a row, or a space before CRLF: section 2.1 asks
            # for exactly one space between fields.
            raise ProxyHeaderError("v1-bad-syntax", f"empty {name}: fields take exactly one space")
        if self._field is _V1Field.FAMILY:
            reason, problem = "v1-bad-family", _family_problem(self._text, complete)
        elif self._field in (_V1Field.SOURCE_ADDRESS, _V1Field.DESTINATION_ADDRESS):
            family = V1_FAMILIES[self._fields[_V1Field.FAMILY]]
            address_problem = _ipv4_problem if family is Family.TCP4 else _ipv6_problem
            reason, problem = "v1-bad-address", address_problem(self._text, complete)
            if problem:
                problem = f"{family.name} {name} {_quote(self._text)}: {problem}"
        else:
            reason, problem = "v1-bad-port", _decimal_problem(self._text, _PORT_MAX)
            if problem:
                problem = f"{name} {_quote(self._text)}: {problem}"
        if problem:
            raise ProxyHeaderError(reason, problem)

    def _end_field(self) -> None:
        if self._field is not _V1Field.KEYWORD:
            self._check_field(complete=True)
        self._fields.append(self._text)
        self._text = ""
        if self._fields[-1] == "UNKNOWN" and self._field is _V1Field.FAMILY:
            self._state = _V1LineState.IGNORING_REST
        elif self._field is _V1Field.DESTINATION_PORT:
            raise ProxyHeaderError("v1-bad-syntax", "extra field after the destination port")
        else:
            self._field = _V1Field(self._field + 1)

    def _end_line(self) -> None:
        if self._state is _V1LineState.READING_FIELD:
            self._check_field(complete=True)
            self._fields.append(self._text)
            self._text = ""
            ends_unknown = self._field is _V1Field.FAMILY and self._fields[-1] == "UNKNOWN"
            if not ends_unknown and self._field is not _V1Field.DESTINATION_PORT:
                raise ProxyHeaderError(
                    "v1-bad-syntax",
                    f"line ends after the {_V1_FIELD_NAMES[self._field]}",
                )
        self._state = _V1LineState.AWAITING_LF


# --- Version 2 TLVs (section 2.2) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TLVSpan:
    type: int
    value_start: int
    value_end: int


@dataclass(slots=True)
class _TLVFields:
    tlvs: tuple[TLV, ...] = ()
    alpn: bytes | None = None
    authority: bytes | None = None
    unique_id: bytes | None = None
    netns: bytes | None = None
    ssl: SSLInfo | None = None
    aws_vpce_id: bytes | None = None
    azure_link_id: int | None = None
    gcp_psc_connection_id: int | None = None


def _split_tlvs(header: bytes, start: int) -> list[_TLVSpan]:
    """
    Find the TLVs between C{start} and the end of C{header}.

    Bounds come from the header's own length field (the end of C{header}),
    never from how much was read; the loop is iterative.
    """
    spans = []
    position = start
    end = len(header)
    while position < end:
        if end - position < _TLV_HEADER_LENGTH:
            raise ProxyHeaderError(
                "v2-tlv-truncated",
                f"{end - position} stray byte(s) after the last TLV, at offset {position}",
            )
        tlv_type = header[position]
        value_start = position + _TLV_HEADER_LENGTH
        value_end = value_start + int.from_bytes(header[position + 1 : value_start], "big")
        if value_end > end:
            raise ProxyHeaderError(
                "v2-tlv-overrun",
                f"TLV type 0x{tlv_type:02x} at offset {position} claims "
                f"{value_end - value_start} bytes, {end - value_start} remain",
            )
        spans.append(_TLVSpan(tlv_type, value_start, value_end))
        position = value_end
    return spans


def _find_crc32c(spans: list[_TLVSpan]) -> int | None:
    """
    Return where the CRC32C value is in the header, if there is one.
    """
    crc_spans = [span for span in spans if span.type == TLV_TYPE_CRC32C]
    for span in crc_spans:
        if span.value_end - span.value_start != _CRC32C_LENGTH:
            raise ProxyHeaderError(
                "v2-bad-tlv",
                f"CRC32C TLV is {span.value_end - span.value_start} bytes, "
                f"must be {_CRC32C_LENGTH}",
            )
    # The first one is the checksum; any later one is covered by it.
    return crc_spans[0].value_start if crc_spans else None


def _verify_crc32c(header: bytes, value_offset: int) -> None:
    """
    Section 2.2.3: checksum the whole header with the CRC32C value zeroed.
    """
    value_end = value_offset + _CRC32C_LENGTH
    received = int.from_bytes(header[value_offset:value_end], "big")
    computed = crc32c(header[:value_offset] + bytes(_CRC32C_LENGTH) + header[value_end:])
    if computed != received:
        raise ProxyHeaderError(
            "v2-crc-mismatch",
            f"CRC32C TLV says 0x{received:08x}, the header's checksum is 0x{computed:08x}",
        )


def _interpret_ssl(value: bytes) -> SSLInfo:
    if len(value) < _SSL_FIXED_LENGTH:
        raise ProxyHeaderError(
            "v2-bad-tlv", f"SSL TLV is {len(value)} bytes, needs at least {_SSL_FIXED_LENGTH}"
        )
    known: dict[str, bytes] = {}
    sub_tlvs = []
    # One level of sub-TLVs, read with a loop: never recurse on peer data.
    position = _SSL_FIXED_LENGTH
    while position < len(value):
        if len(value) - position < _TLV_HEADER_LENGTH:
            raise ProxyHeaderError(
                "v2-bad-tlv", f"{len(value) - position} stray byte(s) after the last SSL sub-TLV"
            )
        subtype = value[position]
        sub_start = position + _TLV_HEADER_LENGTH
        sub_end = sub_start + int.from_bytes(value[position + 1 : sub_start], "big")
        if sub_end > len(value):
            raise ProxyHeaderError(
                "v2-bad-tlv", f"SSL sub-TLV 0x{subtype:02x} runs past the end of the SSL TLV"
            )
        sub_value = value[sub_start:sub_end]
        sub_tlvs.append(TLV(subtype, sub_value))
        name = _SSL_SUBTYPE_FIELDS.get(subtype)
        if name is not None:
            # The first of a repeated sub-TLV wins, as for TLVs.
            known.setdefault(name, sub_value)
        position = sub_end
    return SSLInfo(
        client=value[0],
        verify=int.from_bytes(value[1:_SSL_FIXED_LENGTH], "big"),
        tlvs=tuple(sub_tlvs),
        **known,
    )


def _aws_vpce_id(value: bytes) -> bytes | None:
    """
    The VPC endpoint id, if C{value} has AWS's layout: subtype 0x01, then the
    id as US-ASCII text ("vpce-...").
    """
    if len(value) <= _VENDOR_SUBTYPE_LENGTH or value[0] != _AWS_SUBTYPE_VPCE_ID:
        return None
    payload = value[_VENDOR_SUBTYPE_LENGTH:]
    if not all(_PRINTABLE_FIRST <= byte <= _PRINTABLE_LAST for byte in payload):
        return None
    return payload


def _azure_link_id(value: bytes) -> int | None:
    """
    The link id, if C{value} has Azure's layout: subtype 0x01, then a
    little-endian 32-bit integer.
    """
    if (
        len(value) != _VENDOR_SUBTYPE_LENGTH + _AZURE_LINK_ID_LENGTH
        or value[0] != _AZURE_SUBTYPE_LINK_ID
    ):
        return None
    return int.from_bytes(value[_VENDOR_SUBTYPE_LENGTH:], "little")


def _gcp_psc_connection_id(value: bytes) -> int | None:
    """
    The connection id, if C{value} has Google Cloud's layout: a big-endian
    64-bit integer.
    """
    if len(value) != _GCP_PSC_CONNECTION_ID_LENGTH:
        return None
    return int.from_bytes(value, "big")


def _interpret_tlvs(header: bytes, spans: list[_TLVSpan]) -> _TLVFields:
    fields = _TLVFields()
    tlvs = []
    for span in spans:
        tlv_type = span.type
        value = header[span.value_start : span.value_end]
        tlvs.append(TLV(tlv_type, value))
        # Every TLV of a type with a layout is checked; the first of a type
        # gives the field (see "Repeated TLVs" above).
        if tlv_type == TLV_TYPE_ALPN:
            if fields.alpn is None:
                fields.alpn = value
        elif tlv_type == TLV_TYPE_AUTHORITY:
            if len(value) > AUTHORITY_MAX_LENGTH:
                raise ProxyHeaderError(
                    "v2-authority-too-long",
                    f"AUTHORITY TLV is {len(value)} bytes, "
                    f"a host name is at most {AUTHORITY_MAX_LENGTH}",
                )
            if fields.authority is None:
                fields.authority = value
        elif tlv_type == TLV_TYPE_UNIQUE_ID:
            if len(value) > UNIQUE_ID_MAX_LENGTH:
                raise ProxyHeaderError(
                    "v2-bad-tlv",
                    f"UNIQUE_ID TLV is {len(value)} bytes, at most {UNIQUE_ID_MAX_LENGTH} allowed",
                )
            if fields.unique_id is None:
                fields.unique_id = value
        elif tlv_type == TLV_TYPE_SSL:
            ssl = _interpret_ssl(value)
            if fields.ssl is None:
                fields.ssl = ssl
        elif tlv_type == TLV_TYPE_NETNS:
            if fields.netns is None:
                fields.netns = value
        # Vendor types: decoded only when the layout matches, else kept raw.
        elif tlv_type == TLV_TYPE_AWS:
            if fields.aws_vpce_id is None:
                fields.aws_vpce_id = _aws_vpce_id(value)
        elif tlv_type == TLV_TYPE_AZURE:
            if fields.azure_link_id is None:
                fields.azure_link_id = _azure_link_id(value)
        elif tlv_type == TLV_TYPE_GCP:
            if fields.gcp_psc_connection_id is None:
                fields.gcp_psc_connection_id = _gcp_psc_connection_id(value)
        # NOOP is padding (2.2.4); CRC32C was checked already; other types are
        # kept raw and otherwise ignored (section 2.2).
    fields.tlvs = tuple(tlvs)
    return fields


def _strict_tlvs(header: bytes, start: int) -> _TLVFields:
    spans = _split_tlvs(header, start)
    crc_offset = _find_crc32c(spans)
    if crc_offset is not None:
        # Checked before the other TLVs: if the header was corrupted, say so.
        _verify_crc32c(header, crc_offset)
    return _interpret_tlvs(header, spans)


def _best_effort_tlvs(header: bytes, starts: list[int]) -> _TLVFields:
    for start in starts:
        try:
            spans = _split_tlvs(header, start)
            crc_offset = _find_crc32c(spans)
            fields = _interpret_tlvs(header, spans)
        except ProxyHeaderError:
            continue
        if crc_offset is not None:
            _verify_crc32c(header, crc_offset)
        return fields
    return _TLVFields()


def _address_text(family: Family, packed: bytes) -> str:
    # inet_ntop writes IPv4 exactly as ipaddress does, in C; IPv6 keeps
    # ipaddress's form (it differs for IPv4-mapped addresses).
    if family is Family.TCP4:
        return socket.inet_ntop(socket.AF_INET, packed)
    return str(ipaddress.IPv6Address(packed))


def _decode_v2(header: bytes, command: Command, family_byte: int) -> ProxyHeader:
    """
    Decode a complete v2 header whose 16 fixed bytes were already checked.
    """
    body_start = V2_FIXED_LENGTH
    family = _FAMILY_BY_BYTE.get(family_byte, Family.UNSPEC)
    source = destination = None
    if command is Command.PROXY and family in (Family.TCP4, Family.TCP6):
        address_length = _IPV4_ADDRESS_LENGTH if family is Family.TCP4 else _IPV6_ADDRESS_LENGTH
        ports_start = body_start + 2 * address_length
        source_port = int.from_bytes(header[ports_start : ports_start + _PORT_LENGTH], "big")
        destination_port = int.from_bytes(
            header[ports_start + _PORT_LENGTH : ports_start + 2 * _PORT_LENGTH], "big"
        )
        source = Address(
            _address_text(family, header[body_start : body_start + address_length]), source_port
        )
        destination = Address(
            _address_text(family, header[body_start + address_length : ports_start]),
            destination_port,
        )
        fields = _strict_tlvs(header, body_start + _ADDRESS_BLOCK_LENGTH[family])
    else:
        starts = [body_start]
        address_block_length = _ADDRESS_BLOCK_LENGTH[family]
        if address_block_length and body_start + address_block_length <= len(header):
            starts.append(body_start + address_block_length)
        fields = _best_effort_tlvs(header, starts)
    return ProxyHeader(
        version=2,
        command=command,
        family=family,
        source=source,
        destination=destination,
        tlvs=fields.tlvs,
        alpn=fields.alpn,
        authority=fields.authority,
        unique_id=fields.unique_id,
        netns=fields.netns,
        ssl=fields.ssl,
        aws_vpce_id=fields.aws_vpce_id,
        azure_link_id=fields.azure_link_id,
        gcp_psc_connection_id=fields.gcp_psc_connection_id,
        length=len(header),
    )


def _check_proxy_family(family_byte: int) -> None:
    """
    Decide whether a PROXY command's family/transport byte is acceptable.
    """
    if family_byte not in _FAMILY_VALUES:
        raise ProxyHeaderError(
            "v2-bad-family", f"undefined family/transport byte 0x{family_byte:02x}"
        )
    if family_byte & _LOW_NIBBLE == _TRANSPORT_DGRAM:
        raise ProxyHeaderError(
            "v2-dgram-not-supported",
            f"family/transport 0x{family_byte:02x} is a datagram transport; "
            "this connection is a TCP stream",
        )
    if family_byte >> _NIBBLE_BITS == _FAMILY_UNIX:
        raise ProxyHeaderError(
            "v2-unix-not-supported",
            "family/transport 0x31 (UNIX stream) carries no network client address",
        )


# --- Recognising a header where none is expected -------------------------------

_V1_START: Final = (V1_KEYWORD + " ").encode("ascii")
# No TLS record (0x14-0x17) and no HTTP method starts like either of these.
_HEADER_STARTS: Final = (_V1_START, V2_SIGNATURE)
# The most bytes starts_with_header() needs to decide.
HEADER_START_MAX_LENGTH: Final = max(len(start) for start in _HEADER_STARTS)


def starts_with_header(data: bytes | bytearray) -> bool | None:
    """
    Whether C{data}, the first bytes of a connection that must not carry a
    PROXY header, begins with one anyway (C{"PROXY "} or the v2 signature).

    This is for refusing a header that arrives from a source exempt from
    sending one, never for deciding whether to parse one.

    @return: C{True} or C{False}, or C{None} while C{data} is too short to
        tell (at most L{HEADER_START_MAX_LENGTH} bytes decide).
    """
    undecided = False
    for start in _HEADER_STARTS:
        length = min(len(data), len(start))
        if data[:length] == start[:length]:
            if length == len(start):
                return True
            undecided = True
    return None if undecided else False


# --- The parser -----------------------------------------------------------------


class _Phase(enum.Enum):
    __hash__ = object.__hash__  # see Family

    DETECTING = "detecting"
    V1_LINE = "v1-line"
    V2_FIXED_PART = "v2-fixed-part"
    V2_BODY = "v2-body"
    COMPLETE = "complete"
    FAILED = "failed"


_TRANSITIONS: Final = {
    _Phase.DETECTING: frozenset({_Phase.V1_LINE, _Phase.V2_FIXED_PART, _Phase.FAILED}),
    _Phase.V1_LINE: frozenset({_Phase.COMPLETE, _Phase.FAILED}),
    _Phase.V2_FIXED_PART: frozenset({_Phase.V2_BODY, _Phase.FAILED}),
    _Phase.V2_BODY: frozenset({_Phase.COMPLETE, _Phase.FAILED}),
    _Phase.COMPLETE: frozenset(),
    _Phase.FAILED: frozenset(),
}
_V1_FIRST_BYTE: Final = ord("P")


class ProxyHeaderParser:
    """
    Parse one PROXY header (either version) from the start of a connection.

    Feed it the connection's bytes as they arrive until it returns a result
    or raises; it handles exactly one header, and anything after it is the
    application's.

    @ivar max_v2_length: the largest v2 length field accepted.
    """

    def __init__(self, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        """
        @param max_v2_length: the cap on the v2 length field, so a v2 header
            is at most C{16 + max_v2_length} bytes.  Values above 65535 are
            allowed and mean "no cap beyond the field's own".
        @raise ValueError: if C{max_v2_length} is negative.
        """
        if isinstance(max_v2_length, bool) or not isinstance(max_v2_length, int):
            raise TypeError(f"max_v2_length must be an int, not {type(max_v2_length).__name__}")
        if max_v2_length < 0:
            raise ValueError(f"max_v2_length must not be negative, got {max_v2_length}")
        self.max_v2_length = max_v2_length
        self._phase = _Phase.DETECTING
        self._buffer = bytearray()
        self._v1_scanner = _V1LineScanner()
        self._v2_checked = 0
        self._v2_command = Command.LOCAL
        self._v2_family_byte = 0
        self._v2_length = 0

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, bytes] | None:
        """
        Give the parser the next bytes received.

        @return: C{None} while the header is incomplete; then the header and
            the bytes that followed it in C{data}, untouched.
        @raise ProxyHeaderError: as soon as the bytes received prove the
            input invalid.  The parser is then spent.
        @raise RuntimeError: if called after a result or an error.
        """
        if self._phase in (_Phase.COMPLETE, _Phase.FAILED):
            raise RuntimeError(
                f"ProxyHeaderParser.feed() called in phase {self._phase.value!r}; "
                "a parser handles exactly one header"
            )
        self._buffer += data
        try:
            return self._advance()
        except ProxyHeaderError:
            self._move_to(_Phase.FAILED, "invalid input")
            self._buffer = bytearray()
            raise

    def _move_to(self, phase: _Phase, event: str) -> None:
        if phase not in _TRANSITIONS[self._phase]:
            raise RuntimeError(
                f"illegal transition from phase {self._phase.value!r} "
                f"to {phase.value!r} on {event}"
            )
        self._phase = phase

    def _advance(self) -> tuple[ProxyHeader, bytes] | None:
        while True:
            if self._phase is _Phase.DETECTING:
                if not self._buffer:
                    return None
                # Section 2.2: "PROXY" starts version 1, the signature version
                # 2; the receiver must not guess beyond that.
                first = self._buffer[0]
                if first == _V1_FIRST_BYTE:
                    self._move_to(_Phase.V1_LINE, "first byte 'P'")
                elif first == V2_SIGNATURE[0]:
                    self._move_to(_Phase.V2_FIXED_PART, "first byte 0x0d")
                else:
                    raise ProxyHeaderError(
                        "not-proxy-protocol",
                        f"first byte {_quote(self._buffer[:1])} starts neither "
                        "a v1 nor a v2 header",
                    )
            elif self._phase is _Phase.V1_LINE:
                line_length = self._v1_scanner.scan(self._buffer)
                if line_length is None:
                    return None
                return self._complete(self._v1_scanner.header(), line_length)
            elif self._phase is _Phase.V2_FIXED_PART:
                if not self._check_v2_fixed_part():
                    return None
                self._move_to(_Phase.V2_BODY, "16 fixed bytes checked")
            elif self._phase is _Phase.V2_BODY:
                header_length = V2_FIXED_LENGTH + self._v2_length
                # Section 2.2: parse nothing before the whole header is in.
                if len(self._buffer) < header_length:
                    return None
                header = _decode_v2(
                    bytes(self._buffer[:header_length]), self._v2_command, self._v2_family_byte
                )
                return self._complete(header, header_length)
            else:
                raise RuntimeError(f"_advance() in phase {self._phase.value!r}")

    def _complete(self, header: ProxyHeader, length: int) -> tuple[ProxyHeader, bytes]:
        self._move_to(_Phase.COMPLETE, "header complete")
        leftover = bytes(self._buffer[length:])
        self._buffer = bytearray()
        return header, leftover

    def _check_v2_fixed_part(self) -> bool:
        """
        Check each of the 16 fixed bytes as soon as it arrives.

        @return: whether all 16 are in and valid.
        """
        buffer = self._buffer
        if (
            self._v2_checked == 0
            and len(buffer) >= V2_FIXED_LENGTH
            and buffer.startswith(V2_SIGNATURE)
        ):
            # The usual case, all 16 bytes in one read with a good signature:
            # the three remaining fields are checked once, in order.
            self._check_version_command(buffer[_V2_VERSION_COMMAND_OFFSET])
            self._v2_family_byte = buffer[_V2_FAMILY_OFFSET]
            if self._v2_command is Command.PROXY:
                _check_proxy_family(self._v2_family_byte)
            self._check_length(int.from_bytes(buffer[_V2_LENGTH_OFFSET:V2_FIXED_LENGTH], "big"))
            self._v2_checked = V2_FIXED_LENGTH
            return True
        available = min(len(buffer), V2_FIXED_LENGTH)
        while self._v2_checked < available:
            offset = self._v2_checked
            byte = self._buffer[offset]
            if offset < len(V2_SIGNATURE):
                if byte != V2_SIGNATURE[offset]:
                    raise ProxyHeaderError(
                        "not-proxy-protocol",
                        f"byte {offset} is {_quote(bytes([byte]))}, "
                        "not part of the v2 signature",
                    )
            elif offset == _V2_VERSION_COMMAND_OFFSET:
                self._check_version_command(byte)
            elif offset == _V2_FAMILY_OFFSET:
                self._v2_family_byte = byte
                # Section 2.2: LOCAL discards "the protocol block including
                # the family", so only a PROXY command's family is judged.
                if self._v2_command is Command.PROXY:
                    _check_proxy_family(byte)
            elif offset == V2_FIXED_LENGTH - 1:
                self._check_length(
                    int.from_bytes(self._buffer[_V2_LENGTH_OFFSET:V2_FIXED_LENGTH], "big")
                )
            self._v2_checked += 1
        return self._v2_checked == V2_FIXED_LENGTH

    def _check_version_command(self, byte: int) -> None:
        version, command = byte >> _NIBBLE_BITS, byte & _LOW_NIBBLE
        if version != _V2_VERSION:
            raise ProxyHeaderError(
                "v2-bad-version", f"version nibble is {version}, must be {_V2_VERSION}"
            )
        if command == Command.LOCAL.value:
            self._v2_command = Command.LOCAL
        elif command == Command.PROXY.value:
            self._v2_command = Command.PROXY
        else:
            # Section 2.2: "receivers must drop connections presenting
            # unexpected values here" (nginx treats them as LOCAL).
            raise ProxyHeaderError(
                "v2-bad-command", f"command nibble is {command}, must be 0 (LOCAL) or 1 (PROXY)"
            )

    def _check_length(self, length: int) -> None:
        if length > self.max_v2_length:
            raise ProxyHeaderError(
                "v2-too-long", f"length field is {length}, the limit is {self.max_v2_length}"
            )
        if self._v2_command is Command.PROXY:
            needed = _ADDRESS_BLOCK_LENGTH[_FAMILY_BY_BYTE[self._v2_family_byte]]
            if length < needed:
                raise ProxyHeaderError(
                    "v2-short-address-block",
                    f"length field is {length}, the "
                    f"{_FAMILY_BY_BYTE[self._v2_family_byte].name} address block needs {needed}",
                )
        self._v2_length = length
