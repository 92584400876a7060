import csv
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
            assert json.loads(c["provenance"])["ecg"] == row["ecg"]
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
    row = {"echo": rows[0]["echo"], "ecg": get_testdata_file("waveform_ecg.dcm")}
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
        ({"echo": rows[0]["echo"]}, "manifest", "ecg"),
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
