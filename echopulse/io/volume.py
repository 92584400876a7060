"""Cines stored as image volumes: NIfTI (``.nii``/``.nii.gz``, via nibabel) and MetaImage
(``.mhd`` header + raw data file, parsed here), as CAMUS ships its sequences.

Both store x fastest: a (W, H, T) volume, returned as uint8 (T, H, W) like the other readers.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from echopulse.io.dicom_echo import MAX_DECODED_BYTES, EchoReadError

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mhd")
_MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2",
              "MET_UINT": "u4", "MET_INT": "i4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def is_volume(path: str | Path) -> bool:
    """True when the name says NIfTI or MetaImage."""
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def read_echo_volume(path: str | Path, fps: float | None = None,
                     max_decoded_bytes: int = MAX_DECODED_BYTES) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a 2-D + time cine from a NIfTI or MetaImage file.

    Args:
        path: ``.nii``, ``.nii.gz`` or ``.mhd`` (local or remote; an ``.mhd``'s data file must sit
            beside it).
        fps: frame rate (CAMUS records none; the manifest's ``fps``); default: a NIfTI time step.
        max_decoded_bytes: the most memory the frames may take.

    Returns:
        uint8 (T, H, W) frames (rescaled to 0-255 unless already 8-bit) and metadata like
        :func:`echopulse.io.video.read_echo_video`'s (``region`` None, no UIDs, no start time).

    Raises:
        EchoReadError: missing or unreadable file, not 2-D + time, fewer than two frames, too large,
            or no frame rate.
    """
    from echopulse import storage

    shown = str(path)
    if not storage.exists(shown):
        raise EchoReadError(f"{shown}: file not found")
    if shown.lower().endswith(".mhd"):
        header = _parse_mhd(storage.read_text(shown), shown)
        data_file = header.get("ElementDataFile", "")
        with storage.local_path(shown, companions=[data_file]) as local:
            volume, step = _read_mhd(local, header, shown, max_decoded_bytes), None
    else:
        with storage.local_path(shown) as local:
            volume, step = _read_nifti(local, shown, max_decoded_bytes)
    frames = np.ascontiguousarray(volume.transpose(2, 1, 0))  # (W, H, T) -> (T, H, W)
    if frames.shape[0] < 2:
        raise EchoReadError(f"{shown}: {frames.shape[0]} frame(s); a cine needs at least 2")
    rate = float(fps) if fps else (1.0 / step if step else 0.0)
    if not np.isfinite(rate) or rate <= 0:
        raise EchoReadError(f"{shown}: no frame rate (the file records none; give the manifest an "
                            "'fps' column, e.g. echopulse manifest camus ROOT --fps F)")
    frames = _to_uint8(frames)
    log.debug("read volume %s: %d frames at %.1f fps", shown, len(frames), rate)
    return frames, {"fps": rate, "region": None, "study_uid": "", "sop_uid": "", "n_frames": len(frames),
                    "photometric": "volume", "transfer_syntax": "nifti" if ".nii" in shown.lower() else "mhd",
                    "has_waveform": False, "start": None}


def _read_nifti(path: Path, shown: str, max_decoded_bytes: int) -> tuple[np.ndarray, float | None]:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = tuple(int(s) for s in image.shape)
    except Exception as exc:
        raise EchoReadError(f"{shown}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    _check_shape(shape, shown, image.get_data_dtype().itemsize, max_decoded_bytes)
    step = None
    if len(shape) == 4:  # (x, y, 1, t): the time step is in pixdim[4] with the file's time unit
        unit = image.header.get_xyzt_units()[1]
        dt = float(image.header.get_zooms()[3])
        step = dt * {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(unit, 0.0) or None
    try:
        volume = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise EchoReadError(f"{shown}: NIfTI data could not be read ({type(exc).__name__}: {exc})") from None
    return volume.reshape(shape[0], shape[1], -1), step


def _parse_mhd(text: str, shown: str) -> dict[str, str]:
    header = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    if "DimSize" not in header or "ElementType" not in header or "ElementDataFile" not in header:
        raise EchoReadError(f"{shown}: not a MetaImage header (DimSize, ElementType or ElementDataFile missing)")
    return header


def _read_mhd(path: Path, header: dict[str, str], shown: str, max_decoded_bytes: int) -> np.ndarray:
    data_name = header["ElementDataFile"]
    if data_name.upper() in ("LOCAL", "LIST") or Path(data_name).name != data_name:
        raise EchoReadError(f"{shown}: ElementDataFile {data_name!r} is not a file beside the header")
    kind = _MET_TYPES.get(header["ElementType"])
    if kind is None:
        raise EchoReadError(f"{shown}: ElementType {header['ElementType']} is not supported")
    if int(header.get("ElementNumberOfChannels", "1") or 1) != 1:
        raise EchoReadError(f"{shown}: multi-channel MetaImage is not supported")
    try:
        shape = tuple(int(v) for v in header["DimSize"].split())
    except ValueError:
        raise EchoReadError(f"{shown}: DimSize {header['DimSize']!r} is not a list of integers") from None
    big = header.get("ElementByteOrderMSB", header.get("BinaryDataByteOrderMSB", "False")).lower() == "true"
    dtype = np.dtype(("<" if not big else ">") + kind)
    _check_shape(shape, shown, dtype.itemsize, max_decoded_bytes)
    data_path = path.parent / data_name
    if not data_path.is_file():
        raise EchoReadError(f"{shown}: its data file {data_name} is missing")
    raw = data_path.read_bytes()
    if header.get("CompressedData", "False").lower() == "true":
        try:
            raw = zlib.decompress(raw)
        except zlib.error as exc:
            raise EchoReadError(f"{shown}: compressed data is corrupt ({exc})") from None
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) < expected:
        raise EchoReadError(f"{shown}: {data_name} holds {len(raw)} bytes, the header claims {expected}")
    flat = np.frombuffer(raw[:expected], dtype=dtype)
    return flat.reshape(tuple(reversed(shape))).transpose(tuple(reversed(range(len(shape))))).reshape(
        shape[0], shape[1], -1)


def _check_shape(shape: tuple[int, ...], shown: str, itemsize: int, max_decoded_bytes: int) -> None:
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[2] != 1):
        raise EchoReadError(f"{shown}: shape {shape} is not a 2-D cine over time (x, y, t)")
    if int(np.prod(shape)) * max(itemsize, 1) > max_decoded_bytes:
        raise EchoReadError(f"{shown}: volume {shape} is larger than the "
                            f"{max_decoded_bytes / 2**30:.1f} GiB limit per file")


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    lo, hi = float(frames.min()), float(frames.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.round((frames.astype(np.float64) - lo) * scale).astype(np.uint8)
