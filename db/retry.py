"""Retry policy: a pure function, so it can be reasoned about and tested without a database.

``decide(kind, attempts, max_attempts=...)`` answers "wait this many seconds, then try again" or
``None`` ("give up"). The delay doubles with every attempt (``base * 2**(attempts-1)``), capped.
"""

from __future__ import annotations

#: Failures that may go away on their own: try again later.
TRANSIENT_KINDS = frozenset(
    {
        "transient",  # generic "try again"
        "network",  # connection refused/reset, association aborted
        "timeout",  # DIMSE/ACSE timeout, slow peer
        "resources",  # peer out of resources (DICOM 0xA7xx), disk full, database busy
        "busy",  # peer busy / refused association for now
    }
)

#: Failures that will not change by waiting: give up at once.
PERMANENT_KINDS = frozenset(
    {
        "permanent",  # generic "do not retry"
        "rejected",  # peer refused the object itself (DICOM 0xA9xx, 0xCxxx, SOP class not supported)
        "invalid",  # our input is wrong (undecodable image, no usable view)
        "config",  # misconfiguration (unknown destination, wrong AE title): a person must act
    }
)


def decide(
    error_kind: str,
    attempts: int,
    *,
    max_attempts: int,
    base_seconds: float = 30.0,
    cap_seconds: float = 3600.0,
) -> float | None:
    """Seconds to wait before the next try, or ``None`` to give up.

    ``attempts`` is how many tries have been made so far (>= 1 after the first failure).
    Gives up when the kind is permanent or when ``attempts >= max_attempts``; otherwise waits
    ``min(cap_seconds, base_seconds * 2 ** (attempts - 1))``.
    """
    kind = error_kind.strip().lower()
    if kind not in TRANSIENT_KINDS and kind not in PERMANENT_KINDS:
        raise ValueError(
            f"unknown error kind {error_kind!r}: use one of "
            f"{sorted(TRANSIENT_KINDS)} (retried) or {sorted(PERMANENT_KINDS)} (not retried)"
        )
    if attempts < 0:
        raise ValueError(f"attempts must be >= 0, got {attempts}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if base_seconds < 0 or cap_seconds < 0:
        raise ValueError(
            f"base_seconds ({base_seconds}) and cap_seconds ({cap_seconds}) must be >= 0"
        )
    if kind in PERMANENT_KINDS or attempts >= max_attempts:
        return None
    exponent = max(attempts - 1, 0)
    # Avoid float overflow for absurd attempt counts: past 2**64 the cap has long been reached.
    if exponent > 64:
        return float(cap_seconds)
    return float(min(cap_seconds, base_seconds * (2**exponent)))
