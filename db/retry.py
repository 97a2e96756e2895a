"""Retry policy: a pure function on a typed error, so it can be reasoned about and tested without
a database. Studies (:func:`db.outcomes.fail`) and deliveries (:func:`db.deliveries.record`) both
decide here.

``decide(kind, attempts, max_attempts=...)`` answers "wait this many seconds, then try again" or
``None`` ("give up"). The delay doubles with every attempt (``base * 2**(attempts-1)``), capped.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """Why an attempt failed, as far as retrying is concerned."""

    TRANSIENT = "transient"  # generic "try again"
    NETWORK = "network"  # connection refused/reset, association aborted
    TIMEOUT = "timeout"  # DIMSE/ACSE timeout, slow peer
    RESOURCES = "resources"  # peer out of resources (DICOM 0xA7xx), disk full, database busy
    BUSY = "busy"  # peer busy / refused association for now
    PERMANENT = "permanent"  # generic "do not retry"
    REJECTED = "rejected"  # peer refused the object itself (0xA9xx, 0xCxxx, SOP class unknown)
    INVALID = "invalid"  # our input is wrong (undecodable image, no usable view)
    CONFIG = "config"  # misconfiguration (unknown destination, wrong AE title): a person must act

    @property
    def retryable(self) -> bool:
        """True when waiting may help (the kind is one of :data:`TRANSIENT_KINDS`)."""
        return self in TRANSIENT_KINDS

    @classmethod
    def parse(cls, text: str) -> ErrorKind:
        """The kind named by ``text`` (any case, surrounding blanks ignored); ValueError naming
        the choices otherwise."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(
                f"unknown error kind {text!r}: use one of "
                f"{sorted(TRANSIENT_KINDS)} (retried) or {sorted(PERMANENT_KINDS)} (not retried)"
            ) from None


K = ErrorKind
#: Failures that may go away on their own: try again later.
TRANSIENT_KINDS: frozenset[ErrorKind] = frozenset(
    {K.TRANSIENT, K.NETWORK, K.TIMEOUT, K.RESOURCES, K.BUSY}
)
#: Failures that will not change by waiting: give up at once.
PERMANENT_KINDS: frozenset[ErrorKind] = frozenset({K.PERMANENT, K.REJECTED, K.INVALID, K.CONFIG})


def decide(
    kind: ErrorKind,
    attempts: int,
    *,
    max_attempts: int,
    base_seconds: float = 30.0,
    cap_seconds: float = 3600.0,
) -> float | None:
    """Seconds to wait before the next try, or ``None`` to give up.

    ``attempts`` is how many tries have been made so far (>= 1 after the first failure).
    Gives up when the kind is permanent or when ``attempts >= max_attempts``; otherwise waits
    ``min(cap_seconds, base_seconds * 2 ** (attempts - 1))``. A plain string is read with
    :meth:`ErrorKind.parse` (callers outside the type checker).
    """
    kind = kind if isinstance(kind, ErrorKind) else ErrorKind.parse(kind)
    if attempts < 0:
        raise ValueError(f"attempts must be >= 0, got {attempts}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if base_seconds < 0 or cap_seconds < 0:
        raise ValueError(
            f"base_seconds ({base_seconds}) and cap_seconds ({cap_seconds}) must be >= 0"
        )
    if not kind.retryable or attempts >= max_attempts:
        return None
    exponent = max(attempts - 1, 0)
    # Avoid float overflow for absurd attempt counts: past 2**64 the cap has long been reached.
    if exponent > 64:
        return float(cap_seconds)
    return float(min(cap_seconds, base_seconds * (2**exponent)))
