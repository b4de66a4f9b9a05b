"""
HTTP/1.1 as quayfront speaks it, free of I/O and of Twisted: the request
framing rules (L{RequestFramer}, raising L{PeerMisbehaved} with the status
to answer), the normalised request target routes are chosen on
(L{normalise_target}), the bounds an upstream's response head is held
to (L{ResponseHeadChecker}), the model of one proxied exchange
(L{Exchange}: states, events, actions, deadlines) and the table of the ways
a request can end (L{Ending}, L{ENDINGS}).  The rules and their reason codes are documented in
L{quayfront.http._framing}, L{quayfront.http._target} and
L{quayfront.http._response}.
"""

from ._endings import ENDINGS, Ending, ending_for, registry_code_for
from ._exchange import (
    AbortClient,
    Action,
    Answer,
    Arm,
    BodyState,
    Deadline,
    Disarm,
    Event,
    Exchange,
    ExchangeMisused,
    ExchangeState,
)
from ._framing import (
    MAX_BODY_LENGTH,
    MAX_CHUNK_LINE_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    MAX_REQUEST_LINE_BYTES,
    NEED_DATA,
    BodyData,
    MessageEnd,
    PeerMisbehaved,
    RequestFramer,
    RequestHead,
    parse_chunk_size,
    parse_content_length,
    valid_host,
)
from ._response import ResponseHeadChecker, UpstreamMisbehaved
from ._target import TargetRefused, normalise_path, normalise_target

__all__ = [
    "ENDINGS",
    "AbortClient",
    "Action",
    "Answer",
    "Arm",
    "BodyState",
    "Deadline",
    "Disarm",
    "Ending",
    "Event",
    "Exchange",
    "ExchangeMisused",
    "ExchangeState",
    "ending_for",
    "registry_code_for",
    "MAX_BODY_LENGTH",
    "MAX_CHUNK_LINE_BYTES",
    "MAX_HEAD_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_REQUEST_LINE_BYTES",
    "NEED_DATA",
    "BodyData",
    "MessageEnd",
    "PeerMisbehaved",
    "RequestFramer",
    "RequestHead",
    "ResponseHeadChecker",
    "TargetRefused",
    "UpstreamMisbehaved",
    "normalise_path",
    "normalise_target",
    "parse_chunk_size",
    "parse_content_length",
    "valid_host",
]
