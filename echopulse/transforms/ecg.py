"""ECG conditioning: resample to 250 Hz, band-pass, 12-lead layout, R-peaks, standardize."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import signal as sps

from echopulse.config import ECG_FS, ECG_LEADS
from echopulse.io.ecg import normalize_lead_name

log = logging.getLogger(__name__)

MIN_SECONDS = 2.0
_FLAT_MV = 1e-3  # a lead whose band-passed std is below this carries no ECG


class ECGError(ValueError):
    """An ECG that cannot be conditioned (non-finite, flat, too short, no beats)."""


@dataclass
class PreparedECG:
    """A 12-lead ECG ready for clips.

    Attributes:
        ecg: float32 (12, N) at ``config.ECG_FS``, band-passed and standardized jointly over the
            real leads and time (:func:`standardize`).
        lead_mask: bool (12,), True where the lead is real (present and not flat).
        r_peaks: int (n,) R-peak sample indices at ``config.ECG_FS``.
        heart_rate_bpm: 60 / median RR.
    """

    ecg: np.ndarray
    lead_mask: np.ndarray
    r_peaks: np.ndarray
    heart_rate_bpm: float

    @property
    def duration_s(self) -> float:
        return self.ecg.shape[1] / ECG_FS


def resample(sig: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along the last axis.

    Args:
        sig: (..., N) signal.
        fs_in: input rate in Hz.
        fs_out: output rate in Hz.
    """
    ratio = Fraction(float(fs_out) / float(fs_in)).limit_denominator(1000)
    if ratio == 1:
        return np.asarray(sig, dtype=np.float32)
    # padtype="line": zero padding would make an edge transient out of any baseline offset
    out = sps.resample_poly(
        np.asarray(sig, dtype=np.float64), ratio.numerator, ratio.denominator, axis=-1, padtype="line"
    )
    return out.astype(np.float32)


def bandpass(sig: np.ndarray, fs: float, low: float = 0.67, high: float = 40.0) -> np.ndarray:
    """Zero-phase 2nd-order Butterworth band-pass along the last axis (removes wander and HF noise).

    Args:
        sig: (..., N) signal.
        fs: rate in Hz.
        low: high-pass corner in Hz.
        high: low-pass corner in Hz (clipped below Nyquist).
    """
    sos = butter_bandpass(float(low), float(min(high, 0.45 * fs)), float(fs))
    # even (mirror) padding: a record that starts on an R wave mirrors into a whole beat; the default
    # odd padding turned that edge into a step whose ringing read as a false beat 40 ms in
    return sps.sosfiltfilt(sos, np.asarray(sig, dtype=np.float64), axis=-1, padtype="even").astype(np.float32)


@lru_cache(maxsize=32)
def butter_bandpass(low: float, high: float, fs: float) -> np.ndarray:
    """2nd-order Butterworth band-pass SOS, designed once per (low, high, fs): the design costs
    more than filtering a short single-lead record."""
    return sps.butter(2, [low, high], btype="bandpass", fs=fs, output="sos")


def standardize(sig: np.ndarray, lead_mask: np.ndarray) -> np.ndarray:
    """Zero mean, unit std jointly over the real leads and time (how ST-MEM was pre-trained);
    absent (masked-out) leads are all zero.

    One mean and one std for the whole recording keep the leads' relative amplitudes (a small
    aVR stays small next to a tall V3), which a per-lead scaling would erase.

    Args:
        sig: (12, N) signal.
        lead_mask: bool (12,).
    """
    sig = np.asarray(sig, dtype=np.float64)
    out = np.zeros_like(sig)
    real = np.flatnonzero(lead_mask)
    if real.size:
        values = sig[real]
        std = values.std()
        if std > 1e-8:
            out[real] = (values - values.mean()) / std
    return out.astype(np.float32)


