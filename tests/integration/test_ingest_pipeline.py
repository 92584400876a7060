"""Ingest through Ray Data: exact accounting, quarantine with reasons, idempotent reruns, resume."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom.data
import pytest

from echopulse.io.ecg import read_ecg
from echopulse.schema import QUARANTINE_COLUMNS
from echopulse.synth.phantom import HEADER_TEXT, write_corpus
from jobs.recipes import tiny
from pipelines.ingest import run_ingest
from pipelines.shards import ShardConfig

pytestmark = pytest.mark.integration

# identifiers written into the inputs; none may reach any output byte or log line
SECRETS = {"PatientName": "ZZNAME^SECRET", "PatientID": "ZZPID12345", "PatientBirthDate": "19291231",
           "AccessionNumber": "ZZACC998877", "InstitutionName": "ZZ Secret General Hospital"}


def _set_identifiers(path):
    ds = pydicom.dcmread(path)
    for key, value in SECRETS.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return [str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good phantom pairs plus one input for every kind of bad input, each with its expected reason."""
    top = tmp_path_factory.mktemp("corpus")
    root = top / "archive"
    manifest = write_corpus(root, studies=3, seed=11, duration_s=2.5)
    rows = list(csv.DictReader(open(manifest, newline="")))
    uids = [u for r in rows for u in _set_identifiers(root / r["echo"])]
    good_echo, good_ecg = rows[0]["echo"], rows[0]["ecg"]
    echo_bytes = (root / good_echo).read_bytes()
    bad_dir = root / "bad"
    bad_dir.mkdir()

    (bad_dir / "truncated.dcm").write_bytes(echo_bytes[: len(echo_bytes) // 3])
    (bad_dir / "not_dicom.dcm").write_bytes(b"this is not a DICOM file" * 10)
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), bad_dir / "ct.dcm")
    ds = pydicom.dcmread(root / good_echo)
    frame0 = ds.pixel_array[0].tobytes()
    ds.NumberOfFrames, ds.PixelData = 1, frame0
    ds.save_as(bad_dir / "single.dcm")
    ds = pydicom.dcmread(root / good_echo)
    ds.NumberOfFrames = 1_000_000
    ds.save_as(bad_dir / "million.dcm")
    sig, meta = read_ecg(root / good_ecg)
    fs = int(meta["fs"])
    np.save(bad_dir / "short.npy", sig[:, : int(2.1 * fs)])
    np.save(bad_dir / "flat.npy", np.full_like(sig, 0.3))
    np.save(bad_dir / "nan.npy", np.where(np.arange(sig.shape[1]) % 50 == 0, np.nan, sig))
    outside = top / "outside"
    outside.mkdir()
    (outside / "echo.dcm").write_bytes(echo_bytes)

    bad = [  # (row, stage, words a person reads in the reason)
        ({"echo": "bad/truncated.dcm", "ecg": good_ecg}, "read_echo", "truncated"),
        ({"echo": "bad/not_dicom.dcm", "ecg": good_ecg}, "read_echo", "not a DICOM file"),
        ({"echo": "bad/ct.dcm", "ecg": good_ecg}, "read_echo", "not an ultrasound cine"),
        ({"echo": "bad/single.dcm", "ecg": good_ecg}, "read_echo", "single-frame"),
        ({"echo": "bad/million.dcm", "ecg": good_ecg}, "read_echo", "claims 1000000 frames"),
        ({"echo": good_echo, "ecg": "bad/short.npy", "ecg_fs": fs}, "pair", "ECG shorter than the echo"),
        ({"echo": good_echo, "ecg": "bad/flat.npy", "ecg_fs": fs}, "ecg", "flat"),
        ({"echo": good_echo, "ecg": "bad/nan.npy", "ecg_fs": fs}, "ecg", "NaN"),
        ({"echo": "echo/missing.dcm", "ecg": good_ecg}, "read_echo", "not found"),
        ({"echo": "../outside/echo.dcm", "ecg": good_ecg}, "manifest", "climbs out of the manifest's folder"),
    ]
    fields = list(rows[0].keys()) + ["ecg_fs"]
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        writer.writerows({k: r.get(k, "") for k in fields} for r, _, _ in bad)
    return manifest, rows, bad, uids


