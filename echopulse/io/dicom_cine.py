"""The one writer of 8-bit multi-frame ultrasound cines (generated videos, the phantom): grey, or RGB."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

US_MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"

# PS3.15 Annex E; CID 7050 codes. Every DICOM this project writes carries no real identity: a
# generated video takes nothing from any input, and ingested clips keep no identifier (their
# provenance says so with the same words).
DEIDENTIFICATION_METHOD = "PS3.15 Basic Profile with Clean Pixel Data"
DEIDENTIFICATION_CODES = (("113100", "Basic Application Confidentiality Profile"),
                          ("113101", "Clean Pixel Data Option"))
PHANTOM_METHOD = "Synthetic phantom: no patient; test identifiers are fictional"


def set_cine_pixel_module(ds: Dataset, rows: int, cols: int, n_frames: int, fps: float) -> None:
    """Set MONOCHROME2 8-bit pixel description and FrameTime/CineRate timing on ``ds``."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = n_frames
    ds.FrameTime = f"{1000.0 / fps:.10g}"
    ds.CineRate = max(1, int(round(fps)))
    ds.RecommendedDisplayFrameRate = max(1, int(round(fps)))
    ds.FrameIncrementPointer = Tag(0x0018, 0x1063)  # -> FrameTime


def write_cine(path: Any, frames: np.ndarray, fps: float, *, uids: dict[str, str], date: str, time: str,
               attributes: dict[str, Any], deidentification: tuple[str, tuple[tuple[str, str], ...]] = (
                   DEIDENTIFICATION_METHOD, DEIDENTIFICATION_CODES)) -> None:
    """Write ``frames`` (uint8 ``(n, rows, cols)``, or ``(n, rows, cols, 3)`` RGB) as an explicit-VR
    little-endian US multi-frame file.

    Args:
        path: output file.
        frames: the cine.
        fps: frame rate (FrameTime / CineRate).
        uids: ``study``, ``series`` and ``sop`` instance UIDs.
        date, time: ``YYYYMMDD`` / ``HHMMSS`` for the study, series and content dates.
        attributes: every other attribute by keyword (manufacturer, patient and study modules,
            image type, ...), set after the common ones.
        deidentification: the DeidentificationMethod text and its CID 7050 codes (PatientIdentity-
            Removed is always YES: nothing the project writes carries a real identity).
    """
    n_frames, rows, cols = frames.shape[:3]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_MULTIFRAME_SOP_CLASS
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.Modality = "US"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    set_ultrasound_type2c(ds)
    set_deidentified(ds, *deidentification)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    set_cine_pixel_module(ds, rows, cols, n_frames, fps)
    if frames.ndim == 4:  # colour, as a scanner saves a cine with its coloured ECG strip
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)


def set_deidentified(ds: Dataset, method: str = DEIDENTIFICATION_METHOD,
                     codes: tuple[tuple[str, str], ...] = DEIDENTIFICATION_CODES) -> None:
    """Mark ``ds`` as carrying no patient identity (PatientIdentityRemoved YES, the method)."""
    from pydicom.sequence import Sequence

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = method
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    if items:
        ds.DeidentificationMethodCodeSequence = Sequence(items)


def set_ultrasound_type2c(ds: Dataset) -> None:
    """The Type 2C attributes of the Ultrasound Multi-frame IOD, for an echo.

    PatientOrientation (General Image) is present and empty (unknown). Laterality (General Series)
    is required only for a paired body part and must then have a value; BodyPartExamined HEART says
    the part is unpaired, so Laterality is left out (present but empty, dciodvfy warns that it
    claims the laterality is unknown).
    """
    ds.BodyPartExamined = "HEART"
    ds.PatientOrientation = ""
