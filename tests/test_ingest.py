import csv
import os
import json
import logging

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from echopulse import schema
from echopulse.config import ClipConfig
from echopulse.ingest import IngestError, make_ingest_fn
from echopulse.synth.phantom import HEADER_TEXT, write_corpus

CLIP = ClipConfig(frames=5, size=32, fps=5.0, ecg_samples=300)
SECRETS = ("PHANTOM", "ALEX", "1970-01-01", "19700101")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest = write_corpus(root, studies=2, seed=3, duration_s=2.5)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    return root, rows


def test_clip_rows_match_the_contract(corpus):
    root, rows = corpus
    fn = make_ingest_fn(CLIP, base_dir=str(root), salt="s")
    for row in rows:
        clips = fn(dict(row))
        assert len(clips) == 2  # 2.5 s: starts at 0 and 1 s (1.2 s of ECG each)
        for c in clips:
            assert tuple(c) == schema.CLIP_COLUMNS
            assert c["frames"].dtype == np.uint8 and c["frames"].shape == (5, 32, 32)
            assert c["ecg"].dtype == np.float32 and c["ecg"].shape == (12, 300)
            assert c["ecg_leads"] == [True] * 12 and c["ecg_source"] == "wfdb"
            assert c["heart_rate_bpm"] == pytest.approx(float(row["heart_rate_bpm"]), rel=0.1)
            assert c["r_peaks"] and all(isinstance(p, int) and 0 <= p < 300 for p in c["r_peaks"])
            assert c["split"] == row["split"] and c["view"] == row["view"]
            assert c["ef"] == pytest.approx(float(row["ef"])) and c["source_uri"] == row["echo"]
            assert c["t_end_s"] == pytest.approx(c["t_start_s"] + 1.0) and c["fps"] == 5.0
            prov = json.loads(c["provenance"])
            assert prov["ecg"] == row["ecg"]
            assert prov["patient_identity_removed"] == "YES"
            assert prov["deidentification_method"] == "PS3.15 Basic Profile with Clean Pixel Data"
            assert c["frames"].max() > 50  # real image content, not padding only


def test_clip_ids_deterministic_and_no_patient_data(corpus, caplog):
    root, rows = corpus
    caplog.set_level(logging.DEBUG)
    first = [c for r in rows for c in make_ingest_fn(CLIP, str(root))(dict(r))]
    second = [c for r in rows for c in make_ingest_fn(CLIP, str(root))(dict(r))]
    ids = [c["clip_id"] for c in first]
    assert ids == [c["clip_id"] for c in second] and len(set(ids)) == len(ids)
    uids = [str(pydicom.dcmread(root / r["echo"]).StudyInstanceUID) for r in rows]
    texts = [str(v) for c in first for v in c.values()] + [r.getMessage() for r in caplog.records]
    for secret in (*SECRETS, HEADER_TEXT, *uids):
        assert not any(secret in t for t in texts), secret
    keys = {c["study_key"] for c in first}
    assert keys == {schema.study_key(u) for u in uids}


def test_missing_optional_columns(corpus):
    root, rows = corpus
    row = {"echo": str(root / rows[0]["echo"]), "ecg": str(root / rows[0]["ecg"])}  # absolute paths
    clips = make_ingest_fn(CLIP, base_dir="/nonexistent")(row)
    assert clips[0]["view"] == "unknown" and clips[0]["ef"] is None
    assert clips[0]["split"] == schema.split_for(clips[0]["study_key"])


def test_dicom_ecg_source(corpus):
    root, rows = corpus
    # the phantom and pydicom's ECG were recorded years apart: align them explicitly
    row = {"echo": rows[0]["echo"], "ecg": get_testdata_file("waveform_ecg.dcm"), "ecg_offset_s": "0"}
    clips = make_ingest_fn(CLIP, str(root))(row)
    assert clips and all(c["ecg_source"] == "dicom" and c["ecg"].shape == (12, 300) for c in clips)


def test_failures_name_their_stage(corpus, tmp_path):
    root, rows = corpus
    fn = make_ingest_fn(CLIP, base_dir=str(root))
    (root / "echo" / "junk.dcm").write_bytes(b"not dicom" * 50)
    cases = [
        ({"echo": "echo/missing.dcm", "ecg": rows[0]["ecg"]}, "read_echo", "not found"),
        ({"echo": "echo/junk.dcm", "ecg": rows[0]["ecg"]}, "read_echo", "not a DICOM"),
        ({"echo": get_testdata_file("CT_small.dcm"), "ecg": rows[0]["ecg"]}, "read_echo",
         "not an ultrasound"),
        ({"echo": rows[0]["echo"], "ecg": "ecg/missing.hea"}, "read_ecg", "not found"),
        ({"ecg": rows[0]["ecg"]}, "manifest", "no 'echo'"),
    ]
    for row, stage, words in cases:
        with pytest.raises(IngestError) as info:
            fn(row)
        assert info.value.stage == stage and words in info.value.detail
        assert str(root) not in info.value.detail  # the manifest's path, not the resolved one
    too_long = ClipConfig(frames=21, size=32, fps=5.0, ecg_samples=300)  # 4.2 s > 2.5 s of cine
    with pytest.raises(IngestError) as info:
        make_ingest_fn(too_long, str(root))(dict(rows[0]))
    assert info.value.stage == "pair" and "no clip fits" in info.value.detail


