"""
Rate-limit zones in the shared store: the store's answer within its
deadline, the zone's choice when the store fails (logged once per
transition, counted), and the request path waiting for the decision.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from quayfront.config import (
    ConfigError,
    RateLimitConfig,
    RedisConfig,
    RouteConfig,
    parse_networks,
    parse_redis_url,
)
from quayfront.limits import ConcurrencyLimiter, SharedRateLimiter
from quayfront.metrics import Counters
from quayfront.redisstore import RedisStore, StoreUnavailable, check_config
from quayfront.routing import Route, Router, Upstream
from tests.unit.test_forward import FakeAgent, connect, site_for
from tests.unit.test_routes_and_limits import body_of, status_of


class FakeStore:
    """Answers take_token from a script of results; records the keys asked for."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.pending: list[Deferred] = []
        self.answer: object = None  # None, a wait in seconds, an exception, or "later"

    def take_token(self, key: str, rate_per_s: float, burst: int) -> Deferred:
        self.keys.append(key)
        if self.answer == "later":
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        return succeed(self.answer)


class LogCapture:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __enter__(self) -> "LogCapture":
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def texts(self, fragment: str) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if fragment in formatEvent(e)]


def decided(d: Deferred | None):
    results: list = []
    if d is None:
        return "exempt"
    d.addBoth(results.append)
    assert results, "the decision is still pending"
    return results[0]


def zone(**kwargs) -> RateLimitConfig:
    return RateLimitConfig(store="redis", **kwargs)


def test_key_is_zone_and_normalised_client_address() -> None:
    """Buckets are keyed on the zone and the address; an IPv4-mapped address is its IPv4."""
    store = FakeStore()
    limiter = SharedRateLimiter("registry", zone(), store, Counters())
    decided(limiter.check("::ffff:192.0.2.7"))
    decided(limiter.check("192.0.2.7"))
    assert store.keys == ["quayfront:rate:registry:192.0.2.7"] * 2


def test_store_answer_passes_through() -> None:
    store = FakeStore()
    limiter = SharedRateLimiter("z", zone(), store, Counters())
    assert decided(limiter.check("192.0.2.1")) is None
    store.answer = 0.4
    assert decided(limiter.check("192.0.2.1")) == 0.4


def test_exempt_sources_never_ask_the_store() -> None:
    store = FakeStore()
    limiter = SharedRateLimiter("z", zone(exempt_sources=parse_networks(["10.0.0.0/8"])), store, Counters())
    assert limiter.check("10.1.2.3") is None
    assert store.keys == []


@pytest.mark.parametrize("policy, expected", [("allow", None), ("deny", 1.0)])
def test_store_failure_follows_the_zone_policy_logged_once_per_transition(policy, expected) -> None:
    """Failures decide by on_store_error; one log line down, one up; every failure counted."""
    store = FakeStore()
    counters = Counters()
    limiter = SharedRateLimiter("z", zone(on_store_error=policy), store, counters)
    with LogCapture() as logs:
        store.answer = StoreUnavailable("timeout")
        for _ in range(5):
            assert decided(limiter.check("192.0.2.1")) == expected
        store.answer = None
        for _ in range(3):
            assert decided(limiter.check("192.0.2.1")) is None
        store.answer = StoreUnavailable("not-connected")
        decided(limiter.check("192.0.2.1"))
    down = logs.texts("the shared store failed")
    assert len(down) == 2
    assert "(timeout)" in down[0] and ("denied" if policy == "deny" else "allowed") in down[0]
    assert len(logs.texts("answers again; limits apply")) == 1
    assert counters.value("rate_limit_store_errors", "z") == 6
    assert counters.by_label("rate_limit_store_transitions") == {"down": 2, "up": 1}


def shared_site(store: FakeStore, clock: MemoryReactorClock, policy: str = "allow"):
    agent = FakeAgent()
    limiter = SharedRateLimiter("z", zone(on_store_error=policy), store, Counters())
    upstream = Upstream("default", agent, ConcurrencyLimiter(clock, 0, 0, 1))
    site = site_for(
        Router([Route(RouteConfig(prefix="/v2/"), upstream=upstream, rate_limiter=limiter)]), clock
    )
    return site, agent


def test_request_waits_for_the_shared_decision_then_goes_upstream() -> None:
    """Nothing goes upstream until the store has answered; then the request proceeds."""
    clock = MemoryReactorClock()
    store = FakeStore()
    store.answer = "later"
    site, agent = shared_site(store, clock)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(0)
    assert agent.requests == [] and client.value() == b""
    store.pending[0].callback(None)
    assert len(agent.requests) == 1


