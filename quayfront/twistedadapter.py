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

L{hand_back_idle_timeout} and L{waiting_for_client} name no private Twisted
state any more (the client channel is quayfront's own); they stay here for
the forwarding, which calls them.
"""

from __future__ import annotations

import functools

from twisted.internet._producer_helpers import _PullToPush
from twisted.web import _newclient
from twisted.web.client import HTTPConnectionPool

from quayfront.http import ResponseHeadChecker

_HEAD_STATES = (_newclient.STATUS, _newclient.HEADER)


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
