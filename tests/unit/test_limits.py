"""
The concurrency cap with its queue, and per-client token buckets.
"""

from __future__ import annotations

import ipaddress
import sys

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock

from quayfront.config import RateLimitConfig
from quayfront.limits import ConcurrencyLimiter, Overloaded, RateLimiter


def test_cap_queue_and_handover() -> None:
    """Holders beyond the cap wait in order; a release hands the slot to the first waiter."""
    clock = MemoryReactorClock()
    limiter = ConcurrencyLimiter(clock, max_active=2, queue_size=2, queue_timeout_s=10)
    first, second = limiter.acquire(), limiter.acquire()
    assert first.called and second.called
    third, fourth = limiter.acquire(), limiter.acquire()
    assert not third.called and not fourth.called
    fifth = limiter.acquire()
    failure = []
    fifth.addErrback(failure.append)
    assert failure[0].value.reason == "upstream-queue-full"
    limiter.release()
    assert third.called and not fourth.called
    assert limiter.active == 2 and limiter.waiting == 1
    limiter.release()
    limiter.release()
    limiter.release()
    assert limiter.active == 0 and limiter.waiting == 0


def test_try_acquire_takes_a_free_slot_without_a_deferred() -> None:
    """try_acquire takes a free slot at once and refuses (taking nothing) when the cap is full."""
    limiter = ConcurrencyLimiter(MemoryReactorClock(), max_active=2, queue_size=2, queue_timeout_s=10)
    assert limiter.try_acquire() and limiter.try_acquire()
    assert not limiter.try_acquire()
    assert limiter.active == 2 and limiter.waiting == 0
    waiter = limiter.acquire()
    assert not waiter.called
    limiter.release()
    assert waiter.called and limiter.active == 2
    assert not limiter.try_acquire()


def test_queue_timeout_and_cancel() -> None:
    """A waiter times out with Overloaded; a cancelled waiter leaves the queue."""
    clock = MemoryReactorClock()
    limiter = ConcurrencyLimiter(clock, max_active=1, queue_size=5, queue_timeout_s=3)
    limiter.acquire()
    late, gone = limiter.acquire(), limiter.acquire()
    errors = []
    late.addErrback(errors.append)
    gone.addErrback(lambda f: None)
    gone.cancel()
    assert limiter.waiting == 1
    clock.advance(3)
    assert errors[0].check(Overloaded) and errors[0].value.reason == "upstream-queue-timeout"
    assert limiter.waiting == 0 and clock.getDelayedCalls() == []


def test_no_cap_means_no_queue() -> None:
    """max_active 0 admits everyone at once."""
    limiter = ConcurrencyLimiter(MemoryReactorClock(), max_active=0, queue_size=0, queue_timeout_s=1)
    assert all(limiter.acquire().called for _ in range(1000))


def test_bucket_allows_burst_then_rate() -> None:
    """A client gets its burst at once, then requests_per_s, with the wait to the next token."""
    clock = MemoryReactorClock()
    limiter = RateLimiter(clock, RateLimitConfig(requests_per_s=2.0, burst=3))
    assert [limiter.check("203.0.113.1") for _ in range(3)] == [None, None, None]
    wait = limiter.check("203.0.113.1")
    assert wait == pytest.approx(0.5)
    assert limiter.check("203.0.113.2") is None  # another client is unaffected
    clock.advance(0.5)
    assert limiter.check("203.0.113.1") is None
    assert limiter.check("203.0.113.1") is not None


def test_exempt_sources_are_never_limited() -> None:
    """Exempt CIDRs bypass the bucket, IPv4-mapped addresses included."""
    config = RateLimitConfig(
        requests_per_s=1.0, burst=1, exempt_sources=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    limiter = RateLimiter(MemoryReactorClock(), config)
    assert all(limiter.check("10.1.2.3") is None for _ in range(100))
    assert all(limiter.check("::ffff:10.1.2.3") is None for _ in range(100))
    assert len(limiter) == 0


def test_memory_bounded_under_address_flood() -> None:
    """100k distinct addresses keep at most max_clients buckets, and idle ones expire."""
    clock = MemoryReactorClock()
    limiter = RateLimiter(clock, RateLimitConfig(requests_per_s=10.0, burst=20, max_clients=5000))
    for n in range(100_000):
        limiter.check(str(ipaddress.IPv4Address(0x0A000000 + n)))
    assert len(limiter) == 5000
    size = sys.getsizeof(limiter._buckets)
    assert size < 1_000_000, size
    clock.advance(2.0)  # burst / rate: every bucket is full again
    limiter.check("192.0.2.1")
    assert len(limiter) == 1


class ReferenceBuckets:
    """
    The token buckets as first written (every check drops the buckets full
    again, then evicts past max_clients): what RateLimiter.check decides
    must not differ from it.
    """

    def __init__(self, config: RateLimitConfig) -> None:
        from collections import OrderedDict

        self.rate = config.requests_per_s
        self.burst = float(config.burst)
        self.max_clients = config.max_clients
        self.refill_s = self.burst / self.rate
        self.buckets: OrderedDict = OrderedDict()

    def check(self, client: str, now: float) -> float | None:
        buckets = self.buckets
        while buckets:
            first, (_, updated) = next(iter(buckets.items()))
            if now - updated < self.refill_s:
                break
            del buckets[first]
        tokens, updated = buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        allowed = tokens >= 1.0
        buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        while len(buckets) > self.max_clients:
            buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.rate


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.sampled_from([0.0, 0.01, 0.3, 1.0, 5.0])),
        max_size=200,
    ),
    st.sampled_from([(2.0, 1, 2), (10.0, 3, 3), (1.0, 5, 10)]),
)
# A bucket refilled past its burst, then drawn on at once; more clients
# than max_clients, one coming back after an eviction.
@example([("a", 0.0), ("a", 1.0), ("a", 0.0)], (2.0, 1, 2))
@example([("a", 0.0), ("b", 0.01), ("c", 0.01), ("a", 0.01), ("a", 0.0)], (2.0, 1, 2))
def test_bucket_decisions_agree_with_the_reference(steps, settings) -> None:
    """Every decision and Retry-After equals the reference's, for any order of clients and pauses."""
    rate, burst, max_clients = settings
    config = RateLimitConfig(requests_per_s=rate, burst=burst, max_clients=max_clients)
    clock = MemoryReactorClock()
    limiter = RateLimiter(clock, config)
    reference = ReferenceBuckets(config)
    for client, pause_s in steps:
        clock.advance(pause_s)
        assert limiter.check(client) == reference.check(client, clock.seconds())
        assert len(limiter) <= max_clients