def test_shared_refusal_is_429_with_retry_after() -> None:
    clock = MemoryReactorClock()
    store = FakeStore()
    store.answer = "later"
    site, agent = shared_site(store, clock)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    store.pending[0].callback(2.5)
    clock.advance(0)
    assert agent.requests == []
    assert status_of(client) == 429
    assert b"Retry-After: 3" in client.value()
    assert json.loads(body_of(client))["errors"][0]["code"] == "TOOMANYREQUESTS"


def test_client_gone_before_the_decision_sends_nothing_upstream() -> None:
    clock = MemoryReactorClock()
    store = FakeStore()
    store.answer = "later"
    site, agent = shared_site(store, clock)
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    channel.connectionLost(Failure(ConnectionLost()))
    store.pending[0].callback(None)
    clock.advance(0)
    assert agent.requests == []


# The store itself, over a fake txredisapi pool.


class FakeHandler:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def eval(self, script, keys, args) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((script, keys, args, d))
        return d


class FakeFactory:
    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.handler = FakeHandler()


def store_with(factory: FakeFactory | None, clock: MemoryReactorClock, **kwargs) -> RedisStore:
    config = RedisConfig(url=parse_redis_url("redis://127.0.0.1:6379/0"), op_timeout_s=0.1)
    store = RedisStore(clock, config, **kwargs)
    store._factory = factory
    return store


def outcome(d: Deferred):
    results: list = []
    d.addBoth(results.append)
    return results[0] if results else "pending"


def test_store_sends_one_script_call_and_reads_the_reply() -> None:
    clock = MemoryReactorClock()
    factory = FakeFactory()
    store = store_with(factory, clock)
    taken = store.take_token("k", 5.0, 10)
    refused = store.take_token("k", 5.0, 10)
    (script, keys, args, first), (_, _, _, second) = factory.handler.calls
    assert "redis.call('TIME')" in script and keys == ["k"] and args == ["5.0", "10"]
    first.callback([1, "0"])
    second.callback([0, "0.2"])
    assert outcome(taken) is None
    assert outcome(refused) == pytest.approx(0.2)
    assert store.pending == 0 and clock.getDelayedCalls() == []


def test_store_answers_within_op_timeout_and_drops_the_late_reply() -> None:
    clock = MemoryReactorClock()
    factory = FakeFactory()
    store = store_with(factory, clock)
    d = store.take_token("k", 5.0, 10)
    results: list = []
    d.addBoth(results.append)
    clock.advance(0.099)
    assert results == []
    clock.advance(0.001)
    [failure] = results
    assert failure.check(StoreUnavailable) and failure.value.reason == "timeout"
    assert store.pending == 1
    factory.handler.calls[0][3].callback([1, "0"])
    assert store.pending == 0


def test_store_fails_at_once_without_a_connection_or_past_the_pending_cap() -> None:
    clock = MemoryReactorClock()
    assert outcome(store_with(None, clock).take_token("k", 1, 1)).value.reason == "not-connected"
    assert outcome(store_with(FakeFactory(0), clock).take_token("k", 1, 1)).value.reason == "not-connected"
    store = store_with(FakeFactory(), clock, max_pending=2)
    store.take_token("k", 1, 1)
    store.take_token("k", 1, 1)
    assert outcome(store.take_token("k", 1, 1)).value.reason == "too-many-pending"


def test_store_errors_become_store_unavailable() -> None:
    clock = MemoryReactorClock()
    factory = FakeFactory()
    store = store_with(factory, clock)
    d = store.take_token("k", 1, 1)
    factory.handler.calls[0][3].errback(RuntimeError("WRONGTYPE"))
    assert outcome(d).value.reason == "error: WRONGTYPE"
    d = store.take_token("k", 1, 1)
    factory.handler.calls[1][3].callback("nonsense")
    assert outcome(d).value.reason.startswith("error: unexpected reply")


def test_unreadable_password_or_ca_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError) as caught:
        check_config(
            RedisConfig(url=parse_redis_url("redis://h:1/0"), password_file=str(tmp_path / "no")), "q.toml"
        )
    assert caught.value.key == "redis.password_file"
    with pytest.raises(ConfigError) as caught:
        check_config(
            RedisConfig(url=parse_redis_url("rediss://h:1/0"), ca_file=str(tmp_path / "no")), "q.toml"
        )
    assert caught.value.key == "redis.ca_file"
