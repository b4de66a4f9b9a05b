"""
The request target as quayfront routes it: the path normalised by RFC 3986
section 6.2.2, so that an encoded spelling of a prefix (C{/%76%32/} for
C{/v2/}) takes the same route, and the same limits, as the plain one.

L{normalise_target} decodes percent-encoded unreserved characters
(C{ALPHA / DIGIT / "-" / "." / "_" / "~"}) and upper-cases the hex digits
of every other escape (section 6.2.2.1 and 6.2.2.2); the query is kept as
sent.  It refuses (L{TargetRefused}) what cannot be normalised safely:

  - C{bad-percent-encoding}: a C{%} not followed by two hex digits;
  - C{encoded-slash}: C{%2F} in the path.  An upstream that decodes it
    (some do, some do not) would see a path separator where quayfront
    routed a segment, so routes could not be trusted (Apache's default,
    C{AllowEncodedSlashes Off}, refuses it too);
  - C{dot-segment}: a segment that is C{.} or C{..}, plain or encoded, which
    the upstream may resolve to a path under a different route.
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(rb"%(..)?", re.DOTALL)
_HEX = re.compile(rb"[0-9A-Fa-f]{2}\Z")
_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)


class TargetRefused(ValueError):
    """
    A request target that cannot be normalised; C{reason} names the rule.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _normalise_escape(matched: re.Match) -> bytes:
    digits = matched.group(1)
    if digits is None or not _HEX.match(digits):
        raise TargetRefused("bad-percent-encoding")
    value = int(digits, 16)
    if value in _UNRESERVED:
        return bytes((value,))
    if value == 0x2F:
        raise TargetRefused("encoded-slash")
    return b"%" + digits.upper()


def normalise_path(path: bytes) -> bytes:
    """
    The normalised form of an origin-form path (no query), or raise
    L{TargetRefused}.
    """
    if b"%" in path:
        path = _ESCAPE.sub(_normalise_escape, path)
    # "." is unreserved, so an encoded dot is decoded by now.
    segments = path.split(b"/")
    if b"." in segments or b".." in segments:
        raise TargetRefused("dot-segment")
    return path


def normalise_target(target: bytes) -> tuple[bytes, bytes]:
    """
    C{(path, target)} normalised for an origin-form C{target}: the path to
    route on, and the whole target (the path and the query as sent) to send
    upstream.  Raise L{TargetRefused} for what cannot be normalised.
    """
    path, question, query = target.partition(b"?")
    path = normalise_path(path)
    return path, path + question + query
