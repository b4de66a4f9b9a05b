"""
``python -m tests.bench.layers_server VARIANT PORT UPSTREAM_PORT CERT KEY``:
quayfront's listener chain below HTTP (TCP -> PROXY -> TLS, built by
L{quayfront.listeners.listener_endpoint}) with the thinnest relay on top,
so that what a request costs below the HTTP layer can be measured one
change at a time (see L{tests.bench.layers}).

The relay reads a request head from the client, sends a fixed
``GET /small`` on its own persistent connection to the upstream, and
writes the upstream's answer back when it is complete: per request, one
read and one write on each of the two sockets, as a proxy does.

VARIANT picks the reactor before anything imports one:
  - C{stock}: Twisted's epoll reactor;
  - C{no-log-context}: without the per-event log context only;
  - C{eager-writes}: with eager TCP writes only;
  - C{lean}: both (what quayfront installs).
"""

from __future__ import annotations

import ipaddress
import sys

VARIANTS = ("stock", "no-log-context", "eager-writes", "lean")


def install(variant: str) -> None:
    from twisted.internet.main import installReactor

    from quayfront.twistedadapter import LeanEPollReactor

    if variant == "stock":
        from twisted.internet import epollreactor

        epollreactor.install()
    elif variant == "no-log-context":
        installReactor(LeanEPollReactor(log_context=False, eager_writes=False))
    elif variant == "eager-writes":
        installReactor(LeanEPollReactor(log_context=True, eager_writes=True))
    elif variant == "lean":
        installReactor(LeanEPollReactor())
    else:
        sys.exit(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")


UPSTREAM_REQUEST = b"GET /small HTTP/1.1\r\nHost: upstream\r\n\r\n"


def main() -> None:
    variant, port, upstream_port, cert, key = sys.argv[1:6]
    install(variant)
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    from quayfront.config import ListenAddress, TLSConfig
    from quayfront.listeners import listener_endpoint
    from quayfront.metrics import Counters
    from quayfront.proxylayer import ProxyHeaderPolicy
    from quayfront.tls import load_server_tls

    class UpstreamLeg(Protocol):
        def __init__(self, front: Relay) -> None:
            self.front = front
            self.buffer = b""

        def connectionMade(self) -> None:
            self.front.upstream_ready(self)

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length_at = head.find(b"content-length:")
            length = int(head[length_at + 15:].split(b"\r\n", 1)[0]) if length_at >= 0 else 0
            total = end + 4 + length
            if len(self.buffer) >= total:
                answer, self.buffer = self.buffer[:total], self.buffer[total:]
                self.front.transport.write(answer)

        def connectionLost(self, reason) -> None:
            self.front.transport.loseConnection()

    class Relay(Protocol):
        def __init__(self) -> None:
            self.buffer = b""
            self.upstream: UpstreamLeg | None = None
            self.waiting = 0

        def connectionMade(self) -> None:
            leg = ClientFactory()
            leg.protocol = lambda: UpstreamLeg(self)
            reactor.connectTCP("127.0.0.1", int(upstream_port), leg)

        def upstream_ready(self, leg: UpstreamLeg) -> None:
            self.upstream = leg
            for _ in range(self.waiting):
                leg.transport.write(UPSTREAM_REQUEST)
            self.waiting = 0

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.buffer = self.buffer[end + 4:]
                if self.upstream is None:
                    self.waiting += 1
                else:
                    self.upstream.transport.write(UPSTREAM_REQUEST)

        def connectionLost(self, reason) -> None:
            if self.upstream is not None:
                self.upstream.transport.loseConnection()

    tls = load_server_tls(TLSConfig(cert=cert, key=key), "bench")
    policy = ProxyHeaderPolicy(listener="proxy", required=True,
                               trusted=(ipaddress.ip_network("127.0.0.0/8"),))
    endpoint = listener_endpoint(reactor, ListenAddress("127.0.0.1", int(port)), policy, tls,
                                 Counters(), handshake_timeout_s=10.0)
    factory = Factory.forProtocol(Relay)
    factory.noisy = False
    endpoint.listen(factory).addErrback(lambda f: (print(f, file=sys.stderr), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
