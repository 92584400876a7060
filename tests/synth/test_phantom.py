import csv
import json

import numpy as np
import pydicom
import pytest
import wfdb
from scipy import ndimage

from echopulse.config import ECG_FS, ECG_LEADS
from echopulse.io.ecg import read_ecg
from echopulse.synth.phantom import HEADER_TEXT, make_study, write_corpus, write_study_dicom, write_study_wfdb
from echopulse.transforms.ecg import prepare_ecg
from echopulse.transforms.video import crop_region

SMALL = dict(rows=96, cols=112, duration_s=2.5)


@pytest.fixture(scope="module")
def study():
    return make_study(7, view="A4C", heart_rate_bpm=80, ef=0.55, **SMALL)


def test_frames_and_timing(study):
    assert study.frames.dtype == np.uint8
    assert study.frames.shape == (round(2.5 * study.fps), 96, 112)
    assert study.ecg.signal.shape == (12, round(2.5 * study.ecg.fs))
    assert study.ed_frames and study.es_frames
    for ed, r in zip(study.ed_frames, study.ecg.r_peaks_s):
        assert abs(r * study.fps - ed) <= 0.5


def test_volume_peaks_at_r_and_ef_matches(study):
    v = study.volume
    for ed in study.ed_frames:  # ED is a local maximum of the volume curve
        assert v[ed] >= v[max(ed - 1, 0)] and v[ed] >= v[min(ed + 1, len(v) - 1)]
    for es in study.es_frames:  # ES the minimum (the curve is flat there: allow 1-2 px of area)
        assert v[es] <= 1.02 * min(v[max(es - 1, 0)], v[min(es + 1, len(v) - 1)])
        assert v[es] < 0.9 * v[study.ed_frames].min()
    ef = 1 - v[study.es_frames].mean() / v[study.ed_frames].mean()
    assert ef == pytest.approx(study.ef, abs=0.02)


@pytest.mark.parametrize("view,ef", [("A2C", 0.38), ("A4C", 0.68)])
def test_ef_measured_on_the_pixels(view, ef):
    s = make_study(11, view=view, ef=ef, **SMALL)

    def cavity_area(frame):
        # dark connected blob around the LV centre, volume from area ** 1.5 like the phantom
        labels, _ = ndimage.label(ndimage.gaussian_filter(frame.astype(float), 1.0) < 40)
        x, y = s.lv_center
        assert labels[y, x] > 0
        return (labels == labels[y, x]).sum()

    a_ed = np.mean([cavity_area(s.frames[i]) for i in s.ed_frames])
    a_es = np.mean([cavity_area(s.frames[i]) for i in s.es_frames])
    assert 1 - (a_es / a_ed) ** 1.5 == pytest.approx(ef, abs=0.06)


def _tissue_mask(study):
    x0, y0, x1, y1 = study.region
    mean = study.frames.mean(axis=0)
    mask = np.zeros(mean.shape, dtype=bool)
    mask[y0:y1 + 1, x0:x1 + 1] = mean[y0:y1 + 1, x0:x1 + 1] > 60
    return ndimage.binary_erosion(mask, iterations=1)


