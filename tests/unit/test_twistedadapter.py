"""
Canaries for the private Twisted names in quayfront.twistedadapter: each
fails loudly if a Twisted release removes or changes what it relies on.
(The upstream client no longer uses any: its tests are in
test_upstreamclient.py.)
"""

from __future__ import annotations

import inspect

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import http
from twisted.python.failure import Failure

from quayfront.twistedadapter import (
    ChannelBadRequestHook,
    ChannelContinueHook,
    client_gone,
    hand_back_idle_timeout,
    request_line,
    send_continue,
    waiting_for_client,
    wrap_channel,
)

# Canaries, one per private name.


def test_canary_channel_bad_request_method() -> None:
    """HTTPChannel still answers its own refusals through _respondToBadRequestAndDisconnect."""
    assert callable(getattr(http.HTTPChannel, "_respondToBadRequestAndDisconnect", None))
    assert "_respondToBadRequestAndDisconnect()" in inspect.getsource(
        http.HTTPChannel.headerReceived
    )

    class Channel(ChannelBadRequestHook, http.HTTPChannel):
        refused = 0

        def twisted_refused_request(self) -> None:
            self.refused += 1

    channel = Channel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n")
    assert channel.refused == 1


class _HeldRequest(http.Request):
    """A request that records the request line in gotLength and is answered by the test."""

    seen: tuple[bytes, bytes, bytes] | None = None

    def gotLength(self, length):
        self.seen = request_line(self.channel)
        super().gotLength(length)

    def process(self):
        pass


def held_channel(timeout: float | None = None):
    channel = http.HTTPChannel()
    channel.requestFactory = _HeldRequest
    channel.timeOut = timeout
    channel.callLater = MemoryReactorClock().callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_canary_request_line() -> None:
    """The channel holds the request line in _command, _path, _version when gotLength runs."""
    channel, _ = held_channel()
    channel.dataReceived(b"PUT /a?b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n")
    assert channel.requests[0].seen == (b"PUT", b"/a?b", b"HTTP/1.1")


def test_canary_idle_timeout_hand_back() -> None:
    """While handling a request the channel restores _savedTimeOut when the response ends."""
    channel, _ = held_channel(timeout=60)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert channel._handlingRequest is True and channel.timeOut is None
    hand_back_idle_timeout(channel, 7)
    request = channel.requests[0]
    request.finish()
    assert channel._handlingRequest is False and channel.timeOut == 7
    hand_back_idle_timeout(channel, 9)
    assert channel.timeOut == 9


def test_canary_waiting_for_client() -> None:
    """_waitingForTransport follows the transport's pause and resume."""
    channel, _ = held_channel()
    assert waiting_for_client(channel) is False
    channel.pauseProducing()
    assert waiting_for_client(channel) is True
    channel.resumeProducing()
    assert waiting_for_client(channel) is False


def test_canary_continue_hook() -> None:
    """Expect: 100-continue goes through _send100Continue, which the hook can hold back."""

    class Channel(ChannelContinueHook, http.HTTPChannel):
        held = True

        def hold_continue(self) -> bool:
            return self.held

    channel = Channel()
    channel.requestFactory = _HeldRequest
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                         b"Expect: 100-continue\r\n\r\n")
    assert transport.value() == b""
    send_continue(channel)
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_canary_wrap_channel_and_client_gone() -> None:
    """Site's channel wrapper exists; Request._disconnected turns true when the connection is lost."""
    channel = http.HTTPChannel()
    wrapped = wrap_channel(channel)
    assert wrapped._channel is channel
    channel, _ = held_channel()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    request = channel.requests[0]
    assert client_gone(request) is False
    channel.connectionLost(Failure(ConnectionDone()))
    assert client_gone(request) is True


def test_canary_request_done_replays_through_data_received() -> None:
    """requestDone replays the bytes buffered behind a handled request through self.dataReceived."""
    replayed: list[bytes] = []

    class Channel(http.HTTPChannel):
        in_request_done = False

        def dataReceived(self, data):
            if self.in_request_done:
                replayed.append(data)
            super().dataReceived(data)

        def requestDone(self, request):
            self.in_request_done = True
            try:
                super().requestDone(request)
            finally:
                self.in_request_done = False

    channel = Channel()
    channel.requestFactory = _HeldRequest
    channel.callLater = MemoryReactorClock().callLater
    channel.makeConnection(StringTransport())
    second = b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n" + second)
    channel.requests[0].finish()
    assert replayed == [second]
