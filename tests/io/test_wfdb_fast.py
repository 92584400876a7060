"""The fast format-16 WFDB reader gives what wfdb.rdrecord gives, and steps aside for anything else."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import wfdb

from echopulse.io import ecg as ecg_io
from echopulse.io.wfdb_fast import read_format16

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def write(tmp_path, name="rec", fmt="16", n=12, samples=2500, fs=500, nan=False, **kw):
    rng = np.random.default_rng(len(name) + n)
    signal = np.cumsum(rng.normal(0, 0.02, (samples, n)), axis=0)
    if nan:
        signal[100:110, 1] = np.nan
    wfdb.wrsamp(name, fs=fs, units=["mV"] * n, sig_name=LEADS[:n], p_signal=signal, fmt=[fmt] * n,
                write_dir=str(tmp_path), **kw)
    return tmp_path / name


def assert_same(fast, rec):
    np.testing.assert_array_equal(np.isnan(fast.p_signal), np.isnan(rec.p_signal))
    np.testing.assert_allclose(fast.p_signal, rec.p_signal, rtol=0, atol=1e-12, equal_nan=True)
    assert fast.fs == rec.fs and fast.sig_name == rec.sig_name and fast.units == rec.units
    assert fast.base_date == rec.base_date and fast.base_time == rec.base_time


@pytest.mark.parametrize("kw", [
    {},
    {"nan": True},
    {"n": 1, "fs": 250, "samples": 777},
    {"base_time": dt.time(13, 5, 9), "base_date": dt.date(2026, 2, 3)},
    {"base_time": dt.time(8, 0, 1, 250000), "base_date": dt.date(2019, 12, 31)},
    {"adc_gain": [200.0] * 12, "baseline": [-7] * 12},
])
def test_fast_reader_matches_rdrecord(tmp_path, kw):
    rec_kw = {k: v for k, v in kw.items() if k in ("nan", "n", "fs", "samples")}
    header_kw = {k: v for k, v in kw.items() if k not in rec_kw}
    if "adc_gain" in header_kw:  # wrsamp takes digital samples with explicit gains
        rng = np.random.default_rng(3)
        d = rng.integers(-2000, 2000, (1000, 12)).astype(np.int16)
        wfdb.wrsamp("rec", fs=500, units=["mV"] * 12, sig_name=LEADS, d_signal=d, fmt=["16"] * 12,
                    write_dir=str(tmp_path), **header_kw)
        path = tmp_path / "rec"
    else:
        path = write(tmp_path, **rec_kw, **header_kw)
    fast = read_format16(path)
    assert fast is not None
    assert_same(fast, wfdb.rdrecord(str(path), physical=True))


def test_other_records_are_left_to_wfdb(tmp_path):
    assert read_format16(write(tmp_path, "f212", fmt="212")) is None
    path = write(tmp_path, "short")
    data = (tmp_path / "short.dat").read_bytes()
    (tmp_path / "short.dat").write_bytes(data[: len(data) // 2])  # fewer samples than the header says
    assert read_format16(path) is None
    path = write(tmp_path, "bare")
    lines = (tmp_path / "bare.hea").read_text().splitlines()
    # a signal line without its description and checksum fields
    (tmp_path / "bare.hea").write_text("\n".join([lines[0], *[" ".join(ln.split()[:3]) for ln in lines[1:]]]))
    assert read_format16(path) is None
    (tmp_path / "multi.hea").write_text("multi/2 12 500 5000\nseg1 2500\nseg2 2500\n")
    assert read_format16(tmp_path / "multi") is None
    assert read_format16(tmp_path / "missing") is None


def test_read_ecg_gives_the_same_answer_on_either_path(tmp_path, monkeypatch):
    from echopulse.io import wfdb_fast

    path = write(tmp_path, "both", base_time=dt.time(9, 30, 0), base_date=dt.date(2025, 6, 1))
    fast_sig, fast_meta = ecg_io.read_ecg(str(path) + ".hea")
    monkeypatch.setattr(wfdb_fast, "read_format16", lambda record: None)  # force wfdb.rdrecord
    slow_sig, slow_meta = ecg_io.read_ecg(str(path) + ".hea")
    np.testing.assert_array_equal(fast_sig, slow_sig)
    assert fast_meta == slow_meta
    # format 212 goes through wfdb and still reads
    sig212, _ = ecg_io.read_ecg(str(write(tmp_path, "f212", fmt="212")) + ".hea")
    assert sig212.shape == (12, 2500)