def test_speckle_moves_with_tissue_and_is_correlated(study):
    mask = _tissue_mask(study)
    assert mask.sum() > 300
    f = study.frames.astype(np.float64)
    temporal = [np.corrcoef(f[i][mask], f[i + 1][mask])[0, 1] for i in range(0, len(f) - 1, 5)]
    assert min(temporal) > 0.5
    other = make_study(8, view="A4C", heart_rate_bpm=80, ef=0.55, **SMALL).frames.astype(np.float64)
    assert np.corrcoef(f[0][mask], other[0][mask])[0, 1] < min(temporal) - 0.2  # different speckle
    frame = f[len(f) // 2]
    inner = ndimage.binary_erosion(mask, iterations=2)
    ys, xs = np.nonzero(inner)
    horizontal = np.corrcoef(frame[ys, xs], frame[ys, xs + 1])[0, 1]
    vertical = np.corrcoef(frame[ys, xs], frame[ys + 1, xs])[0, 1]
    assert horizontal > 0.5 and vertical > 0.4  # grains span several pixels


def test_sector_black_outside_and_gain_falls_with_depth(study):
    x0, y0, x1, y1 = study.region
    ever = study.frames[:, y0:y1 + 1, x0:x1 + 1].max(axis=0) > 0
    ys, xs = np.nonzero(ever)
    apex_x = (x1 - x0) / 2
    angles = np.degrees(np.arctan2(np.abs(xs - apex_x), ys + 0.5))
    assert 37.5 <= angles.max() <= 45.5  # sector of ~75-90 degrees, apex at the top
    assert not ever[:8, :8].any() and not ever[:8, -8:].any()
    tissue = _tissue_mask(study)[y0:y1 + 1, x0:x1 + 1]
    mean = study.frames[:, y0:y1 + 1, x0:x1 + 1].mean(axis=0)
    rows = np.arange(mean.shape[0])[:, None] * np.ones_like(mean)
    top = mean[tissue & (rows > 0.2 * mean.shape[0]) & (rows < 0.45 * mean.shape[0])].mean()
    bottom = mean[tissue & (rows > 0.75 * mean.shape[0])].mean()
    assert bottom < top


def test_header_band_burned_in_and_cropped_away(study):
    x0, y0, x1, y1 = study.region
    band = study.frames[:, :y0]
    assert y0 > 0 and band.max() > 150  # text pixels
    assert np.all(band == band[0])  # static overlay
    cropped = crop_region(study.frames, study.region)
    assert cropped.shape[1:] == (y1 - y0 + 1, x1 - x0 + 1)
    # no row of the crop matches the header text rows
    assert not any(np.array_equal(cropped[0, r], band[0, r2]) and band[0, r2].max() > 0
                   for r in range(4) for r2 in range(y0))


def test_dicom_file(tmp_path, study):
    path = write_study_dicom(study, tmp_path / "s.dcm", seed=7)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1" and ds.Modality == "US"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8 and ds.SamplesPerPixel == 1
    assert int(ds.NumberOfFrames) == study.frames.shape[0]
    assert float(ds.FrameTime) == pytest.approx(1000 / study.fps, rel=1e-6)
    assert ds.FrameIncrementPointer == pydicom.tag.Tag(0x0018, 0x1063)
    region = ds.SequenceOfUltrasoundRegions[0]
    assert (region.RegionLocationMinX0, region.RegionLocationMinY0,
            region.RegionLocationMaxX1, region.RegionLocationMaxY1) == study.region
    assert region.PhysicalDeltaX > 0 and region.PhysicalUnitsXDirection == 3
    assert ds.BurnedInAnnotation == "YES"
    assert str(ds.PatientName) in HEADER_TEXT  # fake, and the one the header shows
    np.testing.assert_array_equal(ds.pixel_array, study.frames)
    again = pydicom.dcmread(write_study_dicom(study, tmp_path / "t.dcm", seed=7))
    other = pydicom.dcmread(write_study_dicom(study, tmp_path / "u.dcm", seed=8))
    assert again.StudyInstanceUID == ds.StudyInstanceUID and again.SOPInstanceUID == ds.SOPInstanceUID
    assert other.StudyInstanceUID != ds.StudyInstanceUID


def test_wfdb_record_and_r_peaks_on_ed_frames(tmp_path, study):
    hea = write_study_wfdb(study, tmp_path, "rec")
    rec = wfdb.rdrecord(str(tmp_path / "rec"))
    assert rec.fs == 500 and rec.sig_name == list(ECG_LEADS) and rec.units == ["mV"] * 12
    np.testing.assert_allclose(rec.p_signal.T, study.ecg.signal, atol=1e-3)
    sig, meta = read_ecg(hea)
    prepared = prepare_ecg(sig, meta["fs"], meta["leads"])
    detected_frames = prepared.r_peaks / ECG_FS * study.fps
    for ed in study.ed_frames:
        assert np.min(np.abs(detected_frames - ed)) <= 0.5


def test_corpus(tmp_path):
    manifest = write_corpus(tmp_path / "a", studies=3, seed=4, duration_s=2.5)
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["echo", "ecg", "view", "ef", "heart_rate_bpm", "split"]
        rows = list(reader)
    assert len(rows) == 3 and {r["split"] for r in rows} <= {"train", "val"}
    assert sum(r["split"] == "val" for r in rows) >= 1
    for r in rows:
        assert not r["echo"].startswith("/") and (tmp_path / "a" / r["echo"]).is_file()
        assert (tmp_path / "a" / r["ecg"]).is_file() and r["ecg"].endswith(".hea")
        assert r["view"] in ("A4C", "A2C") and 0.35 <= float(r["ef"]) <= 0.7
        assert 40 <= float(r["heart_rate_bpm"]) <= 150
    truth = json.loads((tmp_path / "a" / "truth.json").read_text())["studies"]
    assert [t["echo"] for t in truth] == [r["echo"] for r in rows]
    assert all(t["ed_frames"] and t["r_peaks_s"] and t["fps"] == 30.0 for t in truth)
    # study i depends only on (seed, i): a one-study corpus reproduces study 0 byte for byte
    write_corpus(tmp_path / "b", studies=1, seed=4, duration_s=2.5)
    for rel in ("echo/study_0000.dcm", "ecg/study_0000.dat", "ecg/study_0000.hea"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_corpus_heart_rates_cover_40_to_150_evenly():
    from echopulse.synth.phantom import corpus_heart_rate

    for seed in (0, 4):
        rates = np.array([corpus_heart_rate(i, seed) for i in range(10)])
        assert rates.min() >= 40 and rates.max() <= 150
        # every 22-bpm band of the range holds some of any ten studies (a uniform draw often misses one)
        counts = np.histogram(rates, bins=5, range=(40, 150))[0]
        assert counts.min() >= 1 and counts.max() <= 3, counts


def test_appearance_varies_the_look_not_the_heart():
    from echopulse.synth.phantom import Appearance

    plain = make_study(7, view="A4C", heart_rate_bpm=80, ef=0.55, **SMALL)
    assert np.array_equal(plain.frames, make_study(7, view="A4C", heart_rate_bpm=80, ef=0.55,
                                                   appearance=Appearance(), **SMALL).frames)
    looks = [Appearance.draw(np.random.default_rng(i)) for i in range(3)]
    assert len({a.sector_half_angle_deg for a in looks}) == 3
    soft = make_study(7, view="A4C", heart_rate_bpm=80, ef=0.55, **SMALL,
                      appearance=Appearance(blur_px=1.5, sector_half_angle_deg=32, gain_db=-6))
    body = slice(20, None)
    f0, f1 = plain.frames[0, body].astype(float), soft.frames[0, body].astype(float)
    # narrower fan: more black columns; darker gain; blur: smaller pixel-to-pixel differences
    assert (f1 == 0).mean() > (f0 == 0).mean() + 0.05
    inside = (f0 > 0) & (f1 > 0)
    assert f1[inside].mean() < f0[inside].mean()
    assert np.abs(np.diff(f1, axis=1))[inside[:, 1:]].mean() < np.abs(np.diff(f0, axis=1))[inside[:, 1:]].mean()
    # the heart is the same heart: EF and rate are the study's
    assert soft.ef == plain.ef and soft.ed_frames == plain.ed_frames
def test_corpus_draws_the_ecg_strip_and_screen_only_studies(tmp_path):
    manifest = write_corpus(tmp_path, studies=2, seed=4, duration_s=2.5, screen_only_every=2)
    rows = list(csv.DictReader(open(manifest, newline="")))
    assert rows[0]["ecg"].endswith(".hea") and rows[1]["ecg"] == "screen"
    assert not (tmp_path / "ecg" / "study_0001.hea").exists()  # the trace is its only ECG
    truth = json.loads((tmp_path / "truth.json").read_text())["studies"]
    for r, t in zip(rows, truth):
        ds = pydicom.dcmread(tmp_path / r["echo"])
        region = ds.SequenceOfUltrasoundRegions[0]
        assert ds.PhotometricInterpretation == "RGB" and ds.Rows > region.RegionLocationMaxY1 + 8
        strip = ds.pixel_array[:, region.RegionLocationMaxY1 + 1 :]  # (T, rows, cols, 3)
        image = ds.pixel_array[:, : region.RegionLocationMaxY1 + 1]
        assert (strip.max(axis=-1) - strip.min(axis=-1) > 100).any()  # a coloured trace
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()  # grey
        drawn = np.asarray(t["screen_r_peaks_s"])
        assert (drawn < 0).any() and t["screen_mode"] == "sweep"  # history before frame 0
        inside = drawn[(drawn >= 0) & (drawn < 2.5)]
        np.testing.assert_allclose(inside, t["r_peaks_s"], atol=1e-5)  # the study's own beats


def _look_stats(frames: np.ndarray) -> np.ndarray:
    """(in-fan mean grey, share of the frame inside the fan, in-fan sharpness) of a study's first
    frame below the header band."""
    f0 = frames[0, 20:].astype(float)
    fan = ndimage.binary_fill_holes(frames[:, 20:].max(axis=0) > 0)
    sharp = np.abs(np.diff(f0, axis=1))[fan[:, 1:] & fan[:, :-1]].mean() / max(f0[fan].mean(), 1.0)
    return np.array([f0[fan].mean(), fan.mean(), sharp])


def test_drawn_appearances_spread_the_image_statistics_that_the_plain_phantom_keeps_fixed():
    size = dict(rows=80, cols=96, duration_s=0.4)
    plain = np.stack([_look_stats(make_study(s, view="A4C", **size).frames) for s in range(4)])
    from echopulse.synth.phantom import Appearance

    looks = [Appearance.draw(np.random.default_rng([9, i])) for i in range(8)]
    varied = np.stack([_look_stats(make_study(s % 4, view="A4C", appearance=a, **size).frames)
                       for s, a in enumerate(looks)])
    spread = lambda x: x.std(axis=0) / np.abs(x.mean(axis=0))  # noqa: E731
    # brightness, fan size and sharpness vary several times more between looks than between
    # plain studies (whose only difference is the speckle and layout jitter)
    assert np.all(spread(varied) > 3 * spread(plain)), (spread(varied), spread(plain))
    assert varied[:, 0].max() - varied[:, 0].min() > 20  # grey levels of in-fan mean


def test_depth_zoom_and_grey_map_change_the_picture_as_named():
    from echopulse.synth.phantom import Appearance

    size = dict(rows=80, cols=96, duration_s=0.2, view="A2C", heart_rate_bpm=70, ef=0.5)
    base = make_study(3, **size)
    deep = make_study(3, appearance=Appearance(depth_zoom=0.75), **size)
    dark = make_study(3, appearance=Appearance(gamma=2.6, tissue=0.02), **size)
    assert deep.lv_area[0] == pytest.approx(base.lv_area[0] * 0.75**2, rel=0.12)  # a smaller heart
    assert deep.lv_center[1] < base.lv_center[1]  # nearer the probe
    fan = base.frames[0, 20:] > 0
    assert dark.frames[0, 20:][fan].mean() < 0.6 * base.frames[0, 20:][fan].mean()
    assert dark.ef == base.ef


def test_specular_walls_are_bright_where_the_beam_meets_them_head_on():
    """``Appearance.specular``: the LV's apical cap (its wall faces the probe) brightens and its
    side walls (the beam runs along them) fade, against the same heart drawn with ``specular=0``."""
    from echopulse.synth.phantom import Appearance, _Renderer

    flat = _Renderer("A2C", 160, 160, seed=5, appearance=Appearance())
    lv = flat.chambers[0]
    center, long_axis, lat_axis = flat._geometry(lv.name)
    cap = flat.pixel_of(center - (lv.axes[1] + lv.wall / 2) * long_axis)
    sides = [flat.pixel_of(center + s * (lv.axes[0] + lv.wall / 2) * lat_axis) for s in (-1, 1)]

    def gain(specular: float) -> tuple[float, float]:
        shiny = _Renderer("A2C", 160, 160, seed=5, appearance=Appearance(specular=specular))
        ratio = shiny.reflectivity(shiny.u, shiny.d, 0.0) / flat.reflectivity(flat.u, flat.d, 0.0)
        return float(ratio[cap[1], cap[0]]), float(max(ratio[y, x] for x, y in sides))

    full_cap, full_side = gain(1.0)
    assert full_cap > 1.5 and full_side < 0.5, (full_cap, full_side)
    half_cap, half_side = gain(0.5)  # a blend of the two, as the attribute says
    assert half_cap == pytest.approx(0.5 + 0.5 * full_cap, rel=1e-6)
    assert half_side == pytest.approx(0.5 + 0.5 * full_side, rel=1e-6)


def test_septum_and_av_floor_brighten_only_where_named():
    """``Appearance.septum`` brightens the A4C's midline between the ventricles (nothing in an A2C,
    which has no RV); ``Appearance.av_floor`` a band deeper than the AV valves."""
    from echopulse.synth.phantom import Appearance, _Renderer

    def brighter(view: str, **look) -> tuple[np.ndarray, _Renderer]:
        flat = _Renderer(view, 160, 160, seed=5, appearance=Appearance())
        shiny = _Renderer(view, 160, 160, seed=5, appearance=Appearance(**look))
        ratio = shiny.reflectivity(shiny.u, shiny.d, 0.0) / flat.reflectivity(flat.u, flat.d, 0.0)
        assert ratio.min() >= 1 - 1e-9  # they only add
        return ratio > 1.3, flat

    septum, r = brighter("A4C", septum=1.0)
    assert septum.sum() > 20 and np.abs(r.u[septum]).max() < 0.1  # a line down the middle
    assert r.d[septum].min() > 0.15 and r.d[septum].max() < 0.75  # between apex and AV plane
    assert not brighter("A2C", septum=1.0)[0].any()
    floor, r = brighter("A4C", av_floor=1.0)
    lv = r.chambers[0]
    base_d = r._geometry("LV")[0][1] + lv.axes[1] * r._geometry("LV")[1][1]
    assert floor.sum() > 50 and np.median(r.d[floor]) > base_d  # behind the LV's base
    assert np.ptp(r.u[floor]) > 2 * lv.axes[0]  # across more than the LV
