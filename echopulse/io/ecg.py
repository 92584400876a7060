"""ECG readers returning millivolts and lead names: WFDB records, DICOM 12-lead ECG Waveform Storage,
a Waveform Sequence embedded in an echo DICOM, the Apple Health ECG CSV export, and CSV/NPY arrays
with a stated rate.

Every reader returns ``(signal, meta)``: float32 (n_leads, N) in mV, and ``fs`` (Hz), ``leads``
(names normalised with :func:`normalize_lead_name`), ``source`` and ``start`` (when the recording
began, a naive local datetime, or None; used only to align with the echo, never written out).
Names, birth dates and other header fields of the files are never returned.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from echopulse.config import ECG_LEADS

log = logging.getLogger(__name__)

_LEAD_BY_KEY = {name.upper(): name for name in ECG_LEADS}
_LEAD_BY_KEY.update({"MLII": "II", "MLI": "I", "MLIII": "III", "ML2": "II"})  # MIT-BIH "modified limb"
_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}
_TIME_COLUMNS = {"t": 1.0, "time": 1.0, "time_s": 1.0, "seconds": 1.0, "sec": 1.0, "s": 1.0,
                 "time_ms": 1e-3, "ms": 1e-3, "t_ms": 1e-3}
_INDEX_COLUMNS = {"sample", "index", "n", "i"}
MAX_ECG_SAMPLES = 50_000_000  # per lead; a day at 500 Hz is 43 M: refuse more rather than allocate


class ECGReadError(ValueError):
    """An ECG file that cannot be read; the message says why in plain words."""


def normalize_lead_name(name: str) -> str:
    """Map a lead label to ``config.ECG_LEADS`` spelling where recognisable.

    ``"Lead I (Einthoven)"`` -> ``"I"``, ``"AVR"`` -> ``"aVR"``, ``"v1"`` -> ``"V1"``, ``"MLII"`` ->
    ``"II"``; other labels come back stripped but otherwise unchanged.

    Args:
        name: a lead label from a file.
    """
    key = re.sub(r"\(.*?\)", "", str(name)).strip()
    key = re.sub(r"^(lead|mdc_ecg_lead_|ecg)[\s_-]*", "", key, flags=re.IGNORECASE).strip()
    return _LEAD_BY_KEY.get(key.upper().replace(" ", ""), str(name).strip())


def read_ecg(
    path: str | Path, fs: float | None = None, leads: list[str] | None = None, units: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an ECG file; the format is recognised from the name and the first bytes.

    Formats: a WFDB record (``.hea`` path, or the record path without extension); DICOM (an ECG
    Waveform Storage file, or an echo with an embedded Waveform Sequence); the Apple Health ECG
    export (``.csv`` with its header block); a plain ``.csv`` (a header row of lead names, optional
    time column) or ``.npy`` array (leads x samples or samples x leads) with a stated rate.

    Args:
        path: the file or record path (local path or remote URI).
        fs: sampling rate for CSV/NPY files (a CSV with a time column needs none).
        leads: lead names for a CSV without a header or an NPY (12 columns default to
            ``config.ECG_LEADS`` order).
        units: units of CSV/NPY values ("mV" default, "uV", "V").

    Returns:
        float32 (n_leads, N) in mV, and metadata ``fs`` (Hz, float), ``leads``, ``source`` ("wfdb",
        "dicom", "apple_health", "csv" or "npy") and ``start`` (datetime or None).

    Raises:
        ECGReadError: missing file, unknown format, a missing rate, or an unreadable record.
    """
    from echopulse import storage

    shown = str(path)
    lower = shown.lower()
    if lower.endswith((".hea", ".dat")) or (
        not Path(shown).suffix and storage.exists(shown + ".hea")
    ):
        record = shown.rsplit(".", 1)[0] if lower.endswith((".hea", ".dat")) else shown
        return _read_wfdb(record)
    if not storage.exists(shown):
        raise ECGReadError(f"{shown}: file not found")
    with storage.local_path(shown) as local:
        with open(local, "rb") as f:
            head = f.read(4096)
        if len(head) >= 132 and head[128:132] == b"DICM":
            return _read_dicom_waveform(local, shown)
        if lower.endswith(".npy") or head.startswith(b"\x93NUMPY"):
            return _read_npy(local, shown, fs, leads, units)
        text_head = head.decode("utf-8", errors="replace").lstrip("\ufeff")
        if re.search(r"^\s*\"?Sample Rate\"?\s*,", text_head, flags=re.MULTILINE):
            return _read_apple_health(local, shown)
        if lower.endswith((".csv", ".txt", ".tsv")):
            return _read_csv(local, shown, fs, leads, units)
    raise ECGReadError(
        f"{shown}: unknown ECG format (expected a WFDB record (.hea), a DICOM ECG, an Apple Health "
        "ECG export (.csv), or a .csv/.npy array with a stated rate)"
    )


