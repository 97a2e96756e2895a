"""Reports at template speed: highdicom builds each report *shape* once, each study fills it.

A full :func:`dicom_node.sr.build_report` costs ~140 ms of CPU. Between studies only *values* vary
(copied attributes, UIDs, probabilities, boxes, lines, summary text, dates); the structure is fixed
by a **shape key** (:func:`shape_key`; never a patient's value). For a shape seen a second time
:class:`ReportTemplates` builds two **probes** whose variable values are distinct sentinels; each
leaf that differs between them is a **slot**, named by matching :func:`slot_values` (which also
fills it); the rest is encoded once (undefined-length sequences, so a slot's length changes no
parent). The template is **checked** before use: filled with the study's own input it must equal
highdicom's report element by element (:func:`diff`), else the shape is always built in full.
On purpose different from a full build: ContributionDateTime and, without ``content_datetime``,
the content/series/creation dates and times (the clock).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import DS, validate_value

from dicom_node import sr as srmod
from dicom_node.derived import (
    CropInfo,
    CtrInfo,
    FindingResult,
    LineInfo,
    MaskQualityInfo,
    atomic_write,
    check_same_patient_and_study,
    deterministic_uid,
    report_series_uid,
    report_uid,
    source_header,
)
from dicom_node.sr_content import _spacing_mm, comment_lines, summary_lines

log = logging.getLogger(__name__)

#: a probe's value replaces a source's value of these VRs (single-valued, non-empty, valid)
_PERTURBED_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "DA", "TM", "DT", "UI", "IS", "AS"})
#: these steer highdicom's structure; their values are part of the shape key
_STRUCTURAL = frozenset(
    {
        "SOPClassUID",
        "SpecificCharacterSet",
        "Modality",
        "PatientOrientation",
        "ImagerPixelSpacing",
        "PixelSpacing",
        "Rows",
        "Columns",
    }
)
#: must agree between frontal and lateral (:func:`check_same_patient_and_study`)
_SHARED = frozenset({"PatientID", "IssuerOfPatientID", "StudyInstanceUID"})
_CLOCK = "ContributionDateTime"
_CLOCK_TAG = str(Tag(_CLOCK))

Path_ = tuple[int | str, ...]  # tag ints and item indices from the root to a leaf
Name = tuple[object, ...]


class NotTemplatable(Exception):
    """This shape's probes did not line up; its reports are built in full."""


@dataclass(frozen=True)
class RenderedReport:
    """A report as its Part 10 bytes, with what the caller needs to file and send it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    instance_number: int
    data: bytes

    def write(self, path: str | Path) -> Path:
        """Write the file atomically (a reader never sees half a file)."""
        return atomic_write(self.data, path)

    def dataset(self) -> Dataset:
        """The report read back (tests and callers that need the tree)."""
        return pydicom.dcmread(BytesIO(self.data))


# --- the shape ----------------------------------------------------------------------------------


def _valid(elem: DataElement) -> bool:
    values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
    try:
        for v in values:
            if isinstance(v, str | bytes):
                validate_value(elem.VR, v, pydicom_config.RAISE)
    except ValueError:
        return False
    return True


def _perturbable(elem: DataElement) -> bool:
    return (
        elem.VR in _PERTURBED_VRS
        and elem.keyword not in _STRUCTURAL
        and elem.VM == 1
        and elem.value not in (None, "")
        and _valid(elem)
    )


def _header_key(ds: Dataset) -> tuple[Hashable, ...]:
    out: list[Hashable] = []
    for elem in ds:
        if elem.tag.group == 0x7FE0 or elem.keyword == "PixelData":
            continue
        if elem.VR == "SQ":
            out.append((int(elem.tag), "SQ", repr(elem.value)))
        elif _perturbable(elem):
            out.append((int(elem.tag), elem.VR))
        else:
            out.append((int(elem.tag), elem.VR, repr(elem.value)))
    return tuple(out)


def _replaced(inp: srmod.ReportInput) -> tuple[str, list[Dataset]]:
    sop_uid = report_uid([*inp.sources, *inp.considered_instances], inp.algorithms)
    study_uid = str(inp.frontal.StudyInstanceUID)
    return sop_uid, srmod._previous(inp.previous, study_uid, sop_uid)


def shape_key(inp: srmod.ReportInput) -> tuple[Hashable, ...]:
    """What fixes the report's structure (see the module docstring); no patient value."""
    _, previous = _replaced(inp)
    crop = inp.crop
    q, ctr = inp.mask_quality, inp.ctr
    return (
        inp.device,
        tuple(inp.algorithms),
        inp.lung_mask_algorithm is None,
        inp.model1.present,
        tuple((f.label, f.present, f.threshold_validated) for f in inp.findings),
        None if crop is None else (crop.x1 > crop.x0 and crop.y1 > crop.y0),
        None if q is None else (q.ok, bool(q.rule or q.reason)),
        None if ctr is None else (ctr.shown, _spacing_mm(inp.frontal) is not None),
        inp.used_lateral,
        len(previous),
        bool(inp.supersedes_reason),
        inp.content_datetime is None,
        tuple(_header_key(ds) for ds in inp.sources),
        tuple(sorted(_shared(inp))),
    )


