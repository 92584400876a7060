"""Clip segmentation of a paired cine + ECG: fixed windows or one cardiac cycle per clip.

Times are on the echo's clock (frame 0 at 0 s). ``ecg_offset_s`` is where echo frame 0 falls on the
ECG's clock (ECG sample ``k`` is at echo time ``k / 250 - ecg_offset_s``). A clip's ECG window
always starts at the clip's first frame and holds ``clip.ecg_samples`` samples at 250 Hz.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echopulse.config import ECG_FS, ClipConfig
from echopulse.transforms.ecg import PreparedECG
from echopulse.transforms.video import resize_frames, sample_frames

_EPS = 1e-6
CLIP_MODES = ("window", "cycle")
MIN_RR_S, MAX_RR_S = 0.3, 2.0  # 200 to 30 bpm: outside this an "interval" is a missed or extra beat


@dataclass(frozen=True)
class ClipSpan:
    """A clip's time span on the echo clock: [t_start_s, t_end_s).

    The clip's ``clip.frames`` frames are spread evenly over the span, so a window span of
    ``clip.seconds`` plays at ``clip.fps`` and a cycle span at ``clip.frames / RR``.
    """

    t_start_s: float
    t_end_s: float

    @property
    def seconds(self) -> float:
        return self.t_end_s - self.t_start_s


def _ecg_fits(t0: float, ecg_duration_s: float | None, ecg_offset_s: float, clip: ClipConfig) -> bool:
    if ecg_duration_s is None:  # an ECG-less clip
        return True
    start = t0 + ecg_offset_s
    return start > -_EPS and start + clip.ecg_samples / ECG_FS <= ecg_duration_s + _EPS


def window_spans(video_duration_s: float, ecg_duration_s: float | None, clip: ClipConfig,
                 ecg_offset_s: float = 0.0) -> list[ClipSpan]:
    """Fixed windows that both the cine and the ECG fully cover.

    A clip shows ``clip.frames`` frames at ``clip.fps`` from ``t_start`` (``clip.seconds`` of video)
    and takes ``clip.ecg_samples`` ECG samples at 250 Hz from ``t_start``. Starts hop by
    ``clip.stride_s`` (or ``clip.seconds``) from the first instant both cover.

    Args:
        video_duration_s: cine length (n_frames / fps).
        ecg_duration_s: ECG length (n_samples / fs); None for an ECG-less cine.
        clip: clip geometry.
        ecg_offset_s: echo frame 0 on the ECG's clock.
    """
    hop = clip.stride_s if clip.stride_s else clip.seconds
    if hop <= 0:
        raise ValueError(f"clip hop must be positive, got {hop}")
    first = 0.0 if ecg_duration_s is None else max(0.0, -ecg_offset_s)
    spans = []
    k = 0
    while True:
        t0 = round(first + k * hop, 9)
        if t0 + clip.seconds > video_duration_s + _EPS:
            break
        if not _ecg_fits(t0, ecg_duration_s, ecg_offset_s, clip):
            if ecg_duration_s is not None and t0 + ecg_offset_s > ecg_duration_s:
                break
            k += 1
            continue
        spans.append(ClipSpan(t_start_s=t0, t_end_s=round(t0 + clip.seconds, 9)))
        k += 1
    return spans


def cycle_spans(r_peaks: np.ndarray, video_duration_s: float, ecg_duration_s: float, clip: ClipConfig,
                ecg_offset_s: float = 0.0) -> list[ClipSpan]:
    """One span per R-R interval that the cine and the ECG cover (the paper's cardiac-cycle clips).

    Intervals outside 0.3-2.0 s (a missed or an extra beat) are skipped.

    Args:
        r_peaks: R-peak sample indices at 250 Hz on the ECG's clock.
        video_duration_s: cine length.
        ecg_duration_s: ECG length.
        clip: clip geometry (its ``frames`` are spread over each interval).
        ecg_offset_s: echo frame 0 on the ECG's clock.
    """
    times = np.asarray(r_peaks, dtype=np.float64) / ECG_FS - ecg_offset_s  # echo clock
    spans = []
    for a, b in zip(times[:-1], times[1:]):
        if not MIN_RR_S <= b - a <= MAX_RR_S:
            continue
        if a < -_EPS or b > video_duration_s + _EPS:
            continue
        if _ecg_fits(a, ecg_duration_s, ecg_offset_s, clip):
            spans.append(ClipSpan(t_start_s=round(float(a), 6), t_end_s=round(float(b), 6)))
    return spans


def cut_clip(
    frames: np.ndarray, fps: float, prepared: PreparedECG | None, span: ClipSpan, clip: ClipConfig,
    ecg_offset_s: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one clip: resampled, resized frames, the ECG window and the R-peaks inside it.

    Clip frame ``i`` is the cine at time ``t_start + i * span.seconds / clip.frames`` (linear
    interpolation).

    Args:
        frames: uint8 (T, H, W) cine, already cropped to the imaging region.
        fps: its frame rate.
        prepared: the study's prepared ECG, or None for an ECG-less clip (all-zero ECG, no peaks).
        span: the clip span.
        clip: clip geometry.
        ecg_offset_s: echo frame 0 on the ECG's clock.

    Returns:
        frames uint8 (clip.frames, clip.size, clip.size), ECG float32 (12, clip.ecg_samples) and int32
        R-peak positions relative to the window start.

    Raises:
        ValueError: when the span is not covered by the ECG or the cine.
    """
    times = span.t_start_s + np.arange(clip.frames) * (span.seconds / clip.frames)
    video = resize_frames(sample_frames(frames, fps, times), clip.size)
    if prepared is None:
        return video, np.zeros((12, clip.ecg_samples), np.float32), np.zeros(0, np.int32)
    s0 = int(round((span.t_start_s + ecg_offset_s) * ECG_FS))
    s1 = s0 + clip.ecg_samples
    if s0 < 0 or s1 > prepared.ecg.shape[1]:
        raise ValueError(f"ECG ({prepared.ecg.shape[1]} samples) does not cover samples {s0}-{s1}")
    ecg = np.ascontiguousarray(prepared.ecg[:, s0:s1], dtype=np.float32)
    peaks = prepared.r_peaks[(prepared.r_peaks >= s0) & (prepared.r_peaks < s1)] - s0
    return video, ecg, peaks.astype(np.int32)