def _meta(fs: float, leads: list[str], source: str, start: datetime | None = None) -> dict[str, Any]:
    return {"fs": float(fs), "leads": leads, "source": source, "start": start}


def _wfdb_signal_files(header: Path) -> list[str]:
    """The signal files a WFDB header names: the first token of each signal line."""
    text = header.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return sorted({ln.split()[0] for ln in lines[1:] if ln.split()})


def _read_wfdb(record: str) -> tuple[np.ndarray, dict[str, Any]]:
    import wfdb

    from echopulse import storage
    from echopulse.io.wfdb_fast import read_format16

    header = record + ".hea"
    try:
        # on S3: one GET for the header, one per signal file it names
        with storage.local_path(header, companions=_wfdb_signal_files) as local:
            try:
                # the common single-file format-16 record without wfdb's slow header parser
                rec = read_format16(local.with_suffix("")) or wfdb.rdrecord(str(local.with_suffix("")),
                                                                           physical=True)
            except Exception as exc:
                raise ECGReadError(f"{header}: unreadable WFDB record ({type(exc).__name__}: {exc})") from None
    except storage.NotFound:
        raise ECGReadError(f"{header}: file not found") from None
    if rec.p_signal is None or rec.p_signal.size == 0:
        raise ECGReadError(f"{header}: WFDB record holds no samples")
    sig = rec.p_signal.T.astype(np.float64)  # (n_leads, N)
    units = rec.units or ["mV"] * sig.shape[0]
    for i, unit in enumerate(units):
        factor = _TO_MV.get(str(unit).strip().lower())
        if factor is None:
            log.warning("%s: lead %d has unknown units %r; assuming mV", Path(header).name, i, unit)
            factor = 1.0
        sig[i] *= factor
    leads = [normalize_lead_name(n) for n in (rec.sig_name or [f"ch{i}" for i in range(sig.shape[0])])]
    start = None
    if rec.base_time is not None and rec.base_date is not None:
        start = datetime.combine(rec.base_date, rec.base_time)
    return sig.astype(np.float32), _meta(rec.fs, leads, "wfdb", start)


