"""Fixed-window clip segmentation of a paired cine + ECG."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echopulse.config import ECG_FS, ClipConfig
from echopulse.transforms.ecg import PreparedECG
from echopulse.transforms.video import resize_frames, sample_frames

_EPS = 1e-6


@dataclass(frozen=True)
class ClipSpan:
    """A clip's time span in the study: [t_start_s, t_end_s), t_end_s = t_start_s + clip.seconds."""

    t_start_s: float
    t_end_s: float


def window_spans(video_duration_s: float, ecg_duration_s: float, clip: ClipConfig) -> list[ClipSpan]:
    """Fixed windows that both the cine and the ECG fully cover.

    A clip shows ``clip.frames`` frames at ``clip.fps`` from ``t_start`` (``clip.seconds`` of video)
    and takes ``clip.ecg_samples`` ECG samples at 250 Hz from ``t_start``. Starts hop by
    ``clip.stride_s`` (or ``clip.seconds``), from 0.

    Args:
        video_duration_s: cine length (n_frames / fps).
        ecg_duration_s: ECG length (n_samples / fs).
        clip: clip geometry.
    """
    hop = clip.stride_s if clip.stride_s else clip.seconds
    if hop <= 0:
        raise ValueError(f"clip hop must be positive, got {hop}")
    need_ecg = clip.ecg_samples / ECG_FS
    spans = []
    k = 0
    while True:
        t0 = round(k * hop, 9)
        if t0 + clip.seconds > video_duration_s + _EPS or t0 + need_ecg > ecg_duration_s + _EPS:
            break
        spans.append(ClipSpan(t_start_s=t0, t_end_s=round(t0 + clip.seconds, 9)))
        k += 1
    return spans


def cut_clip(
    frames: np.ndarray, fps: float, prepared: PreparedECG, span: ClipSpan, clip: ClipConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one clip: resampled, resized frames, the ECG window and the R-peaks inside it.

    Clip frame ``i`` is the cine at time ``t_start + i / clip.fps`` (linear interpolation).

    Args:
        frames: uint8 (T, H, W) cine, already cropped to the imaging region.
        fps: its frame rate.
        prepared: the study's prepared ECG (sample 0 at the time of frame 0).
        span: the clip span.
        clip: clip geometry.

    Returns:
        frames uint8 (clip.frames, clip.size, clip.size), ECG float32 (12, clip.ecg_samples) and int32
        R-peak positions relative to the window start.

    Raises:
        ValueError: when the span is not covered by the ECG or the cine.
    """
    times = span.t_start_s + np.arange(clip.frames) / clip.fps
    video = resize_frames(sample_frames(frames, fps, times), clip.size)
    s0 = int(round(span.t_start_s * ECG_FS))
    s1 = s0 + clip.ecg_samples
    if s0 < 0 or s1 > prepared.ecg.shape[1]:
        raise ValueError(f"ECG ({prepared.ecg.shape[1]} samples) does not cover samples {s0}-{s1}")
    ecg = np.ascontiguousarray(prepared.ecg[:, s0:s1], dtype=np.float32)
    peaks = prepared.r_peaks[(prepared.r_peaks >= s0) & (prepared.r_peaks < s1)] - s0
    return video, ecg, peaks.astype(np.int32)
