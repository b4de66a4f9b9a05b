"""
Configuration loading: defaults, the shipped file, and errors that name the
file, key and reason.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from quayfront.config import (
    DEFAULT_TRUSTED_SOURCES,
    Config,
    ConfigError,
    ListenAddress,
    UpstreamAddress,
    load_config,
    parse_listen_address,
    parse_upstream_url,
)

SHIPPED = Path(__file__).parents[2] / "etc" / "quayfront.toml"
# The PROXY listener's default address is not loopback, so a configuration
# that keeps it must say who the load balancers are.
LOAD_BALANCERS = {"proxy_listener.trusted_sources": ["10.0.0.0/8"]}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "quayfront.toml"
    path.write_text(text)
    return str(path)


def test_shipped_file_is_the_defaults() -> None:
    """The documented etc/quayfront.toml states exactly the built-in defaults."""
    loopback = {"proxy_listener.trusted_sources": list(DEFAULT_TRUSTED_SOURCES)}
    assert load_config(str(SHIPPED), loopback) == Config()


def test_shipped_file_asks_for_the_load_balancers() -> None:
    """The shipped file leaves trusted_sources unset, so it cannot start on 0.0.0.0 as it is."""
    with pytest.raises(ConfigError) as caught:
        load_config(str(SHIPPED))
    assert caught.value.key == "proxy_listener.trusted_sources"


def test_no_file_gives_defaults() -> None:
    """Without a file every setting has its default."""
    config = load_config(None, LOAD_BALANCERS)
    assert config.proxy_listener.address == ListenAddress("0.0.0.0", 8443)
    assert config.tls_listener.address == ListenAddress("0.0.0.0", 443)
    assert config.proxy_listener.header_timeout_s == 5.0


def test_values_are_parsed(tmp_path: Path) -> None:
    """Addresses, URLs and CIDR lists are parsed into typed values."""
    config = load_config(
        write(
            tmp_path,
            """
            [proxy_listener]
            address = "[::]:9443"
            trusted_sources = ["10.1.0.0/16"]
            header_timeout_s = 3
            [upstream]
            url = "unix:/run/registry.sock"
            """,
        )
    )
    assert config.proxy_listener.address == ListenAddress("::", 9443)
    assert config.proxy_listener.trusted_sources == (ipaddress.ip_network("10.1.0.0/16"),)
    assert config.proxy_listener.header_timeout_s == 3.0
    assert config.upstream.url == UpstreamAddress("unix", path="/run/registry.sock")


def test_tlv_headers_table(tmp_path: Path) -> None:
    """tlv_headers maps TLV field names to header names, kept in order."""
    config = load_config(
        write(tmp_path, '[proxy_listener]\ntlv_headers = { authority = "X-A", aws_vpce_id = "X-V" }\n'),
        LOAD_BALANCERS,
    )
    assert config.proxy_listener.tlv_headers == (("authority", "X-A"), ("aws_vpce_id", "X-V"))


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    """Command-line overrides replace single keys and keep the rest of the file."""
    path = write(tmp_path, '[upstream]\nurl = "http://10.0.0.5:5000"\nconnect_timeout_s = 3\n')
    config = load_config(path, {"upstream.url": "http://127.0.0.1:6000", **LOAD_BALANCERS})
    assert config.upstream.url == UpstreamAddress("http", host="127.0.0.1", port=6000)
    assert config.upstream.connect_timeout_s == 3.0


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ("[proxy_listener]\nheader_timout_s = 5\n", "proxy_listener.header_timout_s", "unknown key"),
        ("[nonsense]\nx = 1\n", "nonsense", "unknown key"),
        ("[proxy_listener]\nheader_timeout_s = 'soon'\n", "proxy_listener.header_timeout_s", "number"),
        ("[proxy_listener]\nheader_timeout_s = 0\n", "proxy_listener.header_timeout_s", "greater than 0"),
        ("[proxy_listener]\nenabled = 1\n", "proxy_listener.enabled", "true or false"),
        ("[proxy_listener]\nproxy_protocol = 'maybe'\n", "proxy_listener.proxy_protocol", "one of"),
        ("[proxy_listener]\naddress = '8443'\n", "proxy_listener.address", "HOST:PORT"),
        ("[proxy_listener]\naddress = '::1:8443'\n", "proxy_listener.address", "[ADDRESS]:PORT"),
        ("[proxy_listener]\naddress = '0.0.0.0:70000'\n", "proxy_listener.address", "port"),
        ("[proxy_listener]\ntrusted_sources = ['10.0.0.1/8']\n", "proxy_listener.trusted_sources", "CIDR"),
        ("[proxy_listener]\ntrusted_sources = '10.0.0.0/8'\n", "proxy_listener.trusted_sources", "list"),
        ("[upstream]\nurl = 'https://x:5000'\n", "upstream.url", "http://HOST:PORT"),
        ("[upstream]\nurl = 'unix:relative.sock'\n", "upstream.url", "absolute"),
        ("[health]\nprobe_path = 'v2'\n", "health.probe_path", "start with"),
        ("upstream = 5\n", "upstream", "table"),
        ("[proxy_listener]\ntlv_headers = { sni = 'X-Sni' }\n", "proxy_listener.tlv_headers", "unknown TLV field"),
        ("[proxy_listener]\ntlv_headers = { authority = 'X Bad' }\n", "proxy_listener.tlv_headers", "header name"),
        ("[proxy_listener]\ntlv_headers = ['authority']\n", "proxy_listener.tlv_headers", "table"),
        ("[access_log]\nformat = 'xml'\n", "access_log.format", "one of"),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    """Each kind of mistake is refused with the file, the dotted key and why."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == path
    assert caught.value.key == key
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}: {key}: ")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    """A missing file or broken TOML is reported with the file name."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[upstream\n"))


