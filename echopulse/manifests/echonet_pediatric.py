"""EchoNet-Pediatric: ``A4C/`` and ``PSAX/``, each with ``FileList.csv`` (FileName, EF, Split as a
fold 0-9, ...), ``VolumeTracings.csv`` and ``Videos/``; no ECG.

The dataset gives ten cross-validation folds rather than a split; folds 0-7 become ``train``,
fold 8 ``val`` and fold 9 ``test``. The videos' frame rate comes from their container.
"""

from __future__ import annotations

from pathlib import Path

from echopulse.manifests.common import LayoutError, Manifest, percent_to_fraction, read_table, require
from echopulse.manifests.echonet_dynamic import listed_video, read_tracings, video_name

NAME = "echonet-pediatric"
VIEWS = {"A4C": "A4C", "PSAX": "PSAX"}
FOLD_SPLITS = {**{str(k): "train" for k in range(8)}, "8": "val", "9": "test"}
LAYOUT = "A4C/ and/or PSAX/, each with FileList.csv, VolumeTracings.csv and Videos/"


def build(root: Path, **_: object) -> Manifest:
    """Manifest rows for an EchoNet-Pediatric root: one ECG-less row per listed video.

    Raises:
        LayoutError: neither A4C/ nor PSAX/, a view folder without its files, or a Split that is
            not a fold 0-9.
    """
    folders = [v for v in VIEWS if (root / v).is_dir()]
    if not folders:
        raise LayoutError(f"{root}: neither A4C/ nor PSAX/ found; a {NAME} root has {LAYOUT}")
    out = Manifest()
    for folder in folders:
        base = root / folder
        listing = require(base / "FileList.csv", NAME, LAYOUT)
        rows = read_table(listing, NAME, ("FileName", "EF", "Split"))
        tracings = read_tracings(require(base / "VolumeTracings.csv", NAME, LAYOUT), NAME)
        videos = require(base / "Videos", NAME, LAYOUT)
        for r in rows:
            fold = r["Split"].strip()
            if fold not in FOLD_SPLITS:
                raise LayoutError(f"{listing}: Split {fold!r} of {r['FileName']} is not a fold 0-9")
            name, path = video_name(r["FileName"]), listed_video(videos, r["FileName"], out)
            if path is None:
                continue
            ed, es = tracings.get(name, ("", ""))
            out.rows.append({"echo": str(path), "ecg": "", "ecg_sync": "", "view": VIEWS[folder],
                             "ef": percent_to_fraction(r["EF"]), "split": FOLD_SPLITS[fold],
                             "study": f"{folder}/{name.rsplit('.', 1)[0]}", "ed_frame": ed,
                             "es_frame": es})
    return out
