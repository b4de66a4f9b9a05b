"""
The private Twisted names the HTTP layer's strictness hooks into, in one
place.  Each has a canary in C{tests/unit/test_twistedadapter.py} that fails
loudly when a Twisted release removes or changes it.

  - C{twisted.internet._producer_helpers._PullToPush}: how a consumer
    turns a pull producer (C{static.File}'s) into a push producer, as
    C{HTTPChannel.registerProducer} does; quayfront's own channel does the
    same (L{pull_to_push}).
  - C{Request._disconnected}: whether the client connection is gone
    (L{client_gone}).
  - C{HTTPChannel._respondToBadRequestAndDisconnect}: not called but
    implemented: what C{twisted.web.http.Request} calls on its channel
    when it refuses a request itself; quayfront's channel answers it as
    the framer's refusals (C{FrontChannel._respondToBadRequestAndDisconnect}).

L{hand_back_idle_timeout} and L{waiting_for_client} name no private Twisted
state any more (the client channel is quayfront's own); they stay here for
the forwarding, which calls them.

The upstream side uses no private Twisted name: quayfront's own client
(L{quayfront.upstreamclient}) replaced C{Agent}, C{HTTPConnectionPool} and
C{_newclient}.  L{proxied_transport} stays here, as the one way
forwarding reaches the upstream socket behind a response's body transport.

twisted.web's request (the last section): L{LeanRequest} makes, first
writes and finishes a request in one call each for the plain case, as
C{Request.__init__}, C{write} and C{finish}/C{_cleanup} do; it sets
C{_parsePOSTFormSubmission} and C{_adapterCache} and leaves a request with
C{_disconnected}, C{_inFakeHead} or an C{_encoder} to twisted.web.  The
workers' listening ports are adopted through L{adopt_port}
(C{tcp.Port._fromListeningDescriptor}).

Header fields (their own section): C{Headers._rawHeaders} and
C{twisted.web.http_headers._nameEncoder}, to put fields quayfront has
parsed and checked into a L{Headers} without checking them again
(L{add_checked_fields}).

Below HTTP, the reactor (its last section): C{EPollReactor.doPoll} with
C{_poller}, C{_selectables} and C{_doReadOrWrite}, its C{_reads} (the
descriptors being read: L{epoll_socket_below}), and the TCP write
buffer (C{dataBuffer}, C{offset}, C{_tempDataBuffer},
C{_writeDisconnected}) with the places the reactor builds TCP transports.

Under Twisted's TLS (its own section): pyOpenSSL's C{Connection._ssl},
C{._into_ssl}, C{._from_ssl} and its cffi bindings, to free the memory
BIOs a handshake grew (L{release_handshake_bios}).

Twisted's TLS protocol (the last section): C{TLSMemoryBIOProtocol}'s
receive and write paths (C{_flushReceiveBIO}, C{_write}, C{_flushSendBIO},
C{_bufferedWrite}, C{_tlsConnection} and the shutdown methods), replaced
in L{BatchedReceiveTLS} so that a read's records reach the channel in one
call and a write's records leave in one send; it calls OpenSSL directly
through pyOpenSSL's cffi bindings (C{SSL_read}, C{SSL_write}, C{BIO_read})
and its error check (C{Connection._raise_ssl_error}).
"""

from __future__ import annotations

from twisted.internet._producer_helpers import _PullToPush


def pull_to_push(producer, consumer):
    """
    C{producer}, an C{IPullProducer}, as an C{IPushProducer} writing to
    C{consumer}; call C{startStreaming()} on the result after registering
    it, C{stopStreaming()} when unregistering it.
    """
    return _PullToPush(producer, consumer)


def hand_back_idle_timeout(channel, timeout_s: float | None) -> None:
    """
    Give C{channel} back an idle timeout: at once, or if the channel has
    the whole request and keeps its timeout off until the response ends,
    as the value it will restore then.
    """
    channel.hand_back_idle_timeout(timeout_s)


def waiting_for_client(channel) -> bool:
    """
    Whether C{channel} has stopped producing because its client does not
    read (the transport's buffer is full).
    """
    return bool(getattr(channel, "waiting_for_client", False))


def client_gone(request) -> bool:
    """
    Whether the connection of C{request} (a C{twisted.web} request) is lost.
    """
    return request._disconnected


def proxied_transport(transport):
    """
    The upstream connection's own transport (with C{abortConnection()})
    behind the body transport C{transport} of a response from
    L{quayfront.upstreamclient}, or None once the response has ended and
    the connection went back to the pool.
    """
    return getattr(transport, "connection_transport", None)


