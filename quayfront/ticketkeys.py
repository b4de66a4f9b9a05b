"""
Shared TLS session ticket keys, so that a session started on one replica
(or worker) resumes on any other.

The keys come from files the operator distributes, in nginx's
C{ssl_session_ticket_key} format: 80 bytes (a 16-byte name, a 32-byte
HMAC-SHA256 key, a 32-byte AES-256-CBC key) or the older 48 bytes (name,
16-byte AES-128-CBC key, 16-byte HMAC key).  The first key encrypts new
tickets; every key decrypts, so after a rotation the previous key keeps
resuming the tickets it made (and the client gets a fresh ticket under the
current key).

pyOpenSSL offers no ticket-key API, and the cffi bindings of C{cryptography}
(which links its own OpenSSL statically) no longer declare
C{SSL_CTX_ctrl} or C{SSL_CTX_set_tlsext_ticket_key_evp_cb}.  The functions
are in the loaded image nonetheless, as local symbols: this module finds
them through that image's own symbol table, after checking against several
functions the bindings do export that the table really describes the code
that is loaded.  No second OpenSSL is loaded.  When the check fails (a
stripped or differently built wheel) ticket keys are reported unsupported
and quayfront refuses a configuration that asks for them, rather than guess.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Sequence

import cffi
from OpenSSL import SSL

from quayfront.config import ConfigError

# nginx's key file sizes: name + HMAC-SHA256 key + AES-256 key, or the older
# name + AES-128 key + HMAC key.
KEY_FILE_SIZES = (80, 48)
KEY_NAME_BYTES = 16

# The OpenSSL functions this module calls, and the declarations it calls
# them with (OpenSSL 3.0+ prototypes).
_DECLARATIONS = """
typedef struct {
    const char *key;
    unsigned int data_type;
    void *data;
    size_t data_size;
    size_t return_size;
} OSSL_PARAM;
typedef int (*ticket_key_cb)(void *ssl, unsigned char *key_name, unsigned char *iv,
                             void *cipher_ctx, void *mac_ctx, int enc);
typedef int (*set_ticket_key_cb_fn)(void *ctx, ticket_key_cb cb);
typedef const void *(*cipher_fn)(void);
typedef int (*cipher_init_fn)(void *cipher_ctx, const void *cipher, void *engine,
                              const unsigned char *key, const unsigned char *iv);
