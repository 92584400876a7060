"""Plain echo videos (AVI/MP4, e.g. EchoNet-Dynamic's ``Videos/*.avi``) as uint8 grayscale cines."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from echopulse.io.dicom_echo import MAX_DECODED_BYTES, EchoReadError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".mpg", ".mpeg")


def is_video(path: str | Path) -> bool:
    """True when the name says it is a container video rather than DICOM."""
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def read_echo_video(
    path: str | Path, fps: float | None = None, max_decoded_bytes: int = MAX_DECODED_BYTES
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a video file with ffmpeg (imageio-ffmpeg) into uint8 (T, H, W) luma.

    Frames are decoded one at a time and the running size is checked against
    ``max_decoded_bytes``, so a huge video is refused rather than read whole into memory.

    Args:
        path: a video file (local path or remote URI).
        fps: the frame rate to use (EchoNet's FileList.csv ``FPS``); default: the container's.
        max_decoded_bytes: the most memory the decoded frames may take.

    Returns:
        frames and metadata with ``fps``, ``region`` (None: a plain video has no DICOM region),
        ``study_uid``/``sop_uid`` (empty), ``n_frames``, ``has_waveform`` (False), ``start`` (None).

    Raises:
        EchoReadError: missing or undecodable file, fewer than two frames, no frame rate, too large.
    """
    from echopulse import storage

    shown = str(path)
    if not storage.exists(shown):
        raise EchoReadError(f"{shown}: file not found")
    import imageio.v2 as iio

    with storage.local_path(shown) as local:
        try:
            reader = iio.get_reader(str(local), format="FFMPEG")
        except Exception as exc:
            raise EchoReadError(f"{shown}: not a readable video ({type(exc).__name__})") from None
        try:
            container_fps = float(reader.get_meta_data().get("fps") or 0.0)
            frames, total = [], 0
            for frame in reader:
                gray = _luma(np.asarray(frame))
                total += gray.nbytes
                if total > max_decoded_bytes:
                    raise EchoReadError(
                        f"{shown}: video larger than the {max_decoded_bytes / 2**30:.1f} GiB limit per file"
                    )
                frames.append(gray)
        except EchoReadError:
            raise
        except Exception as exc:
            if not frames:
                raise EchoReadError(f"{shown}: video could not be decoded ({type(exc).__name__})") from None
            log.warning("%s: video ends early after %d frames (%s)", shown, len(frames), type(exc).__name__)
        finally:
            reader.close()
    if len(frames) < 2:
        raise EchoReadError(f"{shown}: video has {len(frames)} frame(s); a cine needs at least 2")
    rate = float(fps) if fps else container_fps
    if not np.isfinite(rate) or rate <= 0:
        raise EchoReadError(f"{shown}: no frame rate (the container has none and none was given)")
    out = np.stack(frames)
    return out, {"fps": rate, "region": None, "study_uid": "", "sop_uid": "", "n_frames": len(out),
                 "photometric": "video", "transfer_syntax": "video", "has_waveform": False,
                 "start": None}


def _luma(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame.astype(np.uint8, copy=False)
    r, g, b = (frame[..., i].astype(np.uint16) for i in range(3))
    return ((77 * r + 150 * g + 29 * b + 128) >> 8).astype(np.uint8)
