"""Our R-peak detector against wfdb's XQRS (``compare_annotations`` sensitivity / positive
predictivity) on ECGs from an independent simulator (neurokit2's ECGSYN) and on a real 12-lead ECG
(pydicom's ``waveform_ecg.dcm``, Mortara, 1 kHz), plus the XQRS fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from wfdb import processing

from echopulse.config import ECG_FS
from echopulse.transforms.ecg import ECGError, detect_r_peaks, prepare_ecg, resample

WINDOW = int(0.15 * ECG_FS)  # the usual beat-matching window of QRS detector evaluation (150 ms)
EDGE_S = 0.3  # both detectors see only part of a beat at the record's edges (XQRS also learns there)


def xqrs_reference(lead_mv: np.ndarray, fs: float) -> np.ndarray:
    """XQRS beats at ``ECG_FS``: it fails to learn its thresholds at 1 kHz, so the lead is resampled."""
    return processing.xqrs_detect(resample(lead_mv, fs, ECG_FS).astype(np.float64), fs=ECG_FS, verbose=False)


def interior(peaks: np.ndarray, n: int) -> np.ndarray:
    peaks = np.asarray(peaks, dtype=np.int64)
    return peaks[(peaks >= EDGE_S * ECG_FS) & (peaks < n - EDGE_S * ECG_FS)]


def compare(reference: np.ndarray, ours: np.ndarray, n: int):
    return processing.compare_annotations(interior(reference, n), interior(ours, n), WINDOW)


@pytest.fixture(scope="module")
def ecgsyn_records():
    """Lead II-like single-lead records at 500 Hz from neurokit2's ECGSYN, 50-150 bpm, with noise."""
    import neurokit2 as nk

    logging.getLogger("neurokit2").setLevel(logging.ERROR)
    return {hr: np.asarray(nk.ecg_simulate(duration=15, sampling_rate=500, heart_rate=hr, noise=0.1,
                                           method="ecgsyn", random_state=hr), dtype=np.float64)
            for hr in (50, 80, 120, 150)}


def test_detector_agrees_with_xqrs_on_neurokit2_ecgsyn_records(ecgsyn_records):
    tp = fn = fp = 0
    errors = []
    for hr, sig in ecgsyn_records.items():
        n = int(round(len(sig) * ECG_FS / 500))
        ours = prepare_ecg(sig[None], 500, ["II"]).r_peaks
        c = compare(xqrs_reference(sig, 500), ours, n)
        assert c.n_ref >= 0.9 * hr * (15 - 2 * EDGE_S) / 60  # XQRS itself saw the beats
        tp, fn, fp = tp + c.tp, fn + c.fn, fp + c.fp
        errors += list(np.abs(c.matched_ref_sample - c.matched_test_sample) * 1000 / ECG_FS)
    sensitivity, ppv = tp / (tp + fn), tp / (tp + fp)
    assert sensitivity >= 0.99 and ppv >= 0.99, (sensitivity, ppv)
    assert np.median(errors) <= 8.0  # ms: both put the beat on the R wave


def test_detector_agrees_with_xqrs_on_a_real_12_lead_ecg():
    from pydicom.data import get_testdata_file

    from echopulse.io.ecg import read_ecg

    path = get_testdata_file("waveform_ecg.dcm", download=False)
    sig, meta = read_ecg(path)  # 12 leads, 10 s at 1 kHz, mV
    assert meta["fs"] == 1000 and len(meta["leads"]) == 12
    prepared = prepare_ecg(sig, meta["fs"], meta["leads"])
    c = compare(xqrs_reference(sig[meta["leads"].index("II")], meta["fs"]), prepared.r_peaks,
                prepared.ecg.shape[1])
    assert c.n_ref >= 9 and c.sensitivity == 1.0 and c.positive_predictivity == 1.0
    assert np.median(np.abs(c.matched_ref_sample - c.matched_test_sample)) * 1000 / ECG_FS <= 12.0


def _burst(sig: np.ndarray, fs: float, at_s: float, seconds: float, mv: float) -> np.ndarray:
    """An electrode-motion burst: a few hundred ms of large 15 Hz oscillation."""
    out = sig.copy()
    i, n = int(at_s * fs), int(seconds * fs)
    out[i : i + n] += mv * np.sin(2 * np.pi * 15 * np.arange(n) / fs)
    return out


def test_xqrs_fallback_when_an_artifact_hides_every_beat(ecgsyn_records):
    sig = _burst(ecgsyn_records[80], 500, at_s=7.0, seconds=0.2, mv=30.0)
    # the burst sets our global height: every beat is below it
    from echopulse.transforms.ecg import bandpass

    filtered = bandpass(resample(sig[None], 500, ECG_FS), ECG_FS)
    assert detect_r_peaks(np.vstack([filtered, np.zeros((11, filtered.shape[1]))]), ECG_FS).size < 2
    prepared = prepare_ecg(sig[None], 500, ["II"])  # the fallback finds the beats before the burst
    assert prepared.r_peaks.size >= 8
    assert prepared.heart_rate_bpm == pytest.approx(80, abs=5)


def test_fallback_never_makes_up_a_rhythm_from_noise():
    rng = np.random.default_rng(0)
    noise = 0.02 * rng.standard_normal(500 * 10)
    noise[2500:2510] += 5.0  # one spike on a line with no heart in it
    with pytest.raises(ECGError, match="R-peaks"):
        prepare_ecg(noise[None], 500, ["II"])


def test_a_record_that_starts_on_an_r_wave_keeps_that_beat_where_it_is(ecgsyn_records):
    sig = ecgsyn_records[80]
    beats = xqrs_reference(sig, 500)
    r_at = int(round(beats[3] * 500 / ECG_FS))  # an interior beat, at 500 Hz
    r_at += int(np.argmax(sig[r_at - 10 : r_at + 11])) - 10  # its very sample
    cut = sig[r_at:]  # the record now begins on the R wave's peak
    peaks = prepare_ecg(cut[None], 500, ["II"]).r_peaks
    # the filter's edge padding used to turn that edge into a false beat 44 ms in (the S wave)
    assert peaks[0] * 1000 / ECG_FS <= 8.0
    c = compare(xqrs_reference(cut, 500), peaks, int(len(cut) * ECG_FS / 500))
    assert c.sensitivity == 1.0 and c.positive_predictivity == 1.0