# --- The reactor and TCP transports: per-event log context, eager writes ---
#
# Below the HTTP layer, two per-request costs of Twisted's epoll reactor
# that quayfront does not need (measured with `BENCH_ONLY=layers make
# bench`, tests/bench/layers.py):
#
#   - C{EPollReactor.doPoll} runs every read or write event inside
#     C{log.callWithLogger(selectable, ...)}, which asks the selectable for
#     its C{logPrefix()} and pushes a legacy log context (a dict, the context
#     tracker) around the call.  The context only names the connection in
#     legacy C{log.msg}/C{log.err} lines; quayfront logs through
#     C{twisted.logger.Logger} with named fields, which never reads it.
#     L{LeanEPollReactor.doPoll} dispatches directly (C{_poller},
#     C{_selectables}, C{_doReadOrWrite}), and still logs anything that
#     escapes an event handler with the connection's log prefix, as
#     C{callWithLogger} does.
#   - C{FileDescriptor.write} always buffers and calls C{startWriting()};
#     the bytes leave on the next poll, then C{stopWriting()}: two
#     C{epoll_ctl} calls and a loop iteration per write on each socket.
#     L{EagerWrite} tries C{send()} at once when nothing is buffered
#     (C{dataBuffer}, C{offset}, C{_tempDataBuffer}, C{_writeDisconnected})
#     and buffers only what the kernel did not take, through the unchanged
#     C{write()}: ordering, producers and C{loseConnection()} behave as
#     before (and nothing changes on a transport that did C{startTLS()},
#     C{TLS}).  The reactor builds its TCP transports with it
#     (C{tcp.Port.transport}, C{tcp.Connector._makeTransport},
#     C{tcp.Port._fromListeningDescriptor}).
#
# Both changes would be worth proposing to Twisted itself; until then they
# live here, each private name with its canary in
# tests/unit/test_twistedadapter.py.

import errno as _errno
import sys as _sys

from select import EPOLLIN as _EPOLLIN
from types import FunctionType as _FunctionType

from twisted.internet import abstract as _abstract
from twisted.internet import main as _main
from twisted.internet import tcp as _tcp
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.internet.tcp import EWOULDBLOCK as _EWOULDBLOCK
from twisted.internet.epollreactor import EPollReactor as _EPollReactor
from twisted.python import log as _legacy_log


class EagerWrite:
    """
    Mixed into a TCP transport: C{write()} sends at once when nothing is
    waiting in the transport's buffer, and buffers only the rest.
    """

    bufferSize = 2**18

    def __init__(self, *args, **kwargs) -> None:
        # Read on every write and read: an instance's own attributes, which
        # CPython 3.11 reads faster than the class attributes they copy
        # (those take the generic lookup every time).  Set first, so that
        # whatever Twisted's __init__ sets stands.
        self.bufferSize = type(self).bufferSize
        self.offset = 0
        self.dataBuffer = b""
        self.disconnecting = 0
        self._writeDisconnected = False
        self.TLS = False
        super().__init__(*args, **kwargs)

    def doRead(self):
        # tcp.Connection.doRead and its _dataReceived in one call (one per
        # read on every connection).
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as e:
            if e.args[0] == _EWOULDBLOCK:
                return None
            return _main.CONNECTION_LOST
        if not data:
            return _main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def write(self, data: bytes) -> None:
        if type(data) is bytes:
            sent = self._send_at_once(data)
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)

    def write_borrowed(self, data) -> None:
        """
        Write C{data}, a buffer its owner reuses once this returns: sent
        from where it is when the kernel takes it all at once; only what
        it does not take is copied (into the transport's buffer).
        """
        sent = self._send_at_once(data)
        if sent == len(data):
            return
        super().write(bytes(data[sent:]))

    def _send_at_once(self, data) -> int:
        """
        How much of C{data} the kernel took at once: none unless nothing is
        waiting in the transport's buffer (and the connection is open).
        """
        if not (
            len(data)
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self.TLS
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
        ):
            return 0
        try:
            return self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            # A reset or closed peer: the buffered path's next doWrite
            # reports it as Twisted always has.
            return 0

    def writeSequence(self, iovec) -> None:
        if not self._tempDataBuffer and self.offset == len(self.dataBuffer):
            self.write(b"".join(iovec))
        else:
            super().writeSequence(iovec)


def own_copies(cls: type, base: type, names: tuple[str, ...]) -> type:
    """
    Give C{cls} copies of C{base}'s methods C{names} with code objects of
    their own.  CPython 3.11 specialises each attribute read for one type,
    in the code object: a method shared by two classes whose instances
    both pass through it (a server's and a client's connections) sees two
    types, and its reads fall back to the generic lookup, several times
    slower.  Each class with its own code is specialised for itself.
    """
    for name in names:
        shared = base.__dict__[name]
        own = _FunctionType(
            shared.__code__.replace(),
            shared.__globals__,
            shared.__name__,
            shared.__defaults__,
            shared.__closure__,
        )
        own.__qualname__ = f"{cls.__qualname__}.{name}"
        own.__doc__ = shared.__doc__
        own.__kwdefaults__ = shared.__kwdefaults__
        setattr(cls, name, own)
    return cls


_EAGER_WRITE_METHODS = ("doRead", "write", "write_borrowed", "_send_at_once", "writeSequence")


class EagerWriteServer(EagerWrite, _tcp.Server):
    """An accepted TCP connection with L{EagerWrite}."""


class EagerWriteClient(EagerWrite, _tcp.Client):
    """An outgoing TCP connection with L{EagerWrite}."""


own_copies(EagerWriteServer, EagerWrite, _EAGER_WRITE_METHODS)
own_copies(EagerWriteClient, EagerWrite, _EAGER_WRITE_METHODS)


class EagerWritePort(_tcp.Port):
    """A listening TCP port whose connections write eagerly."""

    transport = EagerWriteServer


class EagerWriteConnector(_tcp.Connector):
    """Connects with an L{EagerWriteClient}."""

    def _makeTransport(self):
        return EagerWriteClient(self.host, self.port, self.bindAddress, self, self.reactor)


