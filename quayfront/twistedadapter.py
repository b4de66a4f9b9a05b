"""
The private Twisted names the HTTP layer's strictness hooks into, in one
place.  Each has a canary in C{tests/unit/test_twistedadapter.py} that fails
loudly when a Twisted release removes or changes it.

  - C{HTTPChannel._respondToBadRequestAndDisconnect}: what the channel calls
    when its own parser refuses a request (a bare C{400} and a close).
    quayfront's framer refuses everything the channel would first, so this
    is a backstop: L{ChannelBadRequestHook} routes it to the channel's
    C{twisted_refused_request()}, which answers with a real response.
  - Not a name but a behaviour: C{HTTPChannel.requestDone} hands the
    pipelined bytes it buffered while a request was handled back to
    C{self.dataReceived} (through C{LineReceiver.setLineMode}); a channel
    that frames client bytes in C{dataReceived} must let those through
    untouched (see C{FrontChannel.requestDone}).
  - C{HTTPChannel._send100Continue}: what the channel calls to send the
    automatic C{100 Continue}; L{ChannelContinueHook} lets the channel
    hold it back (C{hold_continue()}) and L{send_continue} sends it later.
  - C{HTTPChannel._command}, C{_path}, C{_version}: the request line,
    which the channel keeps to itself until the body has been read
    (L{request_line}).
  - C{HTTPChannel._handlingRequest} and C{_savedTimeOut}: whether the
    channel has the whole request and has switched its idle timeout off
    until the response ends, and the timeout it will then restore
    (L{hand_back_idle_timeout}).
  - C{HTTPChannel._waitingForTransport}: whether the channel is waiting for
    its client to read (L{waiting_for_client}).
  - C{_GenericHTTPChannelProtocol}: the wrapper C{Site.buildProtocol}
    expects around a channel (L{wrap_channel}).
  - C{Request._disconnected}: whether the client connection is gone
    (L{client_gone}).
  - C{TransportProxyProducer._producer}: the upstream socket behind the
    agent's proxy producer, to abort an exchange that ended early
    (L{proxied_transport}).
  - C{HTTPConnectionPool._factory} (called with the quiescent callback and a
    description) and C{_HTTP11ClientFactory._quiescentCallback}: how the
    pool builds upstream protocols; L{bounded_connection_pool} makes it
    build L{_BoundedClientProtocol}.
  - C{HTTP11ClientProtocol._parser} (the response parser C{request()}
    creates), C{HTTPParser.state} with C{_newclient.STATUS} and C{HEADER}:
    L{_BoundedClientProtocol} checks each line of the response head with a
    L{ResponseHeadChecker} before Twisted's parser stores it, and bounds the
    parser's line buffer (C{LineReceiver.MAX_LENGTH}, public).  An error
    raised there makes C{HTTP11ClientProtocol.dataReceived} close the
    connection and fail the response with L{ResponseFailed}.
"""

from __future__ import annotations

import functools

from twisted.web import _newclient, http
from twisted.web.client import HTTPConnectionPool

from quayfront.http import ResponseHeadChecker

_HEAD_STATES = (_newclient.STATUS, _newclient.HEADER)


class ChannelBadRequestHook:
    """
    Mixed into an C{HTTPChannel}: Twisted's own refusal of a request calls
    C{self.twisted_refused_request()}.
    """

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.twisted_refused_request()


class ChannelContinueHook:
    """
    Mixed into an C{HTTPChannel}: the automatic C{100 Continue} is sent only
    if C{self.hold_continue()} is false (the channel then sends it later
    with L{send_continue}).
    """

    def _send100Continue(self) -> None:
        if not self.hold_continue():
            super()._send100Continue()


def send_continue(channel) -> None:
    """
    Send the C{100 Continue} a channel held back.
    """
    http.HTTPChannel._send100Continue(channel)


def request_line(channel) -> tuple[bytes, bytes, bytes]:
    """
    The method, target and version of the request whose head C{channel}
    has just parsed (in C{gotLength}, before the body is read).
    """
    return channel._command, channel._path, channel._version


def hand_back_idle_timeout(channel, timeout_s: float | None) -> None:
    """
    Give C{channel} back an idle timeout: at once, or if the channel has
    the whole request and keeps its timeout off until the response ends,
    as the value it will restore then.
    """
    if channel._handlingRequest:
        channel._savedTimeOut = timeout_s
    else:
        channel.setTimeout(timeout_s)


