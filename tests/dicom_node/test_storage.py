"""dicom_node.storage: atomic, durable files under validated UIDs; the free-space check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.statuses import InsufficientDiskSpace
from dicom_node.storage import InstanceStorage
from dicom_node.uids import InvalidUID


def test_storage_writes_atomically_and_validates_uids(tmp_path: Path) -> None:
    st = InstanceStorage(tmp_path / "s")
    st.prepare()
    out = st.write("1.2.3", "1.2.3.4", [b"abc", memoryview(b"def")])
    assert out.rel_path == "1.2.3/1.2.3.4.dcm"
    assert out.path.read_bytes() == b"abcdef" and out.size_bytes == 6
    assert [p.name for p in (tmp_path / "s" / "1.2.3").iterdir()] == ["1.2.3.4.dcm"]  # no temp left
    with pytest.raises(InvalidUID):
        st.write("../../etc", "1.2", [b"x"])
    with pytest.raises(InvalidUID):
        st.write("1.2", "../passwd", [b"x"])
    assert not (tmp_path / "etc").exists() and not (tmp_path / "passwd").exists()


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    st = InstanceStorage(tmp_path / "s")
    st.prepare()

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        st.write("1.2.3", "1.2.3.5", chunks())
    assert list((tmp_path / "s" / "1.2.3").iterdir()) == []


def test_free_space_threshold(tmp_path: Path) -> None:
    st = InstanceStorage(tmp_path, min_free_disk_mb=10**9)
    with pytest.raises(
        InsufficientDiskSpace, match=r"below the threshold dicom.min_free_disk_mb=1000000000"
    ):
        st.check_free_space()
    InstanceStorage(tmp_path, min_free_disk_mb=1).check_free_space(1000)


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    st = InstanceStorage(tmp_path)
    (tmp_path / "1.2").mkdir()
    old = tmp_path / "1.2" / ".1.2.3.dcm.abc.tmp"
    new = tmp_path / "1.2" / ".1.2.4.dcm.def.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (0, 0))
    assert st.remove_stale_temp_files(older_than_s=3600) == 1
    assert not old.exists() and new.exists()