def adopt_port(port_type, reactor, descriptor: int, family, factory):
    """
    A listening port of C{port_type} on an inherited listening socket, as
    C{reactor.adoptStreamPort} builds one (not yet listening).
    """
    return port_type._fromListeningDescriptor(reactor, descriptor, family, factory)


class LeanEPollReactor(_EPollReactor):
    """
    The epoll reactor without the per-event legacy log context, whose TCP
    connections write eagerly.

    @param log_context: keep Twisted's C{callWithLogger} around every event
        (for measuring the difference only).
    @param eager_writes: build TCP transports with L{EagerWrite} (likewise).
    """

    def __init__(self, log_context: bool = False, eager_writes: bool = True) -> None:
        super().__init__()
        self._log_context = log_context
        self._port_type = EagerWritePort if eager_writes else _tcp.Port
        self._connector_type = EagerWriteConnector if eager_writes else _tcp.Connector

    def doPoll(self, timeout):
        if self._log_context:
            return super().doPoll(timeout)
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == _errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == _EPOLLIN:
                    # Input alone, most events: _doReadOrWrite's read
                    # branch, without its call and its tests for the others.
                    try:
                        if selectable.fileno() == -1:
                            why = _NO_FILEDESC
                            in_read = False
                        else:
                            why = selectable.doRead()
                            in_read = True
                    except BaseException:
                        why = _sys.exc_info()[1]
                        in_read = False
                        _legacy_log.err()
                    if why:
                        self._disconnectSelectable(selectable, why, in_read)
                else:
                    handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                _log_escaped_error(selectable)

    # The run loop calls doIteration, which EPollReactor binds to its own
    # doPoll at class creation: without this the override never runs.
    doIteration = doPoll

    def listenTCP(self, port, factory, backlog=50, interface=""):
        listening = self._port_type(port, factory, backlog, interface, self)
        listening.startListening()
        return listening

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        connector = self._connector_type(host, port, factory, timeout, bindAddress, self)
        connector.connect()
        return connector

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        if addressFamily not in (2, 10):  # AF_INET, AF_INET6: UNIX as before
            return super().adoptStreamPort(fileDescriptor, addressFamily, factory)
        listening = adopt_port(self._port_type, self, fileDescriptor, addressFamily, factory)
        listening.startListening()
        return listening


def epoll_socket_below(transport):
    """
    The TCP transport under C{transport} (itself, or under layers whose
    pause and resume only relay to their own transport: marked
    C{relays_production}), if it runs on an epoll reactor and resumes as
    Twisted's C{FileDescriptor} does, so that whether resuming would change
    anything can be read from the reactor's C{_reads}; else None.
    """
    for _ in range(8):
        if not getattr(type(transport), "relays_production", False):
            break
        transport = transport.transport
    kind = type(transport)
    if (
        isinstance(transport, EagerWrite)
        and isinstance(getattr(transport, "reactor", None), _EPollReactor)
        and kind.resumeProducing is _abstract.FileDescriptor.resumeProducing
        and kind.startReading is _abstract.FileDescriptor.startReading
        and type(transport.reactor).addReader is _EPollReactor.addReader
    ):
        return transport
    return None


def _log_escaped_error(selectable) -> None:
    try:
        prefix = selectable.logPrefix()
    except BaseException:
        prefix = "(buggy logPrefix method)"
    _legacy_log.err(system=prefix)


def install_lean_reactor() -> bool:
    """
    Install L{LeanEPollReactor} as the global reactor unless one is
    installed already (twistd C{--reactor}, a test); C{False} then.
    """
    if "twisted.internet.reactor" in _sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(LeanEPollReactor())
    return True


# --- Under Twisted's TLS: pyOpenSSL's memory BIOs of an idle connection ---
#
# Twisted's C{TLSMemoryBIOProtocol} runs OpenSSL over two memory BIOs of
# the C{OpenSSL.SSL.Connection} it is handed (C{Connection(context, None)}).
# A memory BIO keeps the largest buffer it ever held until it is freed: on
# the server, the ClientHello on one side and the server's whole first
# flight (certificate chain, session tickets) on the other, about 1.7 KB
# per connection measured with a TLS 1.3 client (tests/bench/held.py gives
# the whole figure).  Nothing public frees them while the connection
# lives.  L{release_handshake_bios} swaps both, once they are empty after
# the handshake, for fresh ones that hold nothing until the next record:
# C{SSL_set_bio} frees the old pair.
#
# pyOpenSSL's private names, each with its canary in
# tests/unit/test_twistedadapter.py: C{Connection._ssl}, C{._into_ssl} and
# C{._from_ssl} (the SSL object and its read and write BIOs, which
# C{bio_write}/C{bio_read} use), and the cffi bindings C{OpenSSL._util.lib}
# (C{BIO_new}, C{BIO_s_mem}, C{BIO_get_mem_data}, C{SSL_set_bio}) and
# C{OpenSSL._util.ffi}.  If any is gone the swap does nothing: idle
# connections then keep those buffers, and nothing else changes.

try:
    from OpenSSL._util import ffi as _ssl_ffi
    from OpenSSL._util import lib as _ssl_lib

    _BIO_BINDINGS = all(
        hasattr(_ssl_lib, name)
        for name in ("BIO_new", "BIO_s_mem", "BIO_get_mem_data", "SSL_set_bio")
    )
