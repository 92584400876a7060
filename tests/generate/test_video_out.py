"""Each output format decodes with an independent reader, with the frame count and rate written."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from echopulse.errors import EchoPulseError
from echopulse.video_out import write_video


def _frames(t=7, h=24, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w), dtype=np.uint8)


def gif_frames_and_fps(path):
    with Image.open(path) as image:
        durations = []
        for i in range(image.n_frames):
            image.seek(i)
            durations.append(image.info["duration"])
        return image.n_frames, [1000.0 / d for d in durations]


def mp4_frames_and_fps(path):
    import imageio.v3 as iio

    frames = iio.imread(path, plugin="FFMPEG")
    return frames, iio.immeta(path, plugin="FFMPEG")["fps"]


@pytest.mark.parametrize("fps", [5.0, 10.0, 25.0])
def test_gif_decodes_with_pillow(tmp_path, fps):
    frames = _frames()
    frames[3] = frames[2]  # identical neighbours must stay two frames
    out = write_video(frames, fps, str(tmp_path / "v.gif"))
    count, rates = gif_frames_and_fps(out)
    assert count == len(frames)
    assert rates == pytest.approx([fps] * count)
    with Image.open(out) as image:
        image.seek(5)
        assert np.array_equal(np.asarray(image.convert("L")), frames[5])


@pytest.mark.parametrize("fps", [5.0, 12.0])
def test_mp4_decodes_with_ffmpeg_reader(tmp_path, fps):
    frames = _frames(t=9, h=31, w=40)  # odd height: padded to even for H.264
    out = write_video(frames, fps, str(tmp_path / "v.mp4"))
    decoded, rate = mp4_frames_and_fps(out)
    assert decoded.shape[0] == 9 and decoded.shape[1:3] == (32, 40)
    assert rate == pytest.approx(fps)
    # lossy but close: noise frames are the worst case for H.264
    assert np.abs(decoded[..., 0][:, :31].astype(int) - frames).mean() < 12


def test_dicom_is_synthetic_ultrasound_multiframe(tmp_path):
    frames = _frames(t=6)
    out = write_video(frames, 10.0, str(tmp_path / "v.dcm"))
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    assert ds.Modality == "US"
    assert int(ds.NumberOfFrames) == 6
    assert 1000.0 / float(ds.FrameTime) == pytest.approx(10.0)
    assert np.array_equal(ds.pixel_array, frames)  # lossless
    assert list(ds.ImageType)[0] == "DERIVED"
    assert "SYNTHETIC" in ds.DerivationDescription and "ConversionType" not in ds  # not in the US IOD
    assert ds.PatientIdentityRemoved == "YES" and "Clean Pixel Data" in ds.DeidentificationMethod
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113101"]
    assert str(ds.PatientName) == "" and ds.PatientID == "" and ds.PatientBirthDate == ""
    second = pydicom.dcmread(write_video(frames, 10.0, str(tmp_path / "w.dcm")))
    for uid in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert ds[uid].value != second[uid].value  # new UIDs every time


def test_unsupported_extension_writes_nothing(tmp_path):
    with pytest.raises(EchoPulseError, match=".avi"):
        write_video(_frames(), 5.0, str(tmp_path / "v.avi"))
    assert list(tmp_path.iterdir()) == []


def test_bad_frames_leave_no_file(tmp_path):
    with pytest.raises(ValueError):
        write_video(np.zeros((3, 8, 8), dtype=np.float32), 5.0, str(tmp_path / "v.gif"))
    with pytest.raises(ValueError):
        write_video(_frames(), 0.0, str(tmp_path / "v.mp4"))
    assert list(tmp_path.iterdir()) == []
