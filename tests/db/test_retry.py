"""The retry policy is a pure function: exponential back-off, capped, with a give-up point."""

from __future__ import annotations

import pytest

from db.retry import PERMANENT_KINDS, TRANSIENT_KINDS, ErrorKind, decide

K = ErrorKind


def test_backoff_doubles_per_attempt() -> None:
    assert [decide(K.NETWORK, a, max_attempts=10, base_seconds=30) for a in (1, 2, 3, 4)] == [
        30,
        60,
        120,
        240,
    ]


def test_zero_attempts_waits_base() -> None:
    assert decide(K.TIMEOUT, 0, max_attempts=3, base_seconds=5) == 5


def test_cap_limits_the_delay() -> None:
    assert decide(K.NETWORK, 9, max_attempts=20, base_seconds=30, cap_seconds=3600) == 3600
    assert decide(K.NETWORK, 10_000, max_attempts=20_000, base_seconds=30, cap_seconds=600) == 600


def test_gives_up_when_attempts_are_used() -> None:
    assert decide(K.NETWORK, 2, max_attempts=3) is not None
    assert decide(K.NETWORK, 3, max_attempts=3) is None
    assert decide(K.NETWORK, 4, max_attempts=3) is None


@pytest.mark.parametrize("kind", sorted(PERMANENT_KINDS))
def test_permanent_errors_are_not_retried(kind: ErrorKind) -> None:
    assert not kind.retryable
    assert decide(kind, 1, max_attempts=10) is None


@pytest.mark.parametrize("kind", sorted(TRANSIENT_KINDS))
def test_transient_errors_are_retried(kind: ErrorKind) -> None:
    assert kind.retryable
    assert decide(kind, 1, max_attempts=10) == 30
    # A string from outside the type checker is read case-insensitively.
    assert decide(kind.upper(), 1, max_attempts=10) == 30  # type: ignore[arg-type]


def test_every_kind_is_either_transient_or_permanent() -> None:
    assert TRANSIENT_KINDS | PERMANENT_KINDS == set(ErrorKind)
    assert not TRANSIENT_KINDS & PERMANENT_KINDS
    assert {k.value for k in ErrorKind} == {
        "transient",
        "network",
        "timeout",
        "resources",
        "busy",
        "permanent",
        "rejected",
        "invalid",
        "config",
    }


def test_parse_reads_any_case_and_names_the_choices() -> None:
    assert ErrorKind.parse(" Network ") is ErrorKind.NETWORK
    with pytest.raises(ValueError, match="unknown error kind 'gremlins'.*network"):
        ErrorKind.parse("gremlins")


def test_unknown_kind_is_an_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown error kind 'gremlins'.*network"):
        decide("gremlins", 1, max_attempts=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": 3, "base_seconds": -1},
        {"max_attempts": 3, "cap_seconds": -1},
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        decide(K.NETWORK, 1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempts must be >= 0"):
        decide(K.NETWORK, -1, max_attempts=3)
