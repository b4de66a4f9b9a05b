"""
Property tests for the PROXY header parser.

Valid headers of every kind, built by the test encoder with random TLVs,
must parse to what was encoded however the bytes are split; arbitrary and
mutated input must only ever produce "need more", a header, or a
ProxyHeaderError, with the same verdict whatever the split.  Run with
HYPOTHESIS_PROFILE=fuzz for a long search.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Union

from hypothesis import assume, given, note
from hypothesis import strategies as st

from quayfront.proxyprotocol import (
    DEFAULT_MAX_V2_LENGTH,
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
from quayfront.proxyprotocol._crc32c import crc32c, crc32c_python

from .proxy_encoder import (
    COMMAND_LOCAL,
    COMMAND_PROXY,
    FAMILY_TCP4,
    FAMILY_TCP6,
    FAMILY_UNSPEC,
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

Outcome = Union[tuple[str], tuple[str, str], tuple[str, ProxyHeader, bytes]]

PRINTABLE_ASCII = "".join(chr(code) for code in range(0x20, 0x7F))
KNOWN_TLV_TYPES = frozenset(
    {
        TYPE_ALPN,
        TYPE_AUTHORITY,
        TYPE_CRC32C,
        TYPE_NOOP,
        TYPE_UNIQUE_ID,
        TYPE_SSL,
        TYPE_NETNS,
        TYPE_GCP,
        TYPE_AWS,
        TYPE_AZURE,
    }
)
SSL_SUBTYPE_FIELDS = {
    0x21: "version",
    0x22: "cn",
    0x23: "cipher",
    0x24: "sig_alg",
    0x25: "key_alg",
    0x26: "group",
    0x27: "sig_scheme",
    0x28: "client_cert",
}
DEFINED_FAMILIES = {family.value: family for family in Family}

small_values = st.binary(max_size=24)
ports = st.integers(0, 0xFFFF)


# --- Outcomes ----------------------------------------------------------------------


def outcome(chunks: list[bytes]) -> Outcome:
    """
    Feed C{chunks} and describe the verdict; anything but ProxyHeaderError
    escapes and fails the test.
    """
    parser = ProxyHeaderParser()
    try:
        for index, chunk in enumerate(chunks):
            result = parser.feed(chunk)
            if result is not None:
                header, leftover = result
                return ("complete", header, leftover + b"".join(chunks[index + 1 :]))
    except ProxyHeaderError as error:
        assert re.fullmatch(r"[\x20-\x7e]{1,240}", error.detail)
        assert str(error) == f"{error.reason}: {error.detail}"
        return ("rejected", error.reason)
    return ("incomplete",)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[start:end] for start, end in zip(bounds, bounds[1:])]


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    if len(data) < 2:
        return st.just([])
    return st.lists(st.integers(1, len(data) - 1), max_size=8)


# --- Valid header strategies -----------------------------------------------------------


@st.composite
def ipv6_texts(draw: st.DrawFn) -> tuple[str, str]:
    """
    Any RFC 4291 text form of an address (padding, case, '::' over any run
    of zero groups, dotted tail), with the address's canonical form.
    """
    value = draw(
        st.one_of(
            st.integers(0, 2**128 - 1),
            st.builds(lambda v4: 0xFFFF << 32 | v4, st.integers(0, 2**32 - 1)),
            st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF]), min_size=8, max_size=8).map(
                lambda groups: int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
            ),
        )
    )
    groups = [(value >> (16 * (7 - index))) & 0xFFFF for index in range(8)]
    dotted_tail = draw(st.booleans())
    hex_groups = groups[:6] if dotted_tail else groups
    texts = []
    for group in hex_groups:
        digits = f"{group:x}"
        digits = digits.rjust(draw(st.integers(len(digits), 4)), "0")
        texts.append(digits.upper() if draw(st.booleans()) else digits)
    zero_runs = [
        (start, end)
        for start in range(len(hex_groups))
        for end in range(start + 1, len(hex_groups) + 1)
        if all(group == 0 for group in hex_groups[start:end])
    ]
    tail = str(ipaddress.IPv4Address(value & 0xFFFFFFFF)) if dotted_tail else ""
    run = draw(st.sampled_from([None, *zero_runs]))
    if run is None:
        text = ":".join(texts + ([tail] if tail else []))
    else:
        start, end = run
        right = texts[end:] + ([tail] if tail else [])
        text = ":".join(texts[:start]) + "::" + ":".join(right)
    return text, str(ipaddress.IPv6Address(value))


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        rest = draw(
            st.none() | st.text(PRINTABLE_ASCII, max_size=V1_MAX_LENGTH - len("PROXY UNKNOWN \r\n"))
        )
        line = b"PROXY UNKNOWN" + (b"" if rest is None else b" " + rest.encode("ascii")) + b"\r\n"
        return line, ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=Family.UNSPEC,
            source=None,
            destination=None,
            length=len(line),
        )
    if kind == "TCP4":
        source = source_host = str(draw(st.ip_addresses(v=4)))
        destination = destination_host = str(draw(st.ip_addresses(v=4)))
        family = Family.TCP4
    else:
        (source, source_host), (destination, destination_host) = draw(
            st.tuples(ipv6_texts(), ipv6_texts())
        )
        family = Family.TCP6
    source_port, destination_port = draw(ports), draw(ports)
    line = v1_line(kind, source, destination, source_port, destination_port)
    # Two long addresses with dotted tails can exceed the spec's 107 bytes;
    # such a line is invalid (see the too-long test in test_proxy_parser).
    assume(len(line) <= V1_MAX_LENGTH)
    return line, ProxyHeader(
        version=1,
        command=Command.PROXY,
        family=family,
        source=Address(source_host, source_port),
        destination=Address(destination_host, destination_port),
        length=len(line),
    )


@st.composite
def ssl_tlvs(draw: st.DrawFn) -> tuple[bytes, SSLInfo]:
    client = draw(st.integers(0, 0xFF))
    verify = draw(st.integers(0, 2**32 - 1))
    known = draw(
        st.dictionaries(st.sampled_from(sorted(SSL_SUBTYPE_FIELDS)), small_values, max_size=8)
    )
    unknown = draw(
        st.lists(
            st.tuples(
                st.integers(0, 0xFF).filter(lambda t: t not in SSL_SUBTYPE_FIELDS), small_values
            ),
            max_size=3,
        )
    )
    sub_tlvs = draw(st.permutations([*known.items(), *unknown]))
    info = SSLInfo(
        client=client,
        verify=verify,
        tlvs=tuple(TLV(t, v) for t, v in sub_tlvs),
        **{SSL_SUBTYPE_FIELDS[t]: v for t, v in known.items()},
    )
    return ssl_value(client, verify, sub_tlvs), info


@st.composite
def tlv_plans(draw: st.DrawFn) -> tuple[list[tuple[int, bytes]], dict]:
    """
    Random TLVs: each single-valued kind at most once, repeatable kinds
    (NOOP, unknown types, unknown vendor subtypes) any number of times, in
    random order; with the header fields they should produce.
    """
    items: list[tuple[int, bytes]] = []
    fields: dict = {}
    for name, tlv_type, values in [
        ("alpn", TYPE_ALPN, small_values),
        ("authority", TYPE_AUTHORITY, small_values),
        ("unique_id", TYPE_UNIQUE_ID, st.binary(max_size=128)),
        ("netns", TYPE_NETNS, small_values),
    ]:
        if draw(st.booleans()):
            value = draw(values)
            items.append((tlv_type, value))
            fields[name] = value
    if draw(st.booleans()):
        value, fields["ssl"] = draw(ssl_tlvs())
        items.append((TYPE_SSL, value))
    if draw(st.booleans()):
        fields["gcp_psc_connection_id"] = draw(st.integers(0, 2**64 - 1))
        items.append((TYPE_GCP, gcp_psc_value(fields["gcp_psc_connection_id"])))
    if draw(st.booleans()):
        # AWS's layout: the id is US-ASCII text (other values are kept raw).
        fields["aws_vpce_id"] = draw(
            st.text(PRINTABLE_ASCII, min_size=1, max_size=24).map(str.encode)
        )
        items.append((TYPE_AWS, aws_vpce_value(fields["aws_vpce_id"])))
    if draw(st.booleans()):
        fields["azure_link_id"] = draw(st.integers(0, 2**32 - 1))
        items.append((TYPE_AZURE, azure_link_value(fields["azure_link_id"])))
    vendor_other_subtype = st.builds(
        lambda sub, rest: bytes([sub]) + rest, st.integers(2, 0xFF), small_values
    )
    items += draw(
        st.lists(
            st.one_of(
                st.tuples(st.just(TYPE_NOOP), small_values),
                st.tuples(
                    st.integers(0, 0xFF).filter(lambda t: t not in KNOWN_TLV_TYPES), small_values
                ),
                st.tuples(st.sampled_from([TYPE_AWS, TYPE_AZURE]), vendor_other_subtype),
            ),
            max_size=4,
        )
    )
    return draw(st.permutations(items)), fields


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    command = draw(st.sampled_from([COMMAND_LOCAL, COMMAND_PROXY]))
    addresses = b""
    source = destination = None
    if command == COMMAND_PROXY:
        family_byte = draw(st.sampled_from([FAMILY_UNSPEC, FAMILY_TCP4, FAMILY_TCP6]))
        if family_byte != FAMILY_UNSPEC:
            version = 4 if family_byte == FAMILY_TCP4 else 6
            hosts = draw(st.tuples(st.ip_addresses(v=version), st.ip_addresses(v=version)))
            port_pair = draw(st.tuples(ports, ports))
            encode = ipv4_addresses if version == 4 else ipv6_addresses
            addresses = encode(str(hosts[0]), str(hosts[1]), *port_pair)
            source = Address(str(hosts[0]), port_pair[0])
            destination = Address(str(hosts[1]), port_pair[1])
    else:
        # LOCAL: any family byte, TLVs right after the fixed part, as an AWS
        # NLB health check has them.
        family_byte = draw(st.integers(0, 0xFF))
    items, fields = draw(tlv_plans())
    crc32c_at = draw(st.none() | st.integers(0, len(items)))
    data = v2_header(
        command=command, family=family_byte, addresses=addresses, tlvs=items, crc32c_at=crc32c_at
    )
    assert len(data) - 16 <= DEFAULT_MAX_V2_LENGTH
    expected = ProxyHeader(
        version=2,
        command=Command(command),
        family=DEFINED_FAMILIES.get(family_byte, Family.UNSPEC),
        source=source,
        destination=destination,
        tlvs=tuple(TLV(t, v) for t, v in tlvs_as_sent(data, addresses, items, crc32c_at)),
        length=len(data),
        **fields,
    )
    return data, expected


valid_headers = st.one_of(v1_headers(), v2_headers())


# --- Valid headers ---------------------------------------------------------------------


@given(valid_headers, st.binary(max_size=48), st.data())
def test_any_split_gives_the_encoded_header(
    header: tuple[bytes, ProxyHeader], trailing: bytes, data: st.DataObject
) -> None:
    """A valid header and any bytes after it, split anywhere, parse to what was encoded."""
    encoded, expected = header
    stream = encoded + trailing
    cuts = data.draw(cuts_for(stream))
    assert outcome(split_at(stream, cuts)) == ("complete", expected, trailing)


@given(valid_headers)
def test_byte_by_byte_completes_at_the_last_byte(header: tuple[bytes, ProxyHeader]) -> None:
    """Fed byte by byte, a valid header is neither rejected nor complete before its last byte."""
    encoded, expected = header
    parser = ProxyHeaderParser()
    for offset in range(len(encoded) - 1):
        assert parser.feed(encoded[offset : offset + 1]) is None
    assert parser.feed(encoded[-1:]) == (expected, b"")


@given(valid_headers, valid_headers)
def test_second_header_is_leftover(
    first: tuple[bytes, ProxyHeader], second: tuple[bytes, ProxyHeader]
) -> None:
    """Only the first header is parsed; a second one, of either version, is returned as leftover."""
    assert ProxyHeaderParser().feed(first[0] + second[0]) == (first[1], second[0])


# --- Invalid and arbitrary input ------------------------------------------------------------

interesting_bytes = st.sampled_from(
    b"\x00\x01\x03\x04\x0a\x0d\x20\x21\x2e\x30\x3a\x50\xe0\xea\xee\xff"
)
mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(1, 0xFF)),
    st.tuples(st.just("set"), st.integers(0, 2**16), interesting_bytes),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.integers(0, 0xFF)),
    st.tuples(st.just("delete"), st.integers(0, 2**16)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),
)


def mutate(data: bytes, steps: list[tuple]) -> bytes:
    mutable = bytearray(data)
    for kind, position, *argument in steps:
        if kind == "insert":
            mutable.insert(position % (len(mutable) + 1), argument[0])
            continue
        if not mutable:
            continue
        index = position % len(mutable)
        if kind == "flip":
            mutable[index] ^= argument[0]
        elif kind == "set":
            mutable[index] = argument[0]
        elif kind == "delete":
            del mutable[index]
        else:
            del mutable[index:]
    return bytes(mutable)


def assert_same_verdict_however_split(stream: bytes, cuts: list[int]) -> Outcome:
    whole = outcome([stream])
    note(f"whole: {whole}")
    assert outcome(split_at(stream, cuts)) == whole
    assert outcome([stream[offset : offset + 1] for offset in range(len(stream))]) == whole
    return whole


@given(
    valid_headers, st.lists(mutations, min_size=1, max_size=4), st.binary(max_size=16), st.data()
)
def test_mutated_headers(
    header: tuple[bytes, ProxyHeader], steps: list[tuple], trailing: bytes, data: st.DataObject
) -> None:
    """A mutated header gives need-more, a header or ProxyHeaderError, whatever the split."""
    stream = mutate(header[0], steps) + trailing
    assert_same_verdict_however_split(stream, data.draw(cuts_for(stream)))


starts = st.sampled_from(
    [
        b"",
        b"PROXY ",
        b"PROXY TCP4 ",
        b"PROXY TCP6 ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 ",
        b"PROXY UNKNOWN",
        V2_SIGNATURE,
        V2_SIGNATURE + b"\x20",
        V2_SIGNATURE + b"\x21\x00",
        V2_SIGNATURE + b"\x21\x11\x00",
        V2_SIGNATURE + b"\x21\x21\x00",
        V2_SIGNATURE + b"\x20\x11\x00",
    ]
)


@given(starts, st.binary(max_size=300), st.data())
def test_arbitrary_bytes(start: bytes, rest: bytes, data: st.DataObject) -> None:
    """Arbitrary bytes give need-more, a header or ProxyHeaderError, whatever the split."""
    stream = start + rest
    verdict = assert_same_verdict_however_split(stream, data.draw(cuts_for(stream)))
    if verdict[0] == "complete":
        assert verdict[1].length + len(verdict[2]) == len(stream)


@given(st.integers(0, 0xFF), st.binary(max_size=300))
def test_local_accepts_any_block_unless_its_checksum_fails(family: int, block: bytes) -> None:
    """A LOCAL header is accepted whatever its family and block, unless a CRC32C mismatches."""
    data = V2_SIGNATURE + bytes([0x20, family]) + len(block).to_bytes(2, "big") + block
    verdict = outcome([data])
    if verdict[0] == "rejected":
        assert verdict[1] == "v2-crc-mismatch"
    else:
        assert verdict[0] == "complete"
        header, leftover = verdict[1], verdict[2]
        assert (
            header.command is Command.LOCAL and header.source is None and header.destination is None
        )
        assert header.length == len(data) and leftover == b""


# --- Address syntax against the ipaddress module ------------------------------------------------


@st.composite
def near_valid_texts(draw: st.DrawFn, valid: st.SearchStrategy[str], alphabet: str) -> str:
    text = draw(valid)
    for _ in range(draw(st.integers(0, 2))):
        position = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        character = draw(st.sampled_from(alphabet))
        if edit == "insert":
            text = text[:position] + character + text[position:]
        elif edit == "delete":
            text = text[:position] + text[position + 1 :]
        else:
            text = text[:position] + character + text[position + 1 :]
    return text


IPV6_ALPHABET = "0123456789abcdefABCDEF:."
IPV4_ALPHABET = "0123456789."


@given(
    st.one_of(
        st.text(IPV6_ALPHABET, min_size=1, max_size=45),
        near_valid_texts(ipv6_texts().map(lambda pair: pair[0]), IPV6_ALPHABET).filter(
            lambda t: 0 < len(t) <= 45
        ),
    )
)
def test_v1_ipv6_syntax_agrees_with_ipaddress(text: str) -> None:
    """Under TCP6 the parser accepts exactly what ipaddress accepts as IPv6, canonicalised alike."""
    try:
        canonical = str(ipaddress.IPv6Address(text))
    except ValueError:
        canonical = None
    verdict = outcome([f"PROXY TCP6 {text} ::1 1 2\r\n".encode("ascii")])
    if canonical is None:
        assert verdict == ("rejected", "v1-bad-address")
    else:
        assert verdict[0] == "complete" and verdict[1].source == Address(canonical, 1)


@given(
    st.one_of(
        st.text(IPV4_ALPHABET, min_size=1, max_size=15),
        near_valid_texts(st.ip_addresses(v=4).map(str), IPV4_ALPHABET).filter(
            lambda t: 0 < len(t) <= 15
        ),
    )
)
def test_v1_ipv4_syntax_agrees_with_ipaddress(text: str) -> None:
    """Under TCP4 the parser accepts exactly the dotted quads ipaddress accepts."""
    try:
        canonical = str(ipaddress.IPv4Address(text))
    except ValueError:
        canonical = None
    verdict = outcome([f"PROXY TCP4 {text} 1.2.3.4 1 2\r\n".encode("ascii")])
    if canonical is None:
        assert verdict == ("rejected", "v1-bad-address")
    else:
        assert verdict[0] == "complete" and verdict[1].source == Address(canonical, 1)


@given(st.integers(0, 99_999).map(str) | st.text("0123456789+- ", min_size=1, max_size=6))
def test_v1_port_syntax(text: str) -> None:
    """A port is accepted exactly when it is decimal 0-65535 without leading zeros or sign."""
    verdict = outcome([f"PROXY TCP4 1.2.3.4 5.6.7.8 {text} 2\r\n".encode("ascii")])
    if text.isdigit() and int(text) <= 65535 and str(int(text)) == text:
        assert verdict[0] == "complete" and verdict[1].source == Address("1.2.3.4", int(text))
    else:
        assert verdict[0] == "rejected" and verdict[1] in ("v1-bad-port", "v1-bad-syntax")


# --- CRC32C --------------------------------------------------------------------------------------


def bitwise_crc32c(data: bytes) -> int:
    """
    CRC32C one bit at a time: slow, and obviously the RFC 4960 algorithm.
    """
    remainder = 0xFFFFFFFF
    for byte in data:
        remainder ^= byte
        for _ in range(8):
            remainder = (remainder >> 1) ^ (0x82F63B78 if remainder & 1 else 0)
    return remainder ^ 0xFFFFFFFF


@given(st.binary(max_size=256), st.integers(0, 256))
def test_crc32c_matches_bitwise_reference(data: bytes, cut: int) -> None:
    """Both CRC32C implementations equal the bitwise definition, whole or in two pieces."""
    assert crc32c(data) == crc32c_python(data) == bitwise_crc32c(data)
    assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)
    assert crc32c_python(data[cut:], crc32c_python(data[:cut])) == crc32c(data)
