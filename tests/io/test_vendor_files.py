"""Real vendor files from pydicom-data (a test dependency): the SonoSite cardiac cine, Philips
palette-colour and GE JPEG 2000 (YBR_ICT/YBR_RCT) ultrasound images."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut

from echopulse.config import ClipConfig
from echopulse.ingest import make_ingest_fn
from echopulse.io.dicom_echo import decode_gray, read_echo_dicom
from echopulse.transforms.video import crop_region, mask_outside_sector, resize_frames

# The SonoSite cine's fan, measured by hand: each row's leftmost/rightmost pixel that ever exceeds
# the black background, lines fitted to both edges (they meet at the apex), the arc's distance from
# the apex; checked by drawing the outline over frame 0. Full-frame pixel coordinates.
APEX_XY = (340.0, 17.0)
HALF_ANGLE_DEG = 42.7
RADII = (30.0, 385.0)  # the probe face's arc, the far arc
REGION = (84, 31, 595, 414)  # the file's SequenceOfUltrasoundRegions box (x0, y0, x1, y1)


def vendor_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} not found: install the test extra (pydicom-data)")
    return path


def fan_mask(shape: tuple[int, int]) -> np.ndarray:
    """The hand-measured fan inside the region box, in the region's (cropped) coordinates."""
    x0, y0, x1, y1 = REGION
    y, x = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(float)
    dx, dy = x - APEX_XY[0], y - APEX_XY[1]
    r = np.hypot(dx, dy)
    inside = (r >= RADII[0]) & (r <= RADII[1]) & (np.degrees(np.arctan2(np.abs(dx), dy)) <= HALF_ANGLE_DEG)
    assert inside.shape == shape
    return inside


def luma(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.uint16) for i in range(3))
    return ((77 * r + 150 * g + 29 * b + 128) >> 8).astype(np.uint8)


@pytest.fixture(scope="module")
def sonosite():
    path = vendor_file("color3d_jpeg_baseline.dcm")
    frames, meta = read_echo_dicom(path)
    return path, frames, meta


def test_sonosite_cine_reads_as_a_30_fps_a4c_cine_with_its_region(sonosite):
    _, frames, meta = sonosite
    assert frames.shape == (120, 480, 640) and meta["fps"] == pytest.approx(30.0, abs=1e-3)
    assert meta["region"] == REGION and meta["photometric"] == "YBR_FULL_422"
    assert not meta["has_waveform"]


def test_sector_mask_keeps_the_whole_fan_and_no_text(sonosite):
    _, frames, meta = sonosite
    cropped = crop_region(frames, meta["region"])  # (T, 384, 512)
    masked = mask_outside_sector(cropped)
    fan = fan_mask(cropped.shape[1:])
    signal = cropped.max(axis=0) > 3  # pixels that ever show an echo (the background is 0-1)
    kept = masked.max(axis=0) > 3
    coverage = (kept & fan & signal).sum() / (fan & signal).sum()
    assert coverage > 0.99  # apex, edges and far corners (the old mask kept 0.77 of it)
    # nothing beyond a 4-pixel band around the fan survives (JPEG ringing sits on the edge)
    from scipy import ndimage

    near_fan = ndimage.binary_dilation(fan, iterations=4)
    assert (kept & ~near_fan).sum() == 0
    # burned-in marks inside the region box (the orientation dot, the depth "19"): static and bright
    static_text = (cropped.std(axis=0) < 0.5) & (cropped.mean(axis=0) > 60) & ~near_fan
    assert static_text.sum() > 50  # they are there before masking
    assert masked[:, static_text].max() == 0


