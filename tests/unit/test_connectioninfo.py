"""
PROXY TLVs and TLS details as named, sanitised fields.
"""

from quayfront.connectioninfo import MAX_FIELD_LENGTH, sanitise, tls_fields, tlv_fields
from quayfront.proxyprotocol import Address, Command, Family, ProxyHeader, SSLInfo


def header(**tlvs) -> ProxyHeader:
    return ProxyHeader(
        version=2,
        command=Command.PROXY,
        family=Family.TCP4,
        source=Address("203.0.113.7", 51000),
        destination=Address("192.0.2.10", 8443),
        length=28,
        **tlvs,
    )


def test_sanitise_keeps_printable_ascii_and_escapes_the_rest() -> None:
    """Control bytes, quotes, backslashes and non-ASCII become \\xHH; printable text stays."""
    assert sanitise(b"vpce-0abc") == "vpce-0abc"
    assert sanitise(b'a"b\\c\r\n\x1b\xff') == "a\\x22b\\x5Cc\\x0D\\x0A\\x1B\\xFF"
    assert sanitise(7) == "7"


def test_sanitise_bounds_the_length() -> None:
    """A long value is cut to the bound without splitting an escape."""
    assert len(sanitise(b"x" * 10_000)) == MAX_FIELD_LENGTH
    cut = sanitise(b"\x00" * 1000)
    assert len(cut) <= MAX_FIELD_LENGTH and len(cut) % 4 == 0


def test_tlv_fields_name_what_is_present() -> None:
    """Only TLVs present in the header appear, by name, sanitised."""
    h = header(
        authority=b"registry.example",
        unique_id=b"id\n1",
        aws_vpce_id=b"vpce-08d2bf15fac5001c9",
        azure_link_id=0x01020304,
        ssl=SSLInfo(client=1, verify=0, version=b"TLSv1.3", cn=b"robot"),
    )
    assert tlv_fields(h) == {
        "authority": "registry.example",
        "unique_id": "id\\x0A1",
        "aws_vpce_id": "vpce-08d2bf15fac5001c9",
        "azure_link_id": str(0x01020304),
        "ssl_version": "TLSv1.3",
        "ssl_cn": "robot",
    }
    assert tlv_fields(None) == {}


def test_tls_fields_without_tls() -> None:
    """A transport without a TLS session has no TLS fields."""
    assert tls_fields(object()) == {}


def test_raw_tlvs_are_shown_sanitised() -> None:
    """Vendor TLVs of a foreign layout and unknown types appear raw, sanitised, first of each type."""
    from quayfront.proxyprotocol import TLV

    h = header(
        tlvs=(
            TLV(0x02, b"registry.example"),
            TLV(0xEE, b"\x01\x00\x01\x02\x03\x04\x05"),
            TLV(0xE3, b"lb=\"blue\"\n"),
            TLV(0xE3, b"second"),
            TLV(0xEA, b"\x01vpce-1"),
            TLV(0x04, b"\x00"),
        ),
        authority=b"registry.example",
        aws_vpce_id=b"vpce-1",
    )
    fields = tlv_fields(h)
    assert fields["tlv_0xee"] == "\\x01\\x00\\x01\\x02\\x03\\x04\\x05"
    assert fields["tlv_0xe3"] == "lb=\\x22blue\\x22\\x0A"
    assert "tlv_0xea" not in fields and "tlv_0x02" not in fields and "tlv_0x04" not in fields
    many = header(tlvs=tuple(TLV(0x40 + n, b"x" * 1000) for n in range(20)))
    raw = tlv_fields(many)
    assert len(raw) == 8 and all(len(v) <= MAX_FIELD_LENGTH for v in raw.values())