except ImportError:  # pragma: no cover - a pyOpenSSL without its bindings
    _BIO_BINDINGS = False


#: BIO_get_mem_data's out-parameter (where the data starts), which
#: _bio_pending does not read: one serves every call.
_MEM_DATA_START = _ssl_ffi.new("char **") if _BIO_BINDINGS else None
# cffi's functions as globals: reading them off the FFI object takes
# CPython's generic attribute lookup, several times per request.
if _BIO_BINDINGS:
    _ffi_from_buffer = _ssl_ffi.from_buffer
    _ffi_unpack = _ssl_ffi.unpack
    _ffi_buffer = _ssl_ffi.buffer


def _bio_pending(bio) -> int:
    return _ssl_lib.BIO_get_mem_data(bio, _MEM_DATA_START)


def release_handshake_bios(connection) -> bool:
    """
    Give C{connection} (an C{OpenSSL.SSL.Connection} on memory BIOs) two
    fresh, empty memory BIOs in place of those the handshake grew, if both
    are empty; C{True} if it did.  Call it between reads (after
    C{TLSMemoryBIOProtocol.dataReceived} returns, the incoming BIO has been
    read to the end and the outgoing one flushed to the transport).
    """
    if not _BIO_BINDINGS:
        return False
    ssl = getattr(connection, "_ssl", None)
    into_ssl = getattr(connection, "_into_ssl", None)
    from_ssl = getattr(connection, "_from_ssl", None)
    if ssl is None or into_ssl is None or from_ssl is None:
        return False
    if _bio_pending(into_ssl) or _bio_pending(from_ssl):
        return False
    fresh_in = _ssl_lib.BIO_new(_ssl_lib.BIO_s_mem())
    if fresh_in == _ssl_ffi.NULL:
        return False
    fresh_out = _ssl_lib.BIO_new(_ssl_lib.BIO_s_mem())
    if fresh_out == _ssl_ffi.NULL:
        _ssl_lib.BIO_free(fresh_in)
        return False
    # SSL_set_bio takes ownership of the new pair and frees the old one.
    _ssl_lib.SSL_set_bio(ssl, fresh_in, fresh_out)
    connection._into_ssl = fresh_in
    connection._from_ssl = fresh_out
    return True


# --- Header fields: checked pairs into twisted.web's Headers ---

from twisted.web.http_headers import Headers as _Headers  # noqa: E402
from twisted.web.http_headers import _nameEncoder  # noqa: E402


def add_checked_fields(headers: _Headers, fields) -> None:
    """
    Add C{fields}, (name, value) pairs quayfront's framer or response reader
    has checked (token names, no CR or LF in any value), to C{headers}: the
    same as C{addRawHeader} for each, without its per-value sanitising,
    which replaces only the line ends these values cannot have.  Three to
    four times cheaper per field, for every response head relayed.
    """
    raw = headers._rawHeaders
    encode = _nameEncoder.encode
    for name, value in fields:
        raw.setdefault(encode(name), []).append(value)


# --- Twisted's TLS: one call per read, one transport write per write ---
#
# C{TLSMemoryBIOProtocol._flushReceiveBIO} hands the protocol above one
# C{dataReceived} per TLS record it decrypts: at most 16 KiB each, so an
# upload costs the whole HTTP path (channel, framer, exchange, upstream
# write) once per 16 KiB.  Its C{_write} sends each 16 KiB record with a
# transport write of its own.  And every record costs pyOpenSSL's
# C{recv}/C{send}/C{bio_read} a buffer allocated, a copy made and its
# error checks, about a third of the CPU of a transfer above what OpenSSL's
# own cipher takes (measured: 1.13-1.21 s per GiB encrypted record by
# record through pyOpenSSL, 0.89 s through the same OpenSSL calls made
# directly, 0.64 s for the cipher alone).
#
# L{BatchedReceiveTLS} calls OpenSSL directly, through pyOpenSSL's cffi
# bindings: it decrypts every record a read brought into one buffer and
# hands them on in one C{dataReceived}, in order and before any end of the
# stream the same read reveals; it encrypts a write record by record (so
# the memory BIO never holds more than a record) into one buffer and sends
# them with one transport write.  The two buffers are the process's, not
# the connection's: nothing is left in them between calls.  Anything but
# data or "needs more bytes" goes through pyOpenSSL's own error handling
# (C{Connection._raise_ssl_error}), so failures surface as before.
#
# Twisted's private names, each in the canary test: C{_flushReceiveBIO},
# C{_write} and C{makeConnection} (replaced; the last for its copies of the
# transport's interfaces), C{_creatorCallable}, C{_appSendBuffer},
# C{_connectWrapped}, C{_checkHandshakeStatus}, C{_tlsConnection}, C{_lostTLSConnection},
# C{_aborted}, C{_shutdownTLS}, C{_tlsShutdownFinished}, C{_bufferedWrite}
# and C{_flushSendBIO}.  pyOpenSSL's: C{Connection._ssl}, C{._from_ssl},
# C{._raise_ssl_error} and the bindings C{SSL_read}, C{SSL_write},
# C{SSL_get_error}, C{BIO_read}; without any of them the protocol is
# Twisted's own.  A long read is decrypted in place through
# C{BIO_new_mem_buf}, C{BIO_set_mem_eof_return} and C{SSL_set_bio} (with
# C{Connection._into_ssl} kept up to date); without them it is copied into
# the memory BIO.

