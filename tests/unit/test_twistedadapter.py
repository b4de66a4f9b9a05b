"""
Canaries for the private Twisted names in quayfront.twistedadapter: each
fails loudly if a Twisted release removes or changes what it relies on.
Then the bounded upstream client itself, end to end through a real Agent
and connection pool on an in-memory transport.
"""

from __future__ import annotations

import inspect

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import _newclient, http
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseFailed

from quayfront.config import UpstreamConfig
from quayfront.http import UpstreamMisbehaved
from quayfront.twistedadapter import (
    client_gone,
    hand_back_idle_timeout,
    proxied_transport,
    pull_to_push,
    waiting_for_client,
)
from quayfront.upstream import upstream_agent, upstream_uri

# Canaries, one per private name.


def test_canary_request_refuses_through_its_channel() -> None:
    """twisted.web's Request still refuses a bad request through channel._respondToBadRequestAndDisconnect()."""
    source = inspect.getsource(http.Request.requestReceived)
    assert "self.channel._respondToBadRequestAndDisconnect()" in source


def test_canary_pool_factory() -> None:
    """HTTPConnectionPool builds protocols through _factory(quiescentCallback, metadata)."""
    assert isinstance(HTTPConnectionPool._factory, type)
    factory = HTTPConnectionPool._factory(lambda protocol: None, "metadata")
    assert callable(factory._quiescentCallback)
    source = inspect.getsource(HTTPConnectionPool._newConnection)
    assert "self._factory(quiescentCallback, repr(endpoint))" in source


def test_canary_client_parser() -> None:
    """HTTP11ClientProtocol.request() creates _parser, whose state is STATUS, then HEADER."""
    protocol = _newclient.HTTP11ClientProtocol()
    protocol.makeConnection(StringTransport())
    request = _newclient.Request(b"GET", b"/", _newclient.Headers({b"host": [b"h"]}), None)
    protocol.request(request)
    parser = protocol._parser
    assert isinstance(parser, _newclient.HTTPClientParser)
    assert parser.state == _newclient.STATUS
    parser.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert parser.state == _newclient.HEADER
    assert hasattr(parser, "MAX_LENGTH") and callable(parser.lineLengthExceeded)
    assert "self._giveUp(Failure())" in inspect.getsource(
        _newclient.HTTP11ClientProtocol.dataReceived
    )


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


def test_canary_proxied_transport() -> None:
    """TransportProxyProducer keeps the transport in _producer until stopProxying."""
    inner = StringTransport()
    proxy = _newclient.TransportProxyProducer(inner)
    assert proxied_transport(proxy) is inner
    proxy.stopProxying()
    assert proxied_transport(proxy) is None


# The bounded upstream client through a real Agent.


def exchange(answer: bytes, **limits):
    """A GET through upstream_agent; the upstream answers C{answer}."""
    reactor = MemoryReactorClock()
    agent = upstream_agent(reactor, UpstreamConfig(**limits))
    result = agent.request(b"GET", upstream_uri(b"/v2/"))
    host, port, factory, timeout, bind = reactor.tcpClients[0]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    outcome = []
    result.addBoth(outcome.append)
    protocol.dataReceived(answer)
    return outcome, transport


def misbehaved(outcome) -> UpstreamMisbehaved:
    [failure] = outcome
    failure.trap(ResponseFailed)
    [reason] = failure.value.reasons
    return reason.value


def test_normal_response_passes() -> None:
    """A well-formed head within the limits is relayed, body included."""
    outcome, transport = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok")
    [response] = outcome
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-a") == [b"b"]
    assert response.length == 2
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"HTTX/1.1 200 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "upstream-bad-status-line"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "upstream-bad-header"),
        (b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n", "upstream-bad-header"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", "upstream-too-many-headers"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: " + b"a" * 1000 + b"\r\n" * 1, None),
        (b"HTTP/1.1 200 OK\r\n" + (b"X-A: " + b"a" * 1000 + b"\r\n") * 40,
         "upstream-head-too-large"),
        (b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 100_000, "upstream-head-too-large"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 2000, "upstream-head-too-large"),
    ],
)
def test_misbehaving_heads_fail_and_close(answer: bytes, reason: str | None) -> None:
    """A malformed or oversized head fails the request with its reason and closes the connection."""
    outcome, transport = exchange(answer)
    if reason is None:
        assert outcome == [] and not transport.disconnecting
        return
    assert misbehaved(outcome).reason == reason
    assert transport.disconnecting


def test_limits_are_per_upstream() -> None:
    """max_response_head_bytes and max_response_headers come from the upstream's config."""
    answer = b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n"
    outcome, _ = exchange(answer, max_response_headers=2)
    assert misbehaved(outcome).reason == "upstream-too-many-headers"
    outcome, _ = exchange(answer, max_response_head_bytes=40)
    assert misbehaved(outcome).reason == "upstream-head-too-large"
    outcome, _ = exchange(answer)
    assert outcome[0].code == 204
