"""
What one request costs in the access log and the request metrics.

Feeds a typical L{AccessLogEntry} (a registry blob GET answered 200, with a
user agent and no referer) through L{MeteredAccessLog.write}, as the site
does at the end of each request, with a real L{Counters}, the default route
table (C{DEFAULT_ROUTES}, routed by a real L{Router}) and an L{AccessLog}
writing to C{/dev/null}; plus the C{http_responses} increment the site makes
next to it.  Reports the best of several C{timeit} repeats in microseconds
of this process's CPU time per request, for each access-log format (CPU
time rather than wall time: on a shared machine, time spent waiting for a
core is not the code's).

Run it as a file, so that C{PYTHONPATH} can point it at another checkout's
C{quayfront} (to compare before and after a change on the same machine)::

    python tests/bench/accesslogcost.py
    PYTHONPATH=path/to/other/checkout python tests/bench/accesslogcost.py
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import timeit

from quayfront.accesslog import AccessLog, AccessLogEntry
from quayfront.config import DEFAULT_ROUTES
from quayfront.metrics import Counters, MeteredAccessLog, route_label
from quayfront.routing import Route, Router

#: Requests per timeit repeat, and repeats (the best one is reported).
NUMBER = int(os.environ.get("BENCH_ACCESSLOG_NUMBER", "20000"))
REPEATS = int(os.environ.get("BENCH_ACCESSLOG_REPEATS", "7"))

TYPICAL_ENTRY = AccessLogEntry(
    timestamp=1795470600.25,
    socket_peer="127.0.0.1",
    client="203.0.113.7",
    method=b"GET",
    uri=b"/v2/ns/repo/blobs/sha256:"
    + b"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    protocol=b"HTTP/1.1",
    status=200,
    body_bytes_sent=1432,
    referer=None,
    user_agent=b"containers/5.29.2 (github.com/containers/image)",
    request_time_s=0.00231,
    request_length=412,
    upstream_response_time_s=0.00187,
    listener="proxy",
    client_port=51000,
    request_id="9b2f4c1e8a7d6b5c4f3e2d1c0b9a8f7e",
    proxy_version=2,
)


def metered_log(format: str) -> tuple[MeteredAccessLog, Counters, AccessLog]:
    counters = Counters()
    router = Router([Route(config=route) for route in DEFAULT_ROUTES])
    access_log = AccessLog(os.devnull, format)
    access_log.startService()
    return (
        MeteredAccessLog(access_log, counters, lambda path: route_label(router, path)),
        counters,
        access_log,
    )


def microseconds_per_request(format: str, entry: AccessLogEntry) -> float:
    metered, counters, access_log = metered_log(format)
    status = str(entry.status)

    def one_request() -> None:
        # What FrontRequest._write_access_log does with these two objects.
        counters.increment("http_responses", status)
        metered.write(entry)

    try:
        best_s = min(
            timeit.repeat(one_request, timer=time.process_time, number=NUMBER, repeat=REPEATS)
        )
    finally:
        access_log.stopService()
    return best_s / NUMBER * 1e6


def main() -> None:
    import quayfront

    print(f"quayfront from {os.path.dirname(quayfront.__file__)}; Python {sys.version.split()[0]}")
    print(f"best of {REPEATS} x {NUMBER} requests, CPU microseconds per request:")
    for format in ("quay", "json"):
        print(f"  {format:5} {microseconds_per_request(format, TYPICAL_ENTRY):7.2f}")
    field_names = {f.name for f in dataclasses.fields(AccessLogEntry)}
    if "route_label" in field_names:
        known = dataclasses.replace(TYPICAL_ENTRY, route_label="/v2/")
        given_us = microseconds_per_request("quay", known)
        print(f"  quay, route label given by the site: {given_us:7.2f}")


if __name__ == "__main__":
    main()
