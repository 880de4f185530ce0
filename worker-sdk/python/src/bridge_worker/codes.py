"""Stable error codes shared with the client protocol (mirrors ``bridge_proto::codes``).

These strings are public API: clients switch on them, workers send them.
Workers may add their own codes; a code must be well-formed
(see :func:`is_valid_code`) or the SDK sends ``worker_error`` instead.
"""

from __future__ import annotations

import re

BAD_REQUEST = "bad_request"
"""The client sent data the handler cannot use."""
UNKNOWN_TYPE = "unknown_type"
"""No handler for this message type."""
PAYLOAD_TOO_LARGE = "payload_too_large"
RATE_LIMITED = "rate_limited"
CIRCUIT_OPEN = "circuit_open"
NO_WORKERS = "no_workers"
TIMEOUT = "timeout"
"""The request's deadline passed before its final reply."""
WORKER_ERROR = "worker_error"
"""The worker failed."""
OVERLOADED = "overloaded"
"""Too many requests in flight."""
UNAUTHORIZED = "unauthorized"
CANCELLED = "cancelled"
"""The request was cancelled; workers answer a ``cancel`` with this code."""
INTERNAL = "internal"

_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def is_valid_code(code: str) -> bool:
    """Whether ``code`` is 1 to 64 lowercase ASCII letters, digits and ``_``, starting with a letter."""
    return _CODE.fullmatch(code) is not None