from OpenSSL.SSL import Error as _SSLError  # noqa: E402
from OpenSSL.SSL import WantReadError as _WantReadError  # noqa: E402
from OpenSSL.SSL import ZeroReturnError as _ZeroReturnError  # noqa: E402
from twisted.internet.protocol import Protocol as _Protocol  # noqa: E402
from twisted.protocols.tls import TLSMemoryBIOProtocol as _TLSMemoryBIOProtocol  # noqa: E402
from zope.interface import directlyProvides as _directlyProvides  # noqa: E402
from zope.interface import providedBy as _providedBy  # noqa: E402
from twisted.python.failure import Failure as _Failure  # noqa: E402

_RAW_TLS = _BIO_BINDINGS and all(
    hasattr(_ssl_lib, name)
    for name in (
        "SSL_read", "SSL_write", "SSL_get_error", "BIO_read", "BIO_write", "SSL_ERROR_WANT_READ"
    )
)

#: Bytes of a read put into the memory BIO at a time (see dataReceived).
_BIO_FEED_BYTES = 2**16
#: A read at least this long is decrypted where it lies (see
#: _receive_in_place); a shorter one is copied into the memory BIO.
_IN_PLACE_READ_BYTES = 2**15
#: Whether pyOpenSSL's bindings have what _receive_in_place calls.
_IN_PLACE = _RAW_TLS and all(
    hasattr(_ssl_lib, name) for name in ("BIO_new_mem_buf", "BIO_set_mem_eof_return", "BIO_free")
)
#: Plaintext bytes per TLS record (the protocol's maximum).
_RECORD_BYTES = 2**14
#: The process's buffers for what one read decrypts and one write
#: encrypts: a whole 256 KiB socket read (EagerWrite.bufferSize) or
#: upstream read with room to spare, so that each takes one call above.
_SCRATCH_BYTES = 2**19 + 2**15


class _Scratch:
    """The two process-wide buffers, made on first use."""

    plaintext = None
    ciphertext = None

    @classmethod
    def make(cls) -> None:
        cls.plaintext = _ssl_ffi.new("char[]", _SCRATCH_BYTES)
        cls.ciphertext = _ssl_ffi.new("char[]", _SCRATCH_BYTES)


#: The interfaces each transport declaration stands for, flattened once
#: (by the declaration's id, kept with it so that the id stays its own).
_INTERFACES_OF: dict[int, tuple] = {}


def provide_what_transport_provides(wrapper, transport) -> None:
    """
    Declare on C{wrapper} the interfaces C{transport} provides, as
    C{directlyProvides(wrapper, providedBy(transport))} does, without
    flattening the same declaration again for every connection (most of
    that call's cost).
    """
    declaration = _providedBy(transport)
    known = _INTERFACES_OF.get(id(declaration))
    if known is None or known[0] is not declaration:
        known = _INTERFACES_OF[id(declaration)] = (declaration, tuple(declaration))
    _directlyProvides(wrapper, *known[1])


