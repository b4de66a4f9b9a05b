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
