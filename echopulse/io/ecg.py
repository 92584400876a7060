"""ECG readers (WFDB records and DICOM 12-lead waveforms) returning millivolts and lead names."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from echopulse.config import ECG_LEADS

log = logging.getLogger(__name__)

_LEAD_BY_KEY = {name.upper(): name for name in ECG_LEADS}
_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}


class ECGReadError(ValueError):
    """An ECG file that cannot be read; the message says why in plain words."""


def normalize_lead_name(name: str) -> str:
    """Map a lead label to ``config.ECG_LEADS`` spelling where recognisable.

    ``"Lead I (Einthoven)"`` -> ``"I"``, ``"AVR"`` -> ``"aVR"``, ``"v1"`` -> ``"V1"``; other labels
    come back stripped but otherwise unchanged.

    Args:
        name: a lead label from a file.
    """
    key = re.sub(r"\(.*?\)", "", str(name)).strip()
    key = re.sub(r"^(lead|mdc_ecg_lead_|ecg)[\s_-]*", "", key, flags=re.IGNORECASE).strip()
    return _LEAD_BY_KEY.get(key.upper().replace(" ", ""), str(name).strip())


def read_ecg(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an ECG: a WFDB record (``.hea`` path or record path without extension) or DICOM waveform.

    Args:
        path: the file or record path.

    Returns:
        float32 (n_leads, N) in mV, and metadata ``fs`` (Hz, float), ``leads`` (names normalised with
        :func:`normalize_lead_name`) and ``source`` ("wfdb" or "dicom").

    Raises:
        ECGReadError: missing file, unknown format, or an unreadable record.
    """
    path = Path(path)
    if path.suffix in (".hea", ".dat") or (not path.suffix and path.with_suffix(".hea").is_file()):
        return _read_wfdb(path.with_suffix("") if path.suffix else path)
    if not path.is_file():
        raise ECGReadError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return _read_dicom_waveform(path)
    raise ECGReadError(
        f"{path}: unknown ECG format (expected a WFDB record (.hea) or a DICOM ECG waveform)"
    )


def _read_wfdb(record: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import wfdb

    header = record.with_suffix(".hea")
    if not header.is_file():
        raise ECGReadError(f"{header}: file not found")
    try:
        rec = wfdb.rdrecord(str(record), physical=True)
    except Exception as exc:
        raise ECGReadError(f"{header}: unreadable WFDB record ({type(exc).__name__}: {exc})") from None
    if rec.p_signal is None or rec.p_signal.size == 0:
        raise ECGReadError(f"{header}: WFDB record holds no samples")
    sig = rec.p_signal.T.astype(np.float64)  # (n_leads, N)
    units = rec.units or ["mV"] * sig.shape[0]
    for i, unit in enumerate(units):
        factor = _TO_MV.get(str(unit).strip().lower())
        if factor is None:
            log.warning("%s: lead %d has unknown units %r; assuming mV", header.name, i, unit)
            factor = 1.0
        sig[i] *= factor
    leads = [normalize_lead_name(n) for n in (rec.sig_name or [f"ch{i}" for i in range(sig.shape[0])])]
    return sig.astype(np.float32), {"fs": float(rec.fs), "leads": leads, "source": "wfdb"}


def _read_dicom_waveform(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise ECGReadError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
    groups = ds.get("WaveformSequence")
    if not groups:
        raise ECGReadError(f"{path}: DICOM file has no waveform (WaveformSequence missing); not an ECG")
    # the first multiplex group with the most channels is the rhythm/12-lead group
    index = max(range(len(groups)), key=lambda i: (int(groups[i].get("NumberOfWaveformChannels", 0)), -i))
    group = groups[index]
    try:
        arr = ds.waveform_array(index)  # (N, channels), sensitivity and baseline applied
    except Exception as exc:
        raise ECGReadError(f"{path}: waveform data could not be decoded ({exc})") from None
    sig = arr.T.astype(np.float64)
    leads = []
    for i, ch in enumerate(group.ChannelDefinitionSequence):
        source = ch.get("ChannelSourceSequence")
        label = source[0].get("CodeMeaning", "") if source else ""
        leads.append(normalize_lead_name(label or ch.get("ChannelLabel", f"ch{i}")))
        units_seq = ch.get("ChannelSensitivityUnitsSequence")
        unit = units_seq[0].get("CodeValue", "uV") if units_seq else "uV"
        sig[i] *= _TO_MV.get(str(unit).strip().lower(), 1e-3)
    return sig.astype(np.float32), {"fs": float(group.SamplingFrequency), "leads": leads, "source": "dicom"}
