"""
Small misbehaving (and one well-behaved) HTTP upstreams for the routing and
fault tests, each a separate process so a test can kill it by PID.

Run as ``python upstreams.py MODE ARGS``; every mode writes one line per
event to standard output (flushed), which is what the tests read to learn
what the upstream saw:

``unix-web PATH``
    An HTTP/1.1 server on the UNIX socket PATH answering every request with
    JSON naming the upstream, the method, the path and the headers.
``truncate PORT TOTAL SENT``
    Answers each request with ``Content-Length: TOTAL`` and only SENT body
    bytes, prints ``sent SENT of TOTAL`` and then waits to be killed.
``stall PORT``
    Reads each request head and never answers; prints when the peer closes.
``record PORT``
    An HTTP/1.1 server with keep-alive that prints ``request `` and a JSON
    object (request line and header pairs, body length) for every request
    it reads, and answers each with ``200`` and ``ok``: the framing tests
    read it to prove that a refused request never reached the upstream.
``misbehave PORT KIND``
    Answers each request head with a response head quayfront must refuse:
    KIND ``header-flood`` sends a status line and then 100 MB of header
    lines (or until the peer closes), ``bad-status`` sends
    ``HTTX/1.1 200 OK``; prints how many bytes it sent and when the peer
    closed.
``early-401 PORT``
    Answers ``401`` with ``WWW-Authenticate`` as soon as a request head is
    complete, without reading the body; afterwards it discards (and
    counts) whatever body bytes still arrive until the peer closes.

Every wait is bounded; the processes are started and stopped by the tests
(``start_upstream`` below) and talk only to 127.0.0.1 or a UNIX socket.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

try:  # imported as part of the test package
    from tests.integration import harness
except ImportError:  # run as a script: the standard library is enough
    harness = None  # type: ignore[assignment]

LOOPBACK = "127.0.0.1"
#: Longest any connection handler waits for anything.
HANDLER_TIMEOUT_S = 120.0
#: A server exits after this many connections, or this long without one.
MAX_CONNECTIONS = 10_000
ACCEPT_TIMEOUT_S = 600.0
MAX_HEAD_BYTES = 64 * 1024


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def read_head(conn: socket.socket) -> bytes | None:
    """The request head up to the blank line (the rest is left unread), or None at EOF."""
    head = b""
    for _ in range(MAX_HEAD_BYTES):
        byte = conn.recv(1)
        if not byte:
            return None
        head += byte
        if head.endswith(b"\r\n\r\n"):
            return head
    raise ValueError("request head too long")


def request_line(head: bytes) -> str:
    return head.split(b"\r\n", 1)[0].decode("latin-1")


def header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name.lower().encode():
            return value.strip().decode("latin-1")
    return None


def tcp_server(port: int, handle) -> None:
    """Accept connections on 127.0.0.1:PORT, one daemon thread each (bounded, see above)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((LOOPBACK, port))
    server.listen(128)
    server.settimeout(ACCEPT_TIMEOUT_S)
    say(f"listening on {LOOPBACK}:{port}")

    def run(conn: socket.socket) -> None:
        conn.settimeout(HANDLER_TIMEOUT_S)
        try:
            with conn:
                handle(conn)
        except OSError as e:
            say(f"connection error: {e!r}")

    for _ in range(MAX_CONNECTIONS):
        try:
            conn, _ = server.accept()
        except socket.timeout:
            break
        threading.Thread(target=run, args=(conn,), daemon=True).start()
    say("exiting")


# --------------------------------------------------------------------------
# Modes


def serve_truncate(port: int, total: int, sent: int) -> None:
    def handle(conn: socket.socket) -> None:
        head = read_head(conn)
        if head is None:
            return
        say(f"request: {request_line(head)}")
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % total
        )
        conn.sendall(os.urandom(sent))
        say(f"sent {sent} of {total}")
        # Wait to be killed (or for the peer to leave), never finishing the body.
        conn.recv(1)
        say("peer closed before the body was complete")

    tcp_server(port, handle)


def serve_stall(port: int) -> None:
    def handle(conn: socket.socket) -> None:
        head = read_head(conn)
        if head is None:
            return
        started = time.monotonic()
        say(f"request: {request_line(head)}")
        try:
            for _ in range(1_000_000):
                if not conn.recv(65536):
                    break
            say(f"peer closed after {time.monotonic() - started:.2f}s")
        except (ConnectionResetError, socket.timeout) as e:
            say(f"peer gone after {time.monotonic() - started:.2f}s: {e!r}")

    tcp_server(port, handle)


EARLY_401_BODY = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'


def serve_early_401(port: int) -> None:
    def handle(conn: socket.socket) -> None:
        head = read_head(conn)
        if head is None:
            return
        say(f"request: {request_line(head)} content-length={header(head, 'Content-Length')}")
        conn.sendall(
            b"HTTP/1.1 401 Unauthorized\r\n"
            b'WWW-Authenticate: Bearer realm="https://auth.example/token",service="test"\r\n'
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(EARLY_401_BODY)
            + EARLY_401_BODY
        )
        say("answered 401 before reading the body")
        discarded = 0
        try:
            for _ in range(1_000_000):
                data = conn.recv(1 << 16)
                if not data:
                    break
                discarded += len(data)
            say(f"peer closed; body bytes that arrived after the answer: {discarded}")
        except (ConnectionResetError, socket.timeout) as e:
            say(f"peer gone ({e!r}); body bytes that arrived after the answer: {discarded}")

    tcp_server(port, handle)


