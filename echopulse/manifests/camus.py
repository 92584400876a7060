"""CAMUS: one folder per patient (``patientNNNN/``), directly under the root or under
``database_nifti/`` (the NIfTI release) or ``training/``/``testing/`` (the older MHD release).

Per view (2CH, 4CH) a patient has the half cycle from end-diastole to end-systole as
``patientNNNN_<view>_half_sequence.nii.gz`` (NIfTI) or ``patientNNNN_<view>_sequence.mhd`` + ``.raw``
(MHD), and ``Info_<view>.cfg`` (``ED``, ``ES``: 1-based frames; ``LVef`` in percent). No ECG.
Splits come from ``database_split/subset_{training,validation,testing}.txt`` when present, else
from a ``training``/``testing`` parent folder. CAMUS records no frame rate: pass ``fps`` (the
manifest's ``fps`` column) or ingest refuses the cine for want of one.
"""

from __future__ import annotations

import re
from pathlib import Path

from echopulse.manifests.common import LayoutError, Manifest, percent_to_fraction

NAME = "camus"
VIEWS = {"2CH": "A2C", "4CH": "A4C"}
SEQUENCE_NAMES = ("{p}_{v}_half_sequence.nii.gz", "{p}_{v}_half_sequence.nii", "{p}_{v}_half_sequence.mhd",
                  "{p}_{v}_sequence.mhd")
SPLIT_FILES = {"subset_training.txt": "train", "subset_validation.txt": "val", "subset_testing.txt": "test"}
PARENT_SPLITS = {"training": "train", "testing": "test"}
_PATIENT = re.compile(r"^patient\d{4}$")
LAYOUT = ("patientNNNN/ folders (at the root, under database_nifti/, or under training/ and testing/) "
          "with <patient>_2CH/4CH half sequences (.nii.gz or .mhd) and Info_2CH.cfg/Info_4CH.cfg")


def build(root: Path, fps: float | None = None, **_: object) -> Manifest:
    """Manifest rows for a CAMUS root: one ECG-less row per patient and view.

    Raises:
        LayoutError: no patient folder, or a patient with a sequence but no readable Info cfg.
    """
    patients = sorted(p for parent in (root, root / "database_nifti", root / "training", root / "testing")
                      if parent.is_dir() for p in parent.iterdir() if p.is_dir() and _PATIENT.match(p.name))
    patients.sort(key=lambda p: (p.name, str(p)))
    if not patients:
        raise LayoutError(f"{root}: no patientNNNN/ folder found; a {NAME} root has {LAYOUT}")
    splits = _split_lists(root)
    out = Manifest()
    for patient in patients:
        for view, view_name in VIEWS.items():
            sequence = next((patient / n.format(p=patient.name, v=view) for n in SEQUENCE_NAMES
                             if (patient / n.format(p=patient.name, v=view)).is_file()), None)
            if sequence is None:
                out.skipped[f"patient without a {view} sequence"] += 1
                continue
            info = read_info(patient / f"Info_{view}.cfg")
            split = splits.get(patient.name) or PARENT_SPLITS.get(patient.parent.name, "")
            out.rows.append({"echo": str(sequence), "ecg": "", "ecg_sync": "", "view": view_name,
                             "ef": percent_to_fraction(info.get("LVef", "")), "split": split,
                             "study": patient.name, "fps": f"{fps:g}" if fps else "",
                             "ed_frame": _zero_based(info.get("ED", "")),
                             "es_frame": _zero_based(info.get("ES", ""))})
    return out


def read_info(path: Path) -> dict[str, str]:
    """``key: value`` lines of a CAMUS Info cfg."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LayoutError(f"{path}: unreadable ({type(exc).__name__}); a {NAME} patient has "
                          "Info_2CH.cfg/Info_4CH.cfg beside its sequences") from None
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _zero_based(value: str) -> str:
    try:
        return str(int(float(value)) - 1)
    except ValueError:
        return ""


def _split_lists(root: Path) -> dict[str, str]:
    folder = root / "database_split"
    out = {}
    for name, split in SPLIT_FILES.items():
        if (folder / name).is_file():
            for line in (folder / name).read_text().split():
                out[line.strip()] = split
    return out