class BatchedReceiveTLS(_TLSMemoryBIOProtocol):
    """
    Twisted's TLS protocol, but the records one read brings are handed to
    the protocol above in one C{dataReceived}, the records of one write
    leave in one transport write, and OpenSSL is called directly.
    """

    def makeConnection(self, transport) -> None:
        # Twisted's makeConnection copies the transport's interfaces onto
        # this protocol one at a time (each directlyProvides replacing the
        # last), then ProtocolWrapper.makeConnection copies them all again:
        # eleven zope.interface declarations per connection where one does
        # (about 9 % of a new connection's CPU under cProfile).  The same
        # steps in the same order, with the copy made once.
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        provide_what_transport_provides(self, transport)
        _Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            # ProtocolWrapper.makeConnection, but for its copy of the
            # interfaces and the two calls just made.
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()

    # The protocol above stops and resumes reading through these (the end
    # of every response resumes it).  ProtocolWrapper.__getattr__ would find
    # them on the transport below, at the cost of a failed lookup and two
    # more calls each time.
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        below = self._socket_below
        if below is False:
            below = self._socket_below = epoll_socket_below(self.transport)
        if below is None:
            self.transport.resumeProducing()
        elif below.fileno() not in below.reactor._reads:
            below.resumeProducing()
        # Else the socket is being read already: what resuming it would come
        # to (FileDescriptor.resumeProducing, startReading, addReader and
        # _add find it in the epoll reactor's _reads), without those four
        # calls and the PROXY layer's relay on every response.

    #: The socket transport below, for resumeProducing: False until looked
    #: up, None where the general way is taken.
    _socket_below: object = False

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        # The protocol above registered itself as this transport's producer
        # and is never unregistered once the connection is gone: let go of
        # it, or the two stay in a reference cycle for the garbage collector.
        self._producer = None

    #: The read being handled, while it goes into the memory BIO: a cffi
    #: pointer to its bytes, how far it has gone in, and its length.
    _input = None
    _input_fed = 0
    _input_length = 0

    def dataReceived(self, data: bytes) -> None:
        # Twisted's dataReceived once the handshake is done (the BIO fed,
        # writes held back by the handshake retried, the records read).  A
        # long read (an upload's) is decrypted in place (_receive_in_place).
        # A shorter one goes into the memory BIO, a piece at a time as the
        # records before it are read out (_flushReceiveBIO), should it be
        # long after all (the in-place way unavailable): a memory BIO keeps
        # the largest buffer it ever held until the connection closes, and
        # a 256 KiB read written into it at once would stay allocated on
        # every connection that ever uploaded (measured: 274 KiB per
        # connection).
        if not self._handshakeDone or not _RAW_TLS:
            return super().dataReceived(data)
        if (
            len(data) >= _IN_PLACE_READ_BYTES
            and _IN_PLACE
            and not _bio_pending(self._tlsConnection._into_ssl)
        ):
            return self._receive_in_place(data)
        if self._view_bio is not None:
            self._writable_input()
        # Released when the last reference goes, at the latest as this
        # returns (the BIO copies what it is given): a with statement would
        # add a call of its own per read.
        self._input = pointer = _ffi_from_buffer(data)
        self._input_length = length = len(data)
        # The first piece now: reading before it would only find the BIO
        # empty.
        piece = length if length < _BIO_FEED_BYTES else _BIO_FEED_BYTES
        try:
            if _ssl_lib.BIO_write(self._tlsConnection._into_ssl, pointer, piece) != piece:
                raise MemoryError(f"BIO_write of {piece} bytes failed")
            self._input_fed = piece
            if self._appSendBuffer:
                self._unbufferPendingWrites()
            self._flushReceiveBIO()
        finally:
            self._input = None
            self._input_fed = self._input_length = 0

    #: The read-only BIO over the bytes of the read being (or last) decrypted
    #: in place, or None.
    _view_bio = None

    def _receive_in_place(self, data: bytes) -> None:
        """
        Decrypt C{data} where it lies: OpenSSL reads its records from a
        read-only BIO over C{data}'s own bytes, not from a copy in the
        memory BIO.  An upload's every byte is then copied once less, and
        not cleared first either (a memory BIO zeroes what it grows into):
        measured, 0.67 -> 0.59 s per GiB decrypted.  A record cut short at
        the end of the read is not lost: OpenSSL has taken its first bytes
        into its own record buffer by the time it asks for more.  Whatever
        is left unread when this returns (only if decrypting stopped early)
        is copied into a memory BIO, so that no BIO points into C{data}
        once it is gone.
        """
        connection = self._tlsConnection
        with _ffi_from_buffer(data) as pointer:
            view = _ssl_lib.BIO_new_mem_buf(pointer, len(data))
            if view == _ssl_ffi.NULL:
                raise MemoryError("BIO_new_mem_buf failed")
            # Empty, it asks for more bytes rather than signalling the end.
            _ssl_lib.BIO_set_mem_eof_return(view, -1)
            # The read BIO before it is empty (checked): SSL_set_bio frees it.
            _ssl_lib.SSL_set_bio(connection._ssl, view, connection._from_ssl)
            connection._into_ssl = self._view_bio = view
            try:
                if self._appSendBuffer:
                    self._unbufferPendingWrites()
                self._flushReceiveBIO()
            finally:
                if connection._into_ssl == view and _bio_pending(view):
                    self._writable_input()

    def _writable_input(self) -> None:
        """
        Give the connection a memory BIO to read from again, in place of
        the read-only one over an earlier read, with what that one has not
        been read of.
        """
        connection = self._tlsConnection
        view, self._view_bio = self._view_bio, None
        if connection._into_ssl != view:
            # Replaced since (release_handshake_bios).
            return
        fresh = _ssl_lib.BIO_new(_ssl_lib.BIO_s_mem())
        if fresh == _ssl_ffi.NULL:
            raise MemoryError("BIO_new failed")
        left = _ssl_lib.BIO_get_mem_data(view, _MEM_DATA_START)
        if left > 0 and _ssl_lib.BIO_write(fresh, _MEM_DATA_START[0], left) != left:
            _ssl_lib.BIO_free(fresh)
            raise MemoryError(f"BIO_write of {left} bytes failed")
        _ssl_lib.SSL_set_bio(connection._ssl, fresh, connection._from_ssl)
        connection._into_ssl = fresh

    def _feed_input(self) -> bool:
        """
        Put the next piece of the read being handled into the memory BIO;
        False if all of it is in.
        """
        fed = self._input_fed
        piece = min(_BIO_FEED_BYTES, self._input_length - fed)
        if piece <= 0:
            return False
        into_ssl = self._tlsConnection._into_ssl
        if _ssl_lib.BIO_write(into_ssl, self._input + fed, piece) != piece:
            # A memory BIO refuses only when it cannot grow.
            raise MemoryError(f"BIO_write of {piece} bytes failed")
        self._input_fed = fed + piece
        return True

    def _flushReceiveBIO(self) -> None:
        if not _RAW_TLS:
            return super()._flushReceiveBIO()
        if _Scratch.plaintext is None:
            _Scratch.make()
        connection = self._tlsConnection
        ssl = connection._ssl
        buffer = _Scratch.plaintext
        size = _SCRATCH_BYTES
        ssl_read = _ssl_lib.SSL_read
        used = 0
        while not self._lostTLSConnection:
            count = ssl_read(ssl, buffer + used, size - used)
            while count > 0:
                # Records, one per call: nothing in here can end the
                # connection, so the loop stays tight.
                used += count
                if used == size:
                    self._deliver(_ffi_unpack(buffer, used))
                    used = 0
                count = ssl_read(ssl, buffer + used, size - used)
            if _ssl_lib.SSL_get_error(ssl, count) == _ssl_lib.SSL_ERROR_WANT_READ:
                if self._input_fed < self._input_length and self._feed_input():
                    continue
                # Nothing more decrypts until more bytes arrive.
                break
            # The end of the stream or an error: what came before it first.
            if used:
                self._deliver(_ffi_unpack(buffer, used))
                used = 0
            try:
                connection._raise_ssl_error(ssl, count)
            except _WantReadError:
                break
            except _ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except _SSLError:
                self._tlsShutdownFinished(_Failure())
            else:
                break
        if used and not self._aborted:
            # _deliver, for the last (mostly the only) delivery of a read.
            self.wrappedProtocol.dataReceived(_ffi_unpack(buffer, used))
        # What the records read may call for (a handshake reply, a key
        # update) goes out now: _flushSendBIO, with its usual case (nothing
        # to send) found here.
        if _ssl_lib.BIO_get_mem_data(self._tlsConnection._from_ssl, _MEM_DATA_START):
            _TLSMemoryBIOProtocol._flushSendBIO(self)

    def _flushSendBIO(self) -> None:
        if _RAW_TLS and not _ssl_lib.BIO_get_mem_data(
            self._tlsConnection._from_ssl, _MEM_DATA_START
        ):
            # The usual case after a request is read: nothing to send, known
            # without a bio_read that fails (an exception).
            return
        super()._flushSendBIO()

    def _write(self, data: bytes) -> None:
        if not _RAW_TLS:
            return super()._write(data)
        if self._lostTLSConnection:
            return
        if _Scratch.ciphertext is None:
            _Scratch.make()
        connection = self._tlsConnection
        ssl = connection._ssl
        from_ssl = connection._from_ssl
        buffer = _Scratch.ciphertext
        ssl_write = _ssl_lib.SSL_write
        bio_read = _ssl_lib.BIO_read
        total = len(data)
        offset = used = 0
        # Released when the last reference goes, as this returns (OpenSSL
        # copies what it encrypts): no with statement, a call of its own.
        plaintext = _ffi_from_buffer(data)
        while offset < total:
            count = total - offset
            if count > _RECORD_BYTES:
                count = _RECORD_BYTES
            count = ssl_write(ssl, plaintext + offset, count)
            if count <= 0:
                try:
                    connection._raise_ssl_error(ssl, count)
                except _WantReadError:
                    self._send_encrypted(used)
                    self._bufferedWrite(bytes(data[offset:]))
                    return
                except _SSLError:
                    self._send_encrypted(used)
                    self._tlsShutdownFinished(_Failure())
                    return
                # SSL_write returns more than zero unless it failed.
                raise AssertionError(f"SSL_write returned {count} without an error")
            offset += count
            # The record just made, in one read unless it fills the
            # buffer (then sent, and the rest read after it).
            read = bio_read(from_ssl, buffer + used, _SCRATCH_BYTES - used)
            while read > 0:
                used += read
                if used < _SCRATCH_BYTES:
                    break
                self._send_encrypted(used)
                used = 0
                read = bio_read(from_ssl, buffer, _SCRATCH_BYTES)
        if used:
            # _send_encrypted, for the last (mostly the only) send of a write.
            write_borrowed = self._write_borrowed
            if write_borrowed:
                write_borrowed(_ffi_buffer(buffer, used))
            else:
                self._send_encrypted(used)

    def writeSequence(self, iovec) -> None:
        # Twisted's writeSequence and write in one call.
        if self.disconnecting and self._producer is None:
            return
        self._write(b"".join(iovec))

    #: The transport's L{EagerWrite.write_borrowed}, or None: looked up once.
    _write_borrowed: object = False

    def _send_encrypted(self, used: int) -> None:
        if not used:
            return
        write_borrowed = self._write_borrowed
        if write_borrowed is False:
            # Through the PROXY layer's wrapper, which relays attributes.
            write_borrowed = self._write_borrowed = getattr(
                self.transport, "write_borrowed", None
            )
        if write_borrowed is not None:
            # Sent from the buffer where the socket takes it all; nothing
            # stays in the buffer either way.
            write_borrowed(_ffi_buffer(_Scratch.ciphertext, used))
        else:
            self.transport.write(_ffi_buffer(_Scratch.ciphertext, used)[:])

    def _deliver(self, received: bytes) -> None:
        if not self._aborted:
            # What ProtocolWrapper.dataReceived does, one call fewer.
            self.wrappedProtocol.dataReceived(received)


