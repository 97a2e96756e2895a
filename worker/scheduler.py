"""Periodic jobs run by APScheduler: study completion, lease expiry, retention purge, delivery
retry, storage sweep."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from db.errors import QueueUnavailable
from db.queue import Queue
from dicom_node.storage import InstanceStorage, SweepReport, sweep_storage

from .config import AppConfig, device_info
from .delivery import deliver_due

log = logging.getLogger(__name__)


def _guard(name: str, fn: Callable[[], object]) -> Callable[[], None]:
    """A job must never die: log and carry on (the next run retries)."""

    def run() -> None:
        try:
            fn()
        except QueueUnavailable as exc:
            log.warning("%s skipped: database unavailable (%s)", name, exc)
        except Exception:
            log.exception("%s failed; will run again at the next interval", name)

    run.__name__ = run.__qualname__ = name  # APScheduler names the job by its __qualname__
    return run


def completion_sweep(cfg: AppConfig, queue: Queue) -> int:
    c = cfg.completion
    n = queue.sweep_completion(
        quiet_seconds=c.quiet_seconds,
        max_wait_seconds=c.max_wait_seconds,
        lateral_grace_seconds=c.lateral_grace_seconds,
    )
    if n:
        log.info("completion sweep: %d study(ies) left receiving", n)
    return n


def lease_sweep(queue: Queue) -> int:
    n = queue.sweep_leases()
    if n:
        log.warning(
            "lease sweep: %d study(ies) returned from a worker that stopped heartbeating", n
        )
    return n


def retention_purge(cfg: AppConfig, queue: Queue, now: datetime | None = None) -> int:
    """Delete rows and files of finished studies older than ``retention_days``."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=cfg.scheduler.retention_days)
    uids = queue.purge(cutoff)
    root = Path(cfg.dicom.storage_dir).resolve()
    for uid in uids:
        folder = (root / uid).resolve()
        if folder.parent == root and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
    if uids:
        log.info(
            "retention purge: removed %d finished study(ies) older than %s days",
            len(uids),
            cfg.scheduler.retention_days,
        )
    return len(uids)


def sweep_min_age_s(cfg: AppConfig) -> float:
    """The age a file must reach before the storage sweep touches it: the configured minimum,
    and never less than twice the longest DICOM timeout (the longest a store can be in flight)."""
    d = cfg.dicom
    longest = max(d.acse_timeout_s, d.dimse_timeout_s, d.network_timeout_s)
    return max(cfg.scheduler.storage_sweep_min_age_seconds, 2 * longest)


def storage_sweep(cfg: AppConfig, queue: Queue) -> SweepReport:
    """Stale temp files out; stored files with no queue row registered (or quarantined). Files
    older than the retention period are quarantined, never registered (a purged study must not
    be analysed again)."""
    storage = InstanceStorage(cfg.dicom.storage_dir, min_free_disk_mb=cfg.dicom.min_free_disk_mb)
    report = sweep_storage(
        storage,
        recorded=queue.stored_rel_paths,
        record=queue.record_instance,
        device=device_info(cfg),
        older_than_s=sweep_min_age_s(cfg),
        register_within_s=cfg.scheduler.retention_days * 86400,
    )
    if report.temp_removed or report.registered or report.quarantined:
        log.info(
            "storage sweep: %d stale temp file(s) removed, %d unrecorded instance(s) registered, "
            "%d file(s) quarantined",
            report.temp_removed,
            len(report.registered),
            len(report.quarantined),
        )
    return report


def build_scheduler(cfg: AppConfig, queue: Queue, *, role: str) -> BackgroundScheduler:
    """Jobs per role: the SCP side owns completion, retention and the storage sweep; every role
    sweeps leases (compare-and-set makes concurrent sweeps harmless); delivery retry runs where
    results are made. The scheduler is returned not started."""
    sched = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
    sc = cfg.scheduler
    # (id, name in logs, what it runs, interval in seconds)
    jobs: list[tuple[str, str, Callable[[], object], float]] = []
    if role in ("all", "scp"):
        jobs += [
            ("completion", "completion_sweep", lambda: completion_sweep(cfg, queue),
             cfg.completion.sweep_interval_seconds),
            ("purge", "retention_purge", lambda: retention_purge(cfg, queue),
             sc.purge_interval_seconds),
            ("storage", "storage_sweep", lambda: storage_sweep(cfg, queue),
             sc.storage_sweep_seconds),
        ]  # fmt: skip
    jobs.append(
        ("leases", "lease_sweep", lambda: lease_sweep(queue), sc.lease_sweep_interval_seconds)
    )
    if role in ("all", "worker"):
        jobs.append(
            ("delivery", "delivery_retry", lambda: deliver_due(cfg, queue),
             sc.delivery_retry_interval_seconds)
        )  # fmt: skip
    for job_id, name, fn, seconds in jobs:
        sched.add_job(_guard(name, fn), "interval", seconds=seconds, id=job_id)
    return sched