def _read_dicom_waveform(path: Path, shown: str) -> tuple[np.ndarray, dict[str, Any]]:
    import pydicom

    from echopulse.io.dicom_echo import acquisition_start

    try:
        # the Waveform Sequence (5400,0100) comes before Pixel Data: an echo's frames are not read
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise ECGReadError(f"{shown}: unreadable DICOM ({type(exc).__name__})") from None
    groups = ds.get("WaveformSequence")
    if not groups:
        raise ECGReadError(f"{shown}: DICOM file has no waveform (WaveformSequence missing); not an ECG")
    # the multiplex group with the most channels is the rhythm/12-lead group
    index = max(range(len(groups)), key=lambda i: (int(groups[i].get("NumberOfWaveformChannels", 0)), -i))
    group = groups[index]
    n = int(group.get("NumberOfWaveformSamples", 0)) * int(group.get("NumberOfWaveformChannels", 0))
    bits = int(group.get("WaveformBitsAllocated", 16))
    if len(group.get("WaveformData", b"")) < n * bits // 8:
        raise ECGReadError(f"{shown}: waveform data is shorter than its header says (truncated file?)")
    try:
        arr = ds.waveform_array(index)  # (N, channels), sensitivity and baseline applied
    except Exception as exc:
        raise ECGReadError(f"{shown}: waveform data could not be decoded ({exc})") from None
    sig = arr.T.astype(np.float64)
    leads = []
    for i, ch in enumerate(group.ChannelDefinitionSequence):
        source = ch.get("ChannelSourceSequence")
        label = source[0].get("CodeMeaning", "") if source else ""
        leads.append(normalize_lead_name(label or ch.get("ChannelLabel", f"ch{i}")))
        units_seq = ch.get("ChannelSensitivityUnitsSequence")
        unit = units_seq[0].get("CodeValue", "uV") if units_seq else "uV"
        sig[i] *= _TO_MV.get(str(unit).strip().lower(), 1e-3)
    modality = str(ds.get("Modality", ""))
    embedded = modality not in ("ECG", "") or "PixelData" in ds or ds.get("NumberOfFrames")
    if embedded and len(leads) == 1 and leads[0] not in ECG_LEADS:
        # an ultrasound machine's single monitoring trace (3 electrodes) is displayed as lead II
        log.debug("%s: single embedded ECG channel %r taken as lead II", path.name, leads[0])
        leads = ["II"]
    source_name = "dicom_embedded" if embedded else "dicom"
    return sig.astype(np.float32), _meta(group.SamplingFrequency, leads, source_name, acquisition_start(ds))


