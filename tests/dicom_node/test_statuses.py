"""dicom_node.statuses: the one table from failure class to C-STORE status."""

from __future__ import annotations

from dicom_node.sink import SinkUnavailable
from dicom_node.statuses import (
    DatasetMismatch,
    InsufficientDiskSpace,
    UndecodableDataset,
    status_for,
)
from dicom_node.uids import InvalidUID


def test_status_table() -> None:
    assert status_for(UndecodableDataset("x")) == 0xC210
    assert status_for(DatasetMismatch("x")) == 0xA900
    assert status_for(InvalidUID("x")) == 0xA900
    assert status_for(InsufficientDiskSpace("x")) == 0xA700
    assert status_for(SinkUnavailable("x")) == 0xA700
    assert status_for(PermissionError("x")) == 0xC000
    assert status_for(KeyError("x")) == 0xC000