# --- the values of the slots --------------------------------------------------------------------


def _box(box: CropInfo) -> tuple[float, ...]:
    x0, y0, x1, y1 = (float(v) for v in (box.x0, box.y0, box.x1, box.y1))
    return (x0, y0, x1, y0, x1, y1, x0, y1, x0, y0)


def _line(line: LineInfo) -> tuple[float, ...]:
    return (float(line.x0), float(line.y0), float(line.x1), float(line.y1))


def _width(line: LineInfo, frontal: Dataset) -> float:
    mm = _spacing_mm(frontal)
    return round(line.length * mm, 2) if mm else round(line.length, 2)


def slot_values(inp: srmod.ReportInput, now: _dt.datetime) -> dict[Name, object]:
    """Every value a slot may take, by name, computed as the content builders compute it."""
    sop_uid, previous = _replaced(inp)
    out: dict[Name, object] = {
        ("sop",): sop_uid,
        ("series",): report_series_uid(str(inp.frontal.StudyInstanceUID), inp.device),
        ("inum",): inp.instance_number,
        ("snum",): inp.series_number,
    }
    when = inp.content_datetime or now
    out[("date",)] = when.strftime("%Y%m%d")
    out[("time",)] = when.strftime("%H%M%S")
    for i, line in enumerate(summary_lines(inp, [str(p.SOPInstanceUID) for p in previous])):
        out[("sum", i)] = line
    for i, line in enumerate(comment_lines(inp)):
        out[("com", i)] = line[:1024]
    q = inp.mask_quality
    if q is not None:
        out[("qa",)] = round(float(q.area_fraction), 6)
        out[("qb",)] = round(float(q.left_right_balance), 6)
        out[("qc",)] = int(q.components)
        if not q.ok:
            out[("qrule",)] = q.state[len("REJECTED (") : -1]
    for f in [inp.model1, *inp.findings]:
        out[("p", f.label)] = round(float(f.probability), 6)
        out[("t", f.label)] = round(float(f.threshold), 6)
        if f is inp.model1:
            out[("box", f.label)] = _box(inp.lung_box)
        elif f.present:
            out[("box", f.label)] = _box(inp.region(f.label))
        out[("trk", f.label)] = deterministic_uid(sop_uid, "tracking", f.label)
    out[("trk", "ctr")] = deterministic_uid(sop_uid, "tracking", "ctr")
    ctr = inp.ctr
    if ctr is not None:
        out[("ctr",)] = round(float(ctr.ratio), 4)
        out[("cw",)] = _width(ctr.cardiac, inp.frontal)
        out[("tw",)] = _width(ctr.thoracic, inp.frontal)
        out[("cl",)] = _line(ctr.cardiac)
        out[("tl",)] = _line(ctr.thoracic)
    for s, ds in enumerate(inp.sources):
        for elem in source_header(ds):
            if elem.VR != "SQ":
                out[("hdr", s, elem.keyword or int(elem.tag))] = elem.value
    for i, p in enumerate(previous):
        # its StudyInstanceUID is the frontal's (checked by _previous): one source, ("hdr", ...)
        for kw in ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            out[("prev", i, kw)] = str(p.get(kw))
    return out


def _norm(value: object) -> Hashable:
    if isinstance(value, MultiValue | list | tuple | np.ndarray):
        return tuple(_norm(v) for v in value)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", float(value))
    return ("s", str(value))


# --- probes -------------------------------------------------------------------------------------


