"""Analyse claimed studies: read instances, identify and pair views, run the models in batches,
build the Structured Report (and key image), record the result and deliver it.

Every study is finished through the queue (complete, ignore or fail); one broken study never takes
the rest of its batch down with it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from db.queue import ClaimedStudy, LeaseLost, Queue
from db.records import InstanceRow
from db.retry import decide
from dicom_node import sr as srmod
from dicom_node.pixels import PixelDecodeError, load_image
from dicom_node.views import Candidate, ViewGuess, pick_pair, view_from_headers

from . import __version__
from .config import AppConfig

log = logging.getLogger(__name__)


class StudyRejected(Exception):
    """The study cannot be analysed as sent (a person must look); it is ``ignored`` with this reason."""


class StudyError(Exception):
    """Analysis failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class PreparedStudy:
    claimed: ClaimedStudy
    frontal_ds: Dataset
    frontal_pixels: Any
    lateral_ds: Dataset | None
    lateral_pixels: Any
    views: dict[str, str]  # SOP Instance UID -> "frontal PA (ViewPosition)" etc., for the result
    frontal_view: ViewGuess
    lateral_view: ViewGuess | None
    timings_ms: dict[str, float] = field(default_factory=dict)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 1)


def _patient_key(ds: Dataset) -> tuple[str, str]:
    return (str(ds.get("PatientID", "")), str(ds.get("IssuerOfPatientID", "")))


