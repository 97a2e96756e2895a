"""C-STORE failure classes and the one table that maps each to its DIMSE status.

Every failure the storage SCP can meet is raised as one of the exceptions below (or is an
unexpected exception); :func:`status_for` is the only place that turns them into a status code.

| situation                                              | status |
|--------------------------------------------------------|--------|
| stored and committed, or already stored (same bytes)   | 0x0000 |
| SOP Instance UID already stored with other content:    | 0xB000 |
|   the new object is kept aside and the study flagged    |        |
| disk below the free-space threshold, queue unavailable, | 0xA700 |
|   ENOSPC/EDQUOT/EIO/EFBIG on write or fsync, dataset    |        |
|   larger than dicom.max_dataset_mb (inflated)           |        |
| dataset does not match its SOP class / request          | 0xA900 |
| dataset cannot be parsed                                | 0xC210 |
| anything else                                          | 0xC000 |
"""

from __future__ import annotations

import errno

from .sink import SinkUnavailable
from .uids import InvalidUID

SUCCESS = 0x0000
#: PS3.4 B.2.3 warning "Coercion of Data Elements": the instance was stored, but not filed as
#: sent (a reused SOP Instance UID with other content is kept aside for review). A warning is
#: final for the sender (pynetdicom, dcmtk and Orthanc count it as stored): no retry loop.
STORED_WITH_WARNING = 0xB000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0xC000

_NAMES = {
    SUCCESS: "Success",
    STORED_WITH_WARNING: "Warning: stored aside (SOP Instance UID reused with other content)",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
    PROCESSING_FAILURE: "Error: Cannot understand (processing failure)",
}


class StoreFailure(Exception):
    """Base of the failures the SCP raises on purpose; the message is safe to log (no PHI)."""


class UndecodableDataset(StoreFailure):
    """The received bytes are not a well-formed dataset in the negotiated transfer syntax."""


class DatasetMismatch(StoreFailure):
    """The dataset decodes but does not match its SOP class or the C-STORE request: UIDs
    missing, invalid or different from the request's, or an inconsistent image pixel module."""


class InsufficientDiskSpace(StoreFailure):
    """Free space in the storage folder is below the configured threshold."""


class DatasetTooLarge(StoreFailure):
    """The dataset (inflated, for a Deflated transfer syntax) exceeds dicom.max_dataset_mb."""


#: Write/fsync errors that mean "no room or no disk right now": waiting (or an admin) fixes them.
RESOURCE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS, errno.ENOMEM}
)


def status_for(exc: BaseException) -> int:
    """The C-STORE status for a failure. The single source of truth for this mapping."""
    if isinstance(exc, (InsufficientDiskSpace, SinkUnavailable, DatasetTooLarge)):
        return OUT_OF_RESOURCES
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return OUT_OF_RESOURCES
    if isinstance(exc, (DatasetMismatch, InvalidUID)):
        return DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, UndecodableDataset):
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


def status_name(status: int) -> str:
    """A readable name for a status this SCP sends, e.g. ``0xA700 Refused: Out of Resources``."""
    return f"0x{status:04X} {_NAMES.get(status, 'Unknown')}"
