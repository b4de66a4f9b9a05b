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
