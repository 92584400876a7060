"""Small dataset roots in each public layout, written from one phantom study."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def phantom_study():
    from echopulse.synth.phantom import make_study

    return make_study(11, view="A4C", heart_rate_bpm=75, ef=0.55, duration_s=2.0, fps=20, rows=64, cols=64)


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_avi(path: Path, frames: np.ndarray, fps: float) -> Path:
    import imageio.v2 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = iio.get_writer(str(path), format="FFMPEG", fps=fps, codec="mjpeg", quality=9,
                            macro_block_size=1, ffmpeg_log_level="error")
    try:
        for frame in frames:
            writer.append_data(np.repeat(frame[..., None], 3, axis=2))
    finally:
        writer.close()
    return path


def write_non_cine(path: Path) -> Path:
    """A Basic Text SR: a DICOM object in the study folder that is not an image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "SR"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def mimic_roots(tmp_path_factory, phantom_study):
    """A MIMIC-IV-ECHO root (2 subjects: cines, a still, a report) and a MIMIC-IV-ECG root."""
    from echopulse.synth.phantom import write_study_dicom, write_study_wfdb

    echo = tmp_path_factory.mktemp("mimic-iv-echo")
    listing = []

    def add(subject: str, study: str, n: int, when: str, kind: str = "cine") -> None:
        rel = f"files/p{subject[:2]}/p{subject}/s{study}/{study}_{n:04d}.dcm"
        if kind == "cine":
            write_study_dicom(phantom_study, echo / rel, seed=n)
        elif kind == "still":
            write_study_dicom(dataclasses.replace(phantom_study, frames=phantom_study.frames[:1]), echo / rel, seed=n)
        else:
            write_non_cine(echo / rel)
        listing.append({"subject_id": subject, "study_id": study, "acquisition_datetime": when,
                        "dicom_filepath": rel})

    add("10000001", "90000001", 1, "2180-07-23 08:44:00")
    add("10000001", "90000001", 2, "2180-07-23 08:45:10", "still")
    add("10000001", "90000001", 3, "2180-07-23 08:50:00", "report")
    add("10000002", "90000002", 1, "2181-01-02 10:00:00")
    write_csv(echo / "echo-record-list.csv", listing)

    ecg = tmp_path_factory.mktemp("mimic-iv-ecg")
    records = []
    for subject, study, when in (("10000001", "40000001", "2180-07-23 10:44:00"),  # 2 h later
                                 ("10000001", "40000003", "2180-07-25 08:44:00"),  # 2 days later
                                 ("10000002", "40000002", "2181-01-03 16:00:00")):  # 30 h later
        rel = f"files/p{subject[:4]}/p{subject}/s{study}"
        write_study_wfdb(phantom_study, ecg / rel, study)
        records.append({"subject_id": subject, "study_id": study, "file_name": study, "ecg_time": when,
                        "path": f"{rel}/{study}"})
    write_csv(ecg / "record_list.csv", records)
    return echo, ecg


def _chords(cx: float, cy: float, half_width: float) -> list[tuple[float, float, float, float]]:
    """An EchoNet tracing: the long axis, then perpendicular chords of a given half width."""
    rows = [(cx, cy - 20, cx, cy + 20)]
    rows += [(cx - half_width, cy + k, cx + half_width, cy + k) for k in range(-18, 19, 4)]
    return rows


@pytest.fixture(scope="session")
def echonet_dynamic_root(tmp_path_factory, phantom_study):
    root = tmp_path_factory.mktemp("EchoNet-Dynamic")
    files, tracings = [], []
    for name, ef, split in (("0X1A", 55.0, "TRAIN"), ("0X1B", 40.0, "VAL")):
        write_avi(root / "Videos" / f"{name}.avi", phantom_study.frames, phantom_study.fps)
        files.append({"FileName": name, "EF": ef, "ESV": 30, "EDV": 70, "FrameHeight": 64, "FrameWidth": 64,
                      "FPS": phantom_study.fps, "NumberOfFrames": len(phantom_study.frames), "Split": split})
        # the end-systolic frame (small) listed first, as in the dataset; ED = the larger tracing
        for frame, half in ((7, 6.0), (24, 10.0)):
            tracings += [{"FileName": f"{name}.avi", "X1": a, "Y1": b, "X2": c, "Y2": d, "Frame": frame}
                         for a, b, c, d in _chords(32, 32, half)]
    files.append({**files[0], "FileName": "0X1C"})  # listed, but its video is absent
    write_csv(root / "FileList.csv", files)
    write_csv(root / "VolumeTracings.csv", tracings)
    return root


