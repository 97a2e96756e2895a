"""The models' single entry point for the worker: lung mask -> crop -> Model 1 + Model 2 ->
Grad-CAM.

``Analyzer.analyse`` takes a batch of studies and returns, in the same order, a
:class:`models.api.StudyAnalysis` or the exception that stopped that one study: a bad image in one
study never fails the others. Batched steps that fail as a whole are retried study by study so
the failure is attributed to the study that caused it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import numpy as np

from models.api import (
    CropBox,
    Finding,
    Heatmap,
    LungMaskResult,
    ModelInfo,
    ModelKind,
    StudyAnalysis,
    StudyAnalyzer,
    StudyInput,
    ViewPrediction,
)
from models.classifiers import NO_FINDING, Classifier, DerivedModel1, load_model1, validate_image
from models.common import select_device
from models.config import ModelsConfig
from models.ctr import measure as measure_ctr
from models.labels import MODEL1_LABELS
from models.registry import ModelCard
from models.view_classifier import ViewClassifier

log = logging.getLogger(__name__)

T = TypeVar("T")

#: studies whose Grad-CAM maps are computed in one batched call (one forward pass for them all
#: and one backward pass per distinct Present label)
GRADCAM_BATCH = 32


class ClassifierLike(Protocol):
    card: ModelCard
    uses_lateral: bool

    def predict(
        self, frontals: list[np.ndarray], laterals: list[np.ndarray | None]
    ) -> np.ndarray: ...

    def heatmaps(
        self, frontal: np.ndarray, lateral: np.ndarray | None, labels: list[str]
    ) -> dict[str, np.ndarray]:
        """Grad-CAM maps for ``labels``: uint8 (rows, cols) at the network's input resolution."""
        ...


class MaskerLike(Protocol):
    card: ModelCard

    def predict(self, images: list[np.ndarray], *, margin: float) -> list[LungMaskResult]: ...


@dataclass
class _Work:
    index: int
    study: StudyInput
    frontal: np.ndarray
    lateral: np.ndarray | None
    timings: dict[str, float]
    mask: LungMaskResult | None = None
    crop: np.ndarray | None = None


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 1)


