"""Durable, atomic storage of received instances: ``<root>/<StudyUID>/<SOPInstanceUID>.dcm``.

A file appears under its final name only once its bytes are on disk: it is written to a temp
file in the same study folder, fsynced, renamed over the final name (atomic on POSIX), and the
folder is fsynced so the rename itself survives a power cut. UIDs are validated before they
become path components, so no UID can point outside the storage root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .classify import chest_eligibility, own_output
from .derived import DeviceInfo
from .sink import StoredInstance
from .statuses import InsufficientDiskSpace
from .uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
#: Where the storage sweep moves stored files it cannot register (not a UID, so never taken for a
#: study folder): ``<root>/quarantine/<study>/<file>``.
QUARANTINE_DIR = "quarantine"
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

    def __init__(self, root: Path, *, min_free_disk_mb: int = 1, fsync: bool = True) -> None:
        if min_free_disk_mb < 1:
            raise ValueError(
                f"min_free_disk_mb={min_free_disk_mb}: the free-space floor must be at least 1 MiB"
            )
        self.root = Path(root)
        self.min_free_disk_mb = min_free_disk_mb
        self.fsync = fsync

    def prepare(self) -> None:
        """Create the root folder (and its parents) if needed."""
        self.root.mkdir(parents=True, exist_ok=True)

    def rel_path(self, study_uid: str, sop_instance_uid: str, aside: str = "") -> str:
        """``<study>/<sop>.dcm``; with ``aside`` (hex digits) ``<study>/<sop>.aside-<hex>.dcm``,
        where an object reusing a stored SOP Instance UID with other content is kept."""
        study = validate_uid(study_uid, what="StudyInstanceUID")
        sop = validate_uid(sop_instance_uid, what="SOPInstanceUID")
        if aside and not all(c in "0123456789abcdef" for c in aside):
            raise ValueError("aside must be lowercase hex digits")
        return f"{study}/{sop}.aside-{aside}.dcm" if aside else f"{study}/{sop}.dcm"

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
        free = self.free_mb()
        if free - incoming_bytes / _MiB < self.min_free_disk_mb:
            raise InsufficientDiskSpace(
                f"storage folder {self.root} has {free:.0f} MiB free, below the threshold "
                f"dicom.min_free_disk_mb={self.min_free_disk_mb} "
                "(free space or lower the threshold)"
            )

    def write(
        self,
        study_uid: str,
        sop_instance_uid: str,
        chunks: Iterable[bytes | memoryview],
        *,
        aside: str = "",
    ) -> StoredFile:
        """Atomically write ``chunks`` as the instance's file and return where it went.

        An existing file of that name is replaced atomically (readers see the old or the new
        bytes, never a mix). Raises ``OSError`` when the disk refuses.
        """
        rel = self.rel_path(study_uid, sop_instance_uid, aside)
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

    def dataset_digest(self, rel_path: str) -> str | None:
        """SHA-256 of a stored file's dataset bytes (after preamble and file meta), comparable
        with the digest of received C-STORE bytes; None when the file is missing."""
        try:
            with open(self.root / rel_path, "rb") as f:
                head = f.read(144)
                if (
                    len(head) == 144
                    and head[128:132] == b"DICM"
                    and head[132:136] == b"\x02\x00\x00\x00"
                ):
                    f.seek(144 + int.from_bytes(head[140:144], "little"))
                else:
                    f.seek(0)
                h = hashlib.sha256()
                while block := f.read(1 << 20):
                    h.update(block)
                return h.hexdigest()
        except FileNotFoundError:
            return None

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

    def study_files(self, older_than_s: float) -> Iterator[tuple[str, dict[str, str]]]:
        """Per study folder: ``(study UID, {SOP Instance UID: rel_path})`` of its instance files
        (``<UID>.dcm``) last written more than ``older_than_s`` ago. Temp files, files kept aside
        (``*.aside-<hex>.dcm``), the quarantine and anything not named by UIDs are skipped."""
        if not self.root.is_dir():
            return
        cutoff = time.time() - older_than_s
        for folder in sorted(self.root.iterdir()):
            try:
                study = validate_uid(folder.name, what="StudyInstanceUID")
            except InvalidUID:
                continue
            if not folder.is_dir():
                continue
            files: dict[str, str] = {}
            for path in folder.glob("*.dcm"):
                try:
                    sop = validate_uid(path.name[: -len(".dcm")], what="SOPInstanceUID")
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        files[sop] = f"{study}/{path.name}"
                except (InvalidUID, OSError):
                    continue
            if files:
                yield study, files

    def quarantine(self, rel_path: str) -> str:
        """Move a stored file to ``<root>/quarantine/<rel_path>`` (a unique name if taken) and
        return its new path relative to the root. The file is kept, never deleted."""
        target = self.root / QUARANTINE_DIR / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}")
        os.replace(self.root / rel_path, target)
        if self.fsync:
            _fsync_dir(target.parent)
            _fsync_dir((self.root / rel_path).parent)
        return str(target.relative_to(self.root))


class UnreadableStoredFile(Exception):
    """A stored file cannot be registered; the message is fixed text (never a header value)."""


def read_stored(storage: InstanceStorage, rel_path: str, device: DeviceInfo) -> StoredInstance:
    """The queue record of a stored ``<study>/<sop>.dcm`` file, classified as the SCP classifies
    a received instance (this worker's own outputs, then :func:`chest_eligibility`). Raises
    :class:`UnreadableStoredFile` when the header cannot be read or disagrees with the path."""
    from pydicom import dcmread  # noqa: PLC0415 - keep pydicom's reader off the import path

    path = storage.root / rel_path
    study, name = rel_path.split("/", 1)
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - the text may quote a value: class only
        raise UnreadableStoredFile(f"not a readable DICOM file ({type(exc).__name__})") from None
    try:
        if str(ds.StudyInstanceUID) != study or f"{ds.SOPInstanceUID}.dcm" != name:
            raise UnreadableStoredFile("its StudyInstanceUID/SOPInstanceUID do not match its path")
        validate_uid(str(ds.SeriesInstanceUID), what="SeriesInstanceUID")
        validate_uid(str(ds.SOPClassUID), what="SOPClassUID")
        own = own_output(ds, device)
        eligible, reason = (False, own) if own else chest_eligibility(ds)
        calling_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip()
        inst = StoredInstance.from_dataset(
            ds,
            rel_path=rel_path,
            size_bytes=path.stat().st_size,
            calling_ae=calling_ae[:16],
            eligible=eligible,
            ineligible_reason=reason,
        )
    except UnreadableStoredFile:
        raise
    except Exception as exc:  # noqa: BLE001 - the text may quote a value: class only
        raise UnreadableStoredFile(f"header not usable ({type(exc).__name__})") from None
    return inst if eligible else dataclasses.replace(inst, view=None)


@dataclass
class SweepReport:
    """What one storage sweep did (UIDs and paths only, no patient data)."""

    temp_removed: int = 0
    registered: list[str] = field(default_factory=list)  # SOP Instance UIDs
    quarantined: list[str] = field(default_factory=list)  # new rel paths under quarantine/


def sweep_storage(
    storage: InstanceStorage,
    *,
    recorded: Callable[[Sequence[str]], Mapping[str, str]],
    record: Callable[[StoredInstance], bool],
    device: DeviceInfo,
    older_than_s: float,
    register_within_s: float | None = None,
) -> SweepReport:
    """Remove temp files older than ``older_than_s``; register stored files of that age that
    have no row (a file written just before a database failure), or quarantine them when they
    cannot be read, disagree with their path, or their SOP Instance UID is recorded for another
    file. ``recorded(sop_uids)`` answers ``{uid: rel_path}`` for one study folder at a time;
    ``record`` records one instance (the queue's ``record_instance``). Files older than
    ``register_within_s`` (e.g. the retention period: a purge that could not delete them) are
    quarantined, not registered, so a purged study is never analysed again."""
    report = SweepReport(temp_removed=storage.remove_stale_temp_files(older_than_s))
    for study, files in storage.study_files(older_than_s):
        known = recorded(list(files))
        for sop, rel_path in files.items():
            if known.get(sop) == rel_path:
                continue
            why = "its SOP Instance UID is recorded for another file" if sop in known else ""
            inst = None
            if not why:
                try:
                    inst = read_stored(storage, rel_path, device)
                    age = time.time() - (storage.root / rel_path).stat().st_mtime
                    if register_within_s is not None and age > register_within_s:
                        why = "older than the retention period"
                except (UnreadableStoredFile, OSError) as exc:
                    why = str(exc) if isinstance(exc, UnreadableStoredFile) else "unreadable"
            if inst is not None and not why:
                record(inst)
                report.registered.append(sop)
                log.warning(
                    "storage sweep: instance %s of study %s had no queue row; registered",
                    sop,
                    study,
                )
                continue
            try:
                moved = storage.quarantine(rel_path)
            except OSError as exc:
                log.warning(
                    "storage sweep: could not quarantine %s (errno %s)", rel_path, exc.errno
                )
                continue
            report.quarantined.append(moved)
            log.warning(
                "storage sweep: %s has no queue row and %s; moved to %s", rel_path, why, moved
            )
    return report