typedef int (*mac_set_params_fn)(void *mac_ctx, const OSSL_PARAM *params);
"""
_FUNCTIONS = {
    "SSL_CTX_set_tlsext_ticket_key_evp_cb": "set_ticket_key_cb_fn",
    "EVP_aes_128_cbc": "cipher_fn",
    "EVP_aes_256_cbc": "cipher_fn",
    "EVP_EncryptInit_ex": "cipher_init_fn",
    "EVP_DecryptInit_ex": "cipher_init_fn",
    "EVP_MAC_CTX_set_params": "mac_set_params_fn",
}
# Functions the bindings export: where they sit in the loaded image is
# known, so they tell whether a symbol table describes that image.  cffi
# hands out the address of its direct-call wrapper, C{_cffi_d_NAME}.
_ANCHORS = (
    "SSL_CTX_set_options",
    "SSL_CTX_set_session_id_context",
    "SSL_CTX_new",
    "SSL_CTX_free",
    "SSL_get_session",
)

# OSSL_PARAM data types and "not set" return size (openssl/core.h).
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = 2**64 - 1

# Return values of the ticket key callback (SSL_CTX_set_tlsext_ticket_key_evp_cb(3)).
_TICKET_ERROR = -1
_TICKET_UNKNOWN_KEY = 0
_TICKET_OK = 1
_TICKET_OK_RENEW = 2


class TicketKeysUnsupported(Exception):
    """
    The loaded OpenSSL cannot be given ticket keys; says why.
    """


@dataclass(frozen=True)
class TicketKey:
    """
    One session ticket key: the name tickets carry to say which key made
    them, and the HMAC and AES keys.
    """

    name: bytes
    hmac_key: bytes
    aes_key: bytes

    @classmethod
    def from_bytes(cls, raw: bytes) -> TicketKey:
        """
        Split a key in nginx's layout.

        @raise ValueError: when C{raw} is neither 80 nor 48 bytes long.
        """
        if len(raw) == 80:
            return cls(raw[:16], raw[16:48], raw[48:80])
        if len(raw) == 48:
            return cls(raw[:16], raw[32:48], raw[16:32])
        raise ValueError(f"a ticket key is 80 or 48 bytes, not {len(raw)}")

    @staticmethod
    def generate() -> bytes:
        """
        A new random 80-byte key, as C{openssl rand 80} makes.
        """
        return os.urandom(80)


class _Dl_info(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


class _OpenSSLFunctions:
    """
    The OpenSSL functions the bindings leave out, found in the loaded image.
    """

    def __init__(self) -> None:
        from cryptography.hazmat.bindings._rust import _openssl

        binding_ffi, binding_lib = _openssl.ffi, _openssl.lib
        anchors = {
            name: int(binding_ffi.cast("uintptr_t", binding_ffi.addressof(binding_lib, name)))
            for name in _ANCHORS
        }
        image = self._image_path(anchors[_ANCHORS[0]])
        wrappers = {name: f"_cffi_d_{name}" for name in _ANCHORS}
        symbols = self._read_symbols(image, set(wrappers.values()) | set(_FUNCTIONS))
        missing = sorted(
            name for name in (*wrappers.values(), *_FUNCTIONS) if name not in symbols
        )
        if missing:
            raise TicketKeysUnsupported(
                f"{image} has no symbol table entries for {', '.join(missing)}"
            )
        bias = anchors[_ANCHORS[0]] - symbols[wrappers[_ANCHORS[0]]]
        for name, address in anchors.items():
            if symbols[wrappers[name]] + bias != address:
                raise TicketKeysUnsupported(
                    f"the symbol table of {image} does not match the loaded code ({name})"
                )
        self.ffi = cffi.FFI()
        self.ffi.cdef(_DECLARATIONS)
        self._binding_ffi = binding_ffi
        for name, signature in _FUNCTIONS.items():
            setattr(self, name, self.ffi.cast(signature, symbols[name] + bias))

    @staticmethod
    def _image_path(address: int) -> str:
        info = _Dl_info()
        libc = ctypes.CDLL(None)
        if not libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
            raise TicketKeysUnsupported("cannot tell which file the loaded OpenSSL came from")
        return os.fsdecode(info.dli_fname)

    @staticmethod
    def _read_symbols(path: str, wanted: set[str]) -> dict[str, int]:
        """
        The addresses of the C{wanted} functions in the symbol tables of
        the ELF file at C{path}.  pyelftools finds the tables; the entries
        are scanned with C{struct}, since there are tens of thousands of
        them and only a dozen are wanted.
        """
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        found: dict[str, int] = {}
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                endian = "<" if elf.little_endian else ">"
                if elf.elfclass == 64:
                    entry = struct.Struct(endian + "IBBHQQ")

                    def fields(symbol):
                        return symbol[0], symbol[1], symbol[4]

                else:
                    entry = struct.Struct(endian + "IIIBBH")

                    def fields(symbol):
                        return symbol[0], symbol[3], symbol[1]

                for section_name in (".symtab", ".dynsym"):
                    section = elf.get_section_by_name(section_name)
                    if section is None:
                        continue
                    names = elf.get_section(section["sh_link"]).data()
                    offsets = {}
                    for name in wanted - set(found):
                        needle = b"\0" + name.encode("ascii") + b"\0"
                        at = names.find(needle)
                        while at != -1:
                            offsets[at + 1] = name
                            at = names.find(needle, at + 1)
                    table = section.data()
                    usable = len(table) - len(table) % entry.size
                    for symbol in entry.iter_unpack(table[:usable]):
                        name_offset, info, value = fields(symbol)
                        name = offsets.get(name_offset)
                        # STT_FUNC is 2, in the low four bits of st_info.
                        if name is not None and info & 0xF == 2 and value:
                            found.setdefault(name, value)
        except (OSError, ELFError) as e:
            raise TicketKeysUnsupported(f"cannot read the symbols of {path}: {e}") from None
        return found

    def context_pointer(self, context: SSL.Context):
        return self.ffi.cast(
            "void *", int(self._binding_ffi.cast("uintptr_t", context._context))
        )


_functions: _OpenSSLFunctions | None = None
_unsupported: TicketKeysUnsupported | None = None


def _openssl() -> _OpenSSLFunctions:
    global _functions, _unsupported
    if _functions is None:
        if _unsupported is not None:
            raise _unsupported
        try:
            _functions = _OpenSSLFunctions()
        except TicketKeysUnsupported as e:
            _unsupported = e
            raise
    return _functions


def check_supported() -> None:
    """
    @raise TicketKeysUnsupported: when ticket keys cannot be installed.
    """
    _openssl()


class _TicketKeyCallback:
    """
    OpenSSL's ticket key callback over a fixed list of keys: the first
    encrypts, any decrypts (and asks for a renewed ticket when it is not
    the first).
    """

    def __init__(self, functions: _OpenSSLFunctions, keys: Sequence[TicketKey]) -> None:
        ffi = functions.ffi
        self._functions = functions
        self._by_name = {key.name: index for index, key in enumerate(keys)}
        # C copies of the keys and the MAC parameters, kept alive as long as
        # the callback is.
        self._aes_keys = [ffi.new("unsigned char[]", key.aes_key) for key in keys]
        self._names = [key.name for key in keys]
        self._ciphers = [
            functions.EVP_aes_256_cbc() if len(key.aes_key) == 32 else functions.EVP_aes_128_cbc()
            for key in keys
        ]
        self._param_key = ffi.new("char[]", b"key")
        self._param_digest = ffi.new("char[]", b"digest")
        self._sha256 = ffi.new("char[]", b"SHA256")
        self._hmac_keys = [ffi.new("unsigned char[]", key.hmac_key) for key in keys]
        self._mac_params = []
        for index, key in enumerate(keys):
            params = ffi.new("OSSL_PARAM[3]")
            params[0].key = self._param_key
            params[0].data_type = _OSSL_PARAM_OCTET_STRING
            params[0].data = self._hmac_keys[index]
            params[0].data_size = len(key.hmac_key)
            params[0].return_size = _OSSL_PARAM_UNMODIFIED
            params[1].key = self._param_digest
            params[1].data_type = _OSSL_PARAM_UTF8_STRING
            params[1].data = self._sha256
            params[1].data_size = len(b"SHA256")
            params[1].return_size = _OSSL_PARAM_UNMODIFIED
            # params[2] stays zeroed: the end marker.
            self._mac_params.append(params)
        self.c_callback = ffi.callback("ticket_key_cb", self._call, error=_TICKET_ERROR)

    def _call(self, ssl, key_name, iv, cipher_ctx, mac_ctx, enc: int) -> int:
        ffi = self._functions.ffi
        if enc:
            index = 0
            ffi.memmove(key_name, self._names[0], KEY_NAME_BYTES)
            ffi.memmove(iv, os.urandom(16), 16)
            init = self._functions.EVP_EncryptInit_ex
        else:
            found = self._by_name.get(ffi.buffer(key_name, KEY_NAME_BYTES)[:])
            if found is None:
                # A ticket from a key no longer held: a full handshake.
                return _TICKET_UNKNOWN_KEY
            index = found
            init = self._functions.EVP_DecryptInit_ex
        if init(cipher_ctx, self._ciphers[index], ffi.NULL, self._aes_keys[index], iv) != 1:
            return _TICKET_ERROR
        if self._functions.EVP_MAC_CTX_set_params(mac_ctx, self._mac_params[index]) != 1:
            return _TICKET_ERROR
        if not enc and index != 0:
            return _TICKET_OK_RENEW
        return _TICKET_OK


def install_ticket_keys(context: SSL.Context, keys: Sequence[bytes]) -> None:
    """
    Make C{context} encrypt session tickets with the first of C{keys} and
    accept tickets made with any of them.  Give every server context the
    same keys (an SNI switch keeps the ticket keys of the context the
    connection started on, but reloads replace contexts).

    @raise ValueError: for an empty list, a key of the wrong size or two
        keys with the same name.
    @raise TicketKeysUnsupported: when the loaded OpenSSL cannot be given keys.
    """
    parsed = [TicketKey.from_bytes(bytes(raw)) for raw in keys]
    if not parsed:
        raise ValueError("at least one ticket key is needed")
    if len({key.name for key in parsed}) != len(parsed):
        raise ValueError("two ticket keys have the same name (their first 16 bytes)")
    functions = _openssl()
    callback = _TicketKeyCallback(functions, parsed)
    if (
        functions.SSL_CTX_set_tlsext_ticket_key_evp_cb(
            functions.context_pointer(context), callback.c_callback
        )
        != 1
    ):
        raise TicketKeysUnsupported("OpenSSL refused the ticket key callback")
    # The context must keep the callback (and the key copies) alive.
    context._quayfront_ticket_keys = callback


_process_keys: list[bytes] | None = None


def process_ticket_keys() -> list[bytes]:
    """
    One random key made once per process, for when no key files are
    configured: OpenSSL would otherwise make new keys with every context,
    so a certificate reload would end every session's resumption.  Empty
    when keys cannot be installed (OpenSSL's own keys are used then).
    """
    global _process_keys
    if _process_keys is None:
        try:
            check_supported()
        except TicketKeysUnsupported:
            _process_keys = []
        else:
            _process_keys = [TicketKey.generate()]
    return list(_process_keys)


def load_ticket_key_files(
    paths: Sequence[str], source: str, key: str = "tls.session_ticket_key_files"
) -> list[bytes]:
    """
    Read nginx-style ticket key files, current key first.

    @raise ConfigError: naming C{key}, the file and the reason.
    """
    keys = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read(max(KEY_FILE_SIZES) + 1)
        except OSError as e:
            raise ConfigError(source, key, f"cannot read {path}: {e.strerror}") from None
        if len(raw) not in KEY_FILE_SIZES:
            raise ConfigError(
                source,
                key,
                f"{path} holds {len(raw)} bytes; a ticket key file holds 80 (or 48)"
                " random bytes, e.g. from `openssl rand 80`",
            )
        keys.append(raw)
    names = [raw[:KEY_NAME_BYTES] for raw in keys]
    if len(set(names)) != len(names):
        raise ConfigError(source, key, "two key files hold the same key name (first 16 bytes)")
    if keys:
        try:
            check_supported()
        except TicketKeysUnsupported as e:
            raise ConfigError(
                source, key, f"this OpenSSL build cannot take shared ticket keys: {e}"
            ) from None
    return keys
