"""DICOM UID grammar (PS3.5 section 9.1), checked before a UID is ever used as a file name.

A UID is 1-64 characters of digits and dots, made of non-empty numeric components separated by
single dots, where no component other than a lone ``0`` starts with ``0``. That grammar admits no
``/``, ``..``, leading dot or empty string, so a valid UID is always a safe single path component.
"""

from __future__ import annotations

import re

UID_MAX_LENGTH = 64
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


class InvalidUID(ValueError):
    """A value that should be a DICOM UID is not one (the message says which attribute and why)."""


def uid_problem(value: object) -> str | None:
    """Why ``value`` is not a valid DICOM UID, or ``None`` when it is one."""
    if value is None:
        return "it is missing"
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if value == "":
        return "it is empty"
    if len(value) > UID_MAX_LENGTH:
        return f"it is {len(value)} characters long (at most {UID_MAX_LENGTH})"
    if _UID_RE.fullmatch(value) is None:
        if any(c not in "0123456789." for c in value):
            return "it contains characters other than digits and dots"
        if value.startswith(".") or value.endswith(".") or ".." in value:
            return "it has an empty component"
        return "a component has a leading zero"
    return None


def is_valid_uid(value: object) -> bool:
    """``True`` when ``value`` is a string that follows the DICOM UID grammar."""
    return uid_problem(value) is None


def validate_uid(value: object, *, what: str) -> str:
    """Return ``value`` when it is a valid UID; else raise :class:`InvalidUID` naming ``what``.

    The offending value is never shown (a sender may put anything there, patient data
    included): the message names ``what``, the value's length and the problem.
    """
    problem = uid_problem(value)
    if problem is not None:
        size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise InvalidUID(f"{what} ({size}) is not a valid DICOM UID: {problem}")
    assert isinstance(value, str)
    return value
