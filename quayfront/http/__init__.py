"""
HTTP/1.1 as quayfront speaks it, free of I/O and of Twisted: the request
framing rules (L{RequestFramer}, raising L{PeerMisbehaved} with the status
to answer), the normalised request target routes are chosen on
(L{normalise_target}), an upstream's response read strictly and within
bounds (L{ResponseReader}), the model of one proxied exchange
(L{Exchange}: states, events, actions, deadlines) and the table of the ways
a request can end (L{Ending}, L{ENDINGS}).  The rules and their reason codes
are documented in L{quayfront.http._framing}, L{quayfront.http._target},
L{quayfront.http._response} and L{quayfront.http._upstream}.
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
from ._response import UpstreamMisbehaved
from ._target import TargetRefused, normalise_path, normalise_target
from ._upstream import (
    Framing,
    ReaderMisused,
    ReaderState,
    ResponseData,
    ResponseEnd,
    ResponseHead,
    ResponseIncomplete,
    ResponseReader,
)

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
    "Framing",
    "ReaderMisused",
    "ReaderState",
    "ResponseData",
    "ResponseEnd",
    "ResponseHead",
    "ResponseIncomplete",
    "ResponseReader",
    "TargetRefused",
    "UpstreamMisbehaved",
    "normalise_path",
    "normalise_target",
    "parse_chunk_size",
    "parse_content_length",
    "valid_host",
]