def _read_apple_health(path: Path, shown: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The Apple Health ECG export: a header block of ``key,value`` lines, then one value a line.

    Only Sample Rate, Lead, Unit and Recorded Date are used; Name and Date of Birth are skipped and
    never kept.
    """
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    header: dict[str, str] = {}
    values: list[float] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if not values and not _is_number(line):
            parts = next(csv.reader([line]), [])
            if parts and parts[0].strip() in ("Sample Rate", "Lead", "Unit", "Recorded Date"):
                header[parts[0].strip()] = ",".join(parts[1:]).strip()
            continue
        value = line.replace(",", ".") if line.count(",") == 1 and "." not in line else line
        try:
            values.append(float(value))
        except ValueError:
            raise ECGReadError(f"{shown}: Apple Health ECG sample {len(values) + 1} is not a number") from None
        if len(values) > MAX_ECG_SAMPLES:
            raise ECGReadError(f"{shown}: more than {MAX_ECG_SAMPLES} samples; refusing to read it whole")
    match = re.match(r"\s*([0-9.]+)\s*(hertz|hz)?", header.get("Sample Rate", ""), flags=re.IGNORECASE)
    if not match:
        raise ECGReadError(f"{shown}: Apple Health ECG export without a usable 'Sample Rate' line")
    fs = float(match.group(1))
    if not values:
        raise ECGReadError(f"{shown}: Apple Health ECG export holds no samples")
    unit = header.get("Unit", "µV").strip().lower()
    factor = _TO_MV.get(unit, _TO_MV.get(unit.replace("micro", "µ"), 1e-3))  # exports are in µV
    lead = normalize_lead_name(header.get("Lead", "Lead I") or "Lead I")
    start = None
    recorded = header.get("Recorded Date", "")
    for fmt in ("%Y-%m-%d %H:%M:%S %z", "%Y-%m-%d %H:%M:%S"):
        try:
            start = datetime.strptime(recorded, fmt).replace(tzinfo=None)
            break
        except ValueError:
            continue
    sig = (np.asarray(values, dtype=np.float64) * factor)[None]
    return sig.astype(np.float32), _meta(fs, [lead], "apple_health", start)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ".") if text.count(",") == 1 and "." not in text else text)
        return True
    except ValueError:
        return False


def _lead_names(n: int, leads: list[str] | None, shown: str) -> list[str]:
    if leads:
        if len(leads) != n:
            raise ECGReadError(f"{shown}: {n} ECG channels but {len(leads)} lead names were given")
        return [normalize_lead_name(x) for x in leads]
    if n == len(ECG_LEADS):
        return list(ECG_LEADS)
    raise ECGReadError(
        f"{shown}: {n} ECG channel(s) without lead names; give them (manifest column ecg_leads, "
        "e.g. \"I,II,V1\")"
    )


def _scale(sig: np.ndarray, units: str | None, shown: str) -> np.ndarray:
    factor = _TO_MV.get(str(units or "mV").strip().lower())
    if factor is None:
        raise ECGReadError(f"{shown}: unknown ECG units {units!r} (use mV, uV or V)")
    return sig * factor


def _read_npy(path: Path, shown: str, fs: float | None, leads: list[str] | None,
              units: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    if not fs or fs <= 0:
        raise ECGReadError(f"{shown}: a .npy ECG needs its sampling rate (manifest column ecg_fs or --ecg-fs)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # memory-mapped: nothing read yet
    except Exception as exc:
        raise ECGReadError(f"{shown}: not a readable .npy array ({type(exc).__name__})") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ECGReadError(f"{shown}: ECG array must be 2-D (leads x samples), got shape {arr.shape}")
    if arr.shape[0] > arr.shape[1]:
        arr = arr.T  # samples x leads
    if arr.shape[1] > MAX_ECG_SAMPLES:
        raise ECGReadError(f"{shown}: {arr.shape[1]} samples per lead, more than {MAX_ECG_SAMPLES}")
    names = _lead_names(arr.shape[0], leads, shown)
    sig = _scale(np.asarray(arr, dtype=np.float64), units, shown)
    return sig.astype(np.float32), _meta(fs, names, "npy")


def _read_csv(path: Path, shown: str, fs: float | None, leads: list[str] | None,
              units: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) < 2:
        raise ECGReadError(f"{shown}: CSV ECG holds no samples")
    try:
        dialect = csv.Sniffer().sniff(lines[0] + "\n" + lines[1], delimiters=",;\t ")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(io.StringIO("\n".join(lines)), dialect))
    has_header = not all(_is_number(c) for c in rows[0] if c.strip())
    names = [c.strip() for c in rows[0]] if has_header else None
    data_rows = rows[1:] if has_header else rows
    try:
        data = np.array([[float(c) for c in r if c.strip()] for r in data_rows], dtype=np.float64)
    except ValueError:
        raise ECGReadError(f"{shown}: CSV ECG has a value that is not a number") from None
    if data.ndim != 2:
        raise ECGReadError(f"{shown}: CSV ECG rows have different numbers of values")
    if data.shape[0] < 2:
        raise ECGReadError(f"{shown}: CSV ECG holds fewer than 2 samples")
    keep = list(range(data.shape[1]))
    if names:
        time_cols = [i for i, n in enumerate(names) if n.lower() in _TIME_COLUMNS]
        index_cols = [i for i, n in enumerate(names) if n.lower() in _INDEX_COLUMNS]
        if time_cols and not fs:
            step = float(np.median(np.diff(data[:, time_cols[0]]))) * _TIME_COLUMNS[names[time_cols[0]].lower()]
            fs = 1.0 / step if step > 0 else None
        keep = [i for i in keep if i not in time_cols and i not in index_cols]
        leads = leads or [names[i] for i in keep]
    if not fs or fs <= 0:
        raise ECGReadError(
            f"{shown}: a CSV ECG needs its sampling rate (a time column, manifest column ecg_fs or --ecg-fs)"
        )
    sig = data[:, keep].T
    names_out = _lead_names(sig.shape[0], leads, shown)
    return _scale(sig, units, shown).astype(np.float32), _meta(round(float(fs), 6), names_out, "csv")
