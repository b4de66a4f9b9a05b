"""
Every way a request can end, in one table: the HTTP status quayfront
answers with (if it answers itself), the registry error code its JSON body
carries on registry paths, the reason logged (the access log's C{outcome},
the warning lines) and the metric it is counted under.

The reason strings are the ones operators and their dashboards already
know; they must not change.  A reason is also the metric label: framing
refusals count in C{http_requests_refused}, upstream failures in
C{upstream_errors}, and every request in C{http_responses} by status.

C{status} is None for the endings that send no answer of quayfront's own:
a completed exchange (the upstream's status is relayed), a client that
left (logged as 499, nginx's "client closed request"), and an exchange
cut after its response started (the connection is aborted so a partial
body never looks complete).
"""

from __future__ import annotations

from dataclasses import dataclass

# The status nginx logs for a request whose client went away before the
# response started; quayfront's access log uses it too.
CLIENT_CLOSED_STATUS = 499

#: Counters an ending is counted in (besides http_responses, by status).
REFUSED_COUNTER = "http_requests_refused"
UPSTREAM_COUNTER = "upstream_errors"

# The registry error code of a status quayfront answers itself, as the
# distribution spec's clients (docker, podman, skopeo, containerd) read
# them: they retry UNAVAILABLE and TOOMANYREQUESTS.
_REGISTRY_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    408: "UNKNOWN",
    413: "SIZE_INVALID",
    429: "TOOMANYREQUESTS",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}


def registry_code_for(status: int) -> str:
    """
    The registry error code for a status quayfront answers with.
    """
    return _REGISTRY_CODES.get(status, "UNKNOWN")


@dataclass(frozen=True)
class Ending:
    """
    One way a request ends.

    @ivar reason: the reason logged and the metric label; None only for
        L{COMPLETED}, whose access-log outcome is empty.
    @ivar status: what quayfront answers with, or None if it answers
        nothing of its own (see the module docstring).
    @ivar counter: the counter it is counted in by C{reason}, or None.
    @ivar aborts_client: the client connection is aborted rather than
        answered (the response had started, or the client is gone).
    """

    name: str
    reason: str | None
    status: int | None
    counter: str | None = None
    aborts_client: bool = False

    @property
    def registry_code(self) -> str | None:
        return None if self.status is None else registry_code_for(self.status)

    @property
    def logged_status(self) -> int | None:
        """
        The status the access log shows when no response was written.
        """
        return CLIENT_CLOSED_STATUS if self.name == "CLIENT_CLOSED" else self.status

    def __repr__(self) -> str:
        return f"<Ending {self.name}>"


def _upstream(name: str, reason: str, status: int = 502) -> Ending:
    return Ending(name, reason, status, UPSTREAM_COUNTER)


def _refused(reason: str, status: int) -> Ending:
    return Ending(reason.upper().replace("-", "_"), reason, status, REFUSED_COUNTER)


# The exchange went through: the upstream's response was relayed whole.
COMPLETED = Ending("COMPLETED", None, None)

# Refused before any upstream is involved.
BODY_TOO_LARGE = Ending("BODY_TOO_LARGE", "body-too-large", 413)
RATE_LIMITED = Ending("RATE_LIMITED", "rate-limited", 429)
QUEUE_FULL = _upstream("QUEUE_FULL", "upstream-queue-full", 503)
QUEUE_TIMEOUT = _upstream("QUEUE_TIMEOUT", "upstream-queue-timeout", 503)

# The upstream refused, failed or misbehaved before its response head.
UPSTREAM_REQUEST_REFUSED = _upstream("UPSTREAM_REQUEST_REFUSED", "upstream-request-refused")
UPSTREAM_UNREACHABLE = _upstream("UPSTREAM_UNREACHABLE", "upstream-unreachable")
UPSTREAM_RESET = _upstream("UPSTREAM_RESET", "upstream-reset")
UPSTREAM_ERROR = _upstream("UPSTREAM_ERROR", "upstream-error")
# The reasons of quayfront.http.UpstreamMisbehaved (quayfront.http._response).
UPSTREAM_HEAD_TOO_LARGE = _upstream("UPSTREAM_HEAD_TOO_LARGE", "upstream-head-too-large")
UPSTREAM_TOO_MANY_HEADERS = _upstream("UPSTREAM_TOO_MANY_HEADERS", "upstream-too-many-headers")
UPSTREAM_BAD_STATUS_LINE = _upstream("UPSTREAM_BAD_STATUS_LINE", "upstream-bad-status-line")
UPSTREAM_BAD_HEADER = _upstream("UPSTREAM_BAD_HEADER", "upstream-bad-header")

