"""The one translation of a study's analysis into its outputs.

:class:`StudyResult` holds what the pipeline prepared (headers, pixels, views) and what the models
said (:class:`models.api.StudyAnalysis`). Every output is derived from it here and nowhere else:
the Structured Report's input, the key image's input, the stored result row and the deliveries.
The SR and the key image therefore read the same findings, thresholds and crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from db.queue import ClaimedStudy
from db.records import NewDelivery
from dicom_node import sr as srmod
from dicom_node.config import DestinationConfig
from dicom_node.key_image import HeatmapInfo, KeyImageInput
from dicom_node.views import ViewGuess
from models.api import Finding, LineSegment, ModelInfo, ModelKind, StudyAnalysis


class MissingModel(ValueError):
    """The analysis does not name a model the report must identify (Model 1 or Model 2)."""


@dataclass
class PreparedStudy:
    """A claimed study read from storage: the chosen frontal (and lateral) with pixels."""

    claimed: ClaimedStudy
    frontal_ds: Dataset
    frontal_pixels: np.ndarray
    lateral_ds: Dataset | None
    lateral_pixels: np.ndarray | None
    views: dict[str, str]  # SOP Instance UID -> "frontal PA (ViewPosition)" etc., for the result
    frontal_view: ViewGuess
    lateral_view: ViewGuess | None
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputFile:
    """A DICOM object written for the study, to be delivered."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path


def algorithm_info(model: ModelInfo) -> srmod.AlgorithmInfo:
    return srmod.AlgorithmInfo(model.name, model.version, model.sha256, model.architecture)


def finding_result(finding: Finding) -> srmod.FindingResult:
    return srmod.FindingResult(
        finding.label,
        float(finding.probability),
        float(finding.threshold),
        bool(finding.threshold_validated),
    )


@dataclass
class StudyResult:
    """A prepared study and its analysis, with the worker's identity as the report's device."""

    prepared: PreparedStudy
    analysis: StudyAnalysis
    device: srmod.DeviceInfo

    def _model(self, kind: ModelKind) -> ModelInfo | None:
        return next((m for m in self.analysis.models if m.kind == kind), None)

    @property
    def model1(self) -> srmod.FindingResult:
        return finding_result(self.analysis.model1)

    @property
    def findings(self) -> list[srmod.FindingResult]:
        return [finding_result(f) for f in self.analysis.model2]

    @property
    def crop(self) -> srmod.CropInfo:
        c = self.analysis.lung_mask.crop
        return srmod.CropInfo(c.x0, c.y0, c.x1, c.y1)

    @property
    def mask_quality(self) -> srmod.MaskQualityInfo:
        q = self.analysis.lung_mask.quality
        return srmod.MaskQualityInfo(
            q.area_fraction, q.components, q.left_right_balance, q.ok, q.reason, q.rule
        )

    @cached_property
    def heatmaps(self) -> dict[str, HeatmapInfo]:
        """The Grad-CAM maps as the key image takes them: still uint8 at the model's resolution,
        with the box of the frontal image each covers."""
        out = {}
        for label, heat in self.analysis.heatmaps.items():
            b = heat.box
            out[label] = HeatmapInfo(heat.values, srmod.CropInfo(b.x0, b.y0, b.x1, b.y1))
        return out

    @cached_property
    def regions(self) -> dict[str, srmod.CropInfo]:
        """Where each Present finding is marked: the box around its heat map's hot area (one
        definition, :meth:`dicom_node.key_image.HeatmapInfo.hot_region`, for the report and the
        key image)."""
        shape = self.prepared.frontal_pixels.shape[:2]
        out = {}
        for f in self.analysis.model2:
            heat = self.heatmaps.get(f.label)
            if f.present and heat is not None:
                box = heat.hot_region((int(shape[0]), int(shape[1])))
                if box is not None:
                    out[f.label] = box
        return out

    @property
    def ctr(self) -> srmod.CtrInfo | None:
        c = self.analysis.ctr
        if c is None:
            return None

        def line(seg: LineSegment) -> srmod.LineInfo:
            return srmod.LineInfo(float(seg.x0), float(seg.y0), float(seg.x1), float(seg.y1))

        return srmod.CtrInfo(
            float(c.ratio), line(c.cardiac), line(c.thoracic), bool(c.interpretable), c.reason
        )

    def report_input(self) -> srmod.ReportInput:
        """The Structured Report's input; raises :class:`MissingModel` without Model 1 and 2."""
        p, out = self.prepared, self.analysis
        m1, m2 = self._model(ModelKind.MODEL1), self._model(ModelKind.MODEL2)
        if m1 is None or m2 is None:
            got = sorted(f"{m.name} ({m.kind})" for m in out.models)
            raise MissingModel(f"analyzer did not identify Model 1 and Model 2 (got {got})")
        lung = self._model(ModelKind.LUNG_MASK)
        previous = []
        if p.claimed.previous_report_uid:
            previous.append(
                srmod.PreviousReport(
                    study_instance_uid=p.claimed.study_uid,
                    series_instance_uid=srmod.report_series_uid(p.claimed.study_uid, self.device),
                    sop_instance_uid=p.claimed.previous_report_uid,
                )
            )
        inp = srmod.ReportInput(
            frontal=p.frontal_ds,
            lateral=p.lateral_ds,
            used_lateral=bool(out.used_lateral),
            model1=self.model1,
            findings=self.findings,
            model1_algorithm=algorithm_info(m1),
            model2_algorithm=algorithm_info(m2),
            lung_mask_algorithm=algorithm_info(lung) if lung is not None else None,
            crop=self.crop,
            mask_quality=self.mask_quality,
            regions=self.regions,
            ctr=self.ctr,
            device=self.device,
            previous=previous,
            considered_instances=[i.sop_instance_uid for i in p.claimed.instances if i.eligible],
        )
        return _numbered(inp, p.claimed)

    def key_image_input(self, report_uid: str, instance_number: int = 1) -> KeyImageInput:
        """The key image's input: the same findings, thresholds, regions, crop, QC and
        cardiothoracic ratio as the report ``report_uid`` (numbered like it)."""
        out = self.analysis
        return KeyImageInput(
            frontal=self.prepared.frontal_ds,
            image=self.prepared.frontal_pixels,
            model1=self.model1,
            findings=self.findings,
            report_uid=report_uid,
            lung_mask=out.lung_mask.mask,
            crop=self.crop,
            heatmaps=dict(self.heatmaps),
            regions=self.regions,
            mask_quality=self.mask_quality,
            ctr=self.ctr,
            device=self.device,
            instance_number=instance_number,
        )

    def payload(self, report_path: Path, key_png: Path | None) -> dict[str, Any]:
        """The stored result row (JSON): what was analysed, what the models said, where it went."""
        p, out = self.prepared, self.analysis
        q, c = out.lung_mask.quality, out.lung_mask.crop
        views = {"frontal": p.frontal_view.projection or "frontal"}
        if p.lateral_view:
            views["lateral"] = p.lateral_view.projection or "lateral"
        return {
            "frontal_sop_instance_uid": str(p.frontal_ds.SOPInstanceUID),
            "lateral_sop_instance_uid": (
                str(p.lateral_ds.SOPInstanceUID) if p.lateral_ds is not None else None
            ),
            "views": views,
            "view_sources": p.views,
            "used_lateral": bool(out.used_lateral),
            "model1": _finding_json(out.model1, validated=False),
            "model2": [_finding_json(f, validated=True) for f in out.model2],
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
                "rule": q.rule,
            },
            "ctr": _ctr_json(self.ctr),
            "regions": {k: [b.x0, b.y0, b.x1, b.y1] for k, b in self.regions.items()},
            "timings_ms": p.timings_ms,
            "report_path": str(report_path),
            "key_image_png": str(key_png) if key_png else None,
        }


