"""What every dataset layout shares: the manifest's columns, the refusal error, small readers."""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from echopulse.errors import EchoPulseError

# ingest reads echo, ecg, ecg_sync, ecg_offset_s, view, ef, split, study, fps; ed_frame/es_frame
# (0-based frame indices) are carried for evaluation and ignored by ingest
MANIFEST_COLUMNS = ("echo", "ecg", "ecg_sync", "ecg_offset_s", "view", "ef", "split", "study", "fps",
                    "ed_frame", "es_frame")
SCREEN_ECG = "screen"  # manifest `ecg` value: read the ECG from the trace drawn on the echo


class LayoutError(EchoPulseError):
    """A dataset root that is not in the named layout (one line: the path and what is missing)."""


@dataclass
class Manifest:
    """Rows built from one dataset root, plus what was skipped and why.

    Attributes:
        rows: manifest rows (keys from ``MANIFEST_COLUMNS``; paths absolute).
        skipped: reason -> number of files left out (single-frame images, non-cine objects, ...).
        notes: other counts worth a line (echoes that kept the screen ECG, ...).
    """

    rows: list[dict[str, str]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)


def require(path: Path, dataset: str, what: str) -> Path:
    """``path`` if it exists, else a :class:`LayoutError` naming the root's expected layout."""
    if not path.exists():
        raise LayoutError(f"{path}: not found; a {dataset} root has {what}")
    return path


def read_table(path: Path, dataset: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV that must have ``columns`` (one-line :class:`LayoutError` otherwise)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
            header = [c.strip() for c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LayoutError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise LayoutError(f"{path}: lacks column(s) {', '.join(missing)} of the {dataset} layout")
    return rows


def cell_text(value: object) -> str:
    """A table cell as manifest text: '' for a missing value (None, NaN), else ``str``."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def percent_to_fraction(value: object) -> str:
    """EF in percent (as the datasets give it) -> the 0-1 fraction clips/v1 stores; '' if unknown."""
    try:
        ef = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{ef / 100.0:.6g}" if 0 < ef <= 100 else ""


def write_manifest(manifest: Manifest, out: str | Path) -> Path:
    """Write ``manifest.rows`` as CSV; paths under the manifest's folder become relative to it
    (what ingest resolves against), others stay absolute."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()

    def shown(value: str) -> str:
        if not value or value == SCREEN_ECG or not os.path.isabs(value):
            return value
        rel = os.path.relpath(value, base)
        return value if rel.startswith("..") else rel

    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        for row in manifest.rows:
            full = {c: row.get(c, "") for c in MANIFEST_COLUMNS}
            full["echo"], full["ecg"] = shown(full["echo"]), shown(full["ecg"])
            writer.writerow(full)
    return out
