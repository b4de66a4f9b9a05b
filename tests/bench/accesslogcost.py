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

With C{--before CHECKOUT}, the same is measured in the same process for
C{quayfront/accesslog.py} and C{quayfront/metrics.py} as they are in
another checkout (say, one made by C{git worktree add ../before main}), the
repeats of the two taking turns, so that both see the same machine::

    python tests/bench/accesslogcost.py
    python tests/bench/accesslogcost.py --before ../before
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
import timeit
from types import ModuleType
from typing import Callable

from quayfront import accesslog, metrics
from quayfront.accesslog import AccessLogEntry
from quayfront.config import DEFAULT_ROUTES
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


@dataclasses.dataclass(frozen=True)
class Implementation:
    """The two modules measured, from this checkout or another."""

    name: str
    accesslog: ModuleType
    metrics: ModuleType


def load_from(checkout: str) -> Implementation:
    """
    Another checkout's access-log and metrics modules, loaded under other
    names (they import the rest of quayfront from this checkout).
    """
    modules = {}
    for name in ("accesslog", "metrics"):
        path = os.path.join(checkout, "quayfront", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"before_{name}", path)
        module = importlib.util.module_from_spec(spec)
        # Registered first: dataclasses looks the module up while it loads.
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return Implementation("before", modules["accesslog"], modules["metrics"])


def one_request_of(
    implementation: Implementation, format: str, entry: AccessLogEntry
) -> tuple[Callable[[], None], Callable[[], None]]:
    """
    What the site does with one finished request, and how to close the log.
    """
    counters = implementation.metrics.Counters()
    router = Router([Route(config=route) for route in DEFAULT_ROUTES])
    access_log = implementation.accesslog.AccessLog(os.devnull, format)
    access_log.startService()
    metered = implementation.metrics.MeteredAccessLog(
        access_log, counters, lambda path: implementation.metrics.route_label(router, path)
    )
    status = str(entry.status)

    def one_request() -> None:
        # What FrontRequest._write_access_log does with these two objects.
        counters.increment("http_responses", status)
        metered.write(entry)

    return one_request, access_log.stopService


def best_microseconds(cases: dict[str, Callable[[], None]]) -> dict[str, float]:
    """
    The best repeat of each case, in CPU microseconds per call; the cases
    take turns, repeat after repeat.
    """
    best_s = {name: float("inf") for name in cases}
    for _ in range(REPEATS):
        for name, case in cases.items():
            [took_s] = timeit.repeat(case, timer=time.process_time, number=NUMBER, repeat=1)
            best_s[name] = min(best_s[name], took_s)
    return {name: took_s / NUMBER * 1e6 for name, took_s in best_s.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="CHECKOUT", help="compare with this checkout's modules")
    arguments = parser.parse_args()
    implementations = [Implementation("after", accesslog, metrics)]
    if arguments.before:
        implementations.insert(0, load_from(arguments.before))
    with_route_label = dataclasses.replace(TYPICAL_ENTRY, route_label="/v2/")
    cases = {}
    closers = []
    for implementation in implementations:
        for format in ("quay", "json"):
            cases[f"{format}, {implementation.name}"], close = one_request_of(
                implementation, format, TYPICAL_ENTRY
            )
            closers.append(close)
    cases["quay, after, route label given by the site"], close = one_request_of(
        implementations[-1], "quay", with_route_label
    )
    closers.append(close)
    try:
        results = best_microseconds(cases)
    finally:
        for close in closers:
            close()
    print(f"Python {sys.version.split()[0]}; best of {REPEATS} x {NUMBER} requests, taking turns")
    print("CPU microseconds per request (access log line + request metrics):")
    for name, microseconds in results.items():
        print(f"  {name:45} {microseconds:7.2f}")
    if arguments.before:
        for format in ("quay", "json"):
            ratio = results[f"{format}, before"] / results[f"{format}, after"]
            print(f"  {format}: {ratio:.1f}x cheaper")
        ratio = results["quay, before"] / results["quay, after, route label given by the site"]
        print(f"  quay with the route label given: {ratio:.1f}x cheaper")


if __name__ == "__main__":
    main()
