"""Exceptions raised by the queue. Callers map them to their own answers (e.g. DICOM 0xA700)."""

from __future__ import annotations


class QueueError(RuntimeError):
    """Base class of every error the queue raises on purpose."""


class QueueUnavailable(QueueError):
    """The database cannot be reached or used right now (down, locked past the busy timeout,
    unreadable file). Nothing was written; the caller may retry later (a C-STORE answers 0xA700)."""


class LeaseLost(QueueError):
    """The worker no longer holds the study (its lease expired and was swept, or it was requeued).
    The caller must discard its work for this study: another worker may be processing it."""


class InvalidTransition(QueueError):
    """A state change that the transition table does not allow (a programming error)."""


class DatabaseNotReady(QueueError):
    """The database has no schema (and start-up was not allowed to create it) or an older schema
    revision than this code needs: run ``cxr-worker db upgrade`` (back up first)."""
