import numpy as np
import pytest
import wfdb
from pydicom.data import get_testdata_file

from echopulse.config import ECG_LEADS
from echopulse.io.ecg import ECGReadError, normalize_lead_name, read_ecg
from echopulse.synth.ecg_sim import simulate_ecg


def test_dicom_twelve_lead():
    sig, meta = read_ecg(get_testdata_file("waveform_ecg.dcm"))
    assert meta["source"] == "dicom" and meta["fs"] == 1000.0
    assert meta["leads"] == list(ECG_LEADS)
    assert sig.dtype == np.float32 and sig.shape == (12, 10000)
    peak = np.abs(sig - np.median(sig, axis=1, keepdims=True)).max(axis=1)
    assert np.all(peak > 0.1) and np.all(peak < 5)  # millivolts


@pytest.mark.parametrize("suffix", [".hea", ""])
def test_wfdb_record(tmp_path, suffix):
    ecg = simulate_ecg(3.0, 70, seed=2)
    wfdb.wrsamp("rec", fs=500, units=["mV"] * 12, sig_name=list(ECG_LEADS),
                p_signal=ecg.signal.T.astype(np.float64), fmt=["16"] * 12, write_dir=str(tmp_path))
    sig, meta = read_ecg(str(tmp_path / "rec") + suffix)
    assert meta == {"fs": 500.0, "leads": list(ECG_LEADS), "source": "wfdb"}
    np.testing.assert_allclose(sig, ecg.signal, atol=2e-3)


def test_wfdb_microvolts_and_odd_names(tmp_path):
    x = np.linspace(-1, 1, 1000)[:, None] * np.array([[1000.0, 500.0]])  # uV
    wfdb.wrsamp("uv", fs=250, units=["uV", "uV"], sig_name=["Lead I", "AVR"], p_signal=x,
                fmt=["16", "16"], write_dir=str(tmp_path))
    sig, meta = read_ecg(tmp_path / "uv.hea")
    assert meta["leads"] == ["I", "aVR"]
    assert np.abs(sig).max(axis=1) == pytest.approx([1.0, 0.5], rel=1e-3)


@pytest.mark.parametrize("raw,expected", [
    ("Lead I (Einthoven)", "I"), ("AVR", "aVR"), ("avl", "aVL"), ("v6", "V6"), ("Lead III", "III"),
    ("MDC_ECG_LEAD_V2", "V2"), ("Pleth", "Pleth"),
])
def test_lead_names(raw, expected):
    assert normalize_lead_name(raw) == expected


def test_errors(tmp_path):
    with pytest.raises(ECGReadError, match="not found"):
        read_ecg(tmp_path / "missing.hea")
    with pytest.raises(ECGReadError, match="not found"):
        read_ecg(tmp_path / "missing.xml")
    text = tmp_path / "ecg.csv"
    text.write_text("t,I\n0,0.1\n")
    with pytest.raises(ECGReadError, match="unknown ECG format"):
        read_ecg(text)
    with pytest.raises(ECGReadError, match="no waveform"):
        read_ecg(get_testdata_file("CT_small.dcm"))