def waiting_for_client(channel) -> bool:
    """
    Whether C{channel} has stopped producing because its client does not
    read (the transport's buffer is full).
    """
    return bool(getattr(channel, "_waitingForTransport", False))


def wrap_channel(channel):
    """
    C{channel} in the wrapper C{Site.buildProtocol} returns (it chooses
    HTTP/1.1 or HTTP/2 by ALPN; quayfront offers HTTP/1.1 only).
    """
    return http._GenericHTTPChannelProtocol(channel)


def client_gone(request) -> bool:
    """
    Whether the connection of C{request} (a C{twisted.web} request) is lost.
    """
    return request._disconnected


def proxied_transport(transport):
    """
    The upstream connection's own transport behind the agent's
    C{TransportProxyProducer} C{transport}, or None once it let go of it.
    """
    return getattr(transport, "_producer", None)


def bound_response_parser(parser, checker: ResponseHeadChecker) -> None:
    """
    Make C{parser} (an C{HTTPClientParser}) pass every head line through
    C{checker} and refuse a line longer than the whole head may be.
    """
    line_received = parser.lineReceived

    def checked_line(line: bytes) -> None:
        state = parser.state
        if state in _HEAD_STATES:
            checker.line(line, is_status_line=state == _newclient.STATUS)
        line_received(line)

    def too_long(data: bytes) -> None:
        checker.too_long()

    parser.lineReceived = checked_line
    parser.MAX_LENGTH = checker.max_head_bytes
    parser.lineLengthExceeded = too_long


class _BoundedClientProtocol(_newclient.HTTP11ClientProtocol):
    """
    An upstream connection whose response heads are bounded and checked.
    """

    def __init__(self, quiescentCallback, max_head_bytes: int, max_headers: int) -> None:
        super().__init__(quiescentCallback)
        self._max_head_bytes = max_head_bytes
        self._max_headers = max_headers

    def request(self, request):
        result = super().request(request)
        if self._parser is not None:
            bound_response_parser(
                self._parser, ResponseHeadChecker(self._max_head_bytes, self._max_headers)
            )
        return result


class _BoundedClientFactory(HTTPConnectionPool._factory):
    # One upstream connection is not worth two log lines.
    noisy = False

    def __init__(self, quiescentCallback, metadata, *, max_head_bytes: int, max_headers: int):
        super().__init__(quiescentCallback, metadata)
        self._max_head_bytes = max_head_bytes
        self._max_headers = max_headers

    def buildProtocol(self, addr):
        return _BoundedClientProtocol(
            self._quiescentCallback, self._max_head_bytes, self._max_headers
        )


def bounded_connection_pool(
    reactor, persistent: bool, max_head_bytes: int, max_headers: int
) -> HTTPConnectionPool:
    """
    A connection pool whose connections refuse response heads over
    C{max_head_bytes} or C{max_headers}, or malformed.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = functools.partial(
        _BoundedClientFactory, max_head_bytes=max_head_bytes, max_headers=max_headers
    )
    return pool


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

from twisted.internet import tcp as _tcp
from twisted.internet.epollreactor import EPollReactor as _EPollReactor
from twisted.python import log as _legacy_log


class EagerWrite:
    """
    Mixed into a TCP transport: C{write()} sends at once when nothing is
    waiting in the transport's buffer, and buffers only the rest.
    """

    def write(self, data: bytes) -> None:
        if (
            data
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self.TLS
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
            and type(data) is bytes
        ):
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                # A reset or closed peer: the buffered path's next doWrite
                # reports it as Twisted always has.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)

    def writeSequence(self, iovec) -> None:
        if not self._tempDataBuffer and self.offset == len(self.dataBuffer):
            self.write(b"".join(iovec))
        else:
            super().writeSequence(iovec)


class EagerWriteServer(EagerWrite, _tcp.Server):
    """An accepted TCP connection with L{EagerWrite}."""


class EagerWriteClient(EagerWrite, _tcp.Client):
    """An outgoing TCP connection with L{EagerWrite}."""


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
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                _log_escaped_error(selectable)

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