def _numbered(inp: srmod.ReportInput, claimed: ClaimedStudy) -> srmod.ReportInput:
    """``inp`` with its place in the study's reports (InstanceNumber) and, when it replaces one,
    why (from the queue: e.g. "a late lateral (LL) arrived after report 1"). The same images and
    models give the same report UID (see :func:`dicom_node.sr.build_report`): that report keeps
    its number and replaces nothing."""
    uid = srmod.report_uid([*inp.sources, *inp.considered_instances], inp.algorithms)
    earlier = list(claimed.earlier_reports)
    if uid in earlier:
        return replace(inp, instance_number=earlier.index(uid) + 1, supersedes_reason="")
    return replace(
        inp, instance_number=len(earlier) + 1, supersedes_reason=claimed.reanalysis_reason
    )


def _ctr_json(ctr: srmod.CtrInfo | None) -> dict[str, Any] | None:
    if ctr is None:
        return None
    return {
        "ratio": float(ctr.ratio),
        "interpretable": bool(ctr.interpretable),
        "reason": ctr.reason,
        "cardiac": [ctr.cardiac.x0, ctr.cardiac.y0, ctr.cardiac.x1, ctr.cardiac.y1],
        "thoracic": [ctr.thoracic.x0, ctr.thoracic.y0, ctr.thoracic.x1, ctr.thoracic.y1],
    }


def _finding_json(f: Finding, *, validated: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": f.label,
        "probability": float(f.probability),
        "threshold": float(f.threshold),
        "present": bool(f.present),
    }
    if validated:
        row["threshold_validated"] = bool(f.threshold_validated)
    return row


def deliveries(
    files: Sequence[OutputFile], destinations: Sequence[DestinationConfig]
) -> list[NewDelivery]:
    """One delivery per (destination, file); key images only where the destination wants them."""
    rows = []
    for d in destinations:
        for f in files:
            if f.sop_class_uid == SecondaryCaptureImageStorage and not d.send_key_image:
                continue
            rows.append(NewDelivery(d.name, f.sop_instance_uid, f.sop_class_uid, str(f.path)))
    return rows
