"""Multi-frame ultrasound DICOM reader: frames as uint8 grayscale plus timing and region metadata."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Ultrasound Multi-frame Image Storage (current and retired) and Ultrasound Image Storage
US_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
}
_COLOR = {"RGB", "YBR_FULL", "YBR_FULL_422"}


class EchoReadError(ValueError):
    """An echo DICOM that cannot be used; the message says why in plain words."""


def read_echo_dicom(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a multi-frame ultrasound cine.

    The pixel data length is checked against the header before decoding, so a header that claims
    more frames than the file holds fails fast without allocating them.

    Args:
        path: a DICOM file.

    Returns:
        ``frames`` uint8 (T, H, W) grayscale, and metadata with ``fps``, ``region`` ((x0, y0, x1, y1)
        inclusive from the first 2-D item of SequenceOfUltrasoundRegions, else the first item, else
        None), ``study_uid``, ``sop_uid``, ``n_frames``, ``photometric`` and ``transfer_syntax``.

    Raises:
        EchoReadError: missing file, not DICOM, not an ultrasound cine, single frame, truncated or
            undecodable pixel data, or no frame timing.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise EchoReadError(f"{path}: file not found")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise EchoReadError(f"{path}: not a DICOM file (no DICM header)") from None
    except Exception as exc:  # truncated / corrupt headers raise many different types
        raise EchoReadError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from None

    _check_is_ultrasound(ds, path)
    if "PixelData" not in ds:
        raise EchoReadError(f"{path}: no pixel data")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames < 2:
        raise EchoReadError(f"{path}: single-frame image; a multi-frame cine is needed")
    fps = _frame_rate(ds, path)
    _check_pixel_length(ds, n_frames, path)

    try:
        frames = ds.pixel_array
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise EchoReadError(f"{path}: pixel data could not be decoded ({reason})") from None
    frames = _to_gray_uint8(frames, ds, n_frames)
    meta = {
        "fps": fps,
        "region": _region(ds, frames.shape[1:]),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "sop_uid": str(ds.get("SOPInstanceUID", "")),
        "n_frames": int(frames.shape[0]),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "transfer_syntax": str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")),
    }
    log.debug("read echo %s: %d frames at %.1f fps", path.name, frames.shape[0], fps)
    return frames, meta


def _check_is_ultrasound(ds: Any, path: Path) -> None:
    sop = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if sop in US_SOP_CLASSES or (not sop and modality == "US"):
        return
    if not sop and not modality:
        raise EchoReadError(
            f"{path}: DICOM header has no SOPClassUID or Modality (truncated or incomplete file)"
        )
    from pydicom.uid import UID

    name = UID(sop).name if sop else "unknown SOP class"
    raise EchoReadError(
        f"{path}: not an ultrasound cine (it is {name}, modality {modality or 'unset'}); "
        "expected Ultrasound Multi-frame Image Storage"
    )


def _frame_rate(ds: Any, path: Path) -> float:
    candidates = []
    if ds.get("FrameTime"):
        candidates.append(1000.0 / float(ds.FrameTime))
    vector = ds.get("FrameTimeVector")
    if vector is not None and len(vector) > 1:
        # the first entry is the offset of frame 0 (usually 0), the rest are frame intervals
        intervals = [float(v) for v in list(vector)[1:]]
        if np.mean(intervals) > 0:
            candidates.append(1000.0 / float(np.mean(intervals)))
    for key in ("CineRate", "RecommendedDisplayFrameRate"):
        if ds.get(key):
            candidates.append(float(ds.get(key)))
    for fps in candidates:
        if np.isfinite(fps) and fps > 0:
            return round(float(fps), 6)  # FrameTime is a decimal string: drop its rounding noise
    raise EchoReadError(
        f"{path}: no frame timing (none of FrameTime, FrameTimeVector, CineRate, "
        "RecommendedDisplayFrameRate is usable)"
    )


def _check_pixel_length(ds: Any, n_frames: int, path: Path) -> None:
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows < 1 or cols < 1:
        raise EchoReadError(f"{path}: Rows/Columns missing or zero")
    data = ds.PixelData
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        from pydicom.encaps import parse_fragments

        try:
            if data[:4] != b"\xfe\xff\x00\xe0":
                raise ValueError("no Basic Offset Table item")
            offset_table = 8 + int.from_bytes(data[4:8], "little")
            n_fragments, _ = parse_fragments(data[offset_table:])
        except Exception as exc:
            raise EchoReadError(f"{path}: encapsulated pixel data is corrupt ({exc})") from None
        if n_fragments < n_frames:
            raise EchoReadError(
                f"{path}: header claims {n_frames} frames but the compressed pixel data holds "
                f"only {n_fragments} fragments (truncated file?)"
            )
        return
    samples = int(ds.get("SamplesPerPixel", 1))
    bits = int(ds.get("BitsAllocated", 8))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    per_frame = (rows * cols * samples * bits + 7) // 8
    if photometric == "YBR_FULL_422":
        per_frame = rows * cols * 2 * bits // 8  # chroma subsampled horizontally
    expected = n_frames * per_frame
    if len(data) < expected:
        raise EchoReadError(
            f"{path}: pixel data holds {len(data)} bytes but the header claims {n_frames} frames of "
            f"{rows}x{cols} ({expected} bytes); the file is truncated or its NumberOfFrames is wrong"
        )


def _to_gray_uint8(frames: np.ndarray, ds: Any, n_frames: int) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    photometric = str(ds.get("PhotometricInterpretation", ""))
    samples = int(ds.get("SamplesPerPixel", 1))
    if n_frames > 1 and frames.ndim == (3 if samples > 1 else 2):
        frames = frames[None]  # pydicom drops the frame axis for one frame
    if samples == 3:
        # pydicom returns RGB for YBR data by default (as_rgb); luma is the Y of YBR_FULL
        if photometric in _COLOR and frames.dtype == np.uint8:
            frames = convert_color_space(frames, "RGB", "YBR_FULL")[..., 0]
        else:
            frames = (frames[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    if photometric == "MONOCHROME1":
        frames = frames.max() - frames
    if frames.dtype != np.uint8:
        lo, hi = float(np.min(frames)), float(np.max(frames))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        frames = np.round((frames.astype(np.float64) - lo) * scale).astype(np.uint8)
    return np.ascontiguousarray(frames)


def _region(ds: Any, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not regions:
        return None
    chosen = next((r for r in regions if int(r.get("RegionSpatialFormat", 0)) == 1), regions[0])
    try:
        x0, y0 = int(chosen.RegionLocationMinX0), int(chosen.RegionLocationMinY0)
        x1, y1 = int(chosen.RegionLocationMaxX1), int(chosen.RegionLocationMaxY1)
    except AttributeError:
        return None
    h, w = shape
    x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w - 1))
    y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h - 1))
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)
