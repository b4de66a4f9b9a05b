"""
Which request and response headers cross the proxy, as pure functions over
ordered C{(name, value)} pairs so that repeats and order are kept.

RFC 9110 section 7.6.1: hop-by-hop fields (C{Connection} and every field it
names) describe one connection and are never forwarded.  Framing fields
(C{Content-Length}, C{Transfer-Encoding}) are written by the client library
on each side from the body it actually sends.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Iterable

from twisted.web.http_headers import Headers

HeaderPairs = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Client-supplied forwarding claims: replaced by what quayfront knows, never
# passed through, since any client can write them.
FORWARDING = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip"}
)

# Written by the upstream client from the body it streams.  Expect is
# answered by quayfront itself, so it must not reach an upstream that would
# answer it a second time.
FRAMING = frozenset({b"content-length", b"expect"})


# Never hop-by-hop, whatever a client's Connection header names: the
# upstream needs Host to build its URLs, and the headers quayfront sets are
# its own (a client naming them would only remove what it cannot send).
NEVER_NOMINATED = frozenset({b"host"}) | FORWARDING


def underscored_names(pairs: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """
    The header names in C{pairs} that contain C{_}, in order, without
    repeats.  They are dropped, as nginx does by default
    (C{underscores_in_headers off}): a WSGI upstream maps C{X_Forwarded_For}
    and C{X-Forwarded-For} to the same variable, so one could pose as the
    other.
    """
    names: list[bytes] = []
    for name, _ in pairs:
        if b"_" in name and name not in names:
            names.append(name)
    return names


def _connection_tokens(pairs: HeaderPairs) -> frozenset[bytes]:
    tokens = set()
    for name, value in pairs:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


_name_of = itemgetter(0)

# Dropped from every request whatever else is; with a site's reserved names
# added, made once per set of reserved names (a site has one).
_ALWAYS_DROPPED = HOP_BY_HOP | FORWARDING | FRAMING
_dropped_with: dict[frozenset[bytes], frozenset[bytes]] = {}
# upstream_request_headers' host when the caller does not give it.
_NOT_GIVEN = object()


def upstream_request_headers(
    pairs: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str,
    scheme: bytes = b"https",
    vouched: Iterable[tuple[bytes, bytes]] = (),
    reserved: Iterable[bytes] = (),
    default_host: bytes = b"",
    names: list[bytes] | None = None,
    host: bytes | None | object = _NOT_GIVEN,
) -> HeaderPairs:
    """
    The headers to send upstream for a client request with C{pairs}.

    C{Host} passes unchanged (the registry builds absolute C{Location} URLs
    from it), even if the client's C{Connection} header names it; names
    containing C{_} are dropped (L{underscored_names}); C{X-Forwarded-For} is the client address quayfront vouches for,
    C{X-Forwarded-Host} the client's C{Host}.

    @param vouched: further headers quayfront itself asserts (request id,
        PROXY TLV values).
    @param reserved: lower-case names only quayfront may send (all the
        configured request-id and TLV headers, whether sent this time or
        not): client-sent headers of these names are removed, so a client
        cannot pose as the load balancer.
    @param default_host: the C{Host} to send when the client sent none (an
        HTTP/1.0 client): the address it connected to.
    @param names: the names of C{pairs} (a list) lower-cased, in order, if
        the caller has them (the request framer does): a request with no
        field to drop is then passed on without walking its fields.
    @param host: with C{names}, the first C{Host} value of C{pairs} (None
        for none), if the caller has it (the request framer does).
    """
    vouched = vouched if type(vouched) is list else list(vouched)
    reserved = reserved if isinstance(reserved, frozenset) else frozenset(reserved)
    dropped = _dropped_with.get(reserved)
    if dropped is None:
        dropped = _dropped_with[reserved] = _ALWAYS_DROPPED | reserved
    if reserved.issuperset(map(bytes.lower, map(_name_of, vouched))):
        # The usual case: every name quayfront sends is reserved already,
        # so reserved names are all its own (what the rules below use).
        own = reserved
    else:
        own = frozenset(map(bytes.lower, map(_name_of, vouched)))
        dropped = dropped | own
    if (
        names is not None
        and dropped.isdisjoint(names)
        # (find, not "in": bytes.__contains__ first tries its operand as an
        # integer, and makes and drops a TypeError for a bytes one.)
        and b"".join(names).find(b"_") < 0
    ):
        # Nothing to drop (so no Connection either): the fields as they
        # came, which the loop below would keep one by one.
        forwarded = list(pairs)
        if host is _NOT_GIVEN:
            host = pairs[names.index(b"host")][1] if b"host" in names else None
    else:
        # One pass to lower-case the names (every rule below compares them).
        fields = [(name.lower(), name, value) for name, value in pairs]
        connection = [value for lower, _, value in fields if lower == b"connection"]
        if connection:
            own |= reserved
            nominated = {
                token
                for token in (
                    t.strip().lower() for value in connection for t in value.split(b",")
                )
                if token
                and token not in NEVER_NOMINATED
                and token not in own
                and not token.startswith(b"x-forwarded-")
            }
            dropped = dropped | nominated
        forwarded = []
        host = None
        for lower, name, value in fields:
            if lower == b"host" and host is None:
                host = value
            if lower not in dropped and b"_" not in name:
                forwarded.append((name, value))
    if host is None and default_host:
        forwarded.insert(0, (b"Host", default_host))
        host = default_host
    # In one extend: the forwarding fields, then those quayfront vouches for.
    forwarded += [
        (b"X-Forwarded-For", client_ip.encode("ascii")),
        (b"X-Forwarded-Proto", scheme),
        *vouched,
    ]
    if host is not None:
        forwarded.append((b"X-Forwarded-Host", host))
    return forwarded


def client_response_headers(pairs: Iterable[tuple[bytes, bytes]]) -> HeaderPairs:
    """
    The upstream response headers to pass to the client.
    """
    fields = [(name.lower(), name, value) for name, value in pairs]
    dropped = HOP_BY_HOP
    connection = [value for lower, _, value in fields if lower == b"connection"]
    if connection:
        tokens = {t.strip().lower() for value in connection for t in value.split(b",")}
        tokens.discard(b"")
        dropped = dropped | tokens
    return [(name, value) for lower, name, value in fields if lower not in dropped]


# A field name as received -> (lower case, the case Twisted's Headers writes
# it in), for the names responses bring; bounded, as Twisted bounds its own
# cache, so that a stream of made-up names cannot grow it without end.
_response_names: dict[bytes, tuple[bytes, bytes]] = {}
_MAX_RESPONSE_NAMES = 10_000
# Connection values (lower-cased) whose every token is hop-by-hop already.
_NOMINATING_NOTHING = frozenset({b"keep-alive", b"close"})
# The names of _response_names that are not hop-by-hop -> the case Headers
# writes them in (as bounded): the fields a response relays.
_relayed_names: dict[bytes, bytes] = {}


def _learn_name(name: bytes) -> tuple[bytes, bytes]:
    # The case Headers writes a name in, asked of Headers itself.
    headers = Headers()
    headers.addRawHeader(name, b"")
    [(written, _)] = headers.getAllRawHeaders()
    known = (name.lower(), written)
    if len(_response_names) < _MAX_RESPONSE_NAMES:
        _response_names[name] = known
    return known


def written_name(name: bytes) -> bytes:
    """
    C{name} as a response head built by Twisted's C{Headers} writes it
    (C{content-type}: C{Content-Type}; C{etag}: C{ETag}).
    """
    known = _response_names.get(name)
    if known is None:
        known = _learn_name(name)
    return known[1]


def client_response_fields(pairs: Iterable[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """
    L{client_response_headers} of C{pairs} as the response head relayed to
    the client holds them (what Twisted's C{Headers} would hold after adding
    them one by one, without building one): each name in the case
    L{written_name} gives it, the values of a name repeated (in whatever
    case) under its first appearance, in order.
    """
    fields: dict[bytes, list[bytes]] = {}
    connection = None
    relayed = _relayed_names
    for name, value in pairs:
        # One lookup for a name seen before and relayed (nearly all).
        written = relayed.get(name)
        if written is None:
            known = _response_names.get(name)
            if known is None:
                known = _learn_name(name)
            lower, written = known
            if lower in HOP_BY_HOP:
                if lower == b"connection":
                    connection = [value] if connection is None else [*connection, value]
                continue
            if len(relayed) < _MAX_RESPONSE_NAMES:
                relayed[name] = written
        if written in fields:
            fields[written].append(value)
        else:
            fields[written] = [value]
    if connection is not None:
        if len(connection) == 1 and connection[0].lower() in _NOMINATING_NOTHING:
            # The usual "keep-alive" or "close": a token that names no
            # field, with nothing else to remove.
            return fields
        tokens = {t.strip().lower() for value in connection for t in value.split(b",")}
        tokens -= HOP_BY_HOP
        tokens.discard(b"")
        if tokens:
            for written in [written for written in fields if written.lower() in tokens]:
                del fields[written]
    return fields
