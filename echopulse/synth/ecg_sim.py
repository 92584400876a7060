"""12-lead ECG simulator: a McSharry-style sum of Gaussian waves (P, Q, R, S, T) per beat.

Each wave is a 3-D cardiac dipole (x: patient left, y: inferior, z: anterior) times a Gaussian in
time; every lead is the projection of the dipole onto that lead's axis, so the 12 leads are
consistent projections of one heart (aVR inverted, V1 mostly negative, V5/V6 tall R). Closed-form in
time rather than integrating McSharry's ODE: the ODE's z-equation integrates to exactly this sum of
Gaussians over the phase, and a closed form gives exact R-peak and T-end times for ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echopulse.config import ECG_LEADS

# Wave: (offset from R in s at RR = 1 s, width sigma in s, dipole (x, y, z) in mV)
# P and T offsets/widths scale with sqrt(RR) (Bazett-like); QRS timing does not.
_WAVES = {
    "P": (-0.19, 0.025, (0.08, 0.12, 0.02)),
    "Q": (-0.028, 0.009, (-0.08, -0.03, 0.22)),
    "R": (0.0, 0.011, (0.95, 0.85, -0.55)),
    "S": (0.032, 0.010, (-0.30, -0.25, -0.55)),
    "T": (None, None, (0.28, 0.30, 0.15)),  # placed from the QT interval below
}

# Lead axes as unit vectors in (x, y, z); frontal-plane leads at their hexaxial angles,
# precordial leads around the horizontal plane (V1 right-anterior ... V6 left-lateral).
_FRONTAL_DEG = {"I": 0.0, "II": 60.0, "III": 120.0, "aVR": -150.0, "aVL": -30.0, "aVF": 90.0}
_PRECORDIAL_DEG = {"V1": 115.0, "V2": 95.0, "V3": 75.0, "V4": 55.0, "V5": 30.0, "V6": 5.0}
_PRECORDIAL_GAIN = 1.4  # chest leads sit closer to the heart: larger amplitudes


@dataclass
class SimulatedECG:
    """A simulated 12-lead ECG with its ground-truth fiducials.

    Attributes:
        signal: float32 (12, N) in mV, leads in ``config.ECG_LEADS`` order; sample 0 is t = 0.
        fs: sampling rate in Hz.
        r_peaks_s: R-peak times (s) inside [0, duration).
        t_end_s: T-wave end time (s) of the beat of each R-peak (may lie past the end).
        beat_r_s: R times of every simulated beat, including one before 0 and one after the end.
        beat_t_end_s: T-end time of every simulated beat (same length as ``beat_r_s``).
    """

    signal: np.ndarray
    fs: int
    r_peaks_s: np.ndarray
    t_end_s: np.ndarray
    beat_r_s: np.ndarray
    beat_t_end_s: np.ndarray

    @property
    def duration_s(self) -> float:
        return self.signal.shape[1] / self.fs


def t_wave_timing(rr_s: float) -> tuple[float, float, float]:
    """T-wave peak offset, width and end offset (s from the R-peak) for one RR interval.

    QT follows Bazett (QT = 0.40 * sqrt(RR), from QRS onset ~40 ms before R); the T end is where the
    T Gaussian has fallen to ~4 % of its peak (2.5 sigma).

    Args:
        rr_s: the beat's RR interval in seconds.
    """
    sigma = 0.045 * np.sqrt(rr_s)
    end = 0.40 * np.sqrt(rr_s) - 0.04
    return end - 2.5 * sigma, sigma, end


def _lead_axes() -> np.ndarray:
    axes = []
    for name in ECG_LEADS:
        if name in _FRONTAL_DEG:
            a = np.deg2rad(_FRONTAL_DEG[name])
            axes.append((np.cos(a), np.sin(a), 0.0))
        else:
            a = np.deg2rad(_PRECORDIAL_DEG[name])
            axes.append((_PRECORDIAL_GAIN * np.cos(a), 0.0, _PRECORDIAL_GAIN * np.sin(a)))
    return np.asarray(axes)  # (12, 3)


def simulate_ecg(duration_s: float, heart_rate_bpm: float, fs: int = 500, seed: int = 0) -> SimulatedECG:
    """Simulate a 12-lead ECG with small beat-to-beat variability, baseline wander and noise.

    Args:
        duration_s: length of the record in seconds.
        heart_rate_bpm: mean heart rate.
        fs: sampling rate in Hz.
        seed: RNG seed; the same arguments give the same signal.

    Returns:
        A :class:`SimulatedECG`; the first R-peak lies in [0.08, 0.28] s.
    """
    if duration_s <= 0 or heart_rate_bpm <= 0:
        raise ValueError("duration_s and heart_rate_bpm must be positive")
    rng = np.random.default_rng(seed)
    rr_mean = 60.0 / heart_rate_bpm
    n = int(round(duration_s * fs))
    t = np.arange(n) / fs

    # beat times: respiratory sinus arrhythmia (~0.25 Hz) plus a little jitter
    resp_hz, resp_phase = rng.uniform(0.2, 0.3), rng.uniform(0, 2 * np.pi)
    first_r = rng.uniform(0.08, 0.28)
    beats = [first_r - rr_mean]
    while beats[-1] < duration_s + rr_mean:
        tb = beats[-1]
        rsa = 0.03 * np.sin(2 * np.pi * resp_hz * tb + resp_phase)
        rr = rr_mean * (1 + rsa + 0.01 * rng.standard_normal())
        beats.append(tb + rr)
    beat_r = np.asarray(beats)
    beat_rr = np.diff(beat_r, append=beat_r[-1] + rr_mean)  # each beat's own RR (to the next)

    axes = _lead_axes()
    signal = np.zeros((12, n))
    beat_t_end = np.empty_like(beat_r)
    for i, (r, rr) in enumerate(zip(beat_r, beat_rr)):
        amp = 1 + 0.04 * np.sin(2 * np.pi * resp_hz * r + resp_phase) + 0.02 * rng.standard_normal()
        tp, ts, te = t_wave_timing(rr)
        beat_t_end[i] = r + te
        for name, (offset, sigma, dipole) in _WAVES.items():
            if name == "T":
                offset, sigma = tp, ts
            elif name == "P":
                offset, sigma = offset * np.sqrt(rr), sigma * np.sqrt(rr)
            lo, hi = np.searchsorted(t, [r + offset - 6 * sigma, r + offset + 6 * sigma])
            if hi <= lo:
                continue
            g = np.exp(-0.5 * ((t[lo:hi] - r - offset) / sigma) ** 2)  # (m,)
            signal[:, lo:hi] += amp * (axes @ np.asarray(dipole))[:, None] * g[None, :]

    # baseline wander (respiration, electrode motion) and broadband noise
    for f_hz, a_mv in ((resp_hz, 0.06), (rng.uniform(0.05, 0.12), 0.04)):
        phases = rng.uniform(0, 2 * np.pi, size=(12, 1))
        signal += a_mv * rng.uniform(0.5, 1.0, size=(12, 1)) * np.sin(2 * np.pi * f_hz * t[None, :] + phases)
    signal += 0.012 * rng.standard_normal(signal.shape)

    inside = (beat_r >= 0) & (beat_r < duration_s)
    return SimulatedECG(
        signal=signal.astype(np.float32),
        fs=fs,
        r_peaks_s=beat_r[inside],
        t_end_s=beat_t_end[inside],
        beat_r_s=beat_r,
        beat_t_end_s=beat_t_end,
    )