def test_sonosite_cine_ingests_to_ecg_less_clips_that_keep_the_fan(sonosite, tmp_path):
    from scipy import ndimage

    from echopulse.transforms.clips import cut_clip, window_spans

    path, frames, meta = sonosite
    clip = ClipConfig(frames=5, size=32, fps=5.0, ecg_samples=300)
    clips = make_ingest_fn(clip, base_dir=str(tmp_path), salt="s")({"echo": path, "ecg": "", "view": "A4C"})
    assert len(clips) == 3  # 120 frames at 30.0003 fps end just short of a 4th 1 s window
    assert {c["ecg_source"] for c in clips} == {"none"} and clips[0]["view"] == "A4C"
    # the same clips without the sector mask: crop, cut and resize only
    cropped = crop_region(frames, meta["region"])
    spans = window_spans(len(frames) / meta["fps"], None, clip)
    raw = np.stack([cut_clip(cropped, meta["fps"], None, span, clip)[0] for span in spans])
    got = np.stack([c["frames"] for c in clips])  # (3, 5, 32, 32)
    # the fan at clip size: the same crop, pad and resize applied to the hand-measured fan
    fan = resize_frames(fan_mask((384, 512))[None].astype(np.uint8) * 255, 32)[0] > 127
    inner, outer = ndimage.binary_erosion(fan), ndimage.binary_dilation(fan)
    np.testing.assert_array_equal(got[..., inner], raw[..., inner])  # all of the fan, untouched
    assert got[..., ~outer].max() == 0 and raw[..., ~outer].max() > 20  # the text was there (diluted)


@pytest.mark.parametrize("name, tolerance", [("US1_J2KR.dcm", 0.0), ("US1_J2KI.dcm", 2.0)])
def test_jpeg2000_ybr_rct_and_ict_decode_to_the_luma_of_the_uncompressed_original(name, tolerance):
    rgb = pydicom.dcmread(vendor_file("US1_UNCR.dcm")).pixel_array  # the same GE image, uncompressed RGB
    original = luma(rgb)
    ds = pydicom.dcmread(vendor_file(name))
    assert ds.PhotometricInterpretation == ("YBR_RCT" if "J2KR" in name else "YBR_ICT")
    gray = decode_gray(ds)[0]
    assert np.abs(gray.astype(int) - original).mean() <= tolerance
    # taking the first decoded channel as luma (the decoder already returned RGB) is off wherever the
    # image has colour (its Doppler scale and overlays)
    coloured = rgb.max(axis=-1).astype(int) - rgb.min(axis=-1) > 40
    first = pydicom.dcmread(vendor_file(name)).pixel_array[..., 0].astype(int)
    assert coloured.sum() > 100 and np.abs(first - original)[coloured].mean() > 20


@pytest.mark.parametrize("name", ["examples_palette.dcm", "OBXXXX1A.dcm"])
def test_palette_colour_is_looked_up_not_read_as_grey_levels(name):
    ds = pydicom.dcmread(vendor_file(name))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    index = ds.pixel_array
    gray = decode_gray(ds)[0]
    lut = apply_color_lut(np.arange(256, dtype=np.uint8), ds)  # (256, 3) the palette itself
    lut8 = (lut >> 8).astype(np.uint8) if lut.dtype == np.uint16 else lut
    grey_entry = (lut8[:, 0] == lut8[:, 1]) & (lut8[:, 1] == lut8[:, 2])
    on_grey = grey_entry[index]
    assert on_grey.mean() > 0.5  # mostly a B-mode image ...
    np.testing.assert_array_equal(gray[on_grey], lut8[index[on_grey], 0])  # ... shown at its palette level
    assert np.abs(gray.astype(int) - index).mean() > 5  # the indices are not the picture


def test_palette_colour_cine_reads_through_the_echo_reader(tmp_path):
    ds = pydicom.dcmread(vendor_file("examples_palette.dcm"))
    one = ds.PixelData
    ds.NumberOfFrames, ds.FrameTime = 3, "40"
    ds.PixelData = one * 3
    ds.save_as(tmp_path / "palette_cine.dcm", enforce_file_format=True)
    frames, meta = read_echo_dicom(tmp_path / "palette_cine.dcm")
    assert frames.shape == (3, 350, 800) and meta["fps"] == pytest.approx(25.0)
    np.testing.assert_array_equal(frames[2], decode_gray(pydicom.dcmread(vendor_file("examples_palette.dcm")))[0])


def test_demo_corpus_gets_the_real_cine_as_an_ecg_less_study(tmp_path):
    import csv

    from echopulse.synth.phantom import write_corpus
    from jobs.quickstart import add_vendor_cine

    manifest = write_corpus(tmp_path, studies=1, seed=0, duration_s=1.0)
    assert add_vendor_cine(tmp_path)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[1]["echo"] == "echo/sonosite_a4c.dcm" and rows[1]["ecg"] == ""
    assert pydicom.dcmread(tmp_path / rows[1]["echo"], stop_before_pixels=True).Manufacturer == "SonoSite, Inc."