class Pipeline:
    """The worker's :class:`~worker.loop.BatchProcessor`."""

    def __init__(self, cfg: AppConfig, queue: Queue, analyzer: Any) -> None:
        self.cfg = cfg
        self.queue = queue
        self.analyzer = analyzer
        self.worker_id = cfg.worker.name
        self.device = srmod.DeviceInfo(
            name=cfg.worker.name,
            version=__version__,
            ae_title=cfg.dicom.ae_title,
            manufacturer=cfg.worker.manufacturer,
        )
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
                raise StudyError(
                    f"instance {inst.sop_instance_uid} cannot be read: {exc}", retryable=False
                ) from exc
        patients = {_patient_key(ds) for ds in headers.values()}
        if len(patients) > 1:
            raise StudyRejected(
                f"the study's instances name {len(patients)} different patients; not analysed "
                f"(a report must never reach the wrong patient)"
            )
        guesses = {iid: view_from_headers(ds) for iid, ds in headers.items()}
        undecided = [iid for iid, g in guesses.items() if g.view is None]
        pixels: dict[int, Any] = {}
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
                "study %s: %d image(s) without view in the headers, classified from pixels in %.0f ms",
                study.id,
                len(undecided),
                _ms(t1),
            )
        cands = [
            Candidate.from_dataset(headers[iid], key=iid, guess=guesses[iid]) for iid in headers
        ]
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
        f_id = int(frontal.key)  # type: ignore[arg-type]
        l_id = int(lateral.key) if lateral is not None else None  # type: ignore[arg-type]
        for iid in (f_id, l_id):
            if iid is not None and iid not in pixels:
                pixels[iid] = self._decode(by_id[iid])
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

    def _decode(self, inst: InstanceRow) -> Any:
        try:
            return load_image(self._path(inst)).pixels
        except PixelDecodeError as exc:
            raise StudyError(str(exc), retryable=False) from exc

    # --- the batch ------------------------------------------------------------------------------

    def process(self, studies: Sequence[ClaimedStudy]) -> None:
        from models.api import StudyInput

        prepared: list[PreparedStudy] = []
        for s in studies:
            self._guarded(s, lambda s=s: prepared.append(self.prepare(s)))
        if prepared:
            t0 = time.perf_counter()
            inputs = [
                StudyInput(
                    key=str(p.claimed.id), frontal=p.frontal_pixels, lateral=p.lateral_pixels
                )
                for p in prepared
            ]
            try:
                outputs = self.analyzer.analyse(inputs)
            except Exception as exc:  # the whole batch failed (e.g. out of memory): each retries
                log.exception("model batch of %d failed", len(prepared))
                outputs = [exc] * len(prepared)
            per_study_ms = _ms(t0) / len(prepared)
            for p, out in zip(prepared, outputs, strict=True):
                p.timings_ms["models_batch_share"] = round(per_study_ms, 1)
                self._guarded(p.claimed, lambda p=p, out=out: self.finish(p, out))
        self.deliver_due()

    def _guarded(self, study: ClaimedStudy, fn: Callable[[], object]) -> None:
        """Run one study's step; whatever goes wrong is recorded for that study alone."""
        try:
            fn()
        except StudyRejected as exc:
            reason = str(exc)
            log.warning("study %s not analysed: %s", study.id, reason)
            self._finish_safely(lambda: self.queue.ignore(study.id, self.worker_id, reason))
        except StudyError as exc:
            error, retryable = str(exc), exc.retryable
            log.warning(
                "study %s failed (%s): %s",
                study.id,
                "will retry" if retryable else "permanent",
                error,
            )
            self._finish_safely(
                lambda: self.queue.fail(study.id, self.worker_id, error=error, retryable=retryable)
            )
        except LeaseLost:
            log.warning(
                "study %s: lease lost while working on it; another worker has it now", study.id
            )
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("study %s failed unexpectedly", study.id)
            self._finish_safely(
                lambda: self.queue.fail(study.id, self.worker_id, error=error, retryable=True)
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

    def finish(self, p: PreparedStudy, out: Any) -> None:
        if isinstance(out, Exception):
            raise StudyError(f"model inference failed: {type(out).__name__}: {out}", retryable=True)
        t0 = time.perf_counter()
        report_input = self.report_input(p, out)
        sr_ds = srmod.build_report(report_input)
        folder = self.out_root / p.claimed.study_uid
        folder.mkdir(parents=True, exist_ok=True)
        sr_path = srmod.write_report(sr_ds, folder / f"SR_{sr_ds.SOPInstanceUID}.dcm")
        files = [(str(sr_ds.SOPInstanceUID), str(sr_ds.SOPClassUID), sr_path)]
        key_png: Path | None = None
        wants_key = (
            any(d.send_key_image for d in self.cfg.destinations) or self.cfg.results_dir is not None
        )
        if wants_key:
            key_ds, key_png = self.key_image(p, out, folder, sr_ds)
            if key_ds is not None and key_png is not None:  # written beside its PNG
                files.append(
                    (
                        str(key_ds.SOPInstanceUID),
                        str(key_ds.SOPClassUID),
                        key_png.with_suffix(".dcm"),
                    )
                )
        p.timings_ms["report"] = _ms(t0)
        p.timings_ms.update({f"model_{k}": v for k, v in out.timings_ms.items()})
        payload = self.payload(p, out, sr_path, key_png)
        deliveries = []
        for d in self.cfg.destinations:
            for uid, cls, path in files:
                if cls == SecondaryCaptureImageStorage and not d.send_key_image:
                    continue
                deliveries.append((d.name, uid, cls, str(path)))
        self.queue.complete(
            p.claimed.id,
            self.worker_id,
            result_payload=payload,
            report_sop_instance_uid=str(sr_ds.SOPInstanceUID),
            report_path=str(sr_path),
            deliveries=deliveries,
        )
        m1 = out.model1
        log.info(
            "study %s done: Model 1 %s (p=%.3f), %d finding(s) present, lateral %s, report %s",
            p.claimed.id,
            "abnormal" if m1.present else "no finding",
            m1.probability,
            sum(f.present for f in out.model2),
            "used" if out.used_lateral else "absent",
            sr_ds.SOPInstanceUID,
        )

    def report_input(self, p: PreparedStudy, out: Any) -> srmod.ReportInput:
        infos = {m.name: m for m in out.models}

        def algo(kind: str) -> srmod.AlgorithmInfo | None:
            for m in out.models:
                if m.name.lower().startswith(kind):
                    return srmod.AlgorithmInfo(m.name, m.version, m.sha256, m.architecture)
            return None

        m1, m2, lm = algo("model1"), algo("model2"), algo("lung")
        if m1 is None or m2 is None:
            raise StudyError(
                f"analyzer did not identify Model 1 and Model 2 (got {sorted(infos)})",
                retryable=False,
            )
        previous = []
        if p.claimed.previous_report_uid:
            previous.append(
                srmod.PreviousReport(
                    study_instance_uid=p.claimed.study_uid,
                    series_instance_uid=srmod.report_series_uid(p.claimed.study_uid, self.device),
                    sop_instance_uid=p.claimed.previous_report_uid,
                )
            )
        q = out.lung_mask.quality
        c = out.lung_mask.crop
        return srmod.ReportInput(
            frontal=p.frontal_ds,
            lateral=p.lateral_ds,
            used_lateral=bool(out.used_lateral),
            model1=srmod.FindingResult(
                out.model1.label, float(out.model1.probability), float(out.model1.threshold)
            ),
            findings=[
                srmod.FindingResult(
                    f.label,
                    float(f.probability),
                    float(f.threshold),
                    bool(getattr(f, "threshold_validated", True)),
                )
                for f in out.model2
            ],
            model1_algorithm=m1,
            model2_algorithm=m2,
            lung_mask_algorithm=lm,
            crop=srmod.CropInfo(c.x0, c.y0, c.x1, c.y1),
            mask_quality=srmod.MaskQualityInfo(
                q.area_fraction, q.components, q.left_right_balance, q.ok, q.reason
            ),
            device=self.device,
            previous=previous,
            considered_instances=[i.sop_instance_uid for i in p.claimed.instances if i.eligible],
        )

    def key_image(
        self, p: PreparedStudy, out: Any, folder: Path, sr_ds: Dataset
    ) -> tuple[Dataset | None, Path | None]:
        from dicom_node import key_image as kimod

        return kimod.write_for_pipeline(
            frontal=p.frontal_ds,
            pixels=p.frontal_pixels,
            mask=out.lung_mask.mask,
            crop=(
                out.lung_mask.crop.x0,
                out.lung_mask.crop.y0,
                out.lung_mask.crop.x1,
                out.lung_mask.crop.y1,
            ),
            heatmaps=out.heatmaps,
            findings=[(f.label, f.probability, f.present) for f in out.model2],
            device=self.device,
            folder=folder,
            report_uid=str(sr_ds.SOPInstanceUID),
            model1=srmod.FindingResult(
                out.model1.label, float(out.model1.probability), float(out.model1.threshold)
            ),
        )

    def payload(
        self, p: PreparedStudy, out: Any, sr_path: Path, key_png: Path | None
    ) -> dict[str, Any]:
        q, c = out.lung_mask.quality, out.lung_mask.crop
        return {
            "frontal_sop_instance_uid": str(p.frontal_ds.SOPInstanceUID),
            "lateral_sop_instance_uid": str(p.lateral_ds.SOPInstanceUID)
            if p.lateral_ds is not None
            else None,
            "views": {
                "frontal": p.frontal_view.projection or "frontal",
                **({"lateral": (p.lateral_view.projection or "lateral")} if p.lateral_view else {}),
            },
            "view_sources": p.views,
            "used_lateral": bool(out.used_lateral),
            "model1": {
                "label": out.model1.label,
                "probability": float(out.model1.probability),
                "threshold": float(out.model1.threshold),
                "present": bool(out.model1.present),
            },
            "model2": [
                {
                    "label": f.label,
                    "probability": float(f.probability),
                    "threshold": float(f.threshold),
                    "present": bool(f.present),
                    "threshold_validated": bool(f.threshold_validated),
                }
                for f in out.model2
            ],
            "models": [
                {"name": m.name, "version": m.version, "sha256": m.sha256} for m in out.models
            ],
            "crop": {"x0": c.x0, "y0": c.y0, "x1": c.x1, "y1": c.y1},
            "mask_quality": {
                "area_fraction": float(q.area_fraction),
                "components": int(q.components),
                "left_right_balance": float(q.left_right_balance),
                "ok": bool(q.ok),
                "reason": q.reason,
            },
            "timings_ms": p.timings_ms,
            "report_path": str(sr_path),
            "key_image_png": str(key_png) if key_png else None,
        }

    def deliver_due(self) -> int:
        """Send every delivery that is due; returns how many were delivered."""
        from dicom_node.scu import send

        rows = self.queue.due_deliveries(limit=200)
        if not rows:
            return 0
        by_dest: dict[str, list] = {}
        for r in rows:
            by_dest.setdefault(r.destination, []).append(r)
        delivered = 0
        now = datetime.now(UTC)
        for name, group in by_dest.items():
            dest = next((d for d in self.cfg.destinations if d.name == name), None)
            if dest is None:
                for r in group:
                    self.queue.mark_delivery(
                        r.id,
                        delivered=False,
                        retry_at=None,
                        status=f"destination {name!r} is no longer in config.yaml",
                    )
                continue
            missing = [r for r in group if not Path(r.path).exists()]
            for r in missing:
                self.queue.mark_delivery(
                    r.id,
                    delivered=False,
                    retry_at=None,
                    status=f"report file {r.path} is missing; run 'cxr-worker requeue'",
                )
            group = [r for r in group if r not in missing]
            if not group:
                continue
            results = send(
                [Path(r.path) for r in group],
                dest,
                calling_ae=dest.calling_ae_title or self.cfg.dicom.ae_title,
            )
            by_uid = {res.sop_instance_uid: res for res in results}
            for r in group:
                res = by_uid.get(r.sop_instance_uid)
                if res is not None and res.delivered:
                    self.queue.mark_delivery(r.id, delivered=True, status=res.status, retry_at=None)
                    delivered += 1
                    continue
                status = res.status if res is not None else "not sent"
                retryable = res.retryable if res is not None else True
                delay = decide(
                    "network" if retryable else "rejected",
                    r.attempts + 1,
                    max_attempts=self.cfg.scheduler.delivery_max_attempts,
                )
                retry_at = now + timedelta(seconds=delay) if delay is not None else None
                self.queue.mark_delivery(r.id, delivered=False, status=status, retry_at=retry_at)
                log.warning(
                    "delivery of %s to %s: %s (%s)",
                    r.sop_instance_uid,
                    name,
                    status,
                    f"retry in {delay:.0f} s" if delay is not None else "giving up",
                )
        return delivered