def test_every_input_is_accounted_for(corpus, tmp_path, ray_session, caplog):
    manifest, good, bad, uids = corpus
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "clips"
    summary = run_ingest(str(manifest), str(out), tiny().clip)
    assert summary.inputs == len(good) + len(bad)
    assert summary.inputs_with_clips == len(good)
    assert summary.quarantined == len(bad)
    assert summary.inputs == summary.inputs_with_clips + summary.quarantined
    assert json.loads((out / "summary.json").read_text()) == summary.as_dict()

    quarantine = pq.read_table(out / "quarantine").to_pylist()
    assert list(quarantine[0]) == list(QUARANTINE_COLUMNS)
    by_echo_ecg = {(q["source_uri"], q["detail"].split(";")[0]): q for q in quarantine}
    assert len(by_echo_ecg) == len(bad)
    for row, stage, words in bad:
        q = by_echo_ecg[(row["echo"], f"ecg={row['ecg']}")]  # exactly as given in the manifest
        assert q["stage"] == stage and words in q["detail"] and not q["clip_id"], (row, q)

    clips = pq.read_table(out / "clips")
    assert clips.num_rows == summary.clips
    assert set(clips.column("source_uri").to_pylist()) == {r["echo"] for r in good}
    # no patient data from the DICOM header or the burned-in text in any output byte or log line
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()
    session_logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"
    worker_logs = b"".join(p.read_bytes() for p in session_logs.rglob("*") if p.is_file())
    for secret in [*SECRETS.values(), *uids, HEADER_TEXT.split(" ")[0]]:
        for name, data in (("outputs", blob), ("driver log", logs), ("Ray logs", worker_logs)):
            assert secret.encode() not in data, (secret, name)


