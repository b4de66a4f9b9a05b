"""
Which headers cross the proxy in each direction.
"""

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from quayfront.headers import (
    client_response_fields,
    client_response_headers,
    upstream_request_headers,
    written_name,
)


def names(pairs):
    return [name.lower() for name, _ in pairs]


def test_forwarding_claims_are_replaced_not_appended() -> None:
    """Client-sent X-Forwarded-* and Forwarded never pass; quayfront's own values do."""
    pairs = [
        (b"Host", b"registry.example:8443"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"evil"),
        (b"Forwarded", b"for=6.6.6.6"),
        (b"X-Real-IP", b"6.6.6.6"),
    ]
    out = upstream_request_headers(pairs, client_ip="203.0.113.7")
    assert out == [
        (b"Host", b"registry.example:8443"),
        (b"X-Forwarded-For", b"203.0.113.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"registry.example:8443"),
    ]


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    """Connection, the fields it names, TE, Upgrade, framing and Expect are not forwarded."""
    pairs = [
        (b"Host", b"h"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"10"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Expect", b"100-continue"),
        (b"Authorization", b"Bearer t"),
    ]
    out = upstream_request_headers(pairs, client_ip="192.0.2.1")
    assert names(out) == [b"host", b"authorization", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"]


def test_repeated_headers_keep_every_value_in_order() -> None:
    """Several Accept headers (as skopeo sends) all arrive, in their order."""
    pairs = [
        (b"Host", b"h"),
        (b"Accept", b"application/vnd.oci.image.manifest.v1+json"),
        (b"Accept", b"application/vnd.docker.distribution.manifest.v2+json"),
        (b"Accept", b"application/vnd.docker.distribution.manifest.list.v2+json"),
    ]
    out = upstream_request_headers(pairs, client_ip="192.0.2.1")
    assert [v for n, v in out if n == b"Accept"] == [v for _, v in pairs[1:]]


def test_response_keeps_location_and_repeats_and_drops_hop_by_hop() -> None:
    """Location, Docker headers and repeated values pass; hop-by-hop fields do not."""
    pairs = [
        (b"Location", b"https://registry.example:8443/v2/x/blobs/uploads/u?_state=s"),
        (b"Docker-Upload-UUID", b"u"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    assert client_response_headers(pairs) == pairs[:4]


def test_missing_host_gets_the_address_the_client_connected_to() -> None:
    """An HTTP/1.0 request without Host is sent with the listener address, also as X-Forwarded-Host."""
    out = upstream_request_headers([(b"Accept", b"*/*")], client_ip="192.0.2.1", default_host=b"[2001:db8::1]:8443")
    assert out[0] == (b"Host", b"[2001:db8::1]:8443")
    assert (b"X-Forwarded-Host", b"[2001:db8::1]:8443") in out
    kept = upstream_request_headers([(b"Host", b"reg.example")], client_ip="192.0.2.1", default_host=b"10.0.0.1:8443")
    assert [v for n, v in kept if n == b"Host"] == [b"reg.example"]


def test_response_fields_are_grouped_and_named_as_headers_holds_them() -> None:
    """Names in Headers' case, repeats (in any case) under the first, hop-by-hop gone."""
    pairs = [
        (b"content-type", b"a/b"),
        (b"Connection", b"keep-alive, x-hop"),
        (b"set-cookie", b"a=1"),
        (b"etag", b'"e"'),
        (b"X-HOP", b"1"),
        (b"Set-Cookie", b"b=2"),
        (b"TE", b"trailers"),
    ]
    assert client_response_fields(pairs) == {
        b"Content-Type": [b"a/b"],
        b"Set-Cookie": [b"a=1", b"b=2"],
        b"ETag": [b'"e"'],
    }
    assert written_name(b"www-authenticate") == b"WWW-Authenticate"


_names = st.sampled_from(
    [b"x-a", b"X-A", b"x-B", b"Connection", b"connection", b"Keep-Alive", b"te", b"ETag", b"etag"]
)
_values = st.sampled_from(
    [b"1", b"x-a", b"X-b, close", b" , x-A ,", b"keep-alive", b"te", b"",
     b"close", b"Keep-Alive", b"CLOSE", b" close"]
)


@given(st.lists(st.tuples(_names, _values), max_size=10))
@example([(b"Connection", b"X-b, close"), (b"x-B", b"1"), (b"x-a", b"2")])
def test_response_fields_are_what_headers_would_hold(pairs) -> None:
    """client_response_fields(pairs) is client_response_headers(pairs) added to a Headers."""
    headers = Headers()
    for name, value in client_response_headers(pairs):
        headers.addRawHeader(name, value)
    assert list(client_response_fields(pairs).items()) == [
        (name, list(values)) for name, values in headers.getAllRawHeaders()
    ]