class Analyzer(StudyAnalyzer):
    """All models, loaded once; see the module docstring. Implements :class:`StudyAnalyzer`."""

    def __init__(
        self,
        masker: MaskerLike,
        model1: ClassifierLike,
        model2: ClassifierLike,
        view: ViewClassifier | None,
        *,
        margin: float = 0.05,
        heatmap_exclude: Sequence[str] = ("No Finding",),
    ) -> None:
        if model1.card.labels != list(MODEL1_LABELS):
            raise ValueError(
                f"Model 1 card {model1.card.name} must have the single label 'Abnormal', "
                f"has {model1.card.labels}"
            )
        self.masker = masker
        self.model1 = model1
        self.model2 = model2
        self.view = view
        self.margin = margin
        self.heatmap_exclude = set(heatmap_exclude)

    @classmethod
    def from_config(cls, cfg: ModelsConfig, device: str = "auto") -> Analyzer:
        """Load every card ``cfg`` names (SHA-256 checked); with ``torchxrayvision_checkpoint`` set,
        that checkpoint is Model 2. Raises :class:`models.registry.ModelLoadError` naming the
        file."""
        from models.lung_mask import LungMasker

        dev = select_device(device)
        masker = LungMasker.from_card(cfg.resolve(cfg.lung_mask), dev)
        model2: ClassifierLike
        if cfg.torchxrayvision_checkpoint is not None:
            from models.xrv_adapter import XrvClassifier

            model2 = XrvClassifier.from_checkpoint(cfg.torchxrayvision_checkpoint, dev)
        else:
            model2 = Classifier.from_card(cfg.resolve(cfg.model2), dev)
        model1: ClassifierLike = load_model1(cfg.resolve(cfg.model1), model2, dev)
        view = ViewClassifier.from_card(cfg.resolve(cfg.view_classifier), dev)
        log.info(
            "models loaded on %s: %s",
            dev,
            ", ".join(
                f"{m.name} {m.version}" for m in [masker.card, model1.card, model2.card, view.card]
            ),
        )
        for m in (masker, model2, view):  # models.inference: CUDA batch, channels-last, compile
            accelerate = getattr(m, "accelerate", None)
            if accelerate is not None:
                accelerate(cfg.inference)
        return cls(masker, model1, model2, view, margin=cfg.crop_margin_fraction)

    def model_infos(self) -> list[ModelInfo]:
        """Every loaded model's identity, its kind taken from the slot its card sits in."""
        slots = [
            (ModelKind.LUNG_MASK, self.masker.card),
            (ModelKind.MODEL1, self.model1.card),
            (ModelKind.MODEL2, self.model2.card),
        ]
        if self.view is not None:
            slots.append((ModelKind.VIEW, self.view.card))
        return [card.info(kind) for kind, card in slots]

    def classify_views(self, images: Sequence[np.ndarray]) -> list[ViewPrediction]:
        """Frontal or lateral for each image. Raises ValueError naming the first invalid image."""
        if self.view is None:
            raise RuntimeError(
                "no view classifier is loaded: set models.view_classifier in config.yaml"
            )
        return self.view.predict(list(images))

    # --- analysis -----------------------------------------------------------------------------

    def analyse(self, studies: Sequence[StudyInput]) -> list[StudyAnalysis | Exception]:
        """One result per study, in order: its analysis or the exception that stopped it."""
        results, work, probs = self._classify(studies)
        fail = _recorder(results)

        # 3. findings; Grad-CAM for Model 2's positive findings, for the batch at once
        found: dict[int, tuple[Finding, list[Finding]]] = {}
        positives: dict[int, list[str]] = {}
        for w in work:
            try:
                model1, model2 = self._findings(probs["model1"][id(w)], probs["model2"][id(w)])
            except Exception as exc:  # noqa: BLE001
                fail(w, exc)
                continue
            found[id(w)] = (model1, model2)
            positives[id(w)] = [
                f.label for f in model2 if f.present and f.label not in self.heatmap_exclude
            ]
        work = [w for w in work if id(w) in found]
        with_maps = [w for w in work if positives[id(w)]]
        maps: dict[int, dict[str, Heatmap]] = {}
        for at in range(0, len(with_maps), GRADCAM_BATCH):
            chunk = with_maps[at : at + GRADCAM_BATCH]
            maps.update(self._batched(chunk, partial(self._heatmaps, positives), fail))
        for w in work:
            if results[w.index] is not None:  # its Grad-CAM failed
                continue
            try:
                results[w.index] = self._finish(w, *found[id(w)], maps.get(id(w), {}))
            except Exception as exc:  # noqa: BLE001
                fail(w, exc)
        return [r if r is not None else RuntimeError("study was not analysed") for r in results]

    def findings(
        self, studies: Sequence[StudyInput]
    ) -> list[tuple[Finding, list[Finding]] | Exception]:
        """Model 1's and Model 2's findings per study (reconciled, as :meth:`analyse` reports
        them) without Grad-CAM: the path ``cxr-worker evaluate`` scores, so evaluation and
        serving share decoding, lung mask, crop, resize, normalisation and calibration."""
        results, work, probs = self._classify(studies)
        out: list[tuple[Finding, list[Finding]] | Exception] = []
        done = {w.index: w for w in work}
        for i, r in enumerate(results):
            if i in done:
                w = done[i]
                out.append(self._findings(probs["model1"][id(w)], probs["model2"][id(w)]))
            else:
                out.append(r if isinstance(r, Exception) else RuntimeError("not analysed"))
        return out

    def _classify(
        self, studies: Sequence[StudyInput]
    ) -> tuple[
        list[StudyAnalysis | Exception | None], list[_Work], dict[str, dict[int, np.ndarray]]
    ]:
        """Steps 1-2: validate, lung mask + crop, Model 2 and Model 1 probabilities."""
        results: list[StudyAnalysis | Exception | None] = [None] * len(studies)
        work: list[_Work] = []
        for i, s in enumerate(studies):
            try:
                frontal = validate_image(s.frontal, f"study {s.key}: frontal image")
                lateral = (
                    validate_image(s.lateral, f"study {s.key}: lateral image")
                    if s.lateral is not None
                    else None
                )
                work.append(_Work(i, s, frontal, lateral, {}))
            except Exception as exc:  # noqa: BLE001 - reported for this study only
                results[i] = exc

        fail = _recorder(results)

        # 1. lung mask + crop of every frontal
        t0 = time.perf_counter()
        masks = self._batched(
            work, lambda ws: self.masker.predict([w.frontal for w in ws], margin=self.margin), fail
        )
        ms = _ms(t0) / max(len(work), 1)
        work = [w for w in work if results[w.index] is None]
        for w in work:
            m = masks[id(w)]
            w.mask = m
            c = m.crop
            w.crop = w.frontal[c.y0 : c.y1, c.x0 : c.x1]
            w.timings["lung_mask"] = round(ms, 1)
        work = [w for w in work if self._check_crop(w, fail)]

        # 2. Model 2 and Model 1 on the batch (a Model 1 derived from this Model 2 is computed
        # from Model 2's probabilities: one network, one decision)
        probs: dict[str, dict[int, np.ndarray]] = {}
        for name, model in (("model2", self.model2), ("model1", self.model1)):
            t0 = time.perf_counter()
            if isinstance(model, DerivedModel1) and model.source is self.model2:
                m2 = probs["model2"]
                out = {k: model.from_model2(v[None])[0] for k, v in m2.items()}
            else:
                out = self._batched(work, partial(self._predict, model), fail)
            ms = _ms(t0) / max(len(work), 1)
            probs[name] = out
            work = [w for w in work if results[w.index] is None]
            for w in work:
                w.timings[name] = round(ms, 1)
        return results, work, probs

    def _predict(self, model: ClassifierLike, ws: list[_Work]) -> list[np.ndarray]:
        """One model's probabilities for a batch, one row per study."""
        return list(
            model.predict(
                [self._input(model, w)[0] for w in ws],
                [w.lateral if model.uses_lateral else None for w in ws],
            )
        )

    @staticmethod
    def _input(model: ClassifierLike, w: _Work) -> tuple[np.ndarray, CropBox]:
        """The frontal image a model takes and where it sits in the original frame: the lung crop,
        unless the model's card says it was trained on full images (``input_crop``)."""
        assert w.crop is not None and w.mask is not None
        if str(model.card.hyperparameters.get("input_crop", "lungs")).startswith("full"):
            h, wd = w.frontal.shape
            return w.frontal, CropBox(0, 0, wd, h)
        return w.crop, w.mask.crop

    def _check_crop(self, w: _Work, fail: Callable[[_Work, Exception], None]) -> bool:
        assert w.crop is not None
        if w.crop.size == 0 or min(w.crop.shape) < 2:
            fail(
                w,
                ValueError(
                    f"study {w.study.key}: lung crop {w.mask.crop if w.mask else None} is empty"
                ),
            )
            return False
        return True

    def _batched(
        self,
        work: list[_Work],
        fn: Callable[[list[_Work]], Sequence[T]],
        fail: Callable[[_Work, Exception], None],
    ) -> dict[int, T]:
        """Run ``fn`` on the whole batch; if it raises, run it per study to find the culprit."""
        if not work:
            return {}
        try:
            out = fn(work)
            if len(out) != len(work):
                raise RuntimeError(f"{len(out)} results for {len(work)} studies")
            return {id(w): o for w, o in zip(work, out, strict=True)}
        except Exception as exc:  # noqa: BLE001
            if len(work) == 1:
                fail(work[0], exc)
                return {}
            log.warning(
                "batched step failed for %d studies (%s); retrying one by one", len(work), exc
            )
        res: dict[int, T] = {}
        for w in work:
            try:
                res[id(w)] = fn([w])[0]
            except Exception as exc:  # noqa: BLE001
                fail(w, exc)
        return res

    def _findings(self, p1: np.ndarray, p2: np.ndarray) -> tuple[Finding, list[Finding]]:
        c1 = self.model1.card
        model1 = Finding(
            label=c1.labels[0], probability=float(p1[0]), threshold=c1.threshold(c1.labels[0])
        )
        c2 = self.model2.card
        # a card may list outputs whose threshold no held-out data could set: they are still
        # reported (the probability is real), flagged so the report says the threshold is a default
        unvalidated = set(c2.hyperparameters.get("unvalidated_thresholds", []))
        model2 = [
            Finding(
                label=lab,
                probability=float(p),
                threshold=c2.threshold(lab),
                threshold_validated=lab not in unvalidated,
            )
            for lab, p in zip(c2.labels, p2, strict=True)
        ]
        return reconcile(model1, model2)

    def _heatmaps(
        self, positives: dict[int, list[str]], ws: list[_Work]
    ) -> list[dict[str, Heatmap]]:
        """Grad-CAM maps of each study's Present findings, for a batch of studies: one batched
        call where Model 2 has ``heatmaps_batch`` (:class:`~models.classifiers.Classifier`),
        else one call per study. Maps stay at the model's resolution, placed by the crop box:
        never copied into the full frame."""
        t0 = time.perf_counter()
        inputs = [self._input(self.model2, w) for w in ws]
        laterals = [w.lateral if self.model2.uses_lateral else None for w in ws]
        labels = [positives[id(w)] for w in ws]
        batch = getattr(self.model2, "heatmaps_batch", None)
        if callable(batch):
            cams = batch([img for img, _ in inputs], laterals, labels)
        else:
            cams = [
                self.model2.heatmaps(img, lat, labs)
                for (img, _), lat, labs in zip(inputs, laterals, labels, strict=True)
            ]
        ms = _ms(t0) / len(ws)
        for w in ws:
            w.timings["gradcam"] = ms
        return [
            {lab: Heatmap(cam, box) for lab, cam in c.items()}
            for c, (_, box) in zip(cams, inputs, strict=True)
        ]

    def _finish(
        self, w: _Work, model1: Finding, model2: list[Finding], heatmaps: dict[str, Heatmap]
    ) -> StudyAnalysis:
        assert w.mask is not None and w.crop is not None
        return StudyAnalysis(
            key=w.study.key,
            lung_mask=w.mask,
            model1=model1,
            model2=model2,
            models=self.model_infos(),
            used_lateral=bool(
                w.lateral is not None and (self.model1.uses_lateral or self.model2.uses_lateral)
            ),
            heatmaps=heatmaps,
            timings_ms=dict(w.timings),
            ctr=measure_ctr(w.mask, w.study.projection),
        )


