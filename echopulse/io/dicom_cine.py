"""The one writer of 8-bit multi-frame ultrasound cines (generated videos, the phantom): grey, or RGB."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

US_MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"


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
               attributes: dict[str, Any]) -> None:
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
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    set_cine_pixel_module(ds, rows, cols, n_frames, fps)
    if frames.ndim == 4:  # colour, as a scanner saves a cine with its coloured ECG strip
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
