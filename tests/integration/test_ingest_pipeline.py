"""Ingest through Ray Data: exact accounting, quarantine with reasons, idempotent reruns, resume."""

from __future__ import annotations

import csv
import json
import shutil

import pyarrow.parquet as pq
import pydicom.data
import pytest

from echopulse.synth.phantom import write_corpus
from jobs.recipes import tiny
from pipelines.ingest import run_ingest

pytestmark = pytest.mark.integration

FAKE_NAME_PARTS = ("PHANTOM",)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest = write_corpus(root, studies=3, seed=11, duration_s=2.5)
    rows = list(csv.DictReader(open(manifest, newline="")))
    (root / "echo" / "not_dicom.dcm").write_bytes(b"this is not a DICOM file" * 10)
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), root / "echo" / "ct.dcm")
    good_ecg = rows[0]["ecg"]
    bad = [
        {"echo": "echo/missing.dcm", "ecg": good_ecg},
        {"echo": "echo/not_dicom.dcm", "ecg": good_ecg},
        {"echo": "echo/ct.dcm", "ecg": good_ecg},
    ]
    fields = list(rows[0].keys())
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        writer.writerows({k: r.get(k, "") for k in fields} for r in bad)
    return manifest, rows, bad


def test_every_input_is_accounted_for(corpus, tmp_path, ray_session):
    manifest, good, bad = corpus
    out = tmp_path / "clips"
    summary = run_ingest(str(manifest), str(out), tiny().clip)
    assert summary.inputs == len(good) + len(bad)
    assert summary.inputs_with_clips == len(good)
    assert summary.quarantined == len(bad)
    assert json.loads((out / "summary.json").read_text()) == summary.as_dict()

    quarantine = pq.read_table(out / "quarantine").to_pylist()
    assert sorted(q["echo"] for q in quarantine) == sorted(b["echo"] for b in bad)
    assert all(q["ecg"] == bad[0]["ecg"] and q["stage"] and q["error"] for q in quarantine)
    reasons = {q["echo"]: q["error"].lower() for q in quarantine}
    assert "not found" in reasons["echo/missing.dcm"] or "no such" in reasons["echo/missing.dcm"]

    clips = pq.read_table(out / "clips")
    assert clips.num_rows == summary.clips
    assert set(clips.column("source_uri").to_pylist()) == {r["echo"] for r in good}
    # no patient data from the DICOM header or the burned-in text in any output byte
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for part in FAKE_NAME_PARTS:
        assert part.encode() not in blob


def test_rerun_is_idempotent_and_resume_skips(corpus, tmp_path, ray_session):
    manifest, good, _ = corpus
    out = tmp_path / "clips"
    run_ingest(str(manifest), str(out), tiny().clip)
    first = sorted(pq.read_table(out / "clips").column("clip_id").to_pylist())
    run_ingest(str(manifest), str(out), tiny().clip)
    second = sorted(pq.read_table(out / "clips").column("clip_id").to_pylist())
    assert first == second and len(set(second)) == len(second)

    # resume: drop one input's outcome and part; only that input is redone
    outcome = sorted((out / "outcomes").glob("*.json"))[0]
    key = outcome.stem
    outcome.unlink()
    (out / "clips" / f"part-{key}.parquet").unlink(missing_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").glob("*.parquet")}
    summary = run_ingest(str(manifest), str(out), tiny().clip, resume=True)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "clips").glob("*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())
    assert summary.inputs == len(manifest.read_text().strip().splitlines()) - 1
    assert sorted(pq.read_table(out / "clips").column("clip_id").to_pylist()) == first