@pytest.fixture(scope="session")
def echonet_pediatric_root(tmp_path_factory, phantom_study):
    root = tmp_path_factory.mktemp("EchoNet-Pediatric")
    for view, folds in (("A4C", ("0", "8")), ("PSAX", ("9",))):
        files, tracings = [], []
        for i, fold in enumerate(folds):
            name = f"CR{view}-{i:06d}.avi"
            write_avi(root / view / "Videos" / name, phantom_study.frames, phantom_study.fps)
            files.append({"FileName": name, "EF": 62.5, "Sex": "F", "Age": 7, "Weight": 20, "Height": 110,
                          "Split": fold})
            for frame, r in ((12, 8.0), (3, 14.0)):  # contours: ED (frame 3) is the larger one
                angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                tracings += [{"FileName": name, "X": 32 + r * np.cos(a), "Y": 32 + r * np.sin(a), "Frame": frame}
                             for a in angles]
        write_csv(root / view / "FileList.csv", files)
        write_csv(root / view / "VolumeTracings.csv", tracings)
    return root


INFO = "ED: 1\nES: {es}\nNbFrame: {n}\nSex: F\nAge: 49\nImageQuality: Good\nLVedv: 93.4\nLVesv: 47.2\nLVef: {ef}\n"


def write_mhd(path: Path, frames: np.ndarray) -> Path:
    """A MetaImage cine: (T, H, W) uint8 stored x fastest, DimSize W H T."""
    t, h, w = frames.shape
    raw = path.with_suffix(".raw")
    raw.write_bytes(np.ascontiguousarray(frames).tobytes())
    path.write_text(f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                    f"CompressedData = False\nElementSpacing = 0.3 0.15 1\nDimSize = {w} {h} {t}\n"
                    f"ElementType = MET_UCHAR\nElementDataFile = {raw.name}\n")
    return path


@pytest.fixture(scope="session")
def camus_roots(tmp_path_factory, phantom_study):
    """The NIfTI release (database_nifti/ + database_split/) and the older MHD one (training/, testing/)."""
    import nibabel as nib

    frames = phantom_study.frames[:16]  # a half cycle, ED to ES
    nifti = tmp_path_factory.mktemp("CAMUS_public")
    for p, ef in (("patient0001", 55.0), ("patient0002", 38.5)):
        folder = nifti / "database_nifti" / p
        folder.mkdir(parents=True)
        for view in ("2CH", "4CH"):
            volume = np.ascontiguousarray(frames.transpose(2, 1, 0))  # (W, H, T): x fastest
            nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"{p}_{view}_half_sequence.nii.gz")
            (folder / f"Info_{view}.cfg").write_text(INFO.format(es=16, n=16, ef=ef))
    (nifti / "database_split").mkdir()
    (nifti / "database_split" / "subset_training.txt").write_text("patient0001\n")
    (nifti / "database_split" / "subset_testing.txt").write_text("patient0002\n")

    mhd = tmp_path_factory.mktemp("CAMUS_mhd")
    for parent, p in (("training", "patient0003"), ("testing", "patient0004")):
        folder = mhd / parent / p
        folder.mkdir(parents=True)
        write_mhd(folder / f"{p}_4CH_sequence.mhd", frames)
        (folder / "Info_4CH.cfg").write_text(INFO.format(es=16, n=16, ef=60))
    return nifti, mhd, frames
