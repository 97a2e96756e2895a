"""The other objects a real chest study holds besides its radiographs, as a PACS routing the whole
study sends them: a dose SR from the modality, a radiologist's text SR, a key object selection, a
grayscale presentation state, a scanned requisition (Secondary Capture, Modality OT) and an
encapsulated PDF. Built with pydicom in the patient and study of a real image (``like``), so the
tests need no file that cannot be redistributed. None of them may ever be analysed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.dicom_factory import PATIENT_STUDY

UID_ROOT = "1.2.826.0.1.3680043.8.498."

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def _base(like: Dataset, sop_class: str, modality: str, series_number: int) -> Dataset:
    ds = Dataset()
    for kw in PATIENT_STUDY:
        setattr(ds, kw, like.get(kw, ""))
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(UID_ROOT)
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Manufacturer = "test"
    ds.ContentDate = like.get("StudyDate", "") or "20260101"
    ds.ContentTime = "120000"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _ref(image: Dataset) -> Dataset:
    r = Dataset()
    r.ReferencedSOPClassUID = image.SOPClassUID
    r.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return r


def _sr(like: Dataset, sop_class: str, title: Dataset, text: str, number: int) -> Dataset:
    ds = _base(like, sop_class, "SR", number)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [title]
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    item.TextValue = text
    ds.ContentSequence = [item]
    return ds


def text_report(like: Dataset) -> Dataset:
    """A radiologist's Basic Text SR."""
    return _sr(like, BASIC_TEXT_SR, _code("18748-4", "LN", "Diagnostic imaging report"), "ok", 900)


def dose_report(like: Dataset) -> Dataset:
    """The modality's X-Ray Radiation Dose SR (every DX study from a modern room has one)."""
    title = _code("113701", "DCM", "X-Ray Radiation Dose Report")
    return _sr(like, XRAY_DOSE_SR, title, "DAP 0.1 Gy.cm2", 901)


def key_objects(like: Dataset, images: list[Dataset]) -> Dataset:
    """A Key Object Selection document flagging ``images``."""
    ds = _base(like, KEY_OBJECT_SELECTION, "KO", 902)
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("113000", "DCM", "Of Interest")]
    ev = Dataset()
    ev.StudyInstanceUID = like.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = images[0].SeriesInstanceUID
    series.ReferencedSOPSequence = [_ref(i) for i in images]
    ev.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [ev]
    items = []
    for image in images:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        item.ReferencedSOPSequence = [_ref(image)]
        items.append(item)
    ds.ContentSequence = items
    return ds


def presentation_state(like: Dataset, image: Dataset) -> Dataset:
    """A Grayscale Softcopy Presentation State (a window a radiologist saved on ``image``)."""
    ds = _base(like, GRAYSCALE_PR, "PR", 903)
    ds.ContentLabel, ds.ContentDescription = "WINDOW", "saved window"
    ds.PresentationCreationDate, ds.PresentationCreationTime = "20260101", "120000"
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    series.ReferencedImageSequence = [_ref(image)]
    ds.ReferencedSeriesSequence = [series]
    voi = Dataset()
    voi.ReferencedImageSequence = [_ref(image)]
    voi.WindowCenter, voi.WindowWidth = 2048, 4096
    ds.SoftcopyVOILUTSequence = [voi]
    ds.PresentationLUTShape = "IDENTITY"
    return ds


def scanned_requisition(like: Dataset) -> Dataset:
    """A scanned paper requisition: Secondary Capture, Modality OT, 64 x 64 gray pixels."""
    ds = _base(like, SECONDARY_CAPTURE, "OT", 904)
    ds.ConversionType = "DF"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(64 * 64) % 251).astype(np.uint8).tobytes()
    return ds


def pdf_document(like: Dataset) -> Dataset:
    """An Encapsulated PDF (the referral letter)."""
    ds = _base(like, ENCAPSULATED_PDF, "DOC", 905)
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Referral"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.ConceptNameCodeSequence = []
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    return ds


def whole_study_extras(like: Dataset, images: list[Dataset]) -> list[Dataset]:
    """Every non-analysed object above, for the study of ``like`` and its ``images``."""
    makers: list[Callable[[], Dataset]] = [
        lambda: text_report(like),
        lambda: dose_report(like),
        lambda: key_objects(like, images),
        lambda: presentation_state(like, images[0]),
        lambda: scanned_requisition(like),
        lambda: pdf_document(like),
    ]
    return [make() for make in makers]


def relabelled_lateral(image: Dataset, like: Dataset) -> Dataset:
    """A DX For Presentation "lateral" (ViewPosition LL) in ``like``'s study, with ``image``'s
    pixels: the routing and completion tests need a second view whose header says lateral; no
    real lateral radiograph may be redistributed with the tests (the Orthanc test that measures
    a real pair wraps a CheXpert lateral from ../shared/data)."""
    px = image.pixel_array
    ds = _base(like, "1.2.840.10008.5.1.4.1.1.1.1", "DX", 2)
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "LL"
    ds.PatientOrientation = ["A", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.2, 0.2]
    ds.DetectorType, ds.BurnedInAnnotation = "SCINTILLATOR", "NO"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = px.shape[:2]
    bits = 8 if px.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.WindowCenter, ds.WindowWidth = 2 ** (bits - 1), 2**bits
    ds.PixelData = px.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    return ds