# --- twisted.web's Request: made, first written and finished in one call ---
#
# twisted.web's C{Request} makes two C{Headers} in C{__init__} that a relayed
# request never reads, writes a response head through its general
# C{write} (default content type, cookies, encoders, the HEAD trick) and
# finishes through C{finish} and C{_cleanup}, several calls each.
# L{LeanRequest} does each in one call for the plain case and leaves
# anything else to twisted.web.  Its private names, each in the canary
# test: C{_parsePOSTFormSubmission} and C{_adapterCache} (set as
# C{__init__} sets them), C{_disconnected}, C{_inFakeHead} and C{_encoder}
# (the cases left to twisted.web).

from twisted.web import server as _web_server  # noqa: E402
from twisted.web.http import NO_BODY_CODES as _NO_BODY_CODES  # noqa: E402
from twisted.web.http import toChunk as _to_chunk  # noqa: E402


def _write_nothing(data: bytes) -> None:
    pass


class LeanRequest(_web_server.Request):
    """
    twisted.web's request, made, first written and finished in one call
    each.  Its channel writes a response's start (head and first body
    bytes) with C{write_response_start}; a channel of another type than
    C{lean_channel_type} is finished twisted.web's way.  A subclass
    provides C{requestHeaders} and C{responseHeaders} (made when read:
    C{__init__} does not make them).
    """

    #: The channel type whose requests finish in one call.
    lean_channel_type: type | tuple = ()

    #: What twisted.web's Request.__init__ sets (server's, with http's and
    #: Componentized's under it); LeanRequest's sets the same.
    MIRRORED_ATTRIBUTES = frozenset(
        {
            "notifications",
            "channel",
            "client",
            "host",
            "requestHeaders",
            "received_cookies",
            "responseHeaders",
            "cookies",
            "transport",
            "queued",
            "_parsePOSTFormSubmission",
            "_adapterCache",
        }
    )

    def __init__(self, channel, *args, **kwargs) -> None:
        if args or kwargs:
            super().__init__(channel, *args, **kwargs)
            return
        # What twisted.web's Request.__init__ sets (MIRRORED_ATTRIBUTES), in
        # one call instead of three, with its two Headers made only when
        # something reads them (a relayed request never does).  A test
        # holds twisted.web's to this list.
        self.notifications = []
        self.channel = channel
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self.received_cookies = {}
        self.cookies = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = channel.site._parsePOSTFormSubmission
        self._adapterCache = {}
        # Class attributes that every relayed response reads: CPython 3.11
        # specialises reading an instance's own attribute, not one its class
        # holds (each such read takes the generic lookup), so they are set
        # here, to twisted.web's own defaults (a test holds them to its
        # class's).
        self.finished = self.startedWriting = self.chunked = self.sentLength = 0
        self.producer = self.etag = self.lastModified = self.content = self._encoder = None
        self._disconnected = self._inFakeHead = False

    def _write_relayed_head(self, fields: dict[bytes, list[bytes]], data: bytes) -> bool:
        """
        What twisted.web's C{Request.write} does on its first call, for a
        relayed head and the first body bytes; false, with nothing done, if
        this request uses what that takes twisted.web's own way (a default
        content type, an encoder, cookies...) or is over.
        """
        lines = []
        # A loop rather than a comprehension, which is a call of its own.
        append = lines.append
        for name, values in fields.items():
            for value in values:
                append(name + b": " + value + b"\r\n")
        if not self._write_relayed_lines(b"".join(lines), b"Content-Length" in fields, None, data):
            return False
        if self.chunked:
            # As twisted.web leaves the fields it wrote.
            fields[b"Transfer-Encoding"] = [b"chunked"]
        return True

    def _write_relayed_lines(
        self, lines: bytes, has_length: bool, hsts: bytes | None, data: bytes
    ) -> bool:
        """
        L{_write_relayed_head} for field lines joined already, each ended by
        CRLF: C{has_length} says whether a C{Content-Length} is among them,
        C{hsts} is a C{Strict-Transport-Security} value to add after them
        (if any: None or empty adds none).
        """
        if (
            self.finished
            or self._disconnected
            or self._inFakeHead
            or self._encoder is not None
            or self.defaultContentType is not None
            or self.lastModified is not None
            or self.etag is not None
            or self.cookies
        ):
            return False
        self.startedWriting = 1
        version = self.clientproto
        code = self.code
        added = b"Strict-Transport-Security: " + hsts + b"\r\n" if hsts else b""
        with_body = self.method != b"HEAD" and code not in _NO_BODY_CODES
        if with_body and version == b"HTTP/1.1" and not has_length:
            # Chunked, so that the connection can carry another request.
            added += b"Transfer-Encoding: chunked\r\n"
            self.chunked = 1
        head = b"%s %d %s\r\n%s%s\r\n" % (version, code, self.code_message, lines, added)
        if with_body:
            self.sentLength += len(data)
            if data:
                if self.chunked:
                    head = [head, *_to_chunk(data)]
                else:
                    head = [head, data]
        else:
            # As twisted.web: no body is written for these, ever.
            self.write = _write_nothing
        # The head and the first body bytes in one write, at once (what
        # write_head, write and flush_head would send).
        self.channel.write_response_start(head)
        return True

    def finish(self) -> None:
        """
        What twisted.web's C{Request.finish} (and its C{_cleanup}) does, in
        one call, for a response whose head is written and that nothing
        else holds (no encoder, producer, queue or spooled body: a relayed
        one); anything else goes twisted.web's way.
        """
        if (
            not self.startedWriting
            or self.finished
            or self._disconnected
            or self.queued
            or self.producer is not None
            or self._encoder is not None
            or self.content is not None
            or not isinstance(self.channel, self.lean_channel_type)
        ):
            super().finish()
            return
        channel = self.channel
        if self.chunked:
            # The last chunk.
            channel.write(b"0\r\n\r\n")
        factory = channel.factory
        if factory is not None:
            # quayfront's site's does nothing (the request logs itself when
            # it is over); another factory's is called as twisted.web calls
            # it.
            factory.log(self)
        self.finished = 1
        channel.requestDone(self)
        del self.channel
        for notification in self.notifications:
            notification.callback(None)
        self.notifications = []