# --- clip modes, pairing, ECG sources, EchoNet ---------------------------------------------------

import wfdb  # noqa: E402

from echopulse.errors import ConfigError  # noqa: E402
from echopulse.ingest import IngestOptions  # noqa: E402
from echopulse.io.ecg import read_ecg  # noqa: E402
from echopulse.synth.dicom_variants import add_waveform  # noqa: E402
from pipelines.ingest import clip_for_mode  # noqa: E402
from pipelines.plan import read_manifest  # noqa: E402


def test_cycle_mode_one_clip_per_rr_interval(corpus):
    root, rows = corpus
    truth = json.loads((root / "truth.json").read_text())["studies"][0]
    fn = make_ingest_fn(CLIP, str(root), options=IngestOptions(clip_mode="cycle"))
    clips = fn(dict(rows[0]))
    r = truth["r_peaks_s"]
    # every whole R-R interval inside the 2.5 s cine whose 1.2 s of ECG fits
    expected = [(a, b) for a, b in zip(r, r[1:]) if b <= 2.5 and a + 1.2 <= 2.5]
    assert len(clips) == len(expected) >= 1
    for c, (a, b) in zip(clips, expected):
        assert c["t_start_s"] == pytest.approx(a, abs=0.02) and c["t_end_s"] == pytest.approx(b, abs=0.02)
        assert c["fps"] == pytest.approx(5 / (c["t_end_s"] - c["t_start_s"]))
        assert c["heart_rate_bpm"] == pytest.approx(60 / (c["t_end_s"] - c["t_start_s"]))
        assert c["r_peaks"][0] <= 2  # the clip starts on its R-peak
        assert json.loads(c["provenance"])["clip_mode"] == "cycle"


def test_window_overrides():
    assert clip_for_mode(CLIP, "window", seconds=2.2, fps=5) == ClipConfig(
        frames=11, size=32, fps=5.0, ecg_samples=300)
    assert clip_for_mode(CLIP, "cycle") == CLIP
    with pytest.raises(ConfigError, match="1 \\+ 2k"):
        clip_for_mode(CLIP, "window", seconds=2.0, fps=5)
    with pytest.raises(ConfigError, match="window"):
        clip_for_mode(CLIP, "cycle", seconds=2.0)


def test_paths_escaping_the_manifest_folder(corpus, tmp_path):
    root, rows = corpus
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "echo.dcm").write_bytes((root / rows[0]["echo"]).read_bytes())
    rel = os.path.relpath(outside / "echo.dcm", root)
    assert rel.startswith("..")
    row = {"echo": rel, "ecg": rows[0]["ecg"]}
    with pytest.raises(IngestError) as info:
        make_ingest_fn(CLIP, str(root))(row)
    assert info.value.stage == "manifest" and "climbs out of the manifest's folder" in info.value.detail
    allowed = make_ingest_fn(CLIP, str(root), options=IngestOptions(allow_roots=(str(outside),)))
    assert allowed(row)
    sneaky = {"echo": "echo/../../" + rel.split("/", 1)[1], "ecg": rows[0]["ecg"]}
    with pytest.raises(IngestError, match="climbs out"):
        make_ingest_fn(CLIP, str(root))(sneaky)


def test_offset_from_acquisition_times(corpus, tmp_path):
    root, rows = corpus
    sig, meta = read_ecg(root / rows[0]["ecg"])
    # the ECG started 0.5 s before the echo: write it with a base time, and the echo with its own
    wfdb.wrsamp("early", fs=int(meta["fs"]), units=["mV"] * 12, sig_name=meta["leads"],
                p_signal=np.concatenate([np.zeros((250, 12)), sig.T.astype(float)]), fmt=["16"] * 12,
                base_time=__import__("datetime").time(10, 29, 59, 500000),
                base_date=__import__("datetime").date(2024, 1, 2), write_dir=str(tmp_path))
    echo = tmp_path / "echo.dcm"
    ds = pydicom.dcmread(root / rows[0]["echo"])
    ds.AcquisitionDateTime = "20240102103000"
    ds.save_as(echo)
    clips = make_ingest_fn(CLIP, str(root))({"echo": str(echo), "ecg": str(tmp_path / "early.hea")})
    prov = json.loads(clips[0]["provenance"])
    assert prov["ecg_offset_source"] == "acquisition_time" and prov["ecg_offset_s"] == pytest.approx(0.5)
    # the same clips as the original pair: the ECG window starts at the same beat
    original = make_ingest_fn(CLIP, str(root))(dict(rows[0]))
    assert [c["r_peaks"] for c in clips] == [c["r_peaks"] for c in original]
    explicit = make_ingest_fn(CLIP, str(root))({"echo": str(echo), "ecg": str(tmp_path / "early.hea"),
                                                "ecg_offset_s": "0.5"})
    assert json.loads(explicit[0]["provenance"])["ecg_offset_source"] == "manifest"


