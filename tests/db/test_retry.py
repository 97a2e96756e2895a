"""The retry policy is a pure function: exponential back-off, capped, with a give-up point."""

from __future__ import annotations

import pytest

from db.retry import PERMANENT_KINDS, TRANSIENT_KINDS, decide


def test_backoff_doubles_per_attempt() -> None:
    assert [decide("network", a, max_attempts=10, base_seconds=30) for a in (1, 2, 3, 4)] == [
        30,
        60,
        120,
        240,
    ]


def test_zero_attempts_waits_base() -> None:
    assert decide("timeout", 0, max_attempts=3, base_seconds=5) == 5


def test_cap_limits_the_delay() -> None:
    assert decide("network", 9, max_attempts=20, base_seconds=30, cap_seconds=3600) == 3600
    assert decide("network", 10_000, max_attempts=20_000, base_seconds=30, cap_seconds=600) == 600


def test_gives_up_when_attempts_are_used() -> None:
    assert decide("network", 2, max_attempts=3) is not None
    assert decide("network", 3, max_attempts=3) is None
    assert decide("network", 4, max_attempts=3) is None


@pytest.mark.parametrize("kind", sorted(PERMANENT_KINDS))
def test_permanent_errors_are_not_retried(kind: str) -> None:
    assert decide(kind, 1, max_attempts=10) is None


@pytest.mark.parametrize("kind", sorted(TRANSIENT_KINDS))
def test_transient_errors_are_retried(kind: str) -> None:
    assert decide(kind.upper(), 1, max_attempts=10) == 30


def test_unknown_kind_is_an_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown error kind 'gremlins'.*network"):
        decide("gremlins", 1, max_attempts=3)


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
        decide("network", 1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempts must be >= 0"):
        decide("network", -1, max_attempts=3)
