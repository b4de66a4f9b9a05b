"""
State the worker processes share, so that it does not multiply by their
number: token buckets of the rate-limit zones and the in-flight count of
each upstream's concurrency cap.

Each table is a small file in the main process's private runtime directory,
mapped into every worker (C{mmap}), with a fixed size and layout, and
guarded by an exclusive C{lockf} lock held for a few microseconds per
operation.  Workers are single-threaded, so the lock is only ever contended
between processes.

Token buckets: open addressing over a fixed number of slots (each an 8-byte
key hash, the tokens and the last update), probed over a short window.  A
bucket idle long enough to refill is the same as no bucket, so such slots
are reused; when a window holds no free or refilled slot, its least recently
used bucket is given up (that client starts with a full bucket), which keeps
memory fixed whatever the number of clients, as the in-process limiter's
C{max_clients} does.

Concurrency: one counter per worker per upstream; the cap applies to their
sum.  A worker that dies with slots held has its counters cleared by the
main process, so a crash cannot leak capacity.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from contextlib import contextmanager
from typing import Iterator

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from quayfront.config import IPNetwork, RateLimitConfig
from quayfront.limits import ConcurrencyLimiter, Overloaded, is_exempt

_BUCKET = struct.Struct("<Qdd")  # key hash, tokens, last update (seconds)
_PROBE_WINDOW = 16
_COUNTER = struct.Struct("<q")
#: Client addresses whose bucket keys a limiter remembers (then forgets
#: them all and starts again): a key is a hash, worth not recomputing for
#: every request of a client.
_REMEMBERED_KEYS = 4096

_lockf = fcntl.lockf
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN


def _table_file(path: str, size: int, create: bool) -> tuple[int, mmap.mmap]:
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    if create:
        os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


class _Locked:
    def __init__(self, path: str, size: int, create: bool) -> None:
        self.path = path
        self._fd, self.memory = _table_file(path, size, create)

    def lock(self) -> None:
        # The per-request paths call lock() and unlock() themselves: a
        # generator-based context manager costs more than the lock does.
        _lockf(self._fd, _LOCK_EX)

    def unlock(self) -> None:
        _lockf(self._fd, _LOCK_UN)

    @contextmanager
    def locked(self) -> Iterator[mmap.mmap]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield self.memory
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.memory.close()
        os.close(self._fd)


def bucket_slots(max_clients: int) -> int:
    """Slots for C{max_clients} buckets: a power of two, at most half full."""
    slots = 1024
    while slots < 2 * max_clients:
        slots *= 2
    return slots


class SharedRateLimiter:
    """
    The token buckets of one rate-limit zone, shared by every worker; the
    same C{check} as L{quayfront.limits.RateLimiter}.
    """

    def __init__(
        self, clock: IReactorTime, config: RateLimitConfig, path: str, create: bool = False
    ) -> None:
        self._clock = clock
        self._rate = config.requests_per_s
        self._burst = float(config.burst)
        self._exempt: tuple[IPNetwork, ...] = config.exempt_sources
        self._refill_s = self._burst / self._rate
        self._slots = bucket_slots(config.max_clients)
        self._table = _Locked(path, self._slots * _BUCKET.size, create)
        self._keys: dict[str, int] = {}

    def __len__(self) -> int:
        now = self._clock.seconds()
        count = 0
        with self._table.locked() as memory:
            for slot in range(self._slots):
                key, _, updated = _BUCKET.unpack_from(memory, slot * _BUCKET.size)
                if key and now - updated < self._refill_s:
                    count += 1
        return count

    def _exempted(self, client: str) -> bool:
        return is_exempt(client, self._exempt)

    def check(self, client: str) -> float | None:
        """
        Take a token for C{client}: C{None} when allowed, else the seconds
        until a token will be available.
        """
        if self._exempted(client):
            return None
        key = self._keys.get(client)
        if key is None:
            key = self._key(client)
        first = key & (self._slots - 1)
        now = self._clock.seconds()
        table = self._table
        memory = table.memory
        table.lock()
        try:
            found = reusable = None
            oldest_at = None
            for step in range(_PROBE_WINDOW):
                offset = ((first + step) & (self._slots - 1)) * _BUCKET.size
                slot_key, tokens, updated = _BUCKET.unpack_from(memory, offset)
                if slot_key == key:
                    found = (offset, tokens, updated)
                    break
                if reusable is None and (not slot_key or now - updated >= self._refill_s):
                    reusable = offset
                if oldest_at is None or updated < oldest_at[1]:
                    oldest_at = (offset, updated)
            if found is not None:
                offset, tokens, updated = found
                tokens = min(self._burst, tokens + max(0.0, now - updated) * self._rate)
            else:
                offset = reusable if reusable is not None else oldest_at[0]
                tokens = self._burst
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            _BUCKET.pack_into(memory, offset, key, tokens, now)
        finally:
            table.unlock()
        return None if allowed else (1.0 - tokens) / self._rate

    def _key(self, client: str) -> int:
        digest = hashlib.blake2b(client.encode("utf-8", "surrogateescape"), digest_size=8)
        # 0 marks an empty slot.
        key = int.from_bytes(digest.digest(), "little") or 1
        keys = self._keys
        if len(keys) >= _REMEMBERED_KEYS:
            keys.clear()
        keys[client] = key
        return key


class SharedSlotCounts:
    """
    Per-worker in-flight counts of one upstream, in a shared file.
    """

    def __init__(self, path: str, workers: int, create: bool = False) -> None:
        self.workers = workers
        self._table = _Locked(path, max(1, workers) * _COUNTER.size, create)
        # Every worker's count in one unpack.
        self._all = struct.Struct(f"<{workers}q")

    def try_take(self, worker: int, cap: int) -> bool:
        table = self._table
        memory = table.memory
        table.lock()
        try:
            if sum(self._all.unpack_from(memory)) >= cap:
                return False
            offset = worker * _COUNTER.size
            (mine,) = _COUNTER.unpack_from(memory, offset)
            _COUNTER.pack_into(memory, offset, mine + 1)
            return True
        finally:
            table.unlock()

    def give_back(self, worker: int) -> None:
        table = self._table
        memory = table.memory
        offset = worker * _COUNTER.size
        table.lock()
        try:
            (mine,) = _COUNTER.unpack_from(memory, offset)
            _COUNTER.pack_into(memory, offset, max(0, mine - 1))
        finally:
            table.unlock()

    def clear(self, worker: int) -> None:
        """A worker ended: whatever it held is free again."""
        with self._table.locked() as memory:
            _COUNTER.pack_into(memory, worker * _COUNTER.size, 0)

    def total(self) -> int:
        with self._table.locked() as memory:
            return sum(
                _COUNTER.unpack_from(memory, i * _COUNTER.size)[0] for i in range(self.workers)
            )


class SharedConcurrencyLimiter(ConcurrencyLimiter):
    """
    L{ConcurrencyLimiter} whose cap counts the requests of every worker.

    Requests beyond the cap wait in this worker's queue (bounded and timed
    as before); the queue is served when this worker releases a slot, and
    polled every C{poll_s} while it is not empty, for slots other workers
    release.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_active: int,
        queue_size: int,
        queue_timeout_s: float,
        counts: SharedSlotCounts,
        worker: int,
        poll_s: float = 0.01,
    ) -> None:
        super().__init__(clock, max_active, queue_size, queue_timeout_s)
        self._counts = counts
        self._worker = worker
        self._poll_s = poll_s
        self._poll: IDelayedCall | None = None

    def try_acquire(self) -> bool:
        if not self.max_active or (
            not self._waiting and self._counts.try_take(self._worker, self.max_active)
        ):
            self.active += 1
            return True
        return False

    def acquire(self) -> Deferred:
        if self.try_acquire():
            return succeed(None)
        if len(self._waiting) >= self.queue_size:
            return fail(Overloaded("upstream-queue-full"))
        waiter = super_acquire_waiter(self)
        self._schedule_poll()
        return waiter

    def release(self) -> None:
        if not self.max_active:
            self.active -= 1
            return
        self.active -= 1
        self._counts.give_back(self._worker)
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        while self._waiting and self._counts.try_take(self._worker, self.max_active):
            waiter, timer = self._waiting.popleft()
            timer.cancel()
            self.active += 1
            waiter.callback(None)
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        if self._waiting and (self._poll is None or not self._poll.active()):
            self._poll = self._clock.callLater(self._poll_s, self._polled)

    def _polled(self) -> None:
        self._poll = None
        self._serve_waiters()


def super_acquire_waiter(limiter: ConcurrencyLimiter) -> Deferred:
    """
    Queue a waiter exactly as L{ConcurrencyLimiter.acquire} does when the
    cap is reached (timed, cancellable).
    """

    def cancel(d: Deferred) -> None:
        limiter._forget(d)

    waiter: Deferred = Deferred(cancel)
    timer = limiter._clock.callLater(limiter.queue_timeout_s, limiter._time_out, waiter)
    limiter._waiting.append((waiter, timer))
    return waiter

