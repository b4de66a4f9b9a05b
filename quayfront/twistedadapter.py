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

The upstream side uses no private Twisted name: quayfront's own client
(L{quayfront.upstreamclient}) replaced C{Agent}, C{HTTPConnectionPool} and
C{_newclient}.  L{proxied_transport} stays here, as the one way
forwarding reaches the upstream socket behind a response's body transport.
"""

from __future__ import annotations

from twisted.web import http


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
    The upstream connection's own transport (with C{abortConnection()})
    behind the body transport C{transport} of a response from
    L{quayfront.upstreamclient}, or None once the response has ended and
    the connection went back to the pool.
    """
    return getattr(transport, "connection_transport", None)
