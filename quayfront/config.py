"""
The configuration: one TOML file read once at startup into frozen, typed
sections, then passed down through constructors.

Every key has a default, so an empty file is a valid configuration.  A key
that is unknown, of the wrong type or out of range is a L{ConfigError} naming
the file, the dotted key and the reason; nothing is silently ignored (a
misspelt C{header_timout_s} must not fall back to a default unnoticed).
Units are part of the names (C{_s} seconds, C{_bytes} bytes).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Loopback only: trusting every private range would let any host in the
# same network claim any client address.  A listener on another address that
# requires a header must name its load balancers (see _check_trust).
DEFAULT_TRUSTED_SOURCES = ("127.0.0.0/8", "::1/128")

# Connections each listener accepts at once (max_connections); beyond it new
# ones wait in the kernel's listen backlog.  Far below the descriptor limits
# quayfront starts with (systemd's 524288, a container's 1048576 or 20000).
DEFAULT_MAX_CONNECTIONS = 2048


class ConfigError(Exception):
    """
    The configuration cannot be used; says where and why.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class ListenAddress:
    """
    A TCP address to listen on: an IPv4 or IPv6 literal (or a name) and a
    port.
    """

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamAddress:
    """
    Where the registry application listens: TCP host and port, or a UNIX
    socket path.
    """

    scheme: Literal["http", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """
    Parse C{HOST:PORT} or C{[IPV6]:PORT}.

    @raise ValueError: with the reason, when C{text} is not of that form.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
        ipaddress.IPv6Address(host)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
    return ListenAddress(host, _parse_port(port_text, text))


def parse_upstream_url(text: str) -> UpstreamAddress:
    """
    Parse C{http://HOST:PORT} or C{unix:/absolute/path.sock}.

    @raise ValueError: with the reason, when C{text} is neither.
    """
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: the socket path must be absolute")
        return UpstreamAddress("unix", path=path)
    if text.startswith("http://"):
        authority = text[len("http://") :].rstrip("/")
        if "/" in authority:
            raise ValueError(f"{text!r}: a path prefix is not supported")
        address = parse_listen_address(authority)
        return UpstreamAddress("http", host=address.host, port=address.port)
    raise ValueError(f"{text!r} is neither http://HOST:PORT nor unix:/PATH")


@dataclass(frozen=True)
class RedisAddress:
    """
    Where the shared store (Redis) listens: TCP (C{redis}), TCP with TLS
    (C{rediss}) or a UNIX socket (C{unix}), and the database number.
    """

    scheme: Literal["redis", "rediss", "unix"]
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(text: str) -> RedisAddress | None:
    """
    Parse C{redis://HOST[:PORT][/DB]}, C{rediss://...} (TLS) or
    C{unix:///PATH[?db=DB]}; the empty string is "no store".

    @raise ValueError: with the reason.
    """
    if not text:
        return None
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{text!r} is not redis://HOST:PORT/DB, rediss://... or unix:///PATH")
    if scheme == "unix":
        path, _, query = rest.partition("?")
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: the socket path must be absolute (unix:///PATH)")
        db = 0
        if query:
            name, _, value = query.partition("=")
            if name != "db" or not value.isdigit():
                raise ValueError(f"{text!r}: the only option is ?db=NUMBER")
            db = int(value)
        return RedisAddress("unix", path=path, db=db)
    authority, _, db_text = rest.partition("/")
    if "@" in authority:
        raise ValueError(f"{text!r}: put the password in redis.password_file, not in the URL")
    if db_text and not db_text.isdigit():
        raise ValueError(f"{text!r}: the database must be a number")
    if authority.startswith("[") or authority.count(":") == 1:
        address = parse_listen_address(authority)
        host, port = address.host, address.port
    elif ":" in authority:
        raise ValueError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
    else:
        host, port = authority, 6379
    if not host:
        raise ValueError(f"{text!r}: no host")
    return RedisAddress(scheme, host=host, port=port, db=int(db_text or 0))


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port must be 1-65535")
    return int(text)


def host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    The IP address in a socket or PROXY host string, or C{None}.

    A dual-stack listener sees IPv4 peers as C{::ffff:a.b.c.d}; they are
    returned as IPv4, since operators write IPv4 CIDRs for them.
    """
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_networks(texts: tuple[str, ...] | list[str]) -> tuple[IPNetwork, ...]:
    """
    Parse CIDR strings; a bare address is a one-address network.

    @raise ValueError: naming the first bad entry.
    """
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as e:
            raise ValueError(f"{text!r} is not a CIDR network ({e})") from None
    return tuple(networks)


# Each field's metadata may carry a "check": a function that turns the raw
# TOML value into the stored one or raises ValueError with the reason.
def _checked(default: Any, check: Callable[[Any], Any], toml_type: type | None = None) -> Any:
    metadata: dict[str, Any] = {"check": check}
    if toml_type is not None:
        metadata["toml_type"] = toml_type
    return field(default=default, metadata=metadata)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
        return value

    return check


def _url_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with '/'")
    return value


# RFC 9110 token characters: what a header name may consist of.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _header_name(value: str) -> str:
    if value and not (value.isascii() and set(value.encode()) <= _TOKEN):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


def _tlv_headers(table: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    # Imported here: config must not depend on the parser package at import
    # time for anything but this check.
    from quayfront.connectioninfo import TLV_FIELDS

    pairs = []
    for tlv, header in table.items():
        if tlv not in TLV_FIELDS:
            raise ValueError(f"unknown TLV field {tlv!r} (known: {', '.join(TLV_FIELDS)})")
        if not isinstance(header, str) or not header:
            raise ValueError(f"{tlv}: the header name must be a non-empty string")
        pairs.append((tlv, _header_name(header)))
    return tuple(pairs)


TLS_FIELDS = ("version", "cipher", "sni")


def _tls_headers(table: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name, header in table.items():
        if name not in TLS_FIELDS:
            raise ValueError(f"unknown TLS field {name!r} (known: {', '.join(TLS_FIELDS)})")
        if not isinstance(header, str) or not header:
            raise ValueError(f"{name}: the header name must be a non-empty string")
        pairs.append((name, _header_name(header)))
    return tuple(pairs)


def _url_paths(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_url_path(v) for v in values)


@dataclass(frozen=True)
class ProxyListenerConfig:
    """
    The listener that reads a PROXY protocol header before TLS.
    """

    enabled: bool = True
    address: ListenAddress = _checked(ListenAddress("0.0.0.0", 8443), parse_listen_address)
    proxy_protocol: str = _checked("required", _one_of("required", "off"))
    header_timeout_s: float = _checked(5.0, _positive)
    max_v2_header_bytes: int = _checked(4096, _positive)
    trusted_sources: tuple[IPNetwork, ...] = _checked(
        parse_networks(DEFAULT_TRUSTED_SOURCES), parse_networks
    )
    exempt_sources: tuple[IPNetwork, ...] = _checked((), parse_networks)
    # PROXY v2 TLV fields sent upstream as headers: field name -> header
    # name.  Client-sent headers of those names are always removed.
    tlv_headers: tuple[tuple[str, str], ...] = _checked((), _tlv_headers, toml_type=dict)
    max_connections: int = _checked(DEFAULT_MAX_CONNECTIONS, _positive)


@dataclass(frozen=True)
class TLSListenerConfig:
    """
    The plain TLS listener (no PROXY header): direct clients and load
    balancer health checks.
    """

    enabled: bool = True
    address: ListenAddress = _checked(ListenAddress("0.0.0.0", 443), parse_listen_address)
    max_connections: int = _checked(DEFAULT_MAX_CONNECTIONS, _positive)


@dataclass(frozen=True)
class CertificateFiles:
    """
    One certificate: a PEM file with the leaf first and then its chain, and
    the PEM file of its unencrypted private key (may be the same file).
    """

    cert: str
    key: str


def _certificate_list(entries: list[Any]) -> tuple[CertificateFiles, ...]:
    files = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"cert", "key"}:
            raise ValueError(f"entry {index}: must be a table with exactly 'cert' and 'key'")
        if not all(isinstance(v, str) and v for v in entry.values()):
            raise ValueError(f"entry {index}: 'cert' and 'key' must be non-empty paths")
        files.append(CertificateFiles(entry["cert"], entry["key"]))
    return tuple(files)


def _tls_version(value: str) -> str:
    return _one_of("TLSv1.2", "TLSv1.3")(value)


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("must not be negative")
    return value


@dataclass(frozen=True)
class RedirectListenerConfig:
    """
    An optional plain-HTTP listener that redirects every request to https,
    optionally behind a PROXY header like the TLS listener.
    """

    enabled: bool = False
    address: ListenAddress = _checked(ListenAddress("0.0.0.0", 80), parse_listen_address)
    proxy_protocol: str = _checked("off", _one_of("required", "off"))
    header_timeout_s: float = _checked(5.0, _positive)
    trusted_sources: tuple[IPNetwork, ...] = _checked(
        parse_networks(DEFAULT_TRUSTED_SOURCES), parse_networks
    )
    exempt_sources: tuple[IPNetwork, ...] = _checked((), parse_networks)
    # The https port redirects point at; 443 is left out of the URL.
    https_port: int = _checked(443, _positive)
    max_connections: int = _checked(DEFAULT_MAX_CONNECTIONS, _positive)


@dataclass(frozen=True)
class TLSConfig:
    """
    Certificates and the TLS policy of both TLS listeners.
    """

    # The default certificate: for clients that send no SNI name, or one no
    # other certificate covers.  Empty with self_signed_dev = true: a
    # throw-away certificate for localhost, for development only.
    cert: str = "/etc/quayfront/tls/cert.pem"
    key: str = "/etc/quayfront/tls/key.pem"
    # Further certificates, chosen by the SNI name the client sends (their
    # DNS subjectAltNames, wildcards included).
    certificates: tuple[CertificateFiles, ...] = _checked((), _certificate_list, toml_type=list)
    # A directory of PEM files, each holding a certificate chain and its key,
    # chosen by SNI like `certificates`.  Read at startup and on reload only.
    certificate_dir: str = ""
    self_signed_dev: bool = False
    # Refuse to start with an expired certificate unless this is set.
    allow_expired: bool = False
    min_version: str = _checked("TLSv1.2", _tls_version)
    # OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are all AEAD).
    ciphers_tls12: str = "ECDHE+AESGCM:ECDHE+CHACHA20"
    # Seconds between checks of the certificate files for changes (a reload
    # when they changed); 0 turns the check off.  SIGHUP always reloads.
    reload_check_s: float = _checked(60.0, _non_negative)
    # The Strict-Transport-Security header added to responses that lack
    # one; empty for none.
    hsts: str = "max-age=63072000"
    # TLS session details sent upstream as headers: field (version, cipher,
    # sni) -> header name.  Client-sent headers of these names are removed.
    headers: tuple[tuple[str, str], ...] = _checked((), _tls_headers, toml_type=dict)
    # Session ticket key files shared by every replica, as nginx's
    # ssl_session_ticket_key: 80 (or 48) random bytes each, e.g. from
    # `openssl rand 80`.  The first encrypts new tickets, all decrypt: to
    # rotate, put a new file first and keep the previous one second.  Empty:
    # each process makes its own keys, and a session resumes only on the
    # replica that started it.  Reloaded with the certificates.
    session_ticket_key_files: tuple[str, ...] = ()
    # From the start of TLS (accept, or the end of the PROXY header) to a
    # completed handshake; a connection still handshaking then is closed.
    handshake_timeout_s: float = _checked(10.0, _positive)


@dataclass(frozen=True)
class UpstreamConfig:
    """
    The registry application quayfront forwards to.
    """

    url: UpstreamAddress = _checked(
        UpstreamAddress("http", host="127.0.0.1", port=5000), parse_upstream_url
    )
    connect_timeout_s: float = _checked(10.0, _positive)
    # Idle persistent connections kept per upstream; not a concurrency cap.
    max_idle_connections: int = _checked(64, _positive)
    # Below the upstreams' own keep-alive timeouts (gunicorn 2 s by default is
    # the outlier; docker-registry and Quay's nginx use 60-75 s), so quayfront
    # closes an idle connection before the upstream does and never sends a
    # request into a connection that is being torn down.
    idle_keepalive_s: float = _checked(50.0, _positive)
    # Requests in flight to this upstream at once; 0 = no cap.  Beyond the
    # cap requests wait in a queue of queue_size for at most queue_timeout_s;
    # past either they are answered 503.
    max_connections: int = _checked(0, _non_negative)
    queue_size: int = _checked(256, _non_negative)
    queue_timeout_s: float = _checked(30.0, _positive)
    # Largest upstream response head (status line and header lines, 1xx
    # heads included) and most header lines in it: beyond either, or on a
    # malformed status line or header, the client gets 502 and the upstream
    # connection is closed.  32 KiB is Quay's nginx proxy_buffer_size.
    max_response_head_bytes: int = _checked(32768, _positive)
    max_response_headers: int = _checked(100, _positive)


def _prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with '/'")
    return value


# Quay's front uses 2000 s on registry routes: the closing PUT of a large
# blob can take minutes while the registry assembles it.
REGISTRY_ROUTE_TIMEOUT_S = 2000.0


@dataclass(frozen=True)
class RouteConfig:
    """
    Requests whose path starts with C{prefix} (the longest matching prefix
    wins) go to C{upstream}, or are served from C{directory}.
    """

    prefix: str = _checked("/", _prefix)
    upstream: str = "default"
    directory: str = ""
    # Largest request body accepted, in bytes; 0 = unlimited.  Larger bodies
    # get 413 before the upstream sees the excess.
    max_body_bytes: int = _checked(0, _non_negative)
    # Connecting to the upstream; 0 = the upstream's connect_timeout_s.
    connect_timeout_s: float = _checked(0.0, _non_negative)
    # From the end of the request body to the upstream's response head.
    response_timeout_s: float = _checked(60.0, _positive)
    # Longest pause in either direction while a body streams.
    idle_timeout_s: float = _checked(60.0, _positive)
    # false closes the client connection after each response (Quay does this
    # on registry routes so an L4 balancer can rebalance).
    keepalive: bool = True
    # The [rate_limits.NAME] zone that applies, or "" for none.
    rate_limit: str = ""


DEFAULT_ROUTES = (
    RouteConfig(
        prefix="/v2/",
        response_timeout_s=REGISTRY_ROUTE_TIMEOUT_S,
        idle_timeout_s=REGISTRY_ROUTE_TIMEOUT_S,
    ),
    RouteConfig(
        prefix="/v1/",
        response_timeout_s=REGISTRY_ROUTE_TIMEOUT_S,
        idle_timeout_s=REGISTRY_ROUTE_TIMEOUT_S,
    ),
    RouteConfig(prefix="/"),
)


@dataclass(frozen=True)
class RateLimitConfig:
    """
    A token bucket per client address (the PROXY source): C{requests_per_s}
    sustained, C{burst} at once.
    """

    requests_per_s: float = _checked(10.0, _positive)
    burst: int = _checked(20, _positive)
    exempt_sources: tuple[IPNetwork, ...] = _checked((), parse_networks)
    # Clients tracked at most; the longest idle are forgotten first (a
    # forgotten client starts again with a full bucket).
    max_clients: int = _checked(100_000, _positive)
    # "memory": buckets in this process.  "redis": in the [redis] store, so
    # the limit holds across every replica and worker.
    store: str = _checked("memory", _one_of("memory", "redis"))
    # When the redis store is down or slower than redis.op_timeout_s:
    # "allow" the request or "deny" it (429).
    on_store_error: str = _checked("allow", _one_of("allow", "deny"))


@dataclass(frozen=True)
class RedisConfig:
    """
    The shared store for rate limits with C{store = "redis"}.
    """

    # redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///PATH?db=N;
    # "" for none.
    url: RedisAddress | None = _checked(None, parse_redis_url)
    # PEM CA certificates for rediss://; "" uses the system's trust store.
    ca_file: str = ""
    # A file holding the password (AUTH); "" for none.
    password_file: str = ""
    connect_timeout_s: float = _checked(2.0, _positive)
    # Longest a request waits for the store before on_store_error decides.
    op_timeout_s: float = _checked(0.1, _positive)


@dataclass(frozen=True)
class HTTPConfig:
    """
    Client-facing HTTP limits.
    """

    # Time a connection may sit without a byte from the client: before its
    # first request and between requests (a partial head resets it with
    # every byte; header_timeout_s bounds the whole head).
    idle_timeout_s: float = _checked(60.0, _positive)
    # Time a client may take to send a whole request head, from its first
    # byte (or from the end of the previous response, if the head had
    # started arriving before): answered 408 and closed (nginx's
    # client_header_timeout).
    header_timeout_s: float = _checked(60.0, _positive)
    # Sent upstream with each request's id (the PROXY UNIQUE_ID TLV when the
    # load balancer sends one, else made up), replacing any client value;
    # empty to send none.
    request_id_header: str = _checked("X-Request-ID", _header_name)
    # On SIGTERM, health checks answer 503 at once while quayfront keeps
    # accepting and serving for drain_delay_s, so load balancers see the
    # instance go down and stop sending to it; then the listeners close and
    # requests in flight get up to drain_timeout_s.  A second SIGTERM or
    # SIGINT skips the rest of the delay.
    drain_delay_s: float = _checked(15.0, _non_negative)
    drain_timeout_s: float = _checked(60.0, _non_negative)


@dataclass(frozen=True)
class MetricsConfig:
    """
    A plain-HTTP endpoint with counters in Prometheus' text format; keep it
    on loopback or an admin network.
    """

    enabled: bool = True
    address: ListenAddress = _checked(ListenAddress("127.0.0.1", 9091), parse_listen_address)


@dataclass(frozen=True)
class HealthConfig:
    """
    The health resource that load balancers probe.
    """

    paths: tuple[str, ...] = _checked(("/health", "/health/instance"), _url_paths)
    probe_path: str = _checked("/", _url_path)
    probe_timeout_s: float = _checked(2.0, _positive)
    cache_s: float = _checked(3.0, _positive)


@dataclass(frozen=True)
class AccessLogConfig:
    """
    Where the access log goes: a file path, or C{-} for standard output.
    """

    path: str = "-"
    # "quay": Quay's nginx lb_logs line.  "json": one JSON object per line
    # with every field, PROXY TLVs and TLS details included.
    format: str = _checked("quay", _one_of("quay", "json"))


def _worker_count(value: Any) -> int:
    """
    C{"auto"} (0: one worker per core this process may run on) or a count.
    """
    if value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'must be "auto" or a whole number of at least 1, not {value!r}')
    return value


@dataclass(frozen=True)
class ProcessConfig:
    """
    The process model.
    """

    # Worker processes serving the listeners: a number, or "auto" for one per
    # core (stored as 0).  1 serves everything from the one twistd process.
    workers: int = _checked(1, _worker_count, toml_type=object)


@dataclass(frozen=True)
class Config:
    """
    The whole configuration.
    """

    proxy_listener: ProxyListenerConfig = ProxyListenerConfig()
    tls_listener: TLSListenerConfig = TLSListenerConfig()
    redirect_listener: RedirectListenerConfig = RedirectListenerConfig()
    tls: TLSConfig = TLSConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    # More upstreams by name; [upstream] is the one named "default".
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = DEFAULT_ROUTES
    rate_limits: dict[str, RateLimitConfig] = field(default_factory=dict)
    redis: RedisConfig = RedisConfig()
    http: HTTPConfig = HTTPConfig()
    health: HealthConfig = HealthConfig()
    metrics: MetricsConfig = MetricsConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    process: ProcessConfig = ProcessConfig()


def load_config(
    path: str | None,
    overrides: Mapping[str, Any] = {},
    override_sources: Mapping[str, str] = {},
) -> Config:
    """
    Read the TOML file at C{path} (or nothing, when C{None}) and apply
    C{overrides}, a mapping of dotted keys (C{"upstream.url"}) to values of
    the same form the file would hold (command-line options arrive this way).
    C{override_sources} names where each override came from (an option such
    as C{--cert}); errors in an override name it.

    @raise ConfigError: naming the file (or C{command line}), key and reason.
    """
    source = path or "(defaults)"
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as e:
            raise ConfigError(path, "-", f"cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(path, "-", f"not valid TOML: {e}") from None
    config = _build(Config, document, source, prefix="")
    _check_references(config, source)
    for dotted, value in overrides.items():
        section_name, _, key = dotted.partition(".")
        section = getattr(config, section_name)
        raw = {key: value}
        updated = _build(
            type(section),
            raw,
            override_sources.get(dotted, "command line"),
            f"{section_name}.",
            base=section,
        )
        config = dataclasses.replace(config, **{section_name: updated})
    _check_trust(config, document, overrides, source)
    return config


def _is_loopback(host: str) -> bool:
    ip = host_ip(host)
    return host == "localhost" if ip is None else ip.is_loopback


def _check_trust(
    config: Config, document: dict[str, Any], overrides: Mapping[str, Any], source: str
) -> None:
    """
    Refuse the trust settings that fail silently at run time: a source both
    exempt and trusted (it would be served without a header, so a load
    balancer there fails every connection in TLS), and a listener reachable
    from other hosts that requires a header but relies on the loopback-only
    default for who may send one.
    """
    for section_name in ("proxy_listener", "redirect_listener"):
        section = getattr(config, section_name)
        for exempt in section.exempt_sources:
            for trusted in section.trusted_sources:
                if exempt.version == trusted.version and exempt.overlaps(trusted):
                    raise ConfigError(
                        source,
                        f"{section_name}.exempt_sources",
                        f"{exempt} overlaps {trusted} in {section_name}.trusted_sources: a source"
                        " is either served without a PROXY header (exempt) or must send one"
                        " (trusted), never both; remove it from one of the two lists",
                    )
        if not section.enabled or section.proxy_protocol != "required":
            continue
        key = f"{section_name}.trusted_sources"
        explicit = "trusted_sources" in document.get(section_name, {}) or key in overrides
        if not explicit and not _is_loopback(section.address.host):
            raise ConfigError(
                source,
                key,
                f"must be set: {section_name}.address {section.address} is not a loopback"
                ' address and proxy_protocol = "required", and the default trusts only'
                " loopback (" + ", ".join(DEFAULT_TRUSTED_SOURCES) + "). Set"
                f' [{section_name}] trusted_sources = ["CIDR", ...] to the load balancers\''
                " addresses (e.g. [\"10.0.0.0/8\"])"
                + (", or pass --proxy-trusted CIDR[,CIDR]" if section_name == "proxy_listener" else ""),
            )


def _check_references(config: Config, source: str) -> None:
    """
    Names a route uses must exist; prefixes must be unique.
    """
    upstreams = {"default", *config.upstreams}
    seen = set()
    for index, route in enumerate(config.routes):
        key = f"routes[{index}]"
        if route.prefix in seen:
            raise ConfigError(source, f"{key}.prefix", f"{route.prefix!r} is routed twice")
        seen.add(route.prefix)
        if not route.directory and route.upstream not in upstreams:
            raise ConfigError(
                source,
                f"{key}.upstream",
                f"no upstream named {route.upstream!r} (known: {', '.join(sorted(upstreams))})",
            )
        if route.rate_limit and route.rate_limit not in config.rate_limits:
            raise ConfigError(
                source, f"{key}.rate_limit", f"no [rate_limits.{route.rate_limit}] section"
            )
    for name, zone in config.rate_limits.items():
        if zone.store == "redis" and config.redis.url is None:
            raise ConfigError(
                source, f"rate_limits.{name}.store", "\"redis\" needs [redis] url to be set"
            )
    if "default" in config.upstreams:
        raise ConfigError(
            source, "upstreams.default", "the default upstream is configured as [upstream]"
        )


def _build(cls: type, raw: Any, source: str, prefix: str, base: Any = None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix.rstrip(".") or "-", "must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            source,
            prefix + unknown[0],
            f"unknown key (known here: {', '.join(sorted(known))})",
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = prefix + name
        f = known[name]
        hint = hints[name]
        check = f.metadata.get("check")
        if dataclasses.is_dataclass(hint) and check is None:
            values[name] = _build(hint, value, source, key + ".")
            continue
        section = _section_of(hint)
        if section is not None:
            container, section_type = section
            if container is dict:
                if not isinstance(value, dict):
                    raise ConfigError(source, key, "must be a table of tables")
                values[name] = {
                    entry: _build(section_type, table, source, f"{key}.{entry}.")
                    for entry, table in value.items()
                }
            else:
                if not isinstance(value, list):
                    raise ConfigError(source, key, f"must be an array of tables ([[{key}]])")
                values[name] = tuple(
                    _build(section_type, table, source, f"{key}[{index}].")
                    for index, table in enumerate(value)
                )
            continue
        try:
            values[name] = _convert(hint, value, f)
        except (TypeError, ValueError) as e:
            raise ConfigError(source, key, str(e)) from None
    if base is not None:
        return dataclasses.replace(base, **values)
    return cls(**values)


def _section_of(hint: Any) -> tuple[type, type] | None:
    """
    For C{dict[str, Section]} and C{tuple[Section, ...]} fields: the
    container and the section type.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return dict, args[1]
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        return tuple, args[0]
    return None


def _convert(hint: Any, value: Any, field_: dataclasses.Field) -> Any:
    check = field_.metadata.get("check")
    raw_type = _raw_toml_type(hint, check, field_.metadata.get("toml_type"))
    if raw_type is bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, not {value!r}")
    elif raw_type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"must be an integer, not {value!r}")
    elif raw_type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"must be a number, not {value!r}")
        value = float(value)
    elif raw_type is str:
        if not isinstance(value, str):
            raise TypeError(f"must be a string, not {value!r}")
    elif raw_type is dict:
        if not isinstance(value, dict):
            raise TypeError(f"must be a table, not {value!r}")
    elif raw_type is list:
        if not isinstance(value, list):
            raise TypeError(f"must be a list, not {value!r}")
        if field_.metadata.get("toml_type") is None and not all(isinstance(v, str) for v in value):
            raise TypeError(f"must be a list of strings, not {value!r}")
        value = tuple(value) if field_.metadata.get("toml_type") is None else value
    return check(value) if check is not None else value


def _raw_toml_type(hint: Any, check: Callable[[Any], Any] | None, toml_type: type | None) -> type:
    """
    The TOML type a field is written as: its own type, or for fields with a
    parsing check (addresses, networks) the string or list it is parsed from.
    """
    if toml_type is not None:
        return toml_type
    if hint in (bool, int, float, str):
        return hint
    origin = typing.get_origin(hint)
    if origin is tuple:
        return list
    if origin in (typing.Union, types.UnionType, Literal):
        return str
    # A parsed field (addresses, URLs) is written as a string.
    assert check is not None, hint
    return str


BUILT_IN_DEFAULT = "built-in default"


def key_sources(
    path: str | None, overrides: Mapping[str, Any], override_sources: Mapping[str, str]
) -> Callable[[str], str]:
    """
    Where the value of a dotted key came from: the option that overrode it,
    else the file when the file sets it (or its section), else the built-in
    default.  Keys such as C{tls.certificates[0].cert} are looked up by
    their top two levels.
    """
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError):
            document = {}

    def source_of(key: str) -> str:
        if key in override_sources and key in overrides:
            return override_sources[key]
        section, _, rest = key.partition(".")
        name = rest.split(".", 1)[0].split("[", 1)[0]
        table = document.get(section.split("[", 1)[0])
        if path is not None and isinstance(table, (dict, list)) and (
            not name or isinstance(table, list) or name in table
        ):
            return path
        return BUILT_IN_DEFAULT

    return source_of
