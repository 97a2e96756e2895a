"""Durable, atomic storage of received instances: ``<root>/<StudyUID>/<SOPInstanceUID>.dcm``.

A file appears under its final name only once its bytes are on disk: it is written to a temp
file in the same study folder, fsynced, renamed over the final name (atomic on POSIX), and the
folder is fsynced so the rename itself survives a power cut. UIDs are validated before they
become path components, so no UID can point outside the storage root.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .statuses import InsufficientDiskSpace
from .uids import validate_uid

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
_MiB = 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    path: Path
    rel_path: str  # "<study uid>/<sop instance uid>.dcm", relative to the storage root
    size_bytes: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStorage:
    """The folder tree of received instances.

    ``fsync=False`` exists only for benchmarks that want to measure the cost of durability;
    the service always uses the default.
    """

    def __init__(self, root: Path, *, min_free_disk_mb: int = 0, fsync: bool = True) -> None:
        self.root = Path(root)
        self.min_free_disk_mb = min_free_disk_mb
        self.fsync = fsync

    def prepare(self) -> None:
        """Create the root folder (and its parents) if needed."""
        self.root.mkdir(parents=True, exist_ok=True)

    def rel_path(self, study_uid: str, sop_instance_uid: str) -> str:
        study = validate_uid(study_uid, what="StudyInstanceUID")
        sop = validate_uid(sop_instance_uid, what="SOPInstanceUID")
        return f"{study}/{sop}.dcm"

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        """Final path of an instance; raises :class:`~dicom_node.uids.InvalidUID` for a bad UID."""
        return self.root / self.rel_path(study_uid, sop_instance_uid)

    def exists(self, study_uid: str, sop_instance_uid: str) -> bool:
        return self.path_for(study_uid, sop_instance_uid).is_file()

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / _MiB

    def check_free_space(self, incoming_bytes: int = 0) -> None:
        """Raise :class:`InsufficientDiskSpace` when storing ``incoming_bytes`` would leave less
        than ``min_free_disk_mb`` free."""
        if self.min_free_disk_mb <= 0:
            return
        free = self.free_mb()
        if free - incoming_bytes / _MiB < self.min_free_disk_mb:
            raise InsufficientDiskSpace(
                f"storage folder {self.root} has {free:.0f} MiB free, below the threshold "
                f"dicom.min_free_disk_mb={self.min_free_disk_mb} "
                "(free space or lower the threshold)"
            )

    def write(
        self, study_uid: str, sop_instance_uid: str, chunks: Iterable[bytes | memoryview]
    ) -> StoredFile:
        """Atomically write ``chunks`` as the instance's file and return where it went.

        An existing file of that name is replaced atomically (readers see the old or the new
        bytes, never a mix). Raises ``OSError`` when the disk refuses.
        """
        rel = self.rel_path(study_uid, sop_instance_uid)
        final = self.root / rel
        study_dir = final.parent
        if not study_dir.is_dir():
            study_dir.mkdir(parents=False, exist_ok=True)
            if self.fsync:
                _fsync_dir(self.root)  # the new folder's entry must survive a crash too
        tmp = study_dir / f".{final.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        size += n
                        view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                log.warning("could not remove temp file %s", tmp)
            raise
        if self.fsync:
            _fsync_dir(study_dir)
        return StoredFile(path=final, rel_path=rel, size_bytes=size)

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files left by a crash mid-write. Only files older than ``older_than_s`` are
        touched, so another SCP process writing into the same storage is not disturbed."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in self.root.glob(f"*/.*{TEMP_SUFFIX}"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except OSError:
                continue
        if removed:
            log.info("removed %d stale temp file(s) under %s", removed, self.root)
        return removed
