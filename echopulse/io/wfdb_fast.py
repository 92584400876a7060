"""A fast reader for the WFDB records archives hold most: one signal file in format 16.

``wfdb.rdrecord`` spends ~9 of its ~10 ms a record parsing the header (a pandas lookup per field),
which is a quarter of an archive input's decode. MIMIC-IV-ECG, PTB-XL and our own synthetic
records are single-segment, one ``.dat`` file of interleaved little-endian 16-bit samples with every
header field written out; for those this module parses the header with ``str.split`` and reads the
samples with numpy (:func:`read_format16`). Anything else -- multi-segment records, other formats,
skew, byte offsets, several signal files, a field left out, a short file -- returns ``None`` and
the caller uses ``wfdb.rdrecord``, so the answer never depends on which path ran (tested against
``rdrecord`` in ``tests/io/test_wfdb_fast.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path

import numpy as np

INVALID_16 = -32768  # WFDB's "no sample" value in format 16 (read as NaN)
SIGNAL_FIELDS = 9  # file, format, gain(baseline)/units, resolution, zero, initial, checksum, block, name


@dataclass(frozen=True)
class SimpleRecord:
    """What ``_read_wfdb`` takes from a record: physical samples ``(N, n_sig)``, rate, names,
    units and the start (both ``None`` when the header has no date)."""

    p_signal: np.ndarray
    fs: float
    sig_name: list[str]
    units: list[str]
    base_date: date | None
    base_time: time | None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _gain_field(text: str) -> tuple[float, float, str] | None:
    """``gain(baseline)/units`` -> (gain, baseline, units); ``None`` unless all three are given."""
    gain_part, _, units = text.partition("/")
    if "(" not in gain_part or not gain_part.endswith(")") or not units:
        return None
    gain_text, baseline_text = gain_part[:-1].split("(", 1)
    gain, baseline = _number(gain_text), _number(baseline_text)
    if gain is None or baseline is None or gain == 0:
        return None
    return gain, baseline, units


def _start(fields: list[str]) -> tuple[date | None, time | None] | None:
    """Base time and date from the record line's fields after the sample count (``None``: a form
    this reader does not parse)."""
    if not fields:
        return None, None
    if len(fields) != 2:
        return None
    try:
        clock = datetime.strptime(fields[0], "%H:%M:%S.%f" if "." in fields[0] else "%H:%M:%S").time()
        day = datetime.strptime(fields[1], "%d/%m/%Y").date()
    except ValueError:
        return None
    return day, clock


def read_format16(record: str | Path) -> SimpleRecord | None:
    """The record ``record`` (path without ``.hea``) read without wfdb, or ``None`` when it is not
    a single-file format-16 record with every field given (see the module docstring)."""
    record = Path(record)
    try:
        text = record.with_suffix(".hea").read_text(errors="replace")
    except OSError:
        return None
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines or len(lines[0]) < 4 or "/" in lines[0][0]:
        return None
    head = lines[0]
    nsig, fs, nsamp = _number(head[1]), _number(head[2]), _number(head[3])
    start = _start(head[4:])
    if not nsig or nsig != int(nsig) or not fs or fs <= 0 or nsamp is None or start is None:
        return None
    signals = lines[1:1 + int(nsig)]
    if len(signals) != nsig or any(len(s) < SIGNAL_FIELDS for s in signals):
        return None
    if {s[0] for s in signals} != {signals[0][0]} or any(s[1] != "16" for s in signals):
        return None
    gains = [_gain_field(s[2]) for s in signals]
    if any(g is None for g in gains):
        return None
    data_file = record.parent / signals[0][0]
    try:
        raw = np.fromfile(data_file, dtype="<i2")
    except OSError:
        return None
    n, k = int(nsamp), int(nsig)
    if n <= 0 or raw.size < n * k:
        return None
    digital = raw[: n * k].reshape(n, k)
    gain = np.array([g[0] for g in gains])
    baseline = np.array([g[1] for g in gains])
    physical = (digital.astype(np.float64) - baseline) / gain
    physical[digital == INVALID_16] = np.nan
    return SimpleRecord(physical, float(fs), [" ".join(s[8:]) for s in signals], [g[2] for g in gains],
                        start[0], start[1])
