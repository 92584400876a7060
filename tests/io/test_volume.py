"""NIfTI / MetaImage cines (CAMUS's formats): read back upright, bad files refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from echopulse.io.dicom_echo import EchoReadError
from echopulse.io.volume import read_echo_volume

FRAMES = np.random.default_rng(0).integers(0, 255, (4, 6, 5), dtype=np.uint8)  # (T, H, W)


def write_mhd(path, frames, data_file=None, element_type="MET_UCHAR", extra=""):
    t, h, w = frames.shape
    data_file = data_file or path.with_suffix(".raw").name
    (path.parent / path.with_suffix(".raw").name).write_bytes(np.ascontiguousarray(frames).tobytes())
    path.write_text(f"NDims = 3\nDimSize = {w} {h} {t}\nElementType = {element_type}\n{extra}"
                    f"ElementDataFile = {data_file}\n")
    return path


def test_nifti_4d_takes_its_frame_rate_from_the_time_step(tmp_path):
    import nibabel as nib

    image = nib.Nifti1Image(FRAMES.transpose(2, 1, 0)[:, :, None, :].copy(), np.eye(4))
    image.header.set_xyzt_units("mm", "msec")
    image.header.set_zooms((1.0, 1.0, 1.0, 40.0))
    nib.save(image, tmp_path / "cine.nii.gz")
    frames, meta = read_echo_volume(tmp_path / "cine.nii.gz")
    np.testing.assert_array_equal(frames, FRAMES)
    assert meta["fps"] == pytest.approx(25.0)


def test_mhd_16_bit_is_rescaled_to_8_bit(tmp_path):
    wide = FRAMES.astype("<u2") * 200
    frames, _ = read_echo_volume(write_mhd(tmp_path / "c.mhd", wide, element_type="MET_USHORT"), fps=10)
    assert frames.dtype == np.uint8 and frames.max() == 255 and frames.min() == 0
    np.testing.assert_array_equal(np.argsort(frames.ravel(), kind="stable"), np.argsort(wide.ravel(), kind="stable"))


@pytest.mark.parametrize("case, message", [
    ("escape", "not a file beside the header"),
    ("missing", "data file c.raw is missing"),
    ("short", "holds"),
    ("no_fps", "no frame rate"),
    ("not_mhd", "not a MetaImage header"),
    ("one_frame", "a cine needs at least 2"),
])
def test_bad_metaimage_is_refused_with_the_reason(tmp_path, case, message):
    path = tmp_path / "c.mhd"
    fps = 10.0
    if case == "escape":
        write_mhd(path, FRAMES, data_file="../c.raw")
    elif case == "missing":
        write_mhd(path, FRAMES)
        (tmp_path / "c.raw").unlink()
    elif case == "short":
        write_mhd(path, FRAMES)
        (tmp_path / "c.raw").write_bytes(b"\0" * 10)
    elif case == "no_fps":
        write_mhd(path, FRAMES)
        fps = None
    elif case == "not_mhd":
        path.write_text("hello\n")
    else:
        write_mhd(path, FRAMES[:1])
    with pytest.raises(EchoReadError, match=message) as err:
        read_echo_volume(path, fps=fps)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