def test_embedded_waveform_apple_watch_and_no_ecg(corpus, tmp_path):
    root, rows = corpus
    sig, meta = read_ecg(root / rows[0]["ecg"])
    ds = pydicom.dcmread(root / rows[0]["echo"])
    add_waveform(ds, sig[1:2], meta["fs"], ["ECG"])
    ds.save_as(tmp_path / "with_ecg.dcm")
    clips = make_ingest_fn(CLIP, str(root))({"echo": str(tmp_path / "with_ecg.dcm"), "ecg": ""})
    assert clips and all(c["ecg_source"] == "dicom_embedded" for c in clips)
    assert clips[0]["ecg_leads"] == [name == "II" for name in ("I", "II", "III", "aVR", "aVL", "aVF",
                                                               "V1", "V2", "V3", "V4", "V5", "V6")]

    from scipy.signal import resample_poly

    lead1 = resample_poly(sig[0].astype(float), 512, int(meta["fs"])) * 1000  # uV at 512 Hz
    lines = ["Name,Alex Phantom", 'Date of Birth,"Jan 1, 1970"', "Recorded Date,2024-01-02 10:30:00 +0100",
             "Sample Rate,512 hertz", "Lead,Lead I", "Unit,µV", "", ""] + [f"{v:.3f}" for v in lead1]
    watch = tmp_path / "watch.csv"
    watch.write_text("\n".join(lines))
    clips = make_ingest_fn(CLIP, str(root))({"echo": rows[0]["echo"], "ecg": str(watch), "ecg_offset_s": 0})
    assert clips and clips[0]["ecg_source"] == "apple_health" and sum(clips[0]["ecg_leads"]) == 1
    assert "Alex" not in json.dumps([c["provenance"] for c in clips])

    # no Waveform Sequence and no ECG named: the trace on the phantom's screen is read
    clips = make_ingest_fn(CLIP, str(root))({"echo": rows[0]["echo"]})
    assert clips and all(c["ecg_source"] == "screen" and c["ecg_sync"] for c in clips)
    bare = pydicom.dcmread(root / rows[0]["echo"])  # the same cine in grey, no strip: no ECG at all
    grey = bare.pixel_array[:, : bare.SequenceOfUltrasoundRegions[0].RegionLocationMaxY1 + 1, :, 0]
    bare.Rows, bare.SamplesPerPixel, bare.PhotometricInterpretation = grey.shape[1], 1, "MONOCHROME2"
    del bare.PlanarConfiguration
    bare.PixelData = grey.tobytes()
    bare.save_as(tmp_path / "bare.dcm")
    clips = make_ingest_fn(CLIP, str(root))({"echo": str(tmp_path / "bare.dcm")})
    assert clips and all(c["ecg_source"] == "none" and not any(c["ecg_leads"]) and not c["ecg"].any()
                         and c["heart_rate_bpm"] is None and c["r_peaks"] == [] for c in clips)
    with pytest.raises(IngestError, match="needs an ECG"):
        make_ingest_fn(CLIP, str(root), options=IngestOptions(clip_mode="cycle"))(
            {"echo": str(tmp_path / "bare.dcm")})


def test_ecg_problems_are_reported(corpus, tmp_path):
    root, rows = corpus
    sig, meta = read_ecg(root / rows[0]["ecg"])
    fs = int(meta["fs"])
    cases = {
        "short.npy": (sig[:, : int(2.1 * fs)], "pair", "ECG shorter than the echo"),
        "flat.npy": (np.full_like(sig, 0.2), "ecg", "flat"),
        "nan.npy": (np.where(np.arange(sig.shape[1]) % 97 == 0, np.nan, sig), "ecg", "NaN"),
    }
    for name, (data, stage, words) in cases.items():
        np.save(tmp_path / name, data)
        row = {"echo": rows[0]["echo"], "ecg": str(tmp_path / name), "ecg_fs": fs}
        with pytest.raises(IngestError) as info:
            make_ingest_fn(CLIP, str(root))(row)
        assert info.value.stage == stage and words in info.value.detail, info.value.detail