def test_bad_override_names_the_command_line() -> None:
    """A bad command-line value is reported as coming from the command line."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"upstream.url": "ftp://x"})
    assert caught.value.source == "command line"
    assert caught.value.key == "upstream.url"


def test_address_forms() -> None:
    """Listen addresses and upstream URLs accept IPv4, bracketed IPv6 and names."""
    assert parse_listen_address("[::1]:8443") == ListenAddress("::1", 8443)
    assert parse_listen_address("localhost:443") == ListenAddress("localhost", 443)
    assert str(ListenAddress("::", 8443)) == "[::]:8443"
    assert parse_upstream_url("http://[::1]:5000/") == UpstreamAddress("http", host="::1", port=5000)
    with pytest.raises(ValueError):
        parse_listen_address("[::1]8443")


def test_routes_upstreams_and_rate_limits(tmp_path: Path) -> None:
    """Named upstreams, [[routes]] and rate-limit zones load; listing routes replaces the defaults."""
    config = load_config(
        write(
            tmp_path,
            """
            [upstreams.web]
            url = "unix:/run/web.sock"
            max_connections = 8
            [rate_limits.api]
            requests_per_s = 2.5
            burst = 5
            [[routes]]
            prefix = "/v2/"
            max_body_bytes = 1000
            keepalive = false
            rate_limit = "api"
            [[routes]]
            prefix = "/"
            upstream = "web"
            """,
        ),
        LOAD_BALANCERS,
    )
    assert [r.prefix for r in config.routes] == ["/v2/", "/"]
    assert config.routes[0].max_body_bytes == 1000 and not config.routes[0].keepalive
    assert config.routes[1].upstream == "web"
    assert config.upstreams["web"].max_connections == 8
    assert config.rate_limits["api"].requests_per_s == 2.5


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ("[[routes]]\nprefix = '/'\nupstream = 'nope'\n", "routes[0].upstream", "no upstream named"),
        ("[[routes]]\nprefix = '/'\nrate_limit = 'x'\n", "routes[0].rate_limit", "no [rate_limits.x]"),
        ("[[routes]]\nprefix = '/'\n[[routes]]\nprefix = '/'\n", "routes[1].prefix", "routed twice"),
        ("[[routes]]\nprefix = 'v2'\n", "routes[0].prefix", "start with"),
        ("[[routes]]\nprefx = '/'\n", "routes[0].prefx", "unknown key"),
        ("[upstreams.web]\nurl = 'ftp://x'\n", "upstreams.web.url", "http://HOST:PORT"),
        ("[upstreams.default]\nurl = 'http://a:1'\n", "upstreams.default", "[upstream]"),
        ("routes = 5\n", "routes", "array of tables"),
    ],
)
def test_route_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    """Dangling names, duplicate prefixes and bad route keys are refused with the key."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_route_connect_timeout_gets_its_own_pool_and_shares_the_cap(tmp_path: Path) -> None:
    """A route's connect_timeout_s gives it its own agent while the upstream's limiter is shared."""
    from twisted.internet.testing import MemoryReactorClock

    from quayfront.tap import build_router

    config = load_config(
        write(
            tmp_path,
            "[upstream]\nmax_connections = 4\n"
            "[[routes]]\nprefix = '/v2/'\nconnect_timeout_s = 2.5\n[[routes]]\nprefix = '/'\n",
        ),
        LOAD_BALANCERS,
    )
    router = build_router(config, MemoryReactorClock())
    v2, rest = router.route_for(b"/v2/x"), router.route_for(b"/api")
    assert v2.upstream.agent is not rest.upstream.agent
    assert v2.upstream.limiter is rest.upstream.limiter
    assert v2.upstream.agent.endpoint._timeout == 2.5
    assert v2.upstream.agent.pool is rest.upstream.agent.pool


def test_redis_url_forms(tmp_path: Path) -> None:
    """The [redis] url takes redis://, rediss:// and unix:// forms with a database number."""
    from quayfront.config import RedisAddress, load_config

    cases = {
        "redis://127.0.0.1:6380/2": RedisAddress("redis", host="127.0.0.1", port=6380, db=2),
        "rediss://redis.internal": RedisAddress("rediss", host="redis.internal", port=6379),
        "unix:///run/redis/redis.sock?db=1": RedisAddress("unix", path="/run/redis/redis.sock", db=1),
    }
    for text, expected in cases.items():
        path = tmp_path / "q.toml"
        path.write_text(f'[proxy_listener]\naddress = "127.0.0.1:8443"\n[redis]\nurl = "{text}"\n')
        assert load_config(str(path)).redis.url == expected


