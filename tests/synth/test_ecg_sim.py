import numpy as np
import pytest

from echopulse.config import ECG_LEADS
from echopulse.synth.ecg_sim import simulate_ecg


def test_shape_units_and_first_beat():
    ecg = simulate_ecg(5.0, 72, fs=500, seed=3)
    assert ecg.signal.shape == (12, 2500) and ecg.signal.dtype == np.float32
    assert ecg.fs == 500
    assert 0 <= ecg.r_peaks_s[0] <= 0.3
    assert len(ecg.t_end_s) == len(ecg.r_peaks_s)
    assert 0.5 < np.abs(ecg.signal).max() < 5  # millivolts, not volts or counts


@pytest.mark.parametrize("hr", [55, 80, 110])
def test_rate_and_variability(hr):
    ecg = simulate_ecg(10.0, hr, seed=1)
    rr = np.diff(ecg.r_peaks_s)
    assert abs(60 / rr.mean() - hr) / hr < 0.04
    assert 0 < rr.std() < 0.08 * rr.mean()  # small but non-zero beat-to-beat variability
    qt_like = ecg.t_end_s - ecg.r_peaks_s
    assert np.all((qt_like > 0.18) & (qt_like < 0.5))


def test_lead_polarities_at_r():
    ecg = simulate_ecg(4.0, 70, seed=2)
    idx = np.round(ecg.r_peaks_s * ecg.fs).astype(int)
    at_r = ecg.signal[:, idx].mean(axis=1)
    lead = {name: at_r[i] for i, name in enumerate(ECG_LEADS)}
    assert lead["II"] > 0.5 and lead["I"] > 0.3 and lead["V6"] > 0.3
    assert lead["aVR"] < -0.5  # aVR looks at the heart from the right: inverted
    assert lead["V1"] < 0


def test_seeded_and_deterministic():
    a, b, c = simulate_ecg(3.0, 70, seed=5), simulate_ecg(3.0, 70, seed=5), simulate_ecg(3.0, 70, seed=6)
    np.testing.assert_array_equal(a.signal, b.signal)
    np.testing.assert_array_equal(a.r_peaks_s, b.r_peaks_s)
    assert not np.array_equal(a.signal, c.signal)