# Deadlines.
UPSTREAM_TIMEOUT = _upstream("UPSTREAM_TIMEOUT", "upstream-timeout", 504)
UPSTREAM_STALLED = _upstream("UPSTREAM_STALLED", "upstream-stalled", 504)
CLIENT_BODY_TIMEOUT = Ending("CLIENT_BODY_TIMEOUT", "client-body-timeout", 408)
RESPONSE_IDLE_TIMEOUT = Ending(
    "RESPONSE_IDLE_TIMEOUT", "response-idle-timeout", None, aborts_client=True
)
DRAIN_TIMEOUT = Ending("DRAIN_TIMEOUT", "drain-timeout", None, aborts_client=True)

# Cut short once under way.
CLIENT_CLOSED = Ending("CLIENT_CLOSED", "client-closed", None, aborts_client=True)
UPSTREAM_TRUNCATED = Ending(
    "UPSTREAM_TRUNCATED", "upstream-truncated", None, UPSTREAM_COUNTER, aborts_client=True
)

# Refusals of the request framer (quayfront.http._framing), by reason, and
# of the channel's head deadline and Twisted's parser (a backstop).
FRAMING_REFUSALS = tuple(
    _refused(reason, status)
    for reason, status in (
        ("bare-lf", 400),
        ("bare-cr", 400),
        ("bad-request-line", 400),
        ("bad-request-target", 400),
        ("bad-version", 400),
        ("unsupported-version", 505),
        ("request-line-too-long", 414),
        ("head-too-large", 431),
        ("too-many-headers", 431),
        ("obs-fold", 400),
        ("bad-header", 400),
        ("missing-host", 400),
        ("duplicate-host", 400),
        ("bad-host", 400),
        ("transfer-encoding-http10", 400),
        ("unsupported-transfer-coding", 501),
        ("transfer-encoding-with-content-length", 400),
        ("bad-content-length", 400),
        ("bad-chunk-size", 400),
        ("bad-trailer", 400),
        ("trailer-too-large", 431),
        ("request-head-timeout", 408),
        ("bad-request", 400),
    )
)

# Answered by the site itself: no route, or a target that cannot be
# normalised (quayfront.http._target).
NO_ROUTE = Ending("NO_ROUTE", "no-route", 404)
TARGET_REFUSALS = tuple(
    Ending(reason.upper().replace("-", "_"), reason, 400)
    for reason in ("bad-percent-encoding", "encoded-slash", "dot-segment")
)

ENDINGS: dict[str, Ending] = {
    ending.reason or "": ending
    for ending in (
        COMPLETED,
        BODY_TOO_LARGE,
        RATE_LIMITED,
        QUEUE_FULL,
        QUEUE_TIMEOUT,
        UPSTREAM_REQUEST_REFUSED,
        UPSTREAM_UNREACHABLE,
        UPSTREAM_RESET,
        UPSTREAM_ERROR,
        UPSTREAM_HEAD_TOO_LARGE,
        UPSTREAM_TOO_MANY_HEADERS,
        UPSTREAM_BAD_STATUS_LINE,
        UPSTREAM_BAD_HEADER,
        UPSTREAM_TIMEOUT,
        UPSTREAM_STALLED,
        CLIENT_BODY_TIMEOUT,
        RESPONSE_IDLE_TIMEOUT,
        DRAIN_TIMEOUT,
        CLIENT_CLOSED,
        UPSTREAM_TRUNCATED,
        *FRAMING_REFUSALS,
        NO_ROUTE,
        *TARGET_REFUSALS,
    )
}


def ending_for(reason: str, status: int | None = None) -> Ending:
    """
    The ending logged as C{reason}; a reason the table does not know (an
    upstream misbehaviour added later, say) gets an ending of its own with
    C{status}, counted as an upstream error if it names the upstream.
    """
    ending = ENDINGS.get(reason)
    if ending is not None:
        return ending
    counter = UPSTREAM_COUNTER if reason.startswith("upstream-") else None
    return Ending(reason.upper().replace("-", "_"), reason, status, counter)