def to_twelve_leads(sig: np.ndarray, lead_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Place named leads into ``config.ECG_LEADS`` order; absent leads are zero with mask False.

    Unrecognised names are dropped; if a lead appears twice the first wins. Missing limb leads are
    not derived (the mask means "recorded").

    Args:
        sig: (n_leads, N) signal.
        lead_names: names of the rows of ``sig``.
    """
    if sig.ndim != 2 or sig.shape[0] != len(lead_names):
        raise ECGError(f"signal shape {sig.shape} does not match {len(lead_names)} lead names")
    out = np.zeros((len(ECG_LEADS), sig.shape[1]), dtype=np.float32)
    mask = np.zeros(len(ECG_LEADS), dtype=bool)
    for row, name in zip(sig, lead_names):
        canonical = normalize_lead_name(name)
        if canonical in ECG_LEADS and not mask[ECG_LEADS.index(canonical)]:
            out[ECG_LEADS.index(canonical)] = row
            mask[ECG_LEADS.index(canonical)] = True
        elif canonical not in ECG_LEADS:
            log.debug("ignoring unrecognised lead %r", name)
    return out, mask


def detect_r_peaks(sig12: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices from all real leads.

    QRS energy (5-20 Hz band, squared and summed over leads, smoothed over 50 ms) is peak-picked with
    a 0.25 s refractory period and an adaptive height; each candidate is then moved to the extremum,
    within +-60 ms, of the leads projected onto that beat's QRS polarity.

    Args:
        sig12: (12, N) signal (absent leads all zero).
        fs: rate in Hz.
    """
    sig12 = np.asarray(sig12, dtype=np.float64)
    real = sig12.std(axis=1) > 1e-6
    if not real.any() or sig12.shape[1] < int(0.5 * fs):
        return np.zeros(0, dtype=np.int64)
    leads = sig12[real]
    qrs = bandpass(leads, fs, 5.0, 20.0).astype(np.float64)
    energy = np.sum(qrs**2, axis=0)
    win = max(1, int(0.05 * fs))
    energy = np.convolve(energy, np.ones(win) / win, mode="same")
    height = 0.25 * np.percentile(energy, 99)
    if height <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates, _ = sps.find_peaks(energy, height=height, distance=max(1, int(0.25 * fs)))
    wide = bandpass(leads, fs, 0.67, 40.0).astype(np.float64)
    half = int(0.06 * fs)
    peaks = []
    for c in candidates:
        lo, hi = max(0, c - half), min(wide.shape[1], c + half + 1)
        seg = wide[:, lo:hi]  # (leads, w)
        # per-lead polarity: sign of the lead's largest excursion in the window
        polarity = np.sign(seg[np.arange(seg.shape[0]), np.argmax(np.abs(seg), axis=1)])
        weight = polarity * np.abs(seg).max(axis=1)
        peaks.append(lo + int(np.argmax(weight @ seg)))
    peaks = np.unique(np.asarray(peaks, dtype=np.int64))
    # the refinement can pull two candidates onto one beat; keep the refractory period
    keep = np.concatenate([[True], np.diff(peaks) > int(0.25 * fs)]) if peaks.size else peaks.astype(bool)
    return peaks[keep]


def detect_r_peaks_xqrs(sig12: np.ndarray, fs: float) -> np.ndarray:
    """R-peaks by wfdb's XQRS on the real lead with the most QRS-band energy (the fallback).

    XQRS learns its thresholds from the first beats and adapts them as it goes, so a single huge
    artifact that hides every beat from :func:`detect_r_peaks`'s global height does not blind it.
    It expects millivolts at a clinical rate (it fails to learn at 1 kHz): pass the band-passed
    signal at ``config.ECG_FS``. XQRS finds "beats" in noise too, so its answer is kept only when
    the beats stand out (median R amplitude at least 4 robust standard deviations of the lead) at
    a heart rate (median R-R 0.3-2 s); otherwise nothing is returned rather than a made-up rhythm.

    Args:
        sig12: (12, N) signal in mV (absent leads all zero).
        fs: rate in Hz.
    """
    from wfdb import processing

    sig12 = np.asarray(sig12, dtype=np.float64)
    real = np.flatnonzero(sig12.std(axis=1) > 1e-6)
    none = np.zeros(0, dtype=np.int64)
    if real.size == 0 or sig12.shape[1] < int(2 * fs):
        return none
    energy = [float(np.sum(bandpass(sig12[i], fs, 5.0, 20.0).astype(np.float64) ** 2)) for i in real]
    lead = sig12[real[int(np.argmax(energy))]]
    peaks = np.unique(np.asarray(processing.xqrs_detect(lead, fs=fs, verbose=False), dtype=np.int64))
    if peaks.size < 2 or not 0.3 <= float(np.median(np.diff(peaks))) / fs <= 2.0:
        return none
    robust_std = 1.4826 * float(np.median(np.abs(lead - np.median(lead))))
    if float(np.median(np.abs(lead[peaks]))) < 4.0 * robust_std:
        return none
    return peaks


def prepare_ecg(sig: np.ndarray, fs: float, lead_names: list[str]) -> PreparedECG:
    """Resample to ``config.ECG_FS``, band-pass, detect R-peaks (before standardizing), standardize.

    Args:
        sig: (n_leads, N) ECG in mV.
        fs: its rate in Hz.
        lead_names: names of the rows of ``sig``.

    Raises:
        ECGError: non-finite values, shorter than 2 s, no recognisable or non-flat lead, or fewer than
            two R-peaks (from :func:`detect_r_peaks`, else from :func:`detect_r_peaks_xqrs`).
    """
    sig = np.asarray(sig, dtype=np.float64)
    if sig.ndim != 2:
        raise ECGError(f"ECG must be (leads, samples), got shape {sig.shape}")
    if not np.all(np.isfinite(sig)):
        raise ECGError("ECG contains NaN or infinite values")
    if fs <= 0 or sig.shape[1] / fs < MIN_SECONDS:
        seconds = sig.shape[1] / max(fs, 1e-9)
        raise ECGError(f"ECG too short: {seconds:.2f} s (need at least {MIN_SECONDS:.0f} s)")
    twelve, mask = to_twelve_leads(sig.astype(np.float32), lead_names)
    if not mask.any():
        raise ECGError(f"no recognisable ECG lead among {list(lead_names)}")
    mask &= twelve.std(axis=1) > _FLAT_MV  # disconnected electrodes read as a constant
    # only the recorded leads are filtered (absent ones stay zero): a one-lead ECG costs one lead
    real = resample(twelve[mask], fs, ECG_FS)
    filtered = np.zeros((len(ECG_LEADS), real.shape[1]), dtype=np.float32)
    filtered[mask] = bandpass(real, ECG_FS)
    mask &= filtered.std(axis=1) > _FLAT_MV
    if not mask.any():
        raise ECGError("ECG is flat: no lead carries a signal")
    filtered[~mask] = 0.0
    r_peaks = detect_r_peaks(filtered, ECG_FS)
    if r_peaks.size < 2:
        fallback = detect_r_peaks_xqrs(filtered, ECG_FS)
        if fallback.size >= 2:
            log.info("R-peak detector found %d peak(s); XQRS found %d (used)", r_peaks.size, fallback.size)
            r_peaks = fallback
    if r_peaks.size < 2:
        raise ECGError(f"found {r_peaks.size} R-peaks; need at least 2 to measure the heart rate")
    heart_rate = 60.0 * ECG_FS / float(np.median(np.diff(r_peaks)))
    return PreparedECG(
        ecg=standardize(filtered, mask),
        lead_mask=mask,
        r_peaks=r_peaks,
        heart_rate_bpm=float(heart_rate),
    )


def shifted_ecg(ecg: np.ndarray, heart_rate_bpm: np.ndarray | float | None = None,
                fs: float = ECG_FS) -> np.ndarray:
    """The same ECG half a beat later: each row rolled (circularly, along time) by half its R-R
    interval, so every R-peak lands where the last beat's mid-diastole was.

    The negative condition of timing guidance (``sample(negative_ecg=...)``): the same leads,
    amplitudes and rate as ``ecg`` -- a condition the model has seen in training -- with only the
    beat's phase changed.

    Args:
        ecg: ``(12, L)`` or ``(b, 12, L)`` at ``fs``.
        heart_rate_bpm: per row (or one for all); default: from the R-peaks of each row, or half
            the window when it holds fewer than two.
        fs: sample rate.
    """
    ecg = np.asarray(ecg)
    rows = ecg[None] if ecg.ndim == 2 else ecg
    rates = np.broadcast_to(np.asarray(np.nan if heart_rate_bpm is None else heart_rate_bpm, dtype=np.float64),
                            (len(rows),))
    out = np.empty_like(rows)
    for i, (row, bpm) in enumerate(zip(rows, rates)):
        if np.isfinite(bpm) and bpm > 0:
            rr = 60.0 * fs / bpm
        else:
            peaks = detect_r_peaks(row, fs)
            rr = float(np.median(np.diff(peaks))) if len(peaks) >= 2 else row.shape[-1]
        out[i] = np.roll(row, int(round(rr / 2)), axis=-1)
    return out[0] if ecg.ndim == 2 else out
