"""
Admission limits: a concurrency cap with a bounded wait queue per upstream,
and token-bucket rate limits per client address.

Both take the clock as a parameter and hold memory bounded by their
configuration, whatever the traffic: the queue by C{queue_size}, the buckets
by C{max_clients}.  A zone with C{store = "redis"} keeps its buckets in the
shared store instead (L{SharedRateLimiter}), so its limit holds across
replicas; its decision arrives as a Deferred.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from quayfront.config import IPNetwork, RateLimitConfig, host_ip



def is_exempt(client: str, networks) -> bool:
    """
    Whether C{client} (an address as text) is in one of C{networks}: such
    clients are never rate-limited.
    """
    if not networks:
        return False
    ip = host_ip(client)
    return ip is not None and any(ip in network for network in networks)

class Overloaded(Exception):
    """
    No slot was free and the wait queue was full, or the wait timed out.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConcurrencyLimiter:
    """
    At most C{max_active} holders at once; up to C{queue_size} more wait, in
    order, for at most C{queue_timeout_s}.  C{max_active} 0 means no cap.
    """

    def __init__(
        self, clock: IReactorTime, max_active: int, queue_size: int, queue_timeout_s: float
    ) -> None:
        self._clock = clock
        self.max_active = max_active
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self._waiting: deque[tuple[Deferred, IDelayedCall]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def try_acquire(self) -> bool:
        """
        Take a slot if one is free now (call L{release} exactly once then):
        the common case, without a Deferred.
        """
        if not self.max_active or self.active < self.max_active:
            self.active += 1
            return True
        return False

    def acquire(self) -> Deferred:
        """
        A Deferred that fires when the caller holds a slot (call L{release}
        exactly once then), or fails with L{Overloaded}.  Cancelling it
        leaves the queue.
        """
        if self.try_acquire():
            return succeed(None)
        if len(self._waiting) >= self.queue_size:
            return fail(Overloaded("upstream-queue-full"))

        def cancel(d: Deferred) -> None:
            self._forget(d)

        waiter: Deferred = Deferred(cancel)
        timer = self._clock.callLater(self.queue_timeout_s, self._time_out, waiter)
        self._waiting.append((waiter, timer))
        return waiter

    def _forget(self, waiter: Deferred) -> IDelayedCall | None:
        for entry in self._waiting:
            if entry[0] is waiter:
                self._waiting.remove(entry)
                if entry[1].active():
                    entry[1].cancel()
                return entry[1]
        return None

    def _time_out(self, waiter: Deferred) -> None:
        self._forget(waiter)
        waiter.errback(Overloaded("upstream-queue-timeout"))

    def release(self) -> None:
        if self._waiting:
            waiter, timer = self._waiting.popleft()
            timer.cancel()
            # The slot passes straight to the next waiter.
            waiter.callback(None)
        else:
            self.active -= 1


class RateLimiter:
    """
    A token bucket per client address.

    A bucket that has been idle long enough to refill completely is
    indistinguishable from a new one, so idle buckets are dropped (oldest
    first) as new ones are made, and never more than C{max_clients} are
    kept: a flood of distinct addresses cannot grow memory without limit.
    """

    def __init__(self, clock: IReactorTime, config: RateLimitConfig) -> None:
        self._clock = clock
        self._rate = config.requests_per_s
        self._burst = float(config.burst)
        self._exempt: tuple[IPNetwork, ...] = config.exempt_sources
        self._max_clients = config.max_clients
        self._refill_s = self._burst / self._rate
        # client -> (tokens, last update); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _exempted(self, client: str) -> bool:
        return is_exempt(client, self._exempt)

    def check(self, client: str) -> float | None:
        """
        Take a token for C{client}: C{None} when allowed, else the seconds
        until a token will be available (for C{Retry-After}).
        """
        if self._exempt and self._exempted(client):
            return None
        now = self._clock.seconds()
        buckets = self._buckets
        # Taken out, and put back last: the least recently used go first.
        bucket = buckets.pop(client, None)
        if bucket is not None:
            tokens, updated = bucket
            tokens += (now - updated) * self._rate
            if tokens > self._burst:
                tokens = self._burst
        else:
            # A new bucket (or one dropped as full again): full.  Made
            # where idle ones are dropped, and the number kept bounded.
            if buckets and now - next(iter(buckets.values()))[1] >= self._refill_s:
                # The least recently used bucket is full again: drop such ones.
                self._expire(now)
            while buckets and len(buckets) >= self._max_clients:
                buckets.popitem(last=False)
            tokens = self._burst
        if tokens >= 1.0:
            buckets[client] = (tokens - 1.0, now)
            return None
        buckets[client] = (tokens, now)
        return (1.0 - tokens) / self._rate

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            client, (tokens, updated) = next(iter(buckets.items()))
            if now - updated < self._refill_s:
                break
            del buckets[client]


class SharedRateLimiter:
    """
    A zone's token buckets in the shared store (L{quayfront.redisstore}),
    keyed on the zone and the client address, so that every replica and
    worker draws from the same bucket.

    When the store fails to answer within its C{op_timeout_s} the zone's
    C{on_store_error} decides: allow the request, or deny it as if the
    bucket were empty.  The change between answering and failing is logged
    once each way and counted.
    """

    _log = Logger()

    # How long a denied client is told to wait while the store is down.
    STORE_ERROR_RETRY_AFTER_S = 1.0

    def __init__(self, name: str, config: RateLimitConfig, store, counters) -> None:
        self.name = name
        self._rate = config.requests_per_s
        self._burst = config.burst
        self._exempt: tuple[IPNetwork, ...] = config.exempt_sources
        self._deny_on_error = config.on_store_error == "deny"
        self._store = store
        self._counters = counters
        self.store_failing = False

    def key(self, client: str) -> str:
        ip = host_ip(client)
        return f"quayfront:rate:{self.name}:{ip if ip is not None else client}"

    def check(self, client: str) -> Deferred | None:
        """
        Take a token for C{client}: C{None} at once for an exempt client,
        else a Deferred firing (never failing) with C{None} when allowed or
        the seconds to wait (for C{Retry-After}).
        """
        if self._exempt:
            ip = host_ip(client)
            if ip is not None and any(ip in network for network in self._exempt):
                return None
        decision = self._store.take_token(self.key(client), self._rate, self._burst)
        decision.addCallbacks(self._store_answered, self._store_failed)
        return decision

    def _store_answered(self, wait_s: float | None) -> float | None:
        if self.store_failing:
            self.store_failing = False
            self._counters.increment("rate_limit_store_transitions", "up")
            self._log.info(
                "rate limit zone {zone}: the shared store answers again; limits apply",
                zone=self.name,
            )
        return wait_s

    def _store_failed(self, failure: Failure) -> float | None:
        reason = getattr(failure.value, "reason", None) or failure.getErrorMessage()
        self._counters.increment("rate_limit_store_errors", self.name)
        if not self.store_failing:
            self.store_failing = True
            self._counters.increment("rate_limit_store_transitions", "down")
            self._log.error(
                "rate limit zone {zone}: the shared store failed ({reason}); requests are"
                " {decision} until it answers again",
                zone=self.name,
                reason=reason,
                decision="denied" if self._deny_on_error else "allowed",
            )
        return self.STORE_ERROR_RETRY_AFTER_S if self._deny_on_error else None
