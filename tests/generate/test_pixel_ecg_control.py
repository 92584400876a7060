"""The phantom-free ECG-control score: rate and phase from pixels, on synthetic moving videos."""

from __future__ import annotations

import numpy as np
import pytest

from echopulse.metrics import beat_phase_locking, pixel_ecg_control, pixel_heart_rate


def beating_disc(bpm: float, fps: float = 25.0, seconds: float = 8.0, size: int = 48, noise: float = 0.02,
                 seed: int = 0, phase_s: float = 0.0, beats_s: np.ndarray | None = None) -> np.ndarray:
    """A bright sector-like square with a dark disc whose radius shrinks sharply after each beat
    (at ``phase_s + k * 60 / bpm``, or at ``beats_s``) and refills slowly -- nothing like the
    phantom's model."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * fps)) / fps
    period = 60.0 / bpm
    cycle = ((t - phase_s) % period) / period
    if beats_s is not None:
        beats = np.concatenate([[beats_s[0] - period], beats_s, [beats_s[-1] + period]])
        k = np.searchsorted(beats, t, side="right") - 1
        cycle = (t - beats[k]) / (beats[k + 1] - beats[k])
    radius = size * (0.3 - 0.1 * np.exp(-((cycle - 0.3) / 0.12) ** 2))
    yy, xx = np.mgrid[:size, :size] - size / 2
    r = np.hypot(yy, xx)
    frames = np.where(r[None] < radius[:, None, None], 0.15, 0.7)
    frames = frames + noise * rng.standard_normal(frames.shape)
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("bpm", [45.0, 72.0, 110.0, 145.0])
def test_heart_rate_from_pixels(bpm):
    hr, peak = pixel_heart_rate(beating_disc(bpm), 25.0)
    assert abs(hr - bpm) <= 3.0, (hr, bpm)
    assert peak > 0.5


@pytest.mark.parametrize("bpm", [124.0, 131.0, 134.0, 138.0])
def test_fast_heart_rate_between_whole_frames_at_10_fps(bpm):
    # 134 bpm at 10 fps is a period of 4.48 frames: the whole-frame lags 4 and 5 both miss the
    # peak and two periods (8.96) correlate best; read on whole frames this gives half the rate
    hr, _ = pixel_heart_rate(beating_disc(bpm, fps=10.0, seconds=6.0), 10.0)
    assert abs(hr - bpm) <= 3.0, (hr, bpm)


def test_a_still_noisy_video_has_no_heart_rate():
    rng = np.random.default_rng(1)
    still = (np.clip(0.5 + 0.05 * rng.standard_normal((200, 48, 48)), 0, 1) * 255).astype(np.uint8)
    hr, _ = pixel_heart_rate(still, 25.0)
    assert np.isnan(hr)


def test_phase_locking_tells_the_driving_beat_from_another():
    fps, bpm = 25.0, 72.0
    video = beating_disc(bpm, fps=fps, phase_s=0.2)
    own = 0.2 + np.arange(12) * 60.0 / bpm
    other = 0.05 + np.arange(16) * 60.0 / 97.0  # another ECG: another rate
    assert beat_phase_locking(video, fps, own) > 0.8
    assert beat_phase_locking(video, fps, other) < 0.3


def test_pixel_ecg_control_matched_and_shuffled():
    from echopulse.synth.ecg_sim import simulate_ecg
    from echopulse.transforms.ecg import prepare_ecg
    from echopulse.config import ECG_LEADS

    fps = 25.0
    ecgs = {bpm: prepare_ecg(simulate_ecg(8.0, bpm, fs=250, seed=3).signal, 250, list(ECG_LEADS))
            for bpm in (64.0, 118.0)}
    # the video's beats start at its ECG's R-peaks
    video = beating_disc(64.0, fps=fps, beats_s=ecgs[64.0].r_peaks / 250)
    matched = pixel_ecg_control(video, fps, ecgs[64.0].ecg)
    shuffled = pixel_ecg_control(video, fps, ecgs[118.0].ecg)
    assert matched["hr_match"] == 1.0 and matched["score"] > 0.7, matched
    assert shuffled["hr_match"] == 0.0 and shuffled["score"] <= 0.3, shuffled
