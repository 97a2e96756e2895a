"""Analyse claimed studies: read instances, identify and pair views, run the models in batches,
build the Structured Report (and key image), record the result and deliver it.

Every study is finished through the queue (complete, ignore or fail); one broken study never takes
the rest of its batch down with it."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from db.queue import ClaimedStudy, LeaseLost, Queue
from db.records import InstanceRow
from db.retry import ErrorKind
from dicom_node.derived import IDENTITY_KEYWORDS, IdentityUnreadable, patient_identity
from dicom_node.key_image import build_key_image, write_key_image
from dicom_node.pixels import PixelDecodeError, load_image
from dicom_node.sr_template import ReportTemplates
from dicom_node.views import Candidate, ViewGuess, pick_pair, view_from_headers
from models.api import StudyAnalysis, StudyAnalyzer, StudyInput, ViewPrediction

from .config import AppConfig, device_info
from .delivery import deliver_due
from .results import MissingModel, OutputFile, PreparedStudy, StudyResult, deliveries
from .timing import Lap, StageStats

log = logging.getLogger(__name__)


class StudyObserver(Protocol):
    """Told when a study's result is stored (``worker.metrics.Metrics`` counts it)."""

    def study_analysed(
        self, *, analysis_seconds: float, end_to_end_seconds: float | None
    ) -> None: ...


class StudyRejected(Exception):
    """The study cannot be analysed as sent (a person must look).

    It is ``ignored`` with this reason."""


