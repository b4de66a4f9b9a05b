"""
CRC32C (Castagnoli), the checksum of the PROXY v2 C{PP2_TYPE_CRC32C} TLV.

The algorithm is the one of RFC 4960 appendix B (also used by iSCSI, RFC 3720
appendix B.4): the reflected polynomial 0x82F63B78, initial value and final
XOR 0xFFFFFFFF.

AWS NLBs put a CRC32C in every v2 header, so its cost is paid per
connection: L{crc32c} uses the google-crc32c C library when it is installed
(a dependency of quayfront) and the table-driven L{crc32c_python} otherwise,
which also serves as the reference the tests hold the C one to.
"""

from __future__ import annotations

from typing import Final

# RFC 4960 appendix B: the Castagnoli polynomial 0x1EDC6F41, bit-reversed
# because the CRC is computed least significant bit first.
CASTAGNOLI_POLYNOMIAL_REFLECTED: Final = 0x82F63B78
CRC32C_MASK: Final = 0xFFFFFFFF
_BITS_PER_BYTE: Final = 8
_TABLE_SIZE: Final = 256


def _build_table() -> tuple[int, ...]:
    table = []
    for index in range(_TABLE_SIZE):
        remainder = index
        for _ in range(_BITS_PER_BYTE):
            if remainder & 1:
                remainder = (remainder >> 1) ^ CASTAGNOLI_POLYNOMIAL_REFLECTED
            else:
                remainder >>= 1
        table.append(remainder)
    return tuple(table)


_TABLE: Final = _build_table()


def crc32c_python(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """
    Compute the CRC32C of C{data}.

    @param data: the bytes to checksum.
    @param crc: the CRC32C of the bytes that precede C{data}, to checksum a
        message in pieces: C{crc32c(b, crc32c(a)) == crc32c(a + b)}.
    @return: the checksum, an unsigned 32-bit integer.
    """
    table = _TABLE
    remainder = crc ^ CRC32C_MASK
    for byte in bytes(data):
        remainder = table[(remainder ^ byte) & 0xFF] ^ (remainder >> _BITS_PER_BYTE)
    return remainder ^ CRC32C_MASK


try:
    import google_crc32c as _google_crc32c
except ImportError:  # pragma: no cover - the dependency is normally installed
    crc32c = crc32c_python
else:
    if _google_crc32c.implementation != "c":  # pragma: no cover
        crc32c = crc32c_python
    else:

        def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
            """
            Compute the CRC32C of C{data} (see L{crc32c_python}).
            """
            if crc:
                return _google_crc32c.extend(crc, bytes(data))
            return _google_crc32c.value(bytes(data))
