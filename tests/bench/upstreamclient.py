"""
What the upstream client costs per small keep-alive GET, for comparing two
versions of quayfront (run it with C{PYTHONPATH} naming the checkout to
measure; the script's own checkout by default):

    python tests/bench/upstreamclient.py memory   # the client alone, in memory
    python tests/bench/upstreamclient.py front    # quayfront's CPU, end to end

C{memory}: C{upstream_agent}'s agent against a StringTransport on a
MemoryReactorClock, a 7-header, 10-byte response, the caller reading
C{response.headers} and the body as forwarding does: no sockets, no
kernel, only the client machinery.  Best of 5 runs of C{BENCH_GETS}
(5000) GETs.

C{front}: the fronts benchmark's nginx upstream and quayfront (PROXY +
TLS, access log), curl making sequential and concurrent keep-alive GETs;
quayfront's CPU per request from C{/proc}, as C{make bench} measures it,
for C{BENCH_ROUNDS} (2) rounds.  Needs nginx and curl.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 15:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 10\r\nConnection: keep-alive\r\n"
    b"Docker-Distribution-Api-Version: registry/2.0\r\n\r\n0123456789"
)
REQUEST_HEADERS = [
    (b"Host", b"registry.example"),
    (b"User-Agent", b"curl/7.88"),
    (b"Accept", b"*/*"),
    (b"X-Forwarded-For", b"10.0.0.1"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Request-ID", b"0" * 32),
]


def memory(gets: int) -> str:
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.web.http_headers import Headers

    import quayfront
    from quayfront.config import UpstreamConfig
    from quayfront.upstream import upstream_agent, upstream_uri

    class Sink(Protocol):
        ended = 0

        def dataReceived(self, data: bytes) -> None:
            pass

        def connectionLost(self, reason) -> None:
            Sink.ended += 1

    def relay(response) -> None:
        response.headers.getAllRawHeaders()
        response.deliverBody(Sink())

    reactor = MemoryReactorClock()
    agent = upstream_agent(reactor, UpstreamConfig())
    headers = Headers()
    for name, value in REQUEST_HEADERS:
        headers.addRawHeader(name, value)
    agent.request(b"GET", upstream_uri(b"/v2/x"), headers).addCallback(relay)
    connection = reactor.tcpClients[0][2].buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    reactor.advance(0)
    connection.dataReceived(ANSWER)
    best = None
    for _ in range(5):
        started = time.process_time()
        for _ in range(gets):
            agent.request(b"GET", upstream_uri(b"/v2/x"), headers).addCallback(relay)
            transport.clear()
            connection.dataReceived(ANSWER)
        cpu_us = (time.process_time() - started) / gets * 1e6
        best = cpu_us if best is None else min(best, cpu_us)
    if Sink.ended != 5 * gets + 1 or len(reactor.tcpClients) != 1:
        raise RuntimeError("not every GET completed on the one kept-alive connection")
    source = Path(quayfront.__file__).resolve().parents[1]
    return (f"{type(agent).__name__} ({source}): best of 5 x {gets}: "
            f"{best:.1f} us CPU per GET, the client machinery alone")


def front(rounds: int) -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.bench import fronts

    source = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(REPO_ROOT)
    workdir = Path(tempfile.mkdtemp(prefix="bench-upstreamclient-"))
    datadir = fronts.make_datadir()
    started = []
    try:
        cert, key = fronts.make_cert(workdir)
        upstream_port, unused_port = fronts.free_ports(2)
        values = {"WORKDIR": str(workdir), "DATADIR": str(datadir), "CERT": str(cert),
                  "KEY": str(key), "UPSTREAM_PORT": str(upstream_port),
                  "PROXY_PORT": str(unused_port)}
        started.append(fronts.start_nginx("upstream-nginx", "nginx-upstream.conf.template",
                                          values, workdir, upstream_port))
        quayfront = fronts.start_quayfront(workdir, upstream_port, cert, key,
                                           env_extra={"PYTHONPATH": source})
        started.append(quayfront)
        fronts.warm_up(quayfront)
        latency, rate = fronts.Latency(), fronts.Rate()
        for _ in range(rounds):
            fronts.small_sequential(quayfront, latency)
            fronts.small_concurrent(quayfront, rate)
        return (f"quayfront from {source}: {latency.cpu_us_per_request:.0f} us CPU per GET "
                f"sequential ({latency.requests}), {rate.cpu_us_per_request:.0f} us at "
                f"{fronts.CONNECTIONS} connections ({rate.requests}); load average "
                f"{os.getloadavg()[0]:.1f}")
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(datadir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "memory"
    if what == "memory":
        print(memory(int(os.environ.get("BENCH_GETS", "5000"))))
    elif what == "front":
        print(front(int(os.environ.get("BENCH_ROUNDS", "2"))))
    else:
        sys.exit("usage: upstreamclient.py memory|front")