def _recorder(
    results: list[StudyAnalysis | Exception | None],
) -> Callable[[_Work, Exception], None]:
    """``fail(w, exc)``: log that study ``w``'s analysis failed (its key and the exception) and
    record the exception as its result."""

    def fail(w: _Work, exc: Exception) -> None:
        log.warning("study %s: analysis failed: %s: %s", w.study.key, type(exc).__name__, exc)
        results[w.index] = exc

    return fail


def reconcile(model1: Finding, model2: list[Finding]) -> tuple[Finding, list[Finding]]:
    """Model 1 and Model 2's "No Finding" are one decision (the consistency rule).

    Model 2's "No Finding" is reported as the complement of Model 1: probability
    1 - P(Abnormal), threshold 1 - t(Abnormal), and it is Present exactly when Model 1 is not
    Abnormal (at the boundary the No Finding threshold is moved by one float step so that the two
    never both hold or both fail). With the shipped cards Model 1 *is* 1 - P(No Finding) of
    Model 2 (:class:`models.classifiers.DerivedModel1`), so this only settles rounding; with a
    separately trained Model 1 it makes Model 1 the authority. A Model 2 without "No Finding" is
    returned unchanged."""
    labels = [f.label for f in model2]
    if NO_FINDING not in labels:
        return model1, model2
    p = float(np.float32(1.0) - np.float32(model1.probability))
    t = float(np.float32(1.0) - np.float32(model1.threshold))
    normal = not model1.present
    if (p >= t) != normal:
        t = float(np.nextafter(np.float32(p), np.float32(-1 if normal else 2)))
    j = labels.index(NO_FINDING)
    nf = Finding(
        label=NO_FINDING,
        probability=p,
        threshold=t,
        threshold_validated=model2[j].threshold_validated and model1.threshold_validated,
    )
    assert nf.present == normal
    return model1, [*model2[:j], nf, *model2[j + 1 :]]
