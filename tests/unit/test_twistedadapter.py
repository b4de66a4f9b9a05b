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
    client_gone,
    hand_back_idle_timeout,
    pull_to_push,
    waiting_for_client,
)

# Canaries, one per private name.


def test_canary_request_refuses_through_its_channel() -> None:
    """twisted.web's Request still refuses a bad request through channel._respondToBadRequestAndDisconnect()."""
    source = inspect.getsource(http.Request.requestReceived)
    assert "self.channel._respondToBadRequestAndDisconnect()" in source


class _HeldRequest(http.Request):
    """A request answered by the test."""

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


def test_canary_pull_to_push(monkeypatch) -> None:
    """_PullToPush(producer, consumer) pulls on a cooperator until stopStreaming, as HTTPChannel uses it."""
    import twisted.internet._producer_helpers as helpers
    from twisted.internet.task import Cooperator

    assert "_PullToPush(producer, self)" in inspect.getsource(http.HTTPChannel.registerProducer)

    class Pull:
        calls = 0

        def resumeProducing(self):
            self.calls += 1

        def stopProducing(self):
            pass

    steps: list = []
    monkeypatch.setattr(
        helpers, "cooperate", Cooperator(scheduler=steps.append, started=True).cooperate
    )
    pull = Pull()
    push = pull_to_push(pull, StringTransport())
    push.startStreaming()
    for _ in range(3):
        steps.pop(0)()
    assert pull.calls >= 1
    push.pauseProducing()
    before = pull.calls
    while steps:
        steps.pop(0)()
    assert pull.calls == before
    push.resumeProducing()
    push.stopStreaming()
    while steps:
        steps.pop(0)()
    assert callable(push.stopProducing)


def test_idle_timeout_hand_back_and_waiting_for_client_use_the_channel() -> None:
    """forward.py's two channel helpers read and set the front channel's own state."""

    class Channel:
        waiting_for_client = True
        handed = None

        def hand_back_idle_timeout(self, timeout_s):
            self.handed = timeout_s

    channel = Channel()
    hand_back_idle_timeout(channel, 7)
    assert channel.handed == 7
    assert waiting_for_client(channel) is True
    assert waiting_for_client(None) is False


def test_canary_client_gone() -> None:
    """Request._disconnected turns true when the connection is lost."""
    channel, _ = held_channel()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    request = channel.requests[0]
    assert client_gone(request) is False
    channel.connectionLost(Failure(ConnectionDone()))
    assert client_gone(request) is True
