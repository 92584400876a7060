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
from pipelines.shards import ShardConfig, shard_group

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


def _tokens_by_clip(out):
    t = pq.read_table(out / "tokens")
    return dict(zip(t.column("clip_id").to_pylist(), t.column("tokens").combine_chunks().to_numpy_ndarray()))


def test_one_pass_chunks_are_not_shards(corpus, tmp_path, ray_session):
    """One clip per encode call, round two encoder actors, over several groups: the same tokens as
    one call per group, in shards sized by their tokens; a rerun writes the same files and a resume
    after a lost shard and a lost half ends with the same totals and tokens."""
    from bench._common import write_random_tokens
    from pipelines.fused import run_ingest_tokens

    manifest, good, bad, _ = corpus
    recipe = tiny()
    tokenizer = write_random_tokens(str(tmp_path / "unused"), recipe, n=2)
    whole = run_ingest_tokens(str(manifest), str(tmp_path / "whole"), recipe.clip, tokenizer, batch_size=4)
    expected = _tokens_by_clip(tmp_path / "whole")

    out, shards = tmp_path / "chunked", ShardConfig(inputs_per_task=4, shard_mb=1e-6)  # a token shard per input
    kwargs = {"shards": shards, "actors": 2, "encoder_cpus": 0.5, "batch_size": 1, "chunk_mb": 1e-6}
    chunked = run_ingest_tokens(str(manifest), str(out), recipe.clip, tokenizer, **kwargs)
    assert chunked.as_dict() == whole.as_dict()
    got = _tokens_by_clip(out)
    assert set(got) == set(expected) and len(got) == chunked.tokens
    for cid, toks in got.items():
        np.testing.assert_array_equal(toks, expected[cid])
    names = sorted(p.name for p in (out / "tokens").glob("*.parquet"))
    assert len(names) == chunked.inputs_with_tokens == len(good)
    assert len({shard_group(n) for n in names}) > 1  # several groups, each its own shards

    run_ingest_tokens(str(manifest), str(out), recipe.clip, tokenizer, **kwargs)
    assert sorted(p.name for p in (out / "tokens").glob("*.parquet")) == names

    outcomes = sorted((out / "outcomes").glob("*.parquet"))
    lost = [outcomes[0], *outcomes[len(outcomes) // 2:]]
    for p in lost:
        p.unlink()
    resumed = run_ingest_tokens(str(manifest), str(out), recipe.clip, tokenizer, resume=True, **kwargs)
    assert resumed.as_dict() == whole.as_dict()
    assert set(_tokens_by_clip(out)) == set(expected)


def test_encoders_that_leave_no_cpu_for_a_decoder_are_refused():
    from echopulse.errors import EchoPulseError
    from pipelines.fused import decoder_count

    assert decoder_count(2, 1, 0.5, 0.75) == 2  # the 2-core default: two decoders beside one encoder
    assert decoder_count(16, 2, 2.0, 1.0) == 12
    with pytest.raises(EchoPulseError, match="use fewer --actors"):
        decoder_count(4, 2, 2.0, 1.0)  # two 2-CPU encoders on 4 CPUs: the run would wait forever
    # a joined cluster may grow (an autoscaler adds nodes for waiting tasks): Ray Data decides
    assert decoder_count(0, 2, 2.0, 1.0, fixed=False) is None


def test_decoders_leave_a_cpu_for_the_plans_own_tasks():
    """Ray Data's own tasks (shuffle reduce, repartition) reserve 1 CPU; with decoders and encoders
    holding every CPU, a late plan row's reduce task waited for the first decoder to end (a run's
    two groups decoded in turn, BENCHMARKS stop 32)."""
    from pipelines.fused import DATA_TASK_CPUS, decoder_count, decoder_share

    for cpus, actors, enc, dec in [(2, 1, 0.5, 0.75), (4, 1, 2.0, 1.0), (3, 1, 0.5, 0.75), (16, 2, 2.0, 1.0)]:
        n = decoder_count(cpus, actors, enc, dec)
        share = decoder_share(cpus, actors * enc, n, dec)
        assert 0 < share <= dec
        assert cpus - actors * enc - n * share >= DATA_TASK_CPUS - 1e-9, (cpus, n, share)
    assert decoder_share(16, 4.0, 10, 1.0) == 1.0  # room to spare: the usual reservation


def test_the_pass_is_sized_by_the_cores_behind_a_local_cluster(monkeypatch):
    """The CLI's local cluster claims at least 4 CPUs; on 2 cores that had sized the encoder for 2
    torch threads beside 2 decoders, and the encoder ran 4x slower (BENCHMARKS stop 33). Sized by
    the cores, the encoders' threads and the decoders fit the machine, and the reservations still
    leave Ray Data's tasks a CPU."""
    import os

    from pipelines.common import machine_cores
    from pipelines.fused import DATA_TASK_CPUS, SMALL_DECODE_CPUS, size_pass

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert machine_cores(4) == 2 and machine_cores(1) == 1
    for cpus, cores, actors in [(4, 2, 1), (2, 2, 1), (8, 2, 2), (4, 4, 1), (16, 16, 2)]:
        enc, decoders, dec = size_pass(cpus, cores, actors, None)
        threads = max(1, int(enc))  # what match_torch_threads_to_actor gives each encoder
        assert actors * threads <= cores, (cpus, cores, enc)
        nominal = SMALL_DECODE_CPUS if cores < 4 else 1.0  # a decoder's share of a core
        assert decoders * nominal <= cores - actors * enc + 1e-9, (cpus, cores, decoders)
        assert cpus - actors * enc - decoders * dec >= DATA_TASK_CPUS - 1e-9, (cpus, cores, decoders, dec)
    assert size_pass(4, 2, 1, None) == size_pass(2, 2, 1, None)[:2] + (0.75,)
    assert size_pass(64, 64, 1, None, fixed=False)[1] is None  # a joined cluster: Ray Data decides


def test_kept_clips_and_tokens_close_together_so_resume_adds_no_copies(tmp_path, ray_session):
    """`--keep-clips` with `--resume`: clips shards and token shards cover the same inputs, so a
    run that lost its last token shard redoes those inputs without a second copy of their clips."""
    from bench._common import write_random_tokens
    from pipelines.fused import run_ingest_tokens
    from pipelines.shards import read_outcomes

    manifest = write_corpus(tmp_path / "archive", studies=8, seed=3, duration_s=2.5)
    recipe = tiny()
    tokenizer = write_random_tokens(str(tmp_path / "unused"), recipe, n=2)
    out, kept = tmp_path / "tokens", tmp_path / "clips"
    # tiny clips are ~41 KB an input and their tokens ~30 KB: 0.1 MiB closes clips shards every
    # third input and token shards every fourth unless they close together
    kwargs = {"shards": ShardConfig(shard_mb=0.1), "keep_clips": str(kept), "batch_size": 2, "chunk_mb": 0.05}
    first = run_ingest_tokens(str(manifest), str(out), recipe.clip, tokenizer, **kwargs)
    token_files = sorted(p.name for p in (out / "tokens").glob("*.parquet"))
    assert len(token_files) > 1
    assert sorted(p.name for p in (kept / "clips").glob("*.parquet")) == token_files

    (out / "outcomes" / token_files[-1]).unlink()  # the last token shard was not finished
    again = run_ingest_tokens(str(manifest), str(out), recipe.clip, tokenizer, resume=True, **kwargs)
    assert again.as_dict() == first.as_dict()
    ids = pq.read_table(kept / "clips").column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == first.clips
    keys = read_outcomes(str(kept)).column("_key").to_pylist()
    assert len(keys) == len(set(keys)) == first.inputs


class _DyingEncoder:
    """An encoder actor whose process dies in every call (as when a GPU runs out of memory)."""

    def encode(self, clips_ipc):
        import os

        os._exit(1)


def test_a_dying_encoder_quarantines_its_chunk_and_the_group_goes_on(corpus, tmp_path, ray_session):
    from bench._common import write_random_tokens
    from pipelines.fused import Encoder, GroupTokens
    from pipelines.shards import read_outcomes

    manifest, good, _, _ = corpus
    recipe = tiny()
    clips_out = tmp_path / "clips"
    run_ingest(str(manifest), str(clips_out), recipe.clip)
    clips = pq.read_table(clips_out / "clips")
    halves = [clips.slice(0, 2), clips.slice(2, 2)]
    items = [(i, {"_key": f"input{i}", "echo": f"e{i}.dcm", "ecg": f"e{i}.hea", "clips": 2,
                  "clips_without_ecg": 0, "clips_ecg_synchronized": 0}, t) for i, t in enumerate(halves)]
    tokenizer = write_random_tokens(str(tmp_path / "unused"), recipe, n=2)
    dying = ray_session.remote(_DyingEncoder).options(max_restarts=1, max_task_retries=1).remote()
    working = ray_session.remote(Encoder).remote(tokenizer, 4, False, recipe.clip.ecg_samples)
    out = tmp_path / "tokens"
    sink = GroupTokens(str(out), ShardConfig(), [dying, working], first=0)  # chunk 0 to the dying one
    for item in items:
        sink.submit([item])
    assert sink.finish() == {"inputs": 2, "tokens": 2}
    log = {o["_key"]: o for o in read_outcomes(str(out)).to_pylist()}
    assert log["input0"]["tokens"] == 0 and log["input0"]["stage"] == "encode"
    assert "encoder failed" in log["input0"]["detail"] and "2 clip(s) not tokenized" in log["input0"]["error"]
    assert log["input1"]["tokens"] == 2 and not log["input1"]["stage"]
    written = pq.read_table(out / "tokens").column("clip_id").to_pylist()
    assert written == halves[1].column("clip_id").to_pylist()

    # an encoder that cannot start (a tokenizer its worker cannot read) stops the run at once
    from echopulse.errors import EchoPulseError

    broken = ray_session.remote(Encoder).remote(str(tmp_path / "no" / "tokenizer"), 4, False, 0)
    sink = GroupTokens(str(tmp_path / "stopped"), ShardConfig(), [broken], first=0)
    with pytest.raises(EchoPulseError, match="a tokenizer actor could not start"):
        sink.submit([items[0]])
        sink.finish()


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
