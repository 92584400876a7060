import imageio.v2 as iio
import numpy as np
import pytest

from echopulse.io.dicom_echo import EchoReadError
from echopulse.io.video import is_video, read_echo_video


def write_avi(path, frames, fps):
    """An EchoNet-style AVI (MJPEG in AVI, RGB frames of gray content) through imageio-ffmpeg."""
    with iio.get_writer(str(path), format="FFMPEG", fps=fps, codec="mjpeg", quality=10,
                        pixelformat="yuvj444p", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.repeat(frame[..., None], 3, axis=-1))
    return path


def moving_frames(n=12, size=48):
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([(128 + 100 * np.sin((x + 2 * i) / 6.0) * np.cos(y / 8.0)).astype(np.uint8)
                     for i in range(n)])


def test_reads_avi_frames_and_fps(tmp_path):
    frames = moving_frames()
    path = write_avi(tmp_path / "0X1.avi", frames, fps=50)
    got, meta = read_echo_video(path)
    assert is_video(path) and got.dtype == np.uint8 and got.shape == frames.shape
    assert np.abs(got.astype(int) - frames).mean() < 3
    assert meta["fps"] == pytest.approx(50.0) and meta["region"] is None and meta["study_uid"] == ""
    assert read_echo_video(path, fps=25.0)[1]["fps"] == 25.0  # FileList.csv's FPS wins


def test_video_errors(tmp_path):
    with pytest.raises(EchoReadError, match="not found"):
        read_echo_video(tmp_path / "none.avi")
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"RIFF not really an avi" * 10)
    with pytest.raises(EchoReadError):
        read_echo_video(bad)
    path = write_avi(tmp_path / "big.avi", moving_frames(), fps=50)
    with pytest.raises(EchoReadError, match="limit per file"):
        read_echo_video(path, max_decoded_bytes=48 * 48 * 3)
