import numpy as np
import pytest

from echopulse.config import ECG_FS, ECG_LEADS
from echopulse.synth.ecg_sim import simulate_ecg
from echopulse.transforms.ecg import (
    ECGError,
    bandpass,
    detect_r_peaks,
    prepare_ecg,
    resample,
    standardize,
    to_twelve_leads,
)


def test_resample_keeps_a_sine():
    t = np.arange(1000) / 500
    x = np.sin(2 * np.pi * 3 * t)[None]
    y = resample(x, 500, 250)
    assert y.shape == (1, 500) and y.dtype == np.float32
    t2 = np.arange(500) / 250
    np.testing.assert_allclose(y[0, 20:-20], np.sin(2 * np.pi * 3 * t2)[20:-20], atol=0.02)
    assert resample(x, 1000, 250).shape == (1, 250)


def test_bandpass_removes_wander_keeps_qrs_band():
    t = np.arange(5000) / 500
    wander, ten_hz = 2.0 + np.sin(2 * np.pi * 0.1 * t), np.sin(2 * np.pi * 10 * t)
    y = bandpass((wander + ten_hz)[None], 500)[0]
    core = slice(500, -500)
    assert np.abs(y[core] - ten_hz[core]).max() < 0.15
    assert abs(y[core].mean()) < 0.02


def test_standardize_and_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(12, 400))
    mask = np.ones(12, dtype=bool)
    mask[4] = False
    x[7] *= 3  # a tall lead
    y = standardize(x, mask)
    # jointly over leads and time (ST-MEM's pre-training): one mean, one std
    assert abs(y[mask].mean()) < 1e-5 and abs(y[mask].std() - 1) < 1e-4
    assert not y[4].any()
    # relative amplitudes survive: the tall lead stays about 3x the others
    assert 2.5 < y[7].std() / np.median(y[mask].std(axis=1)) < 3.5


def test_to_twelve_leads_places_by_name():
    x = np.stack([np.full(10, 1.0), np.full(10, 2.0), np.full(10, 3.0)])
    out, mask = to_twelve_leads(x, ["Lead I", "v2", "Pleth"])
    assert out.shape == (12, 10) and mask.tolist() == [n in ("I", "V2") for n in ECG_LEADS]
    assert out[ECG_LEADS.index("V2")][0] == 2.0 and out[~mask].sum() == 0


@pytest.mark.parametrize("seed,hr", [(0, 55), (1, 75), (2, 100), (3, 120)])
def test_r_peaks_match_simulator_truth(seed, hr):
    ecg = simulate_ecg(8.0, hr, seed=seed)
    sig = bandpass(resample(ecg.signal, 500, ECG_FS), ECG_FS)
    peaks = detect_r_peaks(sig, ECG_FS)
    truth = ecg.r_peaks_s * ECG_FS
    assert len(peaks) == len(truth)
    assert np.abs(peaks - truth).max() <= 2


def test_prepare_ecg():
    ecg = simulate_ecg(6.0, 84, seed=4)
    prepared = prepare_ecg(ecg.signal, 500, list(ECG_LEADS))
    assert prepared.ecg.shape == (12, 1500) and prepared.ecg.dtype == np.float32
    assert prepared.lead_mask.all()
    assert abs(prepared.ecg.std() - 1) < 1e-3 and abs(prepared.ecg.mean()) < 1e-3
    assert prepared.heart_rate_bpm == pytest.approx(60 / np.median(np.diff(ecg.r_peaks_s)), rel=0.02)
    assert np.abs(prepared.r_peaks - ecg.r_peaks_s * ECG_FS).max() <= 2


def test_prepare_single_lead_and_dead_lead():
    ecg = simulate_ecg(4.0, 70, seed=5)
    lead_one = prepare_ecg(ecg.signal[:1], 500, ["I"])
    assert lead_one.lead_mask.sum() == 1 and lead_one.lead_mask[0]
    assert len(lead_one.r_peaks) == len(ecg.r_peaks_s)
    sig = ecg.signal.copy()
    sig[7] = 0.4  # a disconnected electrode: constant
    prepared = prepare_ecg(sig, 500, list(ECG_LEADS))
    assert not prepared.lead_mask[7] and not prepared.ecg[7].any()


def test_prepare_errors():
    ecg = simulate_ecg(4.0, 70, seed=6).signal
    bad = ecg.copy()
    bad[3, 100] = np.nan
    with pytest.raises(ECGError, match="NaN"):
        prepare_ecg(bad, 500, list(ECG_LEADS))
    with pytest.raises(ECGError, match="flat"):
        prepare_ecg(np.full_like(ecg, 0.2), 500, list(ECG_LEADS))
    with pytest.raises(ECGError, match="too short"):
        prepare_ecg(ecg[:, :750], 500, list(ECG_LEADS))
    with pytest.raises(ECGError, match="no recognisable"):
        prepare_ecg(ecg[:2], 500, ["Pleth", "Resp"])
    with pytest.raises(ECGError, match="R-peaks"):  # one bump in 4 s: no heart rate
        prepare_ecg(np.r_[np.zeros(1500), np.hanning(60), np.zeros(440)][None], 500, ["II"])