def test_echonet_layout(tmp_path):
    import imageio.v2 as iio

    videos = tmp_path / "EchoNet-Dynamic" / "Videos"
    videos.mkdir(parents=True)
    y, x = np.mgrid[0:112, 0:112]
    sector = (y > 5) & (np.abs(x - 56) < y * 0.8)
    for name in ("0X1A", "0X2B"):
        with iio.get_writer(str(videos / f"{name}.avi"), format="FFMPEG", fps=50, codec="mjpeg",
                            quality=10, pixelformat="yuvj444p", macro_block_size=1) as w:
            for i in range(60):
                frame = (sector * (120 + 90 * np.sin((x + 3 * i) / 5.0) * np.cos(y / 7.0))).astype(np.uint8)
                w.append_data(np.repeat(frame[..., None], 3, axis=-1))
    filelist = tmp_path / "EchoNet-Dynamic" / "FileList.csv"
    filelist.write_text("FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split\n"
                        "0X1A,61.5,20.1,52.2,112,112,50,60,TRAIN\n0X2B,35.0,60.0,92.3,112,112,25,60,VAL\n")
    rows = read_manifest(str(filelist))
    assert rows[0]["echo"] == "Videos/0X1A.avi" and rows[0]["ecg"] == "" and rows[1]["split"] == "val"
    fn = make_ingest_fn(CLIP, str(filelist.parent))
    first, second = fn(rows[0]), fn(rows[1])
    assert len(first) == 1 and len(second) == 2  # 1.2 s at 50 fps; 2.4 s at the listed 25 fps
    c = first[0]
    assert c["ecg_source"] == "none" and c["ef"] == pytest.approx(0.615) and c["view"] == "A4C"
    assert c["split"] == "train" and second[0]["split"] == "val"
    assert c["frames"].shape == (5, 32, 32) and c["frames"].max() > 50


def test_screen_only_study_ingests_end_to_end(corpus):
    """``ecg`` = ``screen``: the lead II drawn under the phantom's image becomes the clips' ECG, on
    the echo's clock (R-peaks within 25 ms of where they were drawn), and the strip is cropped away."""
    root, rows = corpus
    truth = {t["echo"]: t for t in json.loads((root / "truth.json").read_text())["studies"]}
    fn = make_ingest_fn(CLIP, str(root))
    for row in rows:
        screen = fn({**row, "ecg": "screen"})
        paired = fn(dict(row))
        assert len(screen) == len(paired)
        drawn = np.asarray(truth[row["echo"]]["screen_r_peaks_s"])
        for s, p in zip(screen, paired):
            assert s["ecg_source"] == "screen" and s["ecg_sync"] is True
            assert s["ecg_leads"] == [name == "II" for name in ("I", "II", "III", "aVR", "aVL", "aVF",
                                                               "V1", "V2", "V3", "V4", "V5", "V6")]
            np.testing.assert_array_equal(s["frames"], p["frames"])  # trace and strip gone
            found = s["t_start_s"] + np.asarray(s["r_peaks"]) / 250.0
            inside = drawn[(drawn > s["t_start_s"] + 0.05) & (drawn < s["t_end_s"] - 0.05)]
            assert len(found) >= len(inside) >= 1
            assert max(np.min(np.abs(found - t)) for t in inside) < 0.025
            screen_info = json.loads(s["provenance"])["screen"]
            assert screen_info["mode"] == "sweep" and screen_info["history_s"] > 1.0
            assert json.loads(s["provenance"])["ecg_offset_source"] == "screen"


def test_ecg_sync_from_the_manifest_and_bad_screen_rows(corpus, tmp_path):
    root, rows = corpus
    fn = make_ingest_fn(CLIP, str(root))
    assert all(c["ecg_sync"] for c in fn({**rows[0], "ecg_sync": ""}))
    assert not any(c["ecg_sync"] for c in fn({**rows[0], "ecg_sync": "false"}))
    with pytest.raises(IngestError, match="ecg_sync must be true, false or empty, got 'maybe'"):
        fn({**rows[0], "ecg_sync": "maybe"})
    ds = pydicom.dcmread(root / rows[0]["echo"])
    ds.PixelData = ds.pixel_array[..., 0].tobytes()  # the same cine in grey: the trace is gone
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    del ds.PlanarConfiguration
    ds.save_as(tmp_path / "grey.dcm")
    with pytest.raises(IngestError, match="grey.dcm: grey-scale file") as err:
        fn({"echo": str(tmp_path / "grey.dcm"), "ecg": "screen"})
    assert err.value.stage == "read_ecg"
    assert all(c["ecg_source"] == "none" and not c["ecg_sync"] for c in fn({"echo": str(tmp_path / "grey.dcm")}))
