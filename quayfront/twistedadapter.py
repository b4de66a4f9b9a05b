"""
The private Twisted names the HTTP layer's strictness hooks into, in one
place.  Each has a canary in C{tests/unit/test_twistedadapter.py} that fails
loudly when a Twisted release removes or changes it.

  - C{HTTPChannel._respondToBadRequestAndDisconnect}: what the channel calls
    when its own parser refuses a request (a bare C{400} and a close).
    quayfront's framer refuses everything the channel would first, so this
    is a backstop: L{ChannelBadRequestHook} routes it to the channel's
    C{twisted_refused_request()}, which answers with a real response.
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

from twisted.web import _newclient
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
