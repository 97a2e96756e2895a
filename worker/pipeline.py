"""Analyse claimed studies: read instances, identify and pair views, run the models in batches,
build the Structured Report (and key image), record the result and deliver it.

Every study is finished through the queue (complete, ignore or fail); one broken study never takes
the rest of its batch down with it."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
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
from models.api import StudyAnalysis, StudyAnalyzer, StudyInput

from .config import AppConfig, device_info
from .delivery import deliver_due
from .results import MissingModel, OutputFile, PreparedStudy, StudyResult, deliveries

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

    @property
    def kind(self) -> ErrorKind:
        return ErrorKind.TRANSIENT if self.retryable else ErrorKind.INVALID


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 1)


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


class Pipeline:
    """The worker's :class:`~worker.loop.BatchProcessor`."""

    def __init__(self, cfg: AppConfig, queue: Queue, analyzer: StudyAnalyzer) -> None:
        self.cfg = cfg
        self.queue = queue
        self.analyzer = analyzer
        self.worker_id = cfg.worker.name
        # the product's identity, not this process's: see worker.config.device_info
        self.device = device_info(cfg)
        #: reports filled into their shape's template (dicom_node.sr_template), one cache each
        self.reports = ReportTemplates()
        #: told of each stored result (the service's metrics); None: nobody listens
        self.observer: StudyObserver | None = None
        self._batch_started = time.perf_counter()
        self.out_root = Path(cfg.results_dir or (Path(cfg.dicom.storage_dir).parent / "results"))

    @classmethod
    def from_config(cls, cfg: AppConfig, queue: Queue) -> Pipeline:
        """Load every model now, so a missing or tampered weights file stops ``serve`` at start."""
        from models.analyzer import Analyzer

        return cls(cfg, queue, Analyzer.from_config(cfg.models, device=cfg.worker.device))

    # --- reading and pairing ------------------------------------------------------------------

    def _path(self, inst: InstanceRow) -> Path:
        return Path(self.cfg.dicom.storage_dir) / inst.rel_path

    def prepare(self, study: ClaimedStudy) -> PreparedStudy:
        t0 = time.perf_counter()
        eligible = [i for i in study.instances if i.eligible]
        if not eligible:
            raise StudyRejected("no chest radiograph among the study's instances")
        by_id = {inst.id: inst for inst in eligible}
        headers: dict[int, Dataset] = {}
        for inst in eligible:
            try:
                headers[inst.id] = pydicom.dcmread(self._path(inst), stop_before_pixels=True)
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
        pixels: dict[int, np.ndarray] = {}
        if undecided:
            t1 = time.perf_counter()
            imgs = []
            for iid in undecided:
                pixels[iid] = self._decode(by_id[iid])
                imgs.append(pixels[iid])
            for iid, pred in zip(undecided, self.analyzer.classify_views(imgs), strict=True):
                guesses[iid] = ViewGuess(
                    pred.view,
                    None,
                    "view_classifier",
                    float(pred.probability),
                    f"p={pred.probability:.3f}",
                )
            log.info(
                "study %s: %d image(s) without view in the headers, "
                "classified from pixels in %.0f ms",
                study.id,
                len(undecided),
                _ms(t1),
            )
        cands = [
            Candidate.from_dataset(headers[iid], key=iid, guess=guesses[iid]) for iid in headers
        ]
        by_key: dict[Hashable, int] = {iid: iid for iid in headers}
        frontal, lateral = pick_pair(cands)
        views = {
            c.sop_instance_uid: f"{c.guess.view or 'unknown'}"
            f"{' ' + c.guess.projection if c.guess.projection else ''} ({c.guess.source or 'none'})"
            for c in cands
        }
        if frontal is None:
            found = ", ".join(sorted(set(views.values())))
            raise StudyRejected(
                f"no frontal (PA/AP) view among {len(cands)} chest image(s) [{found}]; "
                f"a lateral alone is not analysed"
            )
        f_id = by_key[frontal.key]
        l_id = by_key[lateral.key] if lateral is not None else None
        for wanted in (f_id, l_id):
            if wanted is not None and wanted not in pixels:
                pixels[wanted] = self._decode(by_id[wanted])
        return PreparedStudy(
            claimed=study,
            frontal_ds=headers[f_id],
            frontal_pixels=pixels[f_id],
            lateral_ds=headers[l_id] if l_id is not None else None,
            lateral_pixels=pixels[l_id] if l_id is not None else None,
            views=views,
            frontal_view=frontal.guess,
            lateral_view=lateral.guess if lateral else None,
            timings_ms={"read_decode": _ms(t0)},
        )

    def _decode(self, inst: InstanceRow) -> np.ndarray:
        try:
            return load_image(self._path(inst)).pixels
        except PixelDecodeError as exc:
            raise StudyError(str(exc), retryable=False) from exc

    # --- the batch ------------------------------------------------------------------------------

    def process(self, studies: Sequence[ClaimedStudy]) -> None:
        self._batch_started = time.perf_counter()
        prepared: list[PreparedStudy] = []
        for s in studies:
            self._guarded(s, partial(self._prepare_into, prepared, s))
        if prepared:
            t0 = time.perf_counter()
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
            per_study_ms = _ms(t0) / len(prepared)
            for p, out in zip(prepared, outputs, strict=True):
                p.timings_ms["models_batch_share"] = round(per_study_ms, 1)
                self._guarded(p.claimed, partial(self.finish, p, out))
        self.deliver_due()

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

    def finish(self, p: PreparedStudy, out: StudyAnalysis | BaseException) -> None:
        if isinstance(out, BaseException):
            raise StudyError(f"model inference failed: {type(out).__name__}: {out}", retryable=True)
        t0 = time.perf_counter()
        result = StudyResult(p, out, self.device)
        try:
            report_input = result.report_input()
        except MissingModel as exc:
            raise StudyError(str(exc), retryable=False) from exc
        sr_ds = self.reports.render(report_input)
        folder = self.out_root / p.claimed.study_uid
        folder.mkdir(parents=True, exist_ok=True)
        sr_path = sr_ds.write(folder / f"SR_{sr_ds.sop_instance_uid}.dcm")
        files = [OutputFile(sr_ds.sop_instance_uid, sr_ds.sop_class_uid, sr_path)]
        p.timings_ms["report_sr"] = _ms(t0)
        key_png: Path | None = None
        wants_key = (
            any(d.send_key_image for d in self.cfg.destinations) or self.cfg.results_dir is not None
        )
        if wants_key:
            key = build_key_image(
                result.key_image_input(sr_ds.sop_instance_uid, report_input.instance_number)
            )
            uid = str(key.dataset.SOPInstanceUID)
            key_dcm, key_png = write_key_image(
                key, folder / f"KEY_{uid}.dcm", folder / f"KEY_{uid}.png"
            )
            files.append(OutputFile(uid, str(key.dataset.SOPClassUID), key_dcm))
        p.timings_ms["report"] = _ms(t0)
        p.timings_ms.update({f"model_{k}": v for k, v in out.timings_ms.items()})
        self.queue.complete(
            p.claimed.id,
            self.worker_id,
            result_payload=result.payload(sr_path, key_png),
            report_sop_instance_uid=sr_ds.sop_instance_uid,
            report_path=str(sr_path),
            deliveries=deliveries(files, self.cfg.destinations),
        )
        self._observe(p.claimed)
        m1 = out.model1
        log.info(
            "study %s done: Model 1 %s (p=%.3f), %d finding(s) present, lateral %s, report %s",
            p.claimed.id,
            "abnormal" if m1.present else "no finding",
            m1.probability,
            sum(f.present for f in out.model2),
            "used" if out.used_lateral else "absent",
            sr_ds.sop_instance_uid,
        )

    def _observe(self, study: ClaimedStudy) -> None:
        """Tell the observer how long the study took: since its claim (its batch) and since its
        last image arrived."""
        if self.observer is None:
            return
        last = max((i.received_at for i in study.instances if i.eligible), default=None)
        now = datetime.now(UTC)
        try:
            self.observer.study_analysed(
                analysis_seconds=time.perf_counter() - self._batch_started,
                end_to_end_seconds=(now - last).total_seconds() if last is not None else None,
            )
        except Exception:  # noqa: BLE001 - metrics must never fail a stored result
            log.warning("could not record the study's timings in the metrics", exc_info=True)

    def deliver_due(self) -> int:
        """Send every delivery that is due (see :func:`worker.delivery.deliver_due`)."""
        return deliver_due(self.cfg, self.queue)
