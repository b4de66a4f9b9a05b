"""
State shared by worker processes: rate-limit buckets and upstream caps hold
across every limiter mapping the same table (as every worker does).
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from quayfront.config import RateLimitConfig, parse_networks
from quayfront.limits import Overloaded
from quayfront.sharedstate import SharedConcurrencyLimiter, SharedRateLimiter, SharedSlotCounts


def rate_limiters(tmp_path: Path, count: int, **config):
    clock = MemoryReactorClock()
    zone = RateLimitConfig(**config)
    path = str(tmp_path / "zone")
    first = SharedRateLimiter(clock, zone, path, create=True)
    return clock, [first] + [SharedRateLimiter(clock, zone, path) for _ in range(count - 1)]


def test_a_clients_bucket_holds_across_workers(tmp_path: Path) -> None:
    """Two workers together allow the burst once, not once each."""
    clock, (a, b) = rate_limiters(tmp_path, 2, requests_per_s=1.0, burst=4)
    allowed = [limiter.check("192.0.2.1") is None for limiter in (a, b, a, b, a, b)]
    assert allowed == [True, True, True, True, False, False]
    clock.advance(1.0)
    assert b.check("192.0.2.1") is None
    assert a.check("192.0.2.1") is not None


def test_retry_after_is_the_time_to_the_next_token(tmp_path: Path) -> None:
    """A refused request is told how long until a token is available."""
    clock, (a,) = rate_limiters(tmp_path, 1, requests_per_s=2.0, burst=1)
    assert a.check("192.0.2.1") is None
    assert a.check("192.0.2.1") == 0.5


def test_clients_have_separate_buckets(tmp_path: Path) -> None:
    """One client's exhaustion does not limit another."""
    _, (a, b) = rate_limiters(tmp_path, 2, requests_per_s=1.0, burst=1)
    assert a.check("192.0.2.1") is None
    assert b.check("192.0.2.1") is not None
    assert b.check("192.0.2.2") is None


def test_a_client_at_twice_the_rate_gets_through_about_half(tmp_path: Path) -> None:
    """Sent at 2x the rate through alternating workers, about half pass (plus the burst)."""
    clock, limiters = rate_limiters(tmp_path, 3, requests_per_s=10.0, burst=10)
    allowed = 0
    for n in range(400):
        allowed += limiters[n % 3].check("192.0.2.9") is None
        clock.advance(0.05)
    assert 200 <= allowed <= 212


def test_memory_is_fixed_whatever_the_number_of_clients(tmp_path: Path) -> None:
    """Many more clients than slots: every check still answers, the file does not grow."""
    _, (a,) = rate_limiters(tmp_path, 1, requests_per_s=1.0, burst=1, max_clients=10)
    size = (tmp_path / "zone").stat().st_size
    for n in range(5000):
        assert a.check(f"10.0.{n // 256}.{n % 256}") is None
    assert (tmp_path / "zone").stat().st_size == size


def test_remembered_keys_are_bounded_and_name_the_same_buckets(tmp_path: Path) -> None:
    """A limiter remembers a bounded number of clients' keys; a forgotten key is worked out again to the same bucket."""
    from quayfront import sharedstate

    clock, (a, b) = rate_limiters(tmp_path, 2, requests_per_s=1.0, burst=2, max_clients=10000)
    assert a.check("192.0.2.1") is None
    for n in range(2 * sharedstate._REMEMBERED_KEYS):
        a.check(f"10.1.{n // 256}.{n % 256}")
        assert len(a._keys) <= sharedstate._REMEMBERED_KEYS
    # Forgotten by a, never known to b: both still find its bucket, one
    # token left of the burst.
    assert "192.0.2.1" not in a._keys
    assert b.check("192.0.2.1") is None
    assert a.check("192.0.2.1") is not None


def test_exempt_sources_are_not_limited(tmp_path: Path) -> None:
    """Exempt clients never take tokens."""
    _, (a,) = rate_limiters(
        tmp_path, 1, requests_per_s=1.0, burst=1, exempt_sources=parse_networks(["10.0.0.0/8"])
    )
    assert all(a.check("10.1.2.3") is None for _ in range(5))


def caps(tmp_path: Path, workers: int, cap: int, queue_size: int = 4):
    clock = MemoryReactorClock()
    path = str(tmp_path / "slots")
    SharedSlotCounts(path, workers, create=True)
    limiters = [
        SharedConcurrencyLimiter(clock, cap, queue_size, 30.0, SharedSlotCounts(path, workers), i)
        for i in range(workers)
    ]
    return clock, limiters


def test_the_upstream_cap_counts_every_workers_requests(tmp_path: Path) -> None:
    """With a cap of 2, two workers together hold at most 2 slots; the third waits."""
    clock, (a, b) = caps(tmp_path, 2, cap=2)
    assert a.acquire().called
    assert b.acquire().called
    waiting = a.acquire()
    assert not waiting.called
    b.release()
    clock.advance(0.02)
    assert waiting.called


def test_try_acquire_counts_against_every_workers_slots(tmp_path: Path) -> None:
    """try_acquire takes a shared slot when one is free, and never jumps a worker's own queue."""
    clock, (a, b) = caps(tmp_path, 2, cap=2)
    assert a.try_acquire()
    assert b.try_acquire()
    assert not a.try_acquire() and not b.try_acquire()
    waiting = a.acquire()
    b.release()
    # A slot is free, but a's waiter comes first.
    assert not a.try_acquire()
    clock.advance(0.02)
    assert waiting.called


def test_a_full_queue_is_refused_and_a_timed_out_wait_fails(tmp_path: Path) -> None:
    """Beyond the cap and the queue: 503 reasons, as with one process."""
    clock, (a, b) = caps(tmp_path, 2, cap=1, queue_size=1)
    assert a.acquire().called
    waiting = b.acquire()
    refused = b.acquire()
    failures: list[str] = []
    refused.addErrback(lambda f: failures.append(f.trap(Overloaded) and f.value.reason))
    waiting.addErrback(lambda f: failures.append(f.trap(Overloaded) and f.value.reason))
    clock.advance(31)
    assert failures == ["upstream-queue-full", "upstream-queue-timeout"]


def test_a_dead_workers_slots_are_given_back(tmp_path: Path) -> None:
    """The main process clears a dead worker's count, so its slots are free again."""
    clock, (a, b) = caps(tmp_path, 2, cap=1)
    assert a.acquire().called
    waiting = b.acquire()
    SharedSlotCounts(str(tmp_path / "slots"), 2).clear(0)
    clock.advance(0.02)
    assert waiting.called
