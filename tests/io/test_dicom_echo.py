import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import convert_color_space

from echopulse.io.dicom_echo import EchoReadError, read_echo_dicom
from echopulse.synth.phantom import Study, write_study_dicom


def _write(tmp_path, frames=None, fps=25.0, name="cine.dcm", seed=0):
    rng = np.random.default_rng(seed)
    if frames is None:
        frames = rng.integers(0, 256, size=(6, 40, 48), dtype=np.uint8)
    study = Study(frames=frames, fps=fps, ecg=None, view="A4C", ef=0.6, heart_rate_bpm=70,
                  ed_frames=[], es_frames=[], region=(2, 5, 45, 39), volume=np.ones(len(frames)),
                  lv_area=np.ones(len(frames)), lv_center=(0, 0))
    return write_study_dicom(study, tmp_path / name, seed=seed), frames


def test_reads_frames_and_metadata(tmp_path):
    path, frames = _write(tmp_path, fps=30.0)
    got, meta = read_echo_dicom(path)
    np.testing.assert_array_equal(got, frames)
    assert got.dtype == np.uint8 and got.shape == (6, 40, 48)
    assert meta["fps"] == pytest.approx(30.0)
    assert meta["region"] == (2, 5, 45, 39)
    assert meta["n_frames"] == 6 and meta["study_uid"] and meta["sop_uid"]


def _rewrite(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_frame_rate_fallbacks(tmp_path):
    path, _ = _write(tmp_path, fps=25.0)
    _rewrite(path, FrameTime=None, FrameTimeVector=[0, 50, 50, 50, 50, 50])
    assert read_echo_dicom(path)[1]["fps"] == pytest.approx(20.0)
    _rewrite(path, FrameTimeVector=None, CineRate=None)
    assert read_echo_dicom(path)[1]["fps"] == pytest.approx(25.0)  # RecommendedDisplayFrameRate
    _rewrite(path, RecommendedDisplayFrameRate=None)
    with pytest.raises(EchoReadError, match="frame timing"):
        read_echo_dicom(path)


def test_missing_file_and_not_dicom(tmp_path):
    with pytest.raises(EchoReadError, match="not found"):
        read_echo_dicom(tmp_path / "nope.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"definitely not a DICOM file" * 20)
    with pytest.raises(EchoReadError, match="not a DICOM"):
        read_echo_dicom(junk)


def test_truncated_file(tmp_path):
    path, _ = _write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EchoReadError):
        read_echo_dicom(path)


def test_wrong_modality():
    with pytest.raises(EchoReadError, match="not an ultrasound") as info:
        read_echo_dicom(get_testdata_file("CT_small.dcm"))
    assert "CT" in str(info.value)


def test_single_frame(tmp_path):
    path, frames = _write(tmp_path)
    _rewrite(path, NumberOfFrames=1, PixelData=frames[0].tobytes())
    with pytest.raises(EchoReadError, match="single-frame"):
        read_echo_dicom(path)


def test_frame_count_larger_than_data_fails_before_decoding(tmp_path):
    path, _ = _write(tmp_path)
    _rewrite(path, NumberOfFrames=1_000_000)
    with pytest.raises(EchoReadError, match="claims 1000000 frames"):
        read_echo_dicom(path)


def test_undecodable_compressed_pixel_data(tmp_path):
    path, _ = _write(tmp_path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not a jpeg" * 4] * 6)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(EchoReadError, match="could not be decoded"):
        read_echo_dicom(path)
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not a jpeg" * 4] * 2)
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(EchoReadError, match="only 2 fragments"):
        read_echo_dicom(path)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_color_converted_to_gray(tmp_path, photometric):
    path, _ = _write(tmp_path)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 40, 48, 3), dtype=np.uint8)
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    _rewrite(path, SamplesPerPixel=3, PhotometricInterpretation=photometric, PlanarConfiguration=0,
             PixelData=stored.tobytes())
    gray, _ = read_echo_dicom(path)
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert gray.shape == (6, 40, 48) and gray.dtype == np.uint8
    assert np.abs(gray.astype(float) - luma).max() <= 3


def test_rgb_luma_is_exact_across_its_pixel_steps(tmp_path, monkeypatch):
    """The RGB luma is computed a run of pixels at a time: a step that ends mid-frame (and a short
    last step) gives the same integer BT.601 luma as converting the whole cine at once."""
    import echopulse.io.dicom_echo as dicom_echo

    monkeypatch.setattr(dicom_echo, "LUMA_CHUNK_PX", 1000)  # 6 x 40 x 48 pixels: 12 steps, the last short
    path, _ = _write(tmp_path)
    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 40, 48, 3), dtype=np.uint8)
    rgb[0, 0, :3] = [[255, 255, 255], [0, 0, 0], [255, 0, 255]]  # the largest sum must not overflow
    _rewrite(path, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
             PixelData=rgb.tobytes())
    gray, _ = read_echo_dicom(path)
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    assert np.array_equal(gray, ((77 * r + 150 * g + 29 * b + 128) >> 8).astype(np.uint8))
    assert gray[0, 0, :3].tolist() == [255, 0, 106]