def serve_unix_web(path: str) -> None:
    from http.server import BaseHTTPRequestHandler

    class Web(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = HANDLER_TIMEOUT_S

        def address_string(self) -> str:  # AF_UNIX peers have no address
            return "unix"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            say(f"request: {self.command} {self.path}")
            body = json.dumps({
                "upstream": "web",
                "method": self.command,
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        def log_message(self, fmt: str, *args: object) -> None:
            sys.stderr.write("unix-web: " + (fmt % args) + "\n")

    class Server(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True
        timeout = ACCEPT_TIMEOUT_S

        def handle_timeout(self) -> None:
            self.timed_out = True

    if os.path.exists(path):
        os.unlink(path)
    with Server(path, Web) as server:
        server.timed_out = False
        say(f"listening on unix:{path}")
        for _ in range(MAX_CONNECTIONS):
            server.handle_request()
            if server.timed_out:
                break
    say("exiting")


# --------------------------------------------------------------------------
# Starting them from the tests


def start_upstream(workdir: Path, mode: str, *args: str, port: int | None = None):
    """
    Start this module in ``mode``; wait until it listens.  TCP modes get a
    free port (returned in ``ports["http"]``) unless ``port`` is given.
    """
    assert harness is not None
    argv = [sys.executable, "-u", str(Path(__file__).resolve()), mode]
    if mode == "unix-web":
        argv += list(args)
    else:
        port = port or harness.free_port()
        argv += [str(port), *args]
    proc = harness.spawn(f"upstream-{mode}", argv, workdir)
    if port is not None:
        proc.ports["http"] = port
    try:
        harness.wait_for(lambda: "listening on" in proc.output(), harness.STARTUP_TIMEOUT_S,
                         what=f"the {mode} upstream to listen", abort=proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc


def _read_exact(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        piece = conn.recv(min(65536, count - len(data)))
        if not piece:
            raise ConnectionError("peer closed mid-body")
        data += piece
    return data


def _read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        byte = conn.recv(1)
        if not byte or len(line) > MAX_HEAD_BYTES:
            raise ConnectionError("peer closed mid-line")
        line += byte
    return line


def _read_body(conn: socket.socket, head: bytes) -> int:
    length = header(head, "Content-Length")
    if length is not None:
        return len(_read_exact(conn, int(length)))
    if (header(head, "Transfer-Encoding") or "").lower() != "chunked":
        return 0
    total = 0
    while True:
        size = int(_read_line(conn).split(b";")[0], 16)
        if size == 0:
            while _read_line(conn) != b"\r\n":
                pass
            return total
        total += len(_read_exact(conn, size + 2)) - 2


def serve_record(port: int) -> None:
    def handle(conn: socket.socket) -> None:
        for _ in range(MAX_CONNECTIONS):
            head = read_head(conn)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            pairs = [line.split(":", 1) for line in lines[1:] if ":" in line]
            body_bytes = _read_body(conn, head)
            say("request " + json.dumps({
                "request_line": lines[0],
                "headers": [[name, value.strip()] for name, value in pairs],
                "body_bytes": body_bytes,
            }))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    tcp_server(port, handle)


FLOOD_BYTES = 100 * 1024 * 1024


def serve_misbehave(port: int, kind: str) -> None:
    def handle(conn: socket.socket) -> None:
        if read_head(conn) is None:
            return
        if kind == "bad-status":
            conn.sendall(b"HTTX/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            say("sent bad status line")
        else:
            line = b"X-Flood: " + b"f" * 1000 + b"\r\n"
            sent = 0
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while sent < FLOOD_BYTES:
                    conn.sendall(line * 64)
                    sent += len(line) * 64
            except OSError:
                say(f"peer closed after {sent} flood bytes")
                return
            say(f"sent {sent} flood bytes")
        conn.settimeout(HANDLER_TIMEOUT_S)
        while conn.recv(65536):
            pass
        say("peer closed")

    tcp_server(port, handle)


def main(argv: list[str]) -> None:
    modes = {
        "unix-web": (1, lambda a: serve_unix_web(a[0])),
        "truncate": (3, lambda a: serve_truncate(int(a[0]), int(a[1]), int(a[2]))),
        "stall": (1, lambda a: serve_stall(int(a[0]))),
        "early-401": (1, lambda a: serve_early_401(int(a[0]))),
        "record": (1, lambda a: serve_record(int(a[0]))),
        "misbehave": (2, lambda a: serve_misbehave(int(a[0]), a[1])),
    }
    if not argv or argv[0] not in modes or len(argv) - 1 != modes[argv[0]][0]:
        sys.exit("usage: upstreams.py unix-web PATH | truncate PORT TOTAL SENT"
                 " | stall PORT | early-401 PORT | record PORT"
                 " | misbehave PORT header-flood|bad-status")
    modes[argv[0]][1](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
