"""MIMIC-IV-ECHO: ``files/pNN/p<subject>/s<study>/<study>_<NNNN>.dcm`` indexed by
``echo-record-list.csv`` (subject_id, study_id, acquisition_datetime, dicom_filepath).

The files carry no Waveform Sequence: the ECG recorded with each cine is the trace drawn on the
screen, so every row's ``ecg`` is ``screen`` (synchronized). With ``ecg_root`` (a MIMIC-IV-ECG root:
``record_list.csv`` with subject_id, study_id, file_name, ecg_time, path; 12-lead WFDB at 500 Hz)
an echo whose subject has a 12-lead ECG within ``max_gap`` of the acquisition gets the nearest one
instead, marked ``ecg_sync=false`` with ``ecg_offset_s=0``: the two were taken at different times on
different clocks, so only the heart's rhythm, not its timing, is shared. Single-frame images and
non-cine objects (structured reports, stills) are skipped and counted.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

from tqdm import tqdm

from echopulse.manifests.common import SCREEN_ECG, LayoutError, Manifest, read_table, require

log = logging.getLogger(__name__)

NAME = "mimic-echo"
ECHO_COLUMNS = ("subject_id", "study_id", "acquisition_datetime", "dicom_filepath")
ECG_COLUMNS = ("subject_id", "study_id", "file_name", "ecg_time", "path")
DEFAULT_MAX_GAP = timedelta(hours=24)
_PATH = re.compile(r"^files/p\d{2}/p(?P<subject>\d+)/s(?P<study>\d+)/(?P=study)_\d{4}\.dcm$")


def build(root: Path, ecg_root: Path | None = None, max_gap: timedelta = DEFAULT_MAX_GAP,
          **_: object) -> Manifest:
    """Manifest rows for a MIMIC-IV-ECHO root (see the module docstring).

    Raises:
        LayoutError: the root lacks ``echo-record-list.csv`` or ``files/``, a listed path is not in
            the ``files/pNN/p<subject>/s<study>/<study>_<NNNN>.dcm`` layout, or ``ecg_root`` lacks
            ``record_list.csv``.
    """
    listing = require(root / "echo-record-list.csv", NAME, "echo-record-list.csv and files/")
    require(root / "files", NAME, "echo-record-list.csv and files/")
    records = read_table(listing, NAME, ECHO_COLUMNS)
    ecgs = _ecg_index(ecg_root) if ecg_root is not None else None
    out = Manifest()
    for rec in tqdm(records, desc="mimic-echo headers", unit="file", disable=len(records) < 200):
        rel = rec["dicom_filepath"].replace("\\", "/").lstrip("/")
        match = _PATH.match(rel)
        if not match or match["subject"] != rec["subject_id"] or match["study"] != rec["study_id"]:
            raise LayoutError(f"{listing}: dicom_filepath {rel!r} is not files/pNN/p<subject_id>/"
                              f"s<study_id>/<study_id>_<NNNN>.dcm for subject {rec['subject_id']}, "
                              f"study {rec['study_id']}")
        path = root / rel
        reason = _not_a_cine(path)
        if reason:
            out.skipped[reason] += 1
            continue
        row = {"echo": str(path), "ecg": SCREEN_ECG, "ecg_sync": "true", "view": "unknown",
               "study": f"p{rec['subject_id']}"}  # one subject never spans two splits
        if ecgs is not None:
            paired = _nearest(ecgs, ecg_root, rec["subject_id"], rec["acquisition_datetime"], max_gap)
            if paired:
                row.update(ecg=paired, ecg_sync="false", ecg_offset_s="0")
            else:
                out.notes["no 12-lead ECG within --max-gap: screen ECG kept"] += 1
        out.rows.append(row)
    return out


def _not_a_cine(path: Path) -> str:
    """Why ``path`` is not an ultrasound cine ('' when it is one), from its header alone."""
    import pydicom

    from echopulse.io.dicom_echo import US_SOP_CLASSES

    if not path.is_file():
        return "listed file missing"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "NumberOfFrames", "Modality"])
    except Exception:  # a corrupt header is ingest's to quarantine with its reason
        return ""
    if str(ds.get("SOPClassUID", "")) not in US_SOP_CLASSES:
        return "not an ultrasound image (report, still capture or other object)"
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return ""
    return "single-frame image" if frames < 2 else ""


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.strip())
    except (AttributeError, ValueError):
        return None


def _ecg_index(ecg_root: Path) -> dict[str, list[tuple[datetime, str]]]:
    """subject_id -> [(ecg_time, record path)], sorted by time."""
    listing = require(ecg_root / "record_list.csv", "MIMIC-IV-ECG", "record_list.csv and files/")
    index: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    unparsed = 0
    for rec in read_table(listing, "MIMIC-IV-ECG", ECG_COLUMNS):
        when = _parse_time(rec["ecg_time"])
        if when is None:
            unparsed += 1
            continue
        index[rec["subject_id"]].append((when, rec["path"].replace("\\", "/").lstrip("/")))
    if unparsed:
        log.warning("%s: %d record(s) without a readable ecg_time are not paired", listing, unparsed)
    for entries in index.values():
        entries.sort()
    return index


def _nearest(index: dict[str, list[tuple[datetime, str]]], ecg_root: Path, subject: str,
             acquired: str, max_gap: timedelta) -> str:
    """The header path of the subject's ECG nearest in time to ``acquired`` within ``max_gap``."""
    when = _parse_time(acquired)
    entries = index.get(subject, [])
    if when is None or not entries:
        return ""
    i = bisect.bisect_left(entries, (when, ""))
    best = min(entries[max(0, i - 1): i + 1], key=lambda e: abs(e[0] - when))
    if abs(best[0] - when) > max_gap:
        return ""
    header = ecg_root / f"{best[1]}.hea"
    return str(header) if header.is_file() else ""
