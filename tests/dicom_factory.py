"""Build real-image DICOM test instances: wrap a real radiograph (e.g. a CheXpert lateral) as DX.

Only used by tests; the pixel data comes from real images read from ../shared/data at test time
(those images are never committed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


#: the patient and study attributes a derived instance copies from its study's other images
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)


def wrap_as_dx(
    image_path: Path,
    *,
    like: Dataset,
    view_position: str = "LL",
    sop_instance_uid: str | None = None,
    series_uid: str | None = None,
) -> Dataset:
    """A DX For Presentation instance: ``image_path``'s pixels in ``like``'s patient and study."""
    img = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"cannot read image {image_path}")
    pixels = img.astype(np.uint16) * 16  # 12-bit range like a real detector
    ds = Dataset()
    for kw in PATIENT_STUDY:
        if kw in like:
            setattr(ds, kw, getattr(like, kw))
    ds.PatientName = ds.get("PatientName", "TEST^LATERAL")
    ds.PatientID = ds.get("PatientID", "TEST")
    ds.StudyInstanceUID = like.StudyInstanceUID
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "DX"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["A", "F"] if view_position in ("LL", "RL", "LATERAL") else ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelSpacing = [0.2, 0.2]
    ds.DetectorType = "SCINTILLATOR"
    ds.BurnedInAnnotation = "NO"
    ds.Manufacturer = "test"
    ds.ContentDate = ds.get("StudyDate", "20260101")
    ds.ContentTime = ds.get("StudyTime", "120000")
    ds.AcquisitionDeviceProcessingDescription = ""
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.Laterality = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01" if image_path.suffix.lower() in (".jpg", ".jpeg") else "00"
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