@pytest.mark.parametrize(
    "body, key, reason",
    [
        ('[redis]\nurl = "redis://user:secret@h:1/0"\n', "redis.url", "password_file"),
        ('[redis]\nurl = "http://h"\n', "redis.url", "is not redis://"),
        ('[redis]\nurl = "unix://relative"\n', "redis.url", "absolute"),
        ('[rate_limits.r]\nstore = "redis"\n', "rate_limits.r.store", "needs [redis] url"),
        ('[rate_limits.r]\nstore = "disk"\n', "rate_limits.r.store", "must be one of"),
        ('[rate_limits.r]\non_store_error = "maybe"\n', "rate_limits.r.on_store_error", "must be one of"),
    ],
)
def test_bad_redis_settings_name_key_and_reason(tmp_path: Path, body: str, key: str, reason: str) -> None:
    from quayfront.config import ConfigError, load_config

    path = tmp_path / "q.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.key == key
    assert reason in caught.value.reason
# --- Trust settings ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, section",
    [
        (
            "[proxy_listener]\ntrusted_sources = ['10.0.0.0/8']\nexempt_sources = ['10.1.2.3']\n",
            "proxy_listener",
        ),
        (
            "[proxy_listener]\naddress = '127.0.0.1:8443'\nexempt_sources = ['127.0.0.1/32']\n",
            "proxy_listener",
        ),
        (
            "[proxy_listener]\ntrusted_sources = ['::/0']\nexempt_sources = ['fd00::/8']\n",
            "proxy_listener",
        ),
        (
            "[proxy_listener]\ntrusted_sources = ['10.0.0.0/8']\n"
            "[redirect_listener]\ntrusted_sources = ['10.0.0.0/24']\nexempt_sources = ['10.0.0.0/8']\n",
            "redirect_listener",
        ),
    ],
)
def test_exempt_and_trusted_must_not_overlap(tmp_path: Path, text: str, section: str) -> None:
    """A source both exempt and trusted is a startup error naming both keys."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == f"{section}.exempt_sources"
    assert f"{section}.trusted_sources" in caught.value.reason
    assert str(caught.value).startswith(f"{path}: {section}.exempt_sources: ")


def test_disjoint_exempt_and_trusted_sources_load(tmp_path: Path) -> None:
    """Exempt loopback next to trusted load balancers is the intended layout."""
    config = load_config(
        write(
            tmp_path,
            "[proxy_listener]\ntrusted_sources = ['10.0.0.0/8', '::1/128']\n"
            "exempt_sources = ['127.0.0.1/32', '11.0.0.0/8']\n",
        )
    )
    assert config.proxy_listener.exempt_sources == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("11.0.0.0/8"),
    )


def test_trusted_sources_default_to_loopback() -> None:
    """Only loopback may send a PROXY header unless trusted_sources says otherwise."""
    config = load_config(None, {"proxy_listener.address": "127.0.0.1:8443"})
    assert config.proxy_listener.trusted_sources == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.redirect_listener.trusted_sources == config.proxy_listener.trusted_sources


@pytest.mark.parametrize("address", ["0.0.0.0:8443", "[::]:8443", "10.0.0.5:8443", "lb.example:8443"])
def test_public_listener_requiring_a_header_needs_explicit_trust(
    tmp_path: Path, address: str
) -> None:
    """A non-loopback PROXY listener without trusted_sources refuses to start and says what to set."""
    path = write(tmp_path, f"[proxy_listener]\naddress = '{address}'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == path
    assert caught.value.key == "proxy_listener.trusted_sources"
    assert "trusted_sources = [" in caught.value.reason
    assert "--proxy-trusted" in caught.value.reason


@pytest.mark.parametrize(
    "text, overrides",
    [
        ("[proxy_listener]\naddress = '127.0.0.1:8443'\n", {}),
        ("[proxy_listener]\naddress = '[::1]:8443'\n", {}),
        ("[proxy_listener]\naddress = 'localhost:8443'\n", {}),
        ("[proxy_listener]\nproxy_protocol = 'off'\n", {}),
        ("[proxy_listener]\nenabled = false\n", {}),
        ("[proxy_listener]\ntrusted_sources = ['127.0.0.0/8']\n", {}),
        ("", {"proxy_listener.trusted_sources": ["192.0.2.0/24"]}),
    ],
)
def test_explicit_trust_or_loopback_listener_starts(
    tmp_path: Path, text: str, overrides: dict
) -> None:
    """Loopback listeners, listeners without PROXY, and explicit trust lists all load."""
    load_config(write(tmp_path, text), overrides)


def test_redirect_listener_requiring_a_header_needs_explicit_trust(tmp_path: Path) -> None:
    """The redirect listener follows the same rule when it takes a PROXY header."""
    path = write(
        tmp_path,
        "[proxy_listener]\ntrusted_sources = ['10.0.0.0/8']\n"
        "[redirect_listener]\nenabled = true\nproxy_protocol = 'required'\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "redirect_listener.trusted_sources"
