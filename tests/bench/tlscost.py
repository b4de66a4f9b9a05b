"""
What TLS costs a transfer through quayfront's listeners, in seconds of this
process's CPU time per GiB (CPU time rather than wall time: on a shared
machine, time spent waiting for a core is not the code's).

Against quayfront's own TLS context (C{quayfront.tls}), in memory (Twisted's
C{iosim}), with no sockets:

  - the cipher alone: AES-256-GCM (what TLS 1.3 negotiates here) sealing
    and opening 16 KiB records with C{cryptography};
  - receiving: 256 KiB reads of ciphertext (what one socket read brings
    during an upload) through Twisted's own C{TLSMemoryBIOProtocol} and
    through quayfront's L{BatchedReceiveTLS}, to a protocol that drops the
    plaintext;
  - sending: 256 KiB writes (what one upstream read brings during a
    download) through each, to a transport that drops the ciphertext.

Each figure is the best of three repeats::

    python -m tests.bench.tlscost
"""

from __future__ import annotations

import os
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.protocols.tls import TLSMemoryBIOProtocol

from quayfront.twistedadapter import BatchedReceiveTLS
from tests.unit.test_twistedadapter import _batched_tls_pair

GIB = 1 << 30
RECORD = 1 << 14
#: One socket read during an upload, one upstream read during a download.
CHUNK = 1 << 18
#: Bytes through each path per repeat.
TOTAL = 1 << 28
REPEATS = 3


class _DropProtocol:
    """The protocol above TLS: counts the plaintext and drops it."""

    transport = None
    received = 0

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason) -> None:
        pass


class _DropTransport:
    """The transport below TLS: counts the ciphertext and drops it."""

    sent = 0

    def write(self, data) -> None:
        self.sent += len(data)

    write_borrowed = write


def _best(run) -> float:
    return min(run() for _ in range(REPEATS))


def cipher_alone() -> float:
    def run() -> float:
        key = AESGCM(os.urandom(32))
        nonce = os.urandom(12)
        plaintext = os.urandom(RECORD)
        sealed = key.encrypt(nonce, plaintext, None)
        started = time.process_time()
        for _ in range(TOTAL // RECORD):
            key.decrypt(nonce, sealed, None)
        return (time.process_time() - started) * GIB / TOTAL

    return _best(run)


def receiving(protocol) -> float:
    def run() -> float:
        app = _DropProtocol()
        server, client, _, _, _ = _batched_tls_pair(app, protocol=protocol)
        sender = client._tlsConnection
        record = os.urandom(RECORD)
        reads = []
        for _ in range(TOTAL // CHUNK):
            ciphertext = []
            for _ in range(CHUNK // RECORD):
                sender.send(record)
                ciphertext.append(sender.bio_read(2 * RECORD))
            reads.append(b"".join(ciphertext))
        started = time.process_time()
        for read in reads:
            server.dataReceived(read)
        elapsed = time.process_time() - started
        assert app.received == TOTAL, app.received
        return elapsed * GIB / TOTAL

    return _best(run)


def sending(protocol) -> float:
    def run() -> float:
        server, _, _, _, _ = _batched_tls_pair(_DropProtocol(), protocol=protocol)
        transport = server.transport = _DropTransport()
        chunk = os.urandom(CHUNK)
        started = time.process_time()
        for _ in range(TOTAL // CHUNK):
            server.write(chunk)
        elapsed = time.process_time() - started
        assert transport.sent > TOTAL, transport.sent
        return elapsed * GIB / TOTAL

    return _best(run)


def main() -> None:
    print("CPU seconds per GiB, best of %d repeats of %d MiB" % (REPEATS, TOTAL >> 20))
    print(f"  AES-256-GCM alone, 16 KiB records:  {cipher_alone():.2f}")
    for name, protocol in (
        ("Twisted's TLSMemoryBIOProtocol", TLSMemoryBIOProtocol),
        ("quayfront's BatchedReceiveTLS", BatchedReceiveTLS),
    ):
        print(f"  {name}: receive {receiving(protocol):.2f}, send {sending(protocol):.2f}")


if __name__ == "__main__":
    main()