def _sentinel(vr: str, k: int, i: int) -> object:
    n = 1000 * k + i
    if vr == "PN":
        return f"Probe{k}^N{i}"
    if vr == "DA":
        return (_dt.date(1901, 1, 1) + _dt.timedelta(days=n)).strftime("%Y%m%d")
    if vr == "TM":
        return f"{k:02d}{i % 60:02d}{(i // 60) % 60:02d}"
    if vr == "DT":
        return (_dt.date(1901, 1, 1) + _dt.timedelta(days=n)).strftime("%Y%m%d") + "101010"
    if vr == "UI":
        return deterministic_uid("probe", str(k), str(i))
    if vr == "IS":
        return str(n)
    if vr == "AS":
        return f"{n % 1000:03d}D"
    return f"P{k}V{i}"


def _shared(inp: srmod.ReportInput) -> frozenset[str]:
    """The perturbable attributes whose values the frontal and lateral share (same study,
    patient, maybe series): their probes share a sentinel, so the tree keeps its grouping."""
    if inp.lateral is None:
        return frozenset()
    lat = inp.lateral
    return frozenset(
        e.keyword
        for e in inp.frontal
        if e.keyword and e.keyword in lat and _perturbable(e) and lat[e.tag].value == e.value
    ) | (_SHARED & {e.keyword for e in inp.frontal})


def _probe_header(ds: Dataset, k: int, s: int, shared: frozenset[str]) -> Dataset:
    out = source_header(ds)
    for i, elem in enumerate(list(out)):
        if elem.VR == "SQ" or not _perturbable(elem):
            continue
        idx = 50_000 + int(elem.tag) % 10_000 if elem.keyword in shared else 100 * s + i
        elem.value = _sentinel(elem.VR, k, idx)
    return out


def _probe(inp: srmod.ReportInput, k: int) -> srmod.ReportInput:
    """``inp``'s shape with every variable value a sentinel of probe ``k`` (1 or 2)."""

    def finding(f: FindingResult, j: int) -> FindingResult:
        # probes differ at two decimals too: the summary prints p and thresholds so
        t = round(0.3 + 0.01 * j + 0.01 * k, 6)
        d = 0.05 + 0.003 * k + 0.00001 * j
        return replace(f, probability=round(t + d if f.present else t - d, 6), threshold=t)

    shared = _shared(inp)
    frontal = _probe_header(inp.frontal, k, 0, shared)
    lateral = None if inp.lateral is None else _probe_header(inp.lateral, k, 1, shared)
    rows, cols = int(inp.frontal.Rows), int(inp.frontal.Columns)
    crop = inp.crop
    if crop is not None:
        valid = crop.x1 > crop.x0 and crop.y1 > crop.y0
        crop = CropInfo(3 + k, 5 + k, (cols - 7 - k) if valid else 3 + k, rows - 9 - k)
    q = inp.mask_quality
    if q is not None:
        q = MaskQualityInfo(
            0.2 + 0.013 * k, 3 + 2 * k, 0.6 + 0.017 * k, q.ok,
            f"probe reason {k}" if (q.reason or q.rule) else "", q.rule and f"rule{k}",
        )  # fmt: skip
    ctr = inp.ctr
    if ctr is not None:
        ctr = CtrInfo(
            0.4123 + 0.0101 * k,
            LineInfo(10.5 + k, 20.25 + k, 40.75 + 3 * k, 20.25 + k),
            LineInfo(5.5 + k, 15.25 + k, 60.75 + 5 * k, 15.25 + k)
            if ctr.thoracic.length > 0
            else LineInfo(5.5 + k, 15.25 + k, 5.5 + k, 15.25 + k),
            ctr.interpretable,
            f"probe why {k}",
        )
    labels = [f.label for f in inp.findings]
    regions = {
        lab: CropInfo(11 + 3 * j + k, 13 + 3 * j + k, 50 + j + k, 60 + j + k)
        for j, lab in enumerate(labels)
    }
    _, previous = _replaced(inp)
    study = str(frontal.StudyInstanceUID)
    return replace(
        inp,
        frontal=frontal,
        lateral=lateral,
        model1=finding(inp.model1, -10),
        findings=[finding(f, j) for j, f in enumerate(inp.findings)],
        crop=crop,
        mask_quality=q,
        ctr=ctr,
        regions=regions,
        previous=[
            srmod.PreviousReport(
                study, *(deterministic_uid("probe-prev", str(k), str(i), w) for w in "se")
            )
            for i in range(len(previous))
        ],
        considered_instances=[
            deterministic_uid("probe-considered", str(k), str(i))
            for i in range(len(inp.considered_instances))
        ],
        content_datetime=_dt.datetime(2001, 2, k, 3, 4, 5 + k),
        instance_number=10 + k,
        series_number=9000 + k,
        supersedes_reason=f"probe reason {k}" if inp.supersedes_reason else "",
    )