# --- transfer syntaxes, photometrics, timing order, memory bound -------------------------------

from echopulse.synth.dicom_variants import TRANSFER_SYNTAXES, rewrite_transfer_syntax  # noqa: E402


def _smooth_frames(n=6, rows=40, cols=48, seed=0):
    """Image-like frames (JPEG's error on white noise says nothing about a reader)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    base = 128 + 80 * np.sin(x / 7.0) * np.cos(y / 9.0)
    return np.stack([np.clip(base + 10 * i + rng.normal(0, 2, base.shape), 0, 255) for i in range(n)]
                    ).astype(np.uint8)


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES)
def test_transfer_syntaxes(tmp_path, syntax):
    src, frames = _write(tmp_path, frames=_smooth_frames())
    path = rewrite_transfer_syntax(src, tmp_path / f"{syntax}.dcm", syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed == (
        syntax not in ("explicit", "implicit"))
    got, meta = read_echo_dicom(path)
    assert got.shape == frames.shape and got.dtype == np.uint8 and meta["fps"] == pytest.approx(25.0)
    error = np.abs(got.astype(int) - frames).max()
    if syntax == "jpeg_baseline":
        assert 0 < error <= 12  # lossy, but the same picture
    else:
        assert error == 0  # lossless


def _ybr_422_bytes(rgb):
    """Native YBR_FULL_422: per pair of pixels Y1 Y2 Cb Cr (chroma averaged over the pair)."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float64)
    y = ybr[..., 0]
    cb = (ybr[..., 0::2, 1] + ybr[..., 1::2, 1]) / 2
    cr = (ybr[..., 0::2, 2] + ybr[..., 1::2, 2]) / 2
    out = np.stack([y[..., 0::2], y[..., 1::2], cb, cr], axis=-1)
    return np.round(out).astype(np.uint8).tobytes()


@pytest.mark.parametrize("encoding", ["native", "jpeg_baseline"])
def test_ybr_full_422_converted_to_gray(tmp_path, encoding):
    path, _ = _write(tmp_path)
    gray = _smooth_frames()
    rgb = np.stack([gray, np.clip(gray.astype(int) + 30, 0, 255), np.clip(gray.astype(int) - 30, 0, 255)],
                   axis=-1).astype(np.uint8)
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    if encoding == "native":
        _rewrite(path, SamplesPerPixel=3, PhotometricInterpretation="YBR_FULL_422", PlanarConfiguration=0,
                 PixelData=_ybr_422_bytes(rgb))
    else:
        _rewrite(path, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                 PixelData=rgb.tobytes())
        path = rewrite_transfer_syntax(path, tmp_path / "ybr_jpeg.dcm", "jpeg_baseline", quality=95)
        assert pydicom.dcmread(path).PhotometricInterpretation == "YBR_FULL_422"
    got, meta = read_echo_dicom(path)
    assert got.shape == (6, 40, 48) and meta["photometric"] == "YBR_FULL_422"
    assert np.abs(got.astype(float) - luma).max() <= (2 if encoding == "native" else 10)


def test_timing_order_framet_time_first(tmp_path):
    path, _ = _write(tmp_path, fps=25.0)
    # every source present and disagreeing: FrameTime wins, then FrameTimeVector, CineRate, RDFR
    _rewrite(path, FrameTime="40", FrameTimeVector=[0, 50, 50, 50, 50, 50], CineRate=30,
             RecommendedDisplayFrameRate=15)
    assert read_echo_dicom(path)[1]["fps"] == pytest.approx(25.0)
    _rewrite(path, FrameTime=None)
    assert read_echo_dicom(path)[1]["fps"] == pytest.approx(20.0)
    _rewrite(path, FrameTimeVector=None)
    assert read_echo_dicom(path)[1]["fps"] == pytest.approx(30.0)
    _rewrite(path, CineRate=None)
    assert read_echo_dicom(path)[1]["fps"] == pytest.approx(15.0)
    _rewrite(path, FrameTime="0", CineRate=0)  # unusable values fall through
    assert read_echo_dicom(path)[1]["fps"] == pytest.approx(15.0)


def test_huge_frame_claim_in_compressed_file_is_refused_before_allocation(tmp_path):
    src, _ = _write(tmp_path, frames=_smooth_frames())
    path = rewrite_transfer_syntax(src, tmp_path / "ls.dcm", "jpeg_ls")
    _rewrite(path, NumberOfFrames=1_000_000)
    with pytest.raises(EchoReadError, match="claims 1000000 frames"):
        read_echo_dicom(path)  # the decoded size (1.9 GB) passes the cap: the fragment count stops it
    _rewrite(path, NumberOfFrames=6, Rows=60000, Columns=60000)
    with pytest.raises(EchoReadError, match="GiB limit per file"):
        read_echo_dicom(path)


def test_acquisition_start_and_no_waveform(tmp_path):
    path, _ = _write(tmp_path)
    _rewrite(path, AcquisitionDateTime="20240102103000.500")
    meta = read_echo_dicom(path)[1]
    assert meta["start"].isoformat() == "2024-01-02T10:30:00.500000" and meta["has_waveform"] is False