class StudyError(Exception):
    """Analysis failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only ``retryable``: the default pickling (``cls(*args)``) would lose it, and
        # the prepare stage sends this back from a pool process
        return (_study_error, (str(self), self.retryable))

    @property
    def kind(self) -> ErrorKind:
        return ErrorKind.TRANSIENT if self.retryable else ErrorKind.INVALID


def _study_error(message: str, retryable: bool) -> StudyError:
    return StudyError(message, retryable=retryable)


def _patient_key(ds: Dataset) -> tuple[str, ...]:
    """The patient identity a report is filed under, normalised (see
    :func:`dicom_node.derived.patient_identity`); ``StudyError`` (not retried) naming the
    attribute when one cannot be decoded (never its value)."""
    try:
        return patient_identity(ds)
    except IdentityUnreadable as exc:
        raise StudyError(
            f"instance {ds.get('SOPInstanceUID', '?')}: {exc}", retryable=False
        ) from None


def _identity_mismatch(headers: Sequence[Dataset]) -> str | None:
    """The first identity attribute on which the images differ (its keyword), or None."""
    keys = [_patient_key(ds) for ds in headers]
    for i, keyword in enumerate(IDENTITY_KEYWORDS):
        if len({k[i] for k in keys}) > 1:
            return keyword
    return None


def _decode(inst: InstanceRow, storage_dir: Path) -> np.ndarray:
    try:
        return load_image(storage_dir / inst.rel_path).pixels
    except PixelDecodeError as exc:
        raise StudyError(str(exc), retryable=False) from exc


def _view_label(c: Candidate) -> str:
    return (
        f"{c.guess.view or 'unknown'}"
        f"{' ' + c.guess.projection if c.guess.projection else ''} ({c.guess.source or 'none'})"
    )


@dataclass
class ViewsPending:
    """A study read from storage in which some image's view is not in its headers: the view
    classifier (a model, so the model stage's) must look at the decoded pixels before the pair
    is chosen. :meth:`resolve` finishes the preparation."""

    study: ClaimedStudy
    storage_dir: Path
    headers: dict[int, Dataset]
    guesses: dict[int, ViewGuess]
    pixels: dict[int, np.ndarray]
    undecided: list[int]
    timings_ms: dict[str, float]

    def resolve(
        self, classify: Callable[[list[np.ndarray]], Sequence[ViewPrediction]]
    ) -> PreparedStudy:
        lap = Lap()
        preds = classify([self.pixels[iid] for iid in self.undecided])
        for iid, pred in zip(self.undecided, preds, strict=True):
            self.guesses[iid] = ViewGuess(
                pred.view,
                None,
                "view_classifier",
                float(pred.probability),
                f"p={pred.probability:.3f}",
            )
        lap.take(self.timings_ms, "views")
        log.info(
            "study %s: %d image(s) without view in the headers, classified from pixels in %.0f ms",
            self.study.id,
            len(self.undecided),
            self.timings_ms["views_wall_ms"],
        )
        prepared = _paired(
            self.study, self.storage_dir, self.headers, self.guesses, self.pixels, self.timings_ms
        )
        # decoding an image the headers had placed (rare: only beside an unplaced one)
        lap.take(self.timings_ms, "views_decode")
        return prepared


def read_study(study: ClaimedStudy, storage_dir: Path) -> PreparedStudy | ViewsPending:
    """Everything before the models, without them: read the eligible instances' headers, check
    they name one patient, guess each view from its headers, choose the frontal (and lateral) and
    decode their pixels. A study with an image whose view only its pixels can tell is returned as
    :class:`ViewsPending`, its unplaced images decoded.

    A plain function of picklable arguments, so the overlapped pipeline can run it in a pool
    process (:mod:`worker.stages`). Raises :class:`StudyRejected` or :class:`StudyError`, whose
    messages name instances by UID, never patient data."""
    lap = Lap()
    timings: dict[str, float] = {}
    eligible = [i for i in study.instances if i.eligible]
    if not eligible:
        raise StudyRejected("no chest radiograph among the study's instances")
    by_id = {inst.id: inst for inst in eligible}
    headers: dict[int, Dataset] = {}
    for inst in eligible:
        try:
            headers[inst.id] = pydicom.dcmread(storage_dir / inst.rel_path, stop_before_pixels=True)
        except FileNotFoundError:
            raise StudyError(
                f"instance {inst.sop_instance_uid} is missing from storage "
                f"({inst.rel_path}); was the storage folder changed?",
                retryable=False,
            ) from None
        except Exception as exc:
            # the class only: a parser's text may quote patient data
            raise StudyError(
                f"instance {inst.sop_instance_uid} cannot be read ({type(exc).__name__})",
                retryable=False,
            ) from None
    differs = _identity_mismatch(list(headers.values()))
    if differs is not None:
        raise StudyRejected(
            f"the study's images name different patients (they disagree on {differs}); "
            "not analysed "
            f"(a report must never reach the wrong patient)"
        )
    guesses = {iid: view_from_headers(ds) for iid, ds in headers.items()}
    undecided = [iid for iid, g in guesses.items() if g.view is None]
    if undecided:
        pixels = {iid: _decode(by_id[iid], storage_dir) for iid in undecided}
        lap.take(timings, "prepare")
        return ViewsPending(study, storage_dir, headers, guesses, pixels, undecided, timings)
    prepared = _paired(study, storage_dir, headers, guesses, {}, timings)
    lap.take(timings, "prepare")
    return prepared


def _paired(
    study: ClaimedStudy,
    storage_dir: Path,
    headers: dict[int, Dataset],
    guesses: dict[int, ViewGuess],
    pixels: dict[int, np.ndarray],
    timings: dict[str, float],
) -> PreparedStudy:
    cands = [Candidate.from_dataset(headers[iid], key=iid, guess=guesses[iid]) for iid in headers]
    by_key: dict[Hashable, int] = {iid: iid for iid in headers}
    frontal, lateral = pick_pair(cands)
    views = {c.sop_instance_uid: _view_label(c) for c in cands}
    if frontal is None:
        found = ", ".join(sorted(set(views.values())))
        raise StudyRejected(
            f"no frontal (PA/AP) view among {len(cands)} chest image(s) [{found}]; "
            f"a lateral alone is not analysed"
        )
    f_id = by_key[frontal.key]
    l_id = by_key[lateral.key] if lateral is not None else None
    by_id = {inst.id: inst for inst in study.instances}
    for wanted in (f_id, l_id):
        if wanted is not None and wanted not in pixels:
            pixels[wanted] = _decode(by_id[wanted], storage_dir)
    return PreparedStudy(
        claimed=study,
        frontal_ds=headers[f_id],
        frontal_pixels=pixels[f_id],
        lateral_ds=headers[l_id] if l_id is not None else None,
        lateral_pixels=pixels[l_id] if l_id is not None else None,
        views=views,
        frontal_view=frontal.guess,
        lateral_view=lateral.guess if lateral else None,
        timings_ms=timings,
    )


class Pipeline:
    """The worker's serial :class:`~worker.loop.BatchProcessor`: each batch read, analysed and
    finished before the next is claimed. :class:`worker.stages.StagedPipeline` overlaps the same
    steps across batches."""

    def __init__(self, cfg: AppConfig, queue: Queue, analyzer: StudyAnalyzer) -> None:
        self.cfg = cfg
        self.queue = queue
        self.analyzer = analyzer
        self.worker_id = cfg.worker.name
        # the product's identity, not this process's: see worker.config.device_info
        self.device = device_info(cfg)
        #: reports filled into their shape's template (dicom_node.sr_template), one cache per
        #: thread (a cache is not shared between threads)
        self._reports = threading.local()
        #: told of each stored result (the service's metrics); None: nobody listens
        self.observer: StudyObserver | None = None
        #: per-stage time summed over the studies handled, including ``queue.complete``'s
        self.stats = StageStats()
        self._batch_started = time.perf_counter()
        self.out_root = Path(cfg.results_dir or (Path(cfg.dicom.storage_dir).parent / "results"))
        self.storage_dir = Path(cfg.dicom.storage_dir)
        self.wants_key_image = (
            any(d.send_key_image for d in cfg.destinations) or cfg.results_dir is not None
        )

    @classmethod
    def from_config(cls, cfg: AppConfig, queue: Queue) -> Pipeline:
        """Load every model now, so a missing or tampered weights file stops ``serve`` at start."""
        from models.analyzer import Analyzer

        return cls(cfg, queue, Analyzer.from_config(cfg.models, device=cfg.worker.device))

    @property
    def reports(self) -> ReportTemplates:
        """This thread's report templates."""
        templates: ReportTemplates | None = getattr(self._reports, "templates", None)
        if templates is None:
            templates = self._reports.templates = ReportTemplates()
        return templates

    # --- reading and pairing ------------------------------------------------------------------

    def prepare(self, study: ClaimedStudy) -> PreparedStudy:
        got = read_study(study, self.storage_dir)
        return got.resolve(self.analyzer.classify_views) if isinstance(got, ViewsPending) else got

    # --- the batch ------------------------------------------------------------------------------

    def process(self, studies: Sequence[ClaimedStudy]) -> None:
        self._batch_started = time.perf_counter()
        prepared: list[PreparedStudy] = []
        for s in studies:
            self._guarded(s, partial(self._prepare_into, prepared, s))
        if prepared:
            # nothing else runs in this process now: the whole process's CPU is the models'
            outputs = self.run_models(prepared, cpu_clock=time.process_time)
            for p, out in zip(prepared, outputs, strict=True):
                self._guarded(p.claimed, partial(self.finish, p, out))
        self.deliver_due()

    def run_models(
        self,
        prepared: Sequence[PreparedStudy],
        *,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> Sequence[StudyAnalysis | BaseException]:
        """One model batch; each study gets its analysis or the exception that stopped it, and
        its share of the batch's time (``models_wall_ms``/``models_cpu_ms``)."""
        lap = Lap(cpu_clock)
        inputs = [
            StudyInput(
                key=str(p.claimed.id),
                frontal=p.frontal_pixels,
                lateral=p.lateral_pixels,
                projection=p.frontal_view.projection,
            )
            for p in prepared
        ]
        outputs: Sequence[StudyAnalysis | BaseException]
        try:
            outputs = self.analyzer.analyse(inputs)
        except Exception as exc:  # the whole batch failed (e.g. out of memory): each retries
            log.exception("model batch of %d failed", len(prepared))
            outputs = [exc] * len(prepared)
        share: dict[str, float] = {}
        lap.take(share, "models", share=len(prepared))
        for p in prepared:
            p.timings_ms.update(share)
        return outputs

    def _prepare_into(self, prepared: list[PreparedStudy], study: ClaimedStudy) -> None:
        prepared.append(self.prepare(study))

    def _guarded(self, study: ClaimedStudy, fn: Callable[[], object]) -> None:
        """Run one study's step; whatever goes wrong is recorded for that study alone."""
        try:
            fn()
        except StudyRejected as exc:
            reason = str(exc)
            log.warning("study %s not analysed: %s", study.id, reason)
            self._finish_safely(lambda: self.queue.ignore(study.id, self.worker_id, reason))
        except StudyError as exc:
            error, retryable, kind = str(exc), exc.retryable, exc.kind
            log.warning(
                "study %s failed (%s): %s",
                study.id,
                "will retry" if retryable else "permanent",
                error,
            )
            self._finish_safely(
                lambda: self.queue.fail(study.id, self.worker_id, error=error, kind=kind)
            )
        except LeaseLost:
            log.warning(
                "study %s: lease lost while working on it; another worker has it now", study.id
            )
        except Exception as exc:
            # the class and where, never the text: a parser's message may quote patient data
            error = f"{type(exc).__name__} (details withheld: may quote patient data)"
            log.error(
                "study %s failed unexpectedly: %s; at:\n%s",
                study.id,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            self._finish_safely(
                lambda: self.queue.fail(
                    study.id, self.worker_id, error=error, kind=ErrorKind.TRANSIENT
                )
            )

    def _finish_safely(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except LeaseLost:
            log.warning(
                "lease lost before the outcome could be recorded; the study will be retried"
            )
        except Exception:
            log.exception(
                "could not record a study's outcome; its lease will expire and it will be retried"
            )

    # --- result, report, delivery ----------------------------------------------------------------

    def finish(
        self,
        p: PreparedStudy,
        out: StudyAnalysis | BaseException,
        *,
        started: float | None = None,
    ) -> None:
        """Turn one study's analysis into its outputs in one pass: the report (from its shape's
        template), the key image, their files, then the result row and deliveries
        (``queue.complete``), each written once. ``started``: when the study's batch was claimed
        (``time.perf_counter``), for the observer; default this pipeline's last batch."""
        if isinstance(out, BaseException):
            raise StudyError(f"model inference failed: {type(out).__name__}: {out}", retryable=True)
        lap = Lap()
        result = StudyResult(p, out, self.device)
        try:
            report_input = result.report_input()
        except MissingModel as exc:
            raise StudyError(str(exc), retryable=False) from exc
        sr = self.reports.render(report_input)
        lap.take(p.timings_ms, "report")
        key = None
        if self.wants_key_image:
            key = build_key_image(
                result.key_image_input(sr.sop_instance_uid, report_input.instance_number)
            )
        lap.take(p.timings_ms, "key_image")
        folder = self.out_root / p.claimed.study_uid
        folder.mkdir(parents=True, exist_ok=True)
        sr_path = sr.write(folder / f"SR_{sr.sop_instance_uid}.dcm")
        files = [OutputFile(sr.sop_instance_uid, sr.sop_class_uid, sr_path)]
        key_png: Path | None = None
        if key is not None:
            uid = str(key.dataset.SOPInstanceUID)
            key_dcm, key_png = write_key_image(
                key, folder / f"KEY_{uid}.dcm", folder / f"KEY_{uid}.png"
            )
            files.append(OutputFile(uid, str(key.dataset.SOPClassUID), key_dcm))
        lap.take(p.timings_ms, "writes")
        p.timings_ms.update({f"model_{k}": v for k, v in out.timings_ms.items()})
        self.queue.complete(
            p.claimed.id,
            self.worker_id,
            result_payload=result.payload(sr_path, key_png),
            report_sop_instance_uid=sr.sop_instance_uid,
            report_path=str(sr_path),
            deliveries=deliveries(files, self.cfg.destinations),
        )
        # the row is written: its own write's time can only go to the process's sums
        done: dict[str, float] = {}
        lap.take(done, "complete")
        self.stats.add_timings(p.timings_ms)
        self.stats.add_timings(done)
        self._observe(p.claimed, self._batch_started if started is None else started)
        m1 = out.model1
        log.info(
            "study %s done: Model 1 %s (p=%.3f), %d finding(s) present, lateral %s, report %s",
            p.claimed.id,
            "abnormal" if m1.present else "no finding",
            m1.probability,
            sum(f.present for f in out.model2),
            "used" if out.used_lateral else "absent",
            sr.sop_instance_uid,
        )

    def _observe(self, study: ClaimedStudy, started: float) -> None:
        """Tell the observer how long the study took: since its claim (its batch) and since its
        last image arrived."""
        if self.observer is None:
            return
        last = max((i.received_at for i in study.instances if i.eligible), default=None)
        now = datetime.now(UTC)
        try:
            self.observer.study_analysed(
                analysis_seconds=time.perf_counter() - started,
                end_to_end_seconds=(now - last).total_seconds() if last is not None else None,
            )
        except Exception:  # noqa: BLE001 - metrics must never fail a stored result
            log.warning("could not record the study's timings in the metrics", exc_info=True)

    def deliver_due(self) -> int:
        """Send every delivery that is due (see :func:`worker.delivery.deliver_due`)."""
        return deliver_due(self.cfg, self.queue)