# --- walking and comparing trees ----------------------------------------------------------------


def _leaves(ds: Dataset, path: Path_ = ()) -> Iterator[tuple[Path_, DataElement]]:
    for elem in ds:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from _leaves(item, (*path, int(elem.tag), i))
        else:
            yield (*path, int(elem.tag)), elem


def diff(a: Dataset, b: Dataset, path: Path_ = ()) -> list[str]:
    """Where two datasets differ, recursively, element by element (tag, VR, value, sequence
    lengths): a list of human-readable places (tag paths, no values), empty when equal."""
    out: list[str] = []
    tags_a, tags_b = [e.tag for e in a], [e.tag for e in b]
    if tags_a != tags_b:
        missing = sorted(set(tags_a) ^ set(tags_b))
        return [f"{_where(path)}: element lists differ at {[str(t) for t in missing][:5]}"]
    for ea in a:
        eb = b[ea.tag]
        here = (*path, int(ea.tag))
        if ea.VR != eb.VR:
            out.append(f"{_where(here)}: VR {ea.VR} != {eb.VR}")
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{_where(here)}: {len(ea.value)} != {len(eb.value)} items")
                continue
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value, strict=True)):
                out += diff(ia, ib, (*here, i))
        elif _norm(ea.value) != _norm(eb.value):
            out.append(f"{_where(here)}: values differ")
    return out


def _where(path: Path_) -> str:
    return "/".join(str(BaseTag(p)) if isinstance(p, int) and p > 0xFFFF else str(p) for p in path)


# --- encoding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    name: Name
    tag: BaseTag
    vr: str


_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _fp() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _seq_header(tag: BaseTag) -> bytes:
    return (
        int(tag.group).to_bytes(2, "little")
        + int(tag.element).to_bytes(2, "little")
        + b"SQ\x00\x00\xff\xff\xff\xff"
    )


def _coerce(slot: _Slot, value: object) -> object:
    if slot.vr == "DS":
        return DS(value, auto_format=True)  # type: ignore[arg-type]
    if slot.vr in ("FD", "FL") and not isinstance(value, tuple | list):
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, tuple):
        return list(value)
    return value


class _Template:
    def __init__(self, skeleton: Dataset, slots: dict[Path_, Name], encodings: list[str]) -> None:
        self.encodings = encodings
        self.parts: list[bytes | _Slot] = []
        self._mark = 0
        buf = _fp()
        self._encode(skeleton, (), slots, buf)
        self.parts.append(buf.getvalue()[self._mark :])

    def _encode(
        self, ds: Dataset, path: Path_, slots: dict[Path_, Name], buf: DicomBytesIO
    ) -> None:
        for elem in ds:
            here = (*path, int(elem.tag))
            if elem.VR == "SQ":
                buf.write(_seq_header(elem.tag))
                for i, item in enumerate(elem.value):
                    buf.write(_ITEM)
                    self._encode(item, (*here, i), slots, buf)
                    buf.write(_ITEM_END)
                buf.write(_SEQ_END)
            elif here in slots:
                self.parts.append(buf.getvalue()[self._mark :])
                self._mark = buf.tell()
                self.parts.append(_Slot(slots[here], elem.tag, elem.VR))
            else:
                write_data_element(buf, elem, self.encodings)

    def fill(self, values: dict[Name, object]) -> bytes:
        out: list[bytes] = []
        for part in self.parts:
            if isinstance(part, bytes):
                out.append(part)
                continue
            if part.name == (_CLOCK,):
                value: object = _dt.datetime.now().strftime("%Y%m%d%H%M%S.%f")
            else:
                value = values[part.name]
            fp = _fp()
            write_data_element(
                fp, DataElement(part.tag, part.vr, _coerce(part, value)), self.encodings
            )
            out.append(fp.getvalue())
        return b"".join(out)


