"""
The shared store: Redis, reached without blocking from the reactor.

All of quayfront's Redis I/O is here.  The client is C{txredisapi} (a
Redis protocol, connection pool and reconnection with backoff written for
Twisted); this module gives it endpoints built on the injected reactor and
adds what a request path needs: an answer within C{op_timeout_s} whatever
Redis does, an immediate failure while no connection is up (requests never
queue behind a dead store), and a bound on the operations in flight.

Token buckets are updated by one Lua script, run atomically inside Redis:
one round trip per request, the time taken from the Redis server's own
clock (so replicas' clocks need not agree), and the key set to expire once
an idle bucket would be full again.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure

from quayfront.config import ConfigError, RedisConfig

# KEYS[1] the bucket; ARGV[1] tokens per second, ARGV[2] the burst.
# Returns {1, "0"} when a token was taken, else {0, seconds until one is
# there}.  Numbers go back as strings: Redis truncates Lua numbers to
# integers.  TIME makes the script non-deterministic, which Redis 5+ allows
# (effects replication, the only mode since Redis 7).
TOKEN_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(bucket[1])
local updated = tonumber(bucket[2])
if tokens == nil or updated == nil then
  tokens = burst
  updated = now
end
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
if taken == 1 then
  return {1, '0'}
end
return {0, tostring((1 - tokens) / rate)}
"""

# Operations waiting for Redis at most; beyond, requests are decided
# without it (a slow store must not grow memory without limit).
MAX_PENDING_OPERATIONS = 1024

# Reconnection backoff: short, so limits apply again soon after Redis is
# back; a couple of connection attempts a second per process cost nothing.
RECONNECT_FIRST_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 2.0


class StoreUnavailable(Exception):
    """
    The store did not answer: C{reason} says why (C{not-connected},
    C{timeout}, C{too-many-pending}, C{error: ...}).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_password(config: RedisConfig, source: str) -> str | None:
    if not config.password_file:
        return None
    try:
        with open(config.password_file, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            source, "redis.password_file", f"cannot read {config.password_file}: {reason}"
        ) from None


def _trust_root(config: RedisConfig, source: str):
    if not config.ca_file:
        return platformTrust()
    try:
        with open(config.ca_file, "rb") as f:
            return Certificate.loadPEM(f.read())
    except OSError as e:
        raise ConfigError(
            source, "redis.ca_file", f"cannot read {config.ca_file}: {e.strerror}"
        ) from None
    except Exception as e:
        raise ConfigError(
            source, "redis.ca_file", f"{config.ca_file} holds no PEM certificate ({e})"
        ) from None


def redis_endpoint(reactor, config: RedisConfig, source: str):
    """
    The client endpoint for C{config.url}, on C{reactor}.

    @raise ConfigError: when the CA file cannot be used.
    """
    url = config.url
    assert url is not None
    if url.scheme == "unix":
        return UNIXClientEndpoint(reactor, url.path, timeout=config.connect_timeout_s)
    endpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=config.connect_timeout_s)
    if url.scheme == "redis":
        return endpoint
    trust = _trust_root(config, source)
    return wrapClientTLS(optionsForClientTLS(url.host, trustRoot=trust), endpoint)


def check_config(config: RedisConfig, source: str) -> None:
    """
    Everything a start would read for the store: the password and CA files.

    @raise ConfigError: naming the key and the reason.
    """
    if config.url is None:
        return
    read_password(config, source)
    if config.url.scheme == "rediss":
        _trust_root(config, source)


class RedisStore(Service):
    """
    A pool of connections to Redis, (re)connected in the background while
    the service runs.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        config: RedisConfig,
        source: str = "command line",
        pool_size: int = 1,
        max_pending: int = MAX_PENDING_OPERATIONS,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._endpoint = redis_endpoint(reactor, config, source)
        self._password = read_password(config, source)
        self._pool_size = pool_size
        self._max_pending = max_pending
        self._factory = None
        self.pending = 0

    def startService(self) -> None:
        # Imported here: txredisapi imports the global reactor, which must
        # not happen before twistd has installed the one it runs.
        import txredisapi

        super().startService()
        assert self._config.url is not None
        factory = txredisapi.RedisFactory(
            str(self._config.url),
            self._config.url.db,
            self._pool_size,
            isLazy=True,
            password=self._password,
            convertNumbers=False,
        )
        factory.reconnect = True
        factory.initialDelay = RECONNECT_FIRST_DELAY_S
        factory.maxDelay = RECONNECT_MAX_DELAY_S
        factory.startConnecting(self._endpoint)
        self._factory = factory
        self._log.info("shared store {url}: connecting", url=str(self._config.url))

    def stopService(self):
        super().stopService()
        factory, self._factory = self._factory, None
        if factory is not None:
            return factory.disconnect()
        return None

    @property
    def connected(self) -> bool:
        return self._factory is not None and self._factory.size > 0

    def take_token(self, key: str, rate_per_s: float, burst: int) -> Deferred:
        """
        Take a token from the bucket C{key}, in one round trip.

        @return: a Deferred firing within C{op_timeout_s} with C{None}
            (taken) or the seconds until a token is there, or failing with
            L{StoreUnavailable}.
        """
        if not self.connected:
            return fail(StoreUnavailable("not-connected"))
        if self.pending >= self._max_pending:
            return fail(StoreUnavailable("too-many-pending"))
        answer: Deferred = Deferred()
        self.pending += 1
        operation = self._factory.handler.eval(
            TOKEN_BUCKET_SCRIPT, keys=[key], args=[repr(float(rate_per_s)), str(int(burst))]
        )
        timer = self._reactor.callLater(
            self._config.op_timeout_s, self._timed_out, answer
        )
        operation.addBoth(self._answered, answer, timer)
        return answer

    def _timed_out(self, answer: Deferred) -> None:
        # The reply, when it comes, is dropped by _answered.
        answer.errback(StoreUnavailable("timeout"))

    def _answered(self, result, answer: Deferred, timer: IDelayedCall) -> None:
        self.pending -= 1
        if answer.called:
            return None
        timer.cancel()
        if isinstance(result, Failure):
            answer.errback(StoreUnavailable(f"error: {result.getErrorMessage()}"))
            return None
        try:
            taken, wait_s = result
            decision = None if int(taken) == 1 else max(0.0, float(wait_s))
        except (TypeError, ValueError):
            answer.errback(StoreUnavailable(f"error: unexpected reply {result!r}"))
            return None
        answer.callback(decision)
        return None