def test_rerun_is_idempotent_and_resume_skips(corpus, tmp_path, ray_session):
    manifest, good, _, _ = corpus
    out = tmp_path / "clips"
    shards = ShardConfig(inputs_per_task=4, shard_mb=1e-6)  # one input per file: many chunks
    full = run_ingest(str(manifest), str(out), tiny().clip, shards=shards)
    first = sorted(pq.read_table(out / "clips").column("clip_id").to_pylist())
    names = sorted(p.name for p in (out / "clips").glob("*.parquet"))
    run_ingest(str(manifest), str(out), tiny().clip, shards=shards)
    second = sorted(pq.read_table(out / "clips").column("clip_id").to_pylist())
    assert first == second and len(set(second)) == len(second)
    assert sorted(p.name for p in (out / "clips").glob("*.parquet")) == names  # the same files

    # a half-done run: drop one finished chunk's outcome (its data file is now an orphan) and
    # every outcome of the second half; only those inputs are redone, with the same totals
    outcomes = sorted((out / "outcomes").glob("*.parquet"))
    half = len(outcomes) // 2
    for p in [outcomes[0], *outcomes[half:]]:
        p.unlink()
    redone = {p.name for p in [outcomes[0], *outcomes[half:]]}
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").glob("*.parquet")
              if p.name not in redone}
    summary = run_ingest(str(manifest), str(out), tiny().clip, resume=True, shards=shards)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "clips").glob("*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())
    assert summary.as_dict() == full.as_dict()
    assert summary.inputs == len(manifest.read_text().strip().splitlines()) - 1
    assert sorted(pq.read_table(out / "clips").column("clip_id").to_pylist()) == first


def test_duplicate_rows_are_ingested_once_and_counted(corpus, tmp_path, ray_session):
    manifest, good, _, _ = corpus
    lines = manifest.read_text().strip().splitlines()
    dup = tmp_path / "archive" / "manifest.csv"
    shutil.copytree(manifest.parent, dup.parent)
    dup.write_text("\n".join([*lines, lines[1], lines[2], lines[1]]) + "\n")
    out = tmp_path / "clips"
    summary = run_ingest(str(dup), str(out), tiny().clip)
    assert summary.duplicates == 3 and summary.inputs == len(lines) - 1
    ids = pq.read_table(out / "clips").column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == summary.clips
    # a small manifest fits one task: one clips file and one outcome file in all
    assert len(list((out / "clips").glob("*.parquet"))) == len(list((out / "outcomes").glob("*"))) == 1


def test_one_pass_writes_the_tokens_of_the_clips(corpus, tmp_path, ray_session):
    """`ingest --tokenizer`: the same clips as ingest, each encoded as the two-stage path would."""
    from bench._common import write_random_tokens
    from echopulse.models.checkpoint import load_checkpoint
    from echopulse.schema import read_dataset_info
    from echopulse.tokenize import ERROR, make_tokenize_fn
    from pipelines.fused import run_ingest_tokens

    manifest, good, bad, _ = corpus
    recipe = tiny()
    tokenizer = write_random_tokens(str(tmp_path / "unused"), recipe, n=2)  # an untrained tokenizer
    out, kept = tmp_path / "tokens", tmp_path / "clips"
    summary = run_ingest_tokens(str(manifest), str(out), recipe.clip, tokenizer, keep_clips=str(kept),
                                batch_size=3)
    assert (summary.inputs, summary.inputs_with_tokens, summary.quarantined) == (
        len(good) + len(bad), len(good), len(bad))
    assert summary.tokens == summary.clips > 0
    info = read_dataset_info(str(out), "tokens/v1")
    assert info["counts"]["tokens"] == summary.tokens and sum(info["split_counts"].values()) == summary.tokens
    assert len(pq.read_table(out / "quarantine").to_pylist()) == len(bad)
    tokens = pq.read_table(out / "tokens")
    assert len(list((out / "tokens").glob("*.parquet"))) == 1  # one small task: one shard

    # the kept clips/v1 dataset is a full ingest output; encoding it directly gives the same tokens
    assert read_dataset_info(str(kept), "clips/v1")["counts"]["clips"] == summary.clips
    model, _, tok_info = load_checkpoint(tokenizer, expected_kind="tokenizer")
    fn = make_tokenize_fn(model.eval(), tok_info["model_id"], 4, recipe.clip.ecg_samples)
    expected = {}
    for part in sorted((kept / "clips").glob("*.parquet")):
        for batch in fn({"path": str(part)}):
            assert not any(batch[ERROR])
            expected.update(zip(batch["clip_id"], batch["tokens"]))
    got = dict(zip(tokens.column("clip_id").to_pylist(), tokens.column("tokens").combine_chunks().to_numpy_ndarray()))
    assert set(got) == set(expected)
    for cid, toks in got.items():
        np.testing.assert_array_equal(toks, expected[cid])


def test_storage_refusing_writes_stops_with_one_error_and_resume_continues(corpus, tmp_path, ray_session):
    from echopulse.errors import EchoPulseError

    manifest, good, bad, _ = corpus
    out = tmp_path / "clips"
    out.mkdir()
    (out / "clips").write_text("a file where the shard folder goes: every shard write fails")
    shards = ShardConfig(inputs_per_task=4)
    with pytest.raises(EchoPulseError, match="rerun with --resume"):
        run_ingest(str(manifest), str(out), tiny().clip, resume=True, shards=shards)
    (out / "clips").unlink()
    summary = run_ingest(str(manifest), str(out), tiny().clip, resume=True, shards=shards)
    assert (summary.inputs, summary.inputs_with_clips, summary.quarantined) == (
        len(good) + len(bad), len(good), len(bad))
    assert pq.read_table(out / "clips").num_rows == summary.clips
