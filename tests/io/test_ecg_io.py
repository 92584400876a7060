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
    assert meta == {"fs": 500.0, "leads": list(ECG_LEADS), "source": "wfdb", "start": None}
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
    text = tmp_path / "ecg.xml"
    text.write_text("<ecg/>")
    with pytest.raises(ECGReadError, match="unknown ECG format"):
        read_ecg(text)
    with pytest.raises(ECGReadError, match="no waveform"):
        read_ecg(get_testdata_file("CT_small.dcm"))


# --- more sources: lead subsets, Apple Health, CSV/NPY, Waveform Sequence in an echo -------------

import pydicom  # noqa: E402

from echopulse.synth.dicom_variants import add_waveform  # noqa: E402


def test_wfdb_lead_subset_any_rate(tmp_path):
    """An MIT-BIH-like record: 360 Hz, two leads named MLII and V1."""
    ecg = simulate_ecg(4.0, 75, fs=360, seed=4)
    two = ecg.signal[[1, 6]]
    wfdb.wrsamp("mitbih", fs=360, units=["mV", "mV"], sig_name=["MLII", "V1"], p_signal=two.T,
                fmt=["212", "212"], write_dir=str(tmp_path))
    sig, meta = read_ecg(tmp_path / "mitbih.hea")
    assert meta["fs"] == 360.0 and meta["leads"] == ["II", "V1"] and sig.shape == two.shape
    np.testing.assert_allclose(sig, two, atol=0.01)


def apple_health_csv(path, microvolts, rate=512):
    """What Health > Export All Data writes under electrocardiograms/ (header block, then values)."""
    lines = ["Name,Alex Phantom", 'Date of Birth,"Jan 1, 1970"', "Recorded Date,2024-03-05 09:15:30 +0100",
             "Classification,Sinus Rhythm", "Symptoms,", "Software Version,2", 'Device,"Watch6,2"',
             f"Sample Rate,{rate} hertz", "Lead,Lead I", "Unit,µV", "", "", ""]
    lines += [f"{v:.3f}" for v in microvolts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_apple_health_export(tmp_path):
    ecg = simulate_ecg(30.0, 64, fs=512, seed=5)
    path = apple_health_csv(tmp_path / "ecg_2024-03-05.csv", ecg.signal[0] * 1000.0)
    sig, meta = read_ecg(path)
    assert meta["source"] == "apple_health" and meta["fs"] == 512.0 and meta["leads"] == ["I"]
    assert sig.shape == (1, 30 * 512) and sig.dtype == np.float32
    np.testing.assert_allclose(sig[0], ecg.signal[0], atol=1e-3)  # back in mV
    assert meta["start"].isoformat() == "2024-03-05T09:15:30"
    assert "Alex" not in repr(meta) and "1970" not in repr(meta)


def test_csv_and_npy_with_stated_rate(tmp_path):
    ecg = simulate_ecg(3.0, 70, fs=500, seed=6)
    with_time = tmp_path / "timed.csv"
    t = np.arange(ecg.signal.shape[1]) / 500.0
    np.savetxt(with_time, np.column_stack([t * 1000, ecg.signal[:2].T]), delimiter=",",
               header="time_ms,II,V5", comments="")
    sig, meta = read_ecg(with_time)  # the time column gives the rate
    assert meta["fs"] == pytest.approx(500.0) and meta["leads"] == ["II", "V5"]
    np.testing.assert_allclose(sig, ecg.signal[:2], atol=1e-5)

    bare = tmp_path / "bare.csv"
    np.savetxt(bare, ecg.signal.T * 1000.0, delimiter=";")  # 12 columns, no header, microvolts
    with pytest.raises(ECGReadError, match="sampling rate"):
        read_ecg(bare)
    sig, meta = read_ecg(bare, fs=500, units="uV")
    assert meta["leads"] == list(ECG_LEADS) and meta["source"] == "csv"
    np.testing.assert_allclose(sig, ecg.signal, atol=1e-5)

    npy = tmp_path / "ecg.npy"
    np.save(npy, ecg.signal[:3].T)  # samples x leads
    with pytest.raises(ECGReadError, match="sampling rate"):
        read_ecg(npy)
    with pytest.raises(ECGReadError, match="lead names"):
        read_ecg(npy, fs=500)
    sig, meta = read_ecg(npy, fs=500, leads=["I", "II", "III"])
    assert meta == {"fs": 500.0, "leads": ["I", "II", "III"], "source": "npy", "start": None}
    np.testing.assert_allclose(sig, ecg.signal[:3], atol=1e-6)


def test_waveform_sequence_embedded_in_echo(tmp_path):
    ecg = simulate_ecg(3.0, 70, fs=500, seed=7)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # any image; set it up as a US cine
    ds.Modality = "US"
    add_waveform(ds, ecg.signal[1:2], 500, ["ECG"])  # one unnamed monitoring trace
    path = tmp_path / "echo_with_ecg.dcm"
    ds.save_as(path, enforce_file_format=True)
    sig, meta = read_ecg(path)
    assert meta["source"] == "dicom_embedded" and meta["leads"] == ["II"] and meta["fs"] == 500.0
    np.testing.assert_allclose(sig, ecg.signal[1:2], atol=1e-3)
