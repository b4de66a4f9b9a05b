"""
The plain-HTTP redirect listener and the HSTS header.
"""

import pytest

from quayfront.redirect import https_location


@pytest.mark.parametrize(
    "host, target, port, expected",
    [
        (b"registry.example", b"/v2/?x=1", 443, b"https://registry.example/v2/?x=1"),
        (b"registry.example:80", b"/v2/", 443, b"https://registry.example/v2/"),
        (b"registry.example:8080", b"/", 8443, b"https://registry.example:8443/"),
        (b"[::1]:80", b"/v2/", 443, b"https://[::1]/v2/"),
        (None, b"/v2/", 443, b"https://192.0.2.1/v2/"),
        (b"h", b"http://elsewhere/", 443, b"https://h/"),
    ],
)
def test_redirect_location(host, target, port, expected) -> None:
    """Same host and path over https; the port only when it is not 443."""
    assert https_location(host, "192.0.2.1", target, port) == expected


def test_redirect_listener_answers(tmp_path) -> None:
    """GET gets a 301 and PUT a 308 to the https URL."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from quayfront.redirect import redirect_site

    site = redirect_site(443, MemoryReactorClock())
    for method, code in ((b"GET", b"301"), (b"PUT", b"308")):
        channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.9", 1))
        transport = StringTransport(hostAddress=IPv4Address("TCP", "192.0.2.1", 80))
        channel.makeConnection(transport)
        channel.dataReceived(method + b" /v2/x HTTP/1.1\r\nHost: reg.example\r\nContent-Length: 0\r\n\r\n")
        out = transport.value()
        assert out.startswith(b"HTTP/1.1 " + code)
        assert b"Location: https://reg.example/v2/x" in out


def test_hsts_added_unless_upstream_sent_one() -> None:
    """Responses get Strict-Transport-Security; an upstream's own value is kept."""
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone

    from tests.unit.test_forward import connect, make_site, response

    site, agent, _, _ = make_site()
    site.hsts = b"max-age=600"
    channel, client = connect(site)
    channel.dataReceived(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\nGET /v2/b HTTP/1.1\r\nHost: h\r\n\r\n")
    r = response(200, {}, 0)
    agent.requests[0]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    r = response(200, {b"Strict-Transport-Security": [b"max-age=1"]}, 0)
    agent.requests[1]["d"].callback(r)
    r._bodyDataFinished(Failure(ResponseDone()))
    first, second = client.value().split(b"HTTP/1.1 200")[1:]
    assert b"Strict-Transport-Security: max-age=600" in first
    assert b"Strict-Transport-Security: max-age=1" in second
    assert b"max-age=600" not in second
