"""Prometheus metrics of one ``serve`` process (``/metrics``, see :mod:`worker.health`).

Two kinds, named ``cxr_*``:

- **counted here**, as things happen in this process: C-STOREs answered by status, rejected
  associations, analysis and end-to-end latency histograms;
- **read from the database at each scrape** (every worker's work, so any process shows the whole
  queue): studies per state, the age of the oldest ready study, deliveries per destination and
  state with their send attempts, and the free disk space of the storage and results folders.
  When the database is down these are left out and ``cxr_database_up`` is 0.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from db.errors import QueueUnavailable
from db.queue import Queue, StudyState
from dicom_node.statuses import status_name

log = logging.getLogger(__name__)

#: Seconds from claim to stored result (one batch of a few studies on a CPU takes 2-30 s).
ANALYSIS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
#: Seconds from the study's last image arriving to its report being stored (quiet period, lateral
#: grace, queue wait and analysis together).
END_TO_END_BUCKETS = (5, 10, 30, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600)


class Metrics:
    """The metrics of one process, in their own registry (nothing global: tests may build
    several). It is the SCP's :class:`~dicom_node.scp.SCPEvents` and the pipeline's observer."""

    def __init__(self, *, disk_paths: dict[str, Path] | None = None) -> None:
        """``disk_paths``: label -> folder whose free space to report (e.g. storage, results)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "cxr_instances_received",
            "C-STORE requests answered, by the DIMSE status sent back",
            ["status"],
            registry=self.registry,
        )
        self.instances_received.labels(status=status_name(0)).inc(0)
        self.associations_rejected = Counter(
            "cxr_associations_rejected",
            "Association requests rejected (unknown calling or called AE title, too many...)",
            ["reason"],
            registry=self.registry,
        )
        self.analysis_seconds = Histogram(
            "cxr_analysis_seconds",
            "Seconds from claiming a study to storing its result (its batch's time)",
            buckets=ANALYSIS_BUCKETS,
            registry=self.registry,
        )
        self.end_to_end_seconds = Histogram(
            "cxr_end_to_end_seconds",
            "Seconds from the study's last image arriving to its report being stored",
            buckets=END_TO_END_BUCKETS,
            registry=self.registry,
        )
        self.queue_collector = QueueCollector(disk_paths or {})
        self.registry.register(self.queue_collector)

    def attach_queue(self, queue: Queue) -> None:
        """Report the queue's state from now on."""
        self.queue_collector.queue = queue

    # --- dicom_node.scp.SCPEvents ---------------------------------------------------------------

    def instance_received(self, status: int) -> None:
        self.instances_received.labels(status=status_name(status)).inc()

    def association_rejected(self, reason: str) -> None:
        self.associations_rejected.labels(reason=reason).inc()

    # --- the pipeline's observer ----------------------------------------------------------------

    def study_analysed(self, *, analysis_seconds: float, end_to_end_seconds: float | None) -> None:
        """A study's result was stored ``analysis_seconds`` after its claim and
        ``end_to_end_seconds`` after its last image arrived."""
        self.analysis_seconds.observe(max(0.0, analysis_seconds))
        if end_to_end_seconds is not None:
            self.end_to_end_seconds.observe(max(0.0, end_to_end_seconds))


class QueueCollector(Collector):
    """Gauges read at scrape time from the database and the file system."""

    def __init__(self, disk_paths: dict[str, Path], queue: Queue | None = None) -> None:
        self.disk_paths = disk_paths
        self.queue = queue

    def describe(self) -> list[Metric]:
        return []  # the families depend on the data; describe nothing (no pre-scrape at register)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        yield from self._disk()
        up = GaugeMetricFamily(
            "cxr_database_up", "1 when the queue database answered this scrape, else 0"
        )
        if self.queue is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            snap = self.queue.snapshot()
        except QueueUnavailable as exc:
            log.warning("metrics: database unavailable (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        studies = GaugeMetricFamily(
            "cxr_studies", "Studies in the queue, by state", labels=["state"]
        )
        for state in StudyState:
            studies.add_metric([state.value], snap.studies.get(state.value, 0))
        yield studies
        yield GaugeMetricFamily(
            "cxr_oldest_ready_study_age_seconds",
            "How long the oldest claimable (ready) study has waited for a worker; 0 when none",
            value=snap.oldest_ready_age_seconds,
        )
        yield from self._deliveries(snap.deliveries, snap.delivery_attempts)
        yield GaugeMetricFamily(
            "cxr_metrics_scrape_seconds",
            "Seconds this scrape spent reading the database and the disks",
            value=time.perf_counter() - started,
        )

    def _disk(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(
            "cxr_disk_free_bytes", "Free bytes on the file system of a folder", labels=["path"]
        )
        for label, path in self.disk_paths.items():
            probe = _existing(path)
            if probe is None:
                continue
            try:
                free.add_metric([label], shutil.disk_usage(probe).free)
            except OSError as exc:
                log.warning("metrics: cannot read the free space of %s (%s)", probe, exc)
        yield free

    @staticmethod
    def _deliveries(
        counts: dict[tuple[str, str], int], attempts: dict[tuple[str, str], int]
    ) -> Iterator[Metric]:
        by_state = GaugeMetricFamily(
            "cxr_deliveries",
            "Result objects to send, by destination and state (pending, retry, delivered, "
            "failed), for the studies still in the database",
            labels=["destination", "state"],
        )
        tries = GaugeMetricFamily(
            "cxr_delivery_attempts",
            "Send attempts made so far, by destination (studies still in the database)",
            labels=["destination"],
        )
        failed = GaugeMetricFamily(
            "cxr_delivery_failed_attempts",
            "Send attempts that did not deliver, by destination (studies still in the database)",
            labels=["destination"],
        )
        destinations = sorted({d for d, _ in counts})
        for (dest, state), n in sorted(counts.items()):
            by_state.add_metric([dest, state], n)
        for dest in destinations:
            total = sum(a for (d, _), a in attempts.items() if d == dest)
            delivered = counts.get((dest, "delivered"), 0)
            tries.add_metric([dest], total)
            failed.add_metric([dest], max(0, total - delivered))
        yield by_state
        yield tries
        yield failed


def _existing(path: Path) -> Path | None:
    """``path`` or its nearest existing parent (a folder not created yet is on that disk)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return None


def seconds_since(then: datetime | None, now: datetime) -> float | None:
    """``now - then`` in seconds, or None when ``then`` is unknown."""
    return None if then is None else (now - then).total_seconds()
