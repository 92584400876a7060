"""EchoNet-Dynamic: ``FileList.csv`` (FileName, EF, FPS, Split, ...), ``VolumeTracings.csv`` (the LV
traced at end-diastole and end-systole) and ``Videos/<FileName>.avi``; apical four-chamber videos
with no ECG (they serve tokenizer training)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from echopulse.manifests.common import Manifest, cell_text, percent_to_fraction, read_table, require

NAME = "echonet-dynamic"
FILELIST_COLUMNS = ("FileName", "EF", "FPS", "Split")
LAYOUT = "FileList.csv, VolumeTracings.csv and Videos/"


def build(root: Path, **_: object) -> Manifest:
    """Manifest rows for an EchoNet-Dynamic root: one ECG-less row per listed video.

    Raises:
        LayoutError: FileList.csv, VolumeTracings.csv or Videos/ missing, or FileList.csv lacks
            FileName/EF/FPS/Split.
    """
    rows = read_table(require(root / "FileList.csv", NAME, LAYOUT), NAME, FILELIST_COLUMNS)
    tracings = read_tracings(require(root / "VolumeTracings.csv", NAME, LAYOUT), NAME)
    videos = require(root / "Videos", NAME, LAYOUT)
    out = Manifest()
    for r in rows:
        name, path = video_name(r["FileName"]), listed_video(videos, r["FileName"], out)
        if path is None:
            continue
        out.rows.append(filelist_row(r, str(path), tracings.get(name, ("", ""))))
    return out


def filelist_row(r: dict, echo: str, traced: tuple[str, str] = ("", "")) -> dict[str, str]:
    """One FileList.csv row as a manifest row for the video at ``echo``: no ECG, an apical
    four-chamber view, EF from percent to a fraction, Split lower-cased, the study named after the
    video, ``traced`` = (end-diastolic, end-systolic) frame when known. Also what ingest makes of a
    FileList.csv given as its manifest (``pipelines.plan.read_manifest``)."""
    name = video_name(cell_text(r["FileName"]))
    return {"echo": echo, "ecg": "", "ecg_sync": "", "view": "A4C", "ef": percent_to_fraction(r.get("EF")),
            "fps": cell_text(r.get("FPS")), "split": cell_text(r.get("Split")).lower(),
            "study": name.rsplit(".", 1)[0], "ed_frame": traced[0], "es_frame": traced[1]}


def listed_video(videos: Path, file_name: str, out: Manifest) -> Path | None:
    """The video FileList.csv lists under ``videos``; None (counted as skipped) when it is missing."""
    path = videos / video_name(file_name)
    if not path.is_file():
        out.skipped["listed video missing from Videos/"] += 1
        return None
    return path


def video_name(value: str) -> str:
    """FileList.csv names videos with or without their ``.avi``."""
    value = value.strip()
    return value if value.lower().endswith(".avi") else f"{value}.avi"


def read_tracings(path: Path, dataset: str) -> dict[str, tuple[str, str]]:
    """Video name -> (end-diastolic frame, end-systolic frame), 0-based, as strings.

    Of the two traced frames, the one with the larger traced LV is end-diastole. Tracings come as
    chords (X1, Y1, X2, Y2: the long axis, then its perpendicular chords; the cavity grows with
    their summed length) or as a contour (X, Y: area by the shoelace formula).
    """
    rows = read_table(path, dataset, ("FileName", "Frame"))
    chords = bool(rows) and "X1" in rows[0]
    points: dict[tuple[str, str], list[tuple[float, ...]]] = defaultdict(list)
    for r in rows:
        try:
            if chords:
                points[(video_name(r["FileName"]), r["Frame"])].append(
                    tuple(float(r[k]) for k in ("X1", "Y1", "X2", "Y2")))
            else:
                points[(video_name(r["FileName"]), r["Frame"])].append((float(r["X"]), float(r["Y"])))
        except (KeyError, ValueError):
            continue
    sizes: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for (name, frame), pts in points.items():
        sizes[name].append((_chord_size(pts) if chords else _polygon_area(pts), frame))
    out = {}
    for name, traced in sizes.items():
        if len(traced) >= 2:
            traced.sort()
            out[name] = (traced[-1][1], traced[0][1])
    return out


def _chord_size(chords: list[tuple[float, ...]]) -> float:
    return sum(math.hypot(x2 - x1, y2 - y1) for x1, y1, x2, y2 in chords[1:])


def _polygon_area(points: list[tuple[float, ...]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    n = len(points)
    return 0.5 * abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n)))
