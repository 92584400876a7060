"""The pixel and cine attributes every 8-bit grayscale multi-frame echo this project writes shares."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.tag import Tag


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