def _file(body: bytes, sop_class: str, sop_uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    fp = _fp()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + body


def _encode_full(sr: Dataset) -> bytes:
    return _Template(sr, {}, _encodings(sr)).fill({})


def _encodings(sr: Dataset) -> list[str]:
    return convert_encodings(sr.get("SpecificCharacterSet", "ISO_IR 6"))


def _rendered(inp: srmod.ReportInput, sop_uid: str, series_uid: str, body: bytes) -> RenderedReport:
    return RenderedReport(
        sop_uid, str(srmod.SR_SOP_CLASS), series_uid, inp.instance_number,
        _file(body, str(srmod.SR_SOP_CLASS), sop_uid),
    )  # fmt: skip


def _locate(
    p1: Dataset, p2: Dataset, v1: dict[Name, object], v2: dict[Name, object]
) -> dict[Path_, Name]:
    """The slots: every leaf that differs between the probes, named by its values."""
    if [(p, e.VR) for p, e in _leaves(p1)] != [(p, e.VR) for p, e in _leaves(p2)]:
        raise NotTemplatable("the probes' trees differ in shape (leaf paths differ)")
    by1: dict[Hashable, list[Name]] = {}
    for name, value in v1.items():
        by1.setdefault(_norm(value), []).append(name)
    slots: dict[Path_, Name] = {}
    leaves2 = dict(_leaves(p2))
    for path, e1 in _leaves(p1):
        e2 = leaves2[path]
        if _norm(e1.value) == _norm(e2.value):
            continue
        if e1.keyword == _CLOCK:
            slots[path] = (_CLOCK,)
            continue
        names = [
            n for n in by1.get(_norm(e1.value), []) if n in v2 and _norm(v2[n]) == _norm(e2.value)
        ]
        # one source only; the frontal's and lateral's copy of a shared attribute are one
        if len({(n[0], n[2]) if n[0] == "hdr" else n for n in names}) != 1:
            raise NotTemplatable(f"no single source for {e1.keyword or e1.tag} at {_where(path)}")
        slots[path] = names[0]
    return slots


class ReportTemplates:
    """Reports by template, one per shape (least recently used first out past ``max_shapes``).

    Not shared between threads; each worker process holds its own."""

    def __init__(self, max_shapes: int = 256, *, template_after: int = 2) -> None:
        self.max_shapes = max_shapes
        self.template_after = template_after  # sightings of a shape before it gets a template
        self._cache: OrderedDict[tuple[Hashable, ...], _Template | None] = OrderedDict()
        self._seen: OrderedDict[tuple[Hashable, ...], int] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def render(self, inp: srmod.ReportInput) -> RenderedReport:
        """The report for ``inp`` as bytes; equal to :func:`dicom_node.sr.build_report`'s."""
        check_same_patient_and_study(inp.sources)
        key = shape_key(inp)
        sop_uid, _ = _replaced(inp)
        series_uid = report_series_uid(str(inp.frontal.StudyInstanceUID), inp.device)
        if key in self._cache:
            self._cache.move_to_end(key)
            tpl = self._cache[key]
            if tpl is not None:
                self.hits += 1
                values = slot_values(inp, _dt.datetime.now())
                return _rendered(inp, sop_uid, series_uid, tpl.fill(values))
        self.misses += 1
        full = srmod.build_report(inp)
        if key not in self._cache:
            # a template costs two probe builds: make one only for a shape that recurs, so a
            # stream of one-off shapes costs what a plain build costs
            seen = self._seen.pop(key, 0) + 1
            if seen >= self.template_after:
                self._cache[key] = self._make(inp, full)
                while len(self._cache) > self.max_shapes:
                    self._cache.popitem(last=False)
            else:
                self._seen[key] = seen
                while len(self._seen) > 4 * self.max_shapes:
                    self._seen.popitem(last=False)
        return _rendered(inp, sop_uid, series_uid, _encode_full(full))

    def _make(self, inp: srmod.ReportInput, full: Dataset) -> _Template | None:
        try:
            p1, p2 = _probe(inp, 1), _probe(inp, 2)
            b1, b2 = srmod.build_report(p1), srmod.build_report(p2)
            v1 = slot_values(p1, _dt.datetime.now())
            v2 = slot_values(p2, _dt.datetime.now())
            tpl = _Template(b1, _locate(b1, b2, v1, v2), _encodings(b1))
            when = _dt.datetime.strptime(f"{full.ContentDate}{full.ContentTime}", "%Y%m%d%H%M%S")
            filled = pydicom.dcmread(BytesIO(tpl.fill(slot_values(inp, when))), force=True)
            problems = [d for d in diff(full, filled) if _CLOCK_TAG not in d]
            if problems:
                raise NotTemplatable(f"the filled template differs: {problems[:3]}")
            return tpl
        except (NotTemplatable, ValueError, KeyError) as exc:
            log.warning("report shape not templatable, built in full: %s", exc)
            return None
