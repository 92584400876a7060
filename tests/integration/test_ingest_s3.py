"""Ingest from and to S3: a real S3-protocol server (moto's server mode) on loopback, no client mocks."""

from __future__ import annotations

import csv
import io
import json

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from echopulse import storage
from echopulse.errors import OutputWriteError
from echopulse.synth.phantom import write_corpus
from jobs.recipes import tiny
from pipelines.ingest import run_ingest
from pipelines.plan import group_of, input_key
from pipelines.shards import GROUP_STRIDE, ChunkWriter, ShardConfig, shard_name

pytestmark = pytest.mark.integration

BUCKET = "echo-archive"


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(scope="module")
def s3_corpus(s3_server, bucket, tmp_path_factory):
    """Two phantom studies uploaded under s3://BUCKET/in/ with a Parquet manifest (and one bad row)."""
    root = tmp_path_factory.mktemp("s3corpus")
    manifest = write_corpus(root, studies=2, seed=21, duration_s=2.5)
    rows = list(csv.DictReader(open(manifest, newline="")))
    rows.append({**rows[0], "echo": "echo/absent.dcm"})
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".dcm", ".hea", ".dat"):
            s3_server.upload_file(str(path), BUCKET, f"in/{path.relative_to(root).as_posix()}")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    s3_server.put_object(Bucket=BUCKET, Key="in/manifest.parquet", Body=buf.getvalue())
    return f"s3://{BUCKET}/in/manifest.parquet", rows


def test_ingest_from_and_to_s3(s3_server, s3_moto, s3_corpus, ray_session):
    manifest, rows = s3_corpus
    out = f"s3://{BUCKET}/clips"
    first = len(s3_moto.requests)
    summary = run_ingest(manifest, out, tiny().clip)
    requests = s3_moto.requests[first:]
    assert (summary.inputs, summary.inputs_with_clips, summary.quarantined) == (3, 2, 1)

    listed = s3_server.list_objects_v2(Bucket=BUCKET, Prefix="clips/")["Contents"]
    keys = {o["Key"] for o in listed}
    assert "clips/summary.json" in keys and "clips/quarantine/quarantine.parquet" in keys
    body = s3_server.get_object(Bucket=BUCKET, Key="clips/summary.json")["Body"].read()
    assert json.loads(body) == summary.as_dict()
    parts = sorted(k for k in keys if k.startswith("clips/clips/shard-"))
    assert len(parts) == 1  # one task's inputs: one sized shard, one outcome file
    assert sum(k.startswith("clips/outcomes/") for k in keys) == 1
    table = pa.concat_tables(
        pq.read_table(io.BytesIO(s3_server.get_object(Bucket=BUCKET, Key=k)["Body"].read())) for k in parts)
    assert table.num_rows == summary.clips > 0
    assert set(table.column("source_uri").to_pylist()) == {r["echo"] for r in rows[:2]}
    quarantine = pq.read_table(io.BytesIO(s3_server.get_object(
        Bucket=BUCKET, Key="clips/quarantine/quarantine.parquet")["Body"].read())).to_pylist()
    assert quarantine[0]["source_uri"] == "echo/absent.dcm" and "not found" in quarantine[0]["detail"]

    # S3 requests: one GET per input file (echo, WFDB header, signal), no HEAD or listing per file;
    # one PUT per output file; the output prefix listed once to clear it and once for the outcome log
    for r in rows[:2]:
        for key in (r["echo"], r["ecg"], r["ecg"].replace(".hea", ".dat")):
            assert [kind for _, kind, k in requests if k == f"in/{key}"] == ["get"]
    written = [k for _, kind, k in requests if kind == "put"]
    assert sorted(written) == sorted(k for k in keys if k.startswith("clips/"))  # each output once
    assert not [k for _, kind, k in requests if kind == "head" and k.startswith("clips/")]
    # (s3fs probes an empty prefix with a HEAD and a one-key listing: the first run's clear)
    assert sum(kind == "list" for _, kind, _ in requests) <= 3, requests
    # the manifest is read as a Ray dataset: a fixed number of HEADs/GETs of that one object per
    # run (header, row count, the read tasks), whatever its row count
    manifest_reads = [r for r in requests if r[2] == "in/manifest.parquet"]
    assert len(manifest_reads) <= 24, manifest_reads
    assert len(requests) - len(manifest_reads) <= 3 * len(rows) + len(keys) + 8

    # resume skips everything already done, listing the output once to find it
    first = len(s3_moto.requests)
    again = run_ingest(manifest, out, tiny().clip, resume=True)
    resumed = s3_moto.requests[first:]
    assert again.as_dict() == summary.as_dict()
    assert storage.exists(f"{out}/dataset.json")
    assert not [k for _, _, k in resumed if k.startswith("in/echo") or k.startswith("in/ecg")]
    assert sum(kind == "list" for _, kind, _ in resumed) == 2, resumed  # resume's listing + the final log read


def test_one_pass_from_and_to_s3_with_the_tokenizer_on_s3(s3_server, s3_moto, s3_corpus, ray_session, tmp_path):
    """`ingest --tokenizer s3://...`: the encoder actors read the tokenizer with the run's keys and
    the decode tasks write the token shard and the outcome log to the bucket."""
    from pathlib import Path

    from bench._common import write_random_tokens
    from pipelines.fused import run_ingest_tokens

    manifest, rows = s3_corpus
    local = Path(write_random_tokens(str(tmp_path / "unused"), tiny(), n=2))
    for path in local.rglob("*"):
        if path.is_file():
            s3_server.upload_file(str(path), BUCKET, f"models/tok/{path.relative_to(local).as_posix()}")
    out = f"s3://{BUCKET}/tokens"
    summary = run_ingest_tokens(manifest, out, tiny().clip, f"s3://{BUCKET}/models/tok")
    assert (summary.inputs, summary.inputs_with_tokens, summary.quarantined) == (3, 2, 1)
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket=BUCKET, Prefix="tokens/")["Contents"]}
    shards = [k for k in keys if k.startswith("tokens/tokens/shard-")]
    assert len(shards) == 1 and sum(k.startswith("tokens/outcomes/") for k in keys) == 1
    table = pq.read_table(io.BytesIO(s3_server.get_object(Bucket=BUCKET, Key=shards[0])["Body"].read()))
    assert table.num_rows == summary.tokens == summary.clips > 0


def test_a_shard_above_the_part_size_is_a_multipart_upload(s3_server, s3_moto, bucket):
    """A shard larger than ``part_mb`` goes up in parts while it is written (S3 keeps a multipart
    object's ETag as ``<md5>-<parts>``); a small one is one PUT; neither asks for a HEAD or a listing."""
    rng = np.random.default_rng(0)  # incompressible rows: the file is as large as the rows
    big = pa.table({"x": pa.array([rng.bytes(1 << 20) for _ in range(12)], pa.binary())})
    cfg = ShardConfig(shard_mb=64, row_group_mb=2, part_mb=5)
    first = len(s3_moto.requests)
    writer = ChunkWriter(f"s3://{BUCKET}/mp", "clips", cfg)
    writer.add(0, {"_key": "a", "clips": 12}, big)
    writer.close_chunk()
    requests = s3_moto.requests[first:]
    head = s3_server.head_object(Bucket=BUCKET, Key="mp/clips/" + shard_name(0))
    parts = int(head["ETag"].strip('"').rsplit("-", 1)[1])
    assert parts >= 2 and head["ContentLength"] > 12 << 20
    assert [kind for _, kind, _ in requests] == ["post"] + ["put"] * parts + ["post", "put"]  # + outcome
    body = s3_server.get_object(Bucket=BUCKET, Key="mp/clips/" + shard_name(0))["Body"].read()
    assert pq.read_table(io.BytesIO(body)).equals(big.cast(pq.read_table(io.BytesIO(body)).schema))
    assert not s3_server.list_multipart_uploads(Bucket=BUCKET).get("Uploads")

    writer = ChunkWriter(f"s3://{BUCKET}/mp", "clips", cfg)
    writer.add(1, {"_key": "b", "clips": 1}, big.slice(0, 1))
    writer.close_chunk()
    assert "-" not in s3_server.head_object(Bucket=BUCKET, Key="mp/clips/" + shard_name(1))["ETag"]


def test_one_filesystem_per_credentials_and_a_missing_bucket_is_an_error(s3_server, s3_moto, monkeypatch):
    fs, path = storage.filesystem(f"s3://{BUCKET}/a")
    assert storage.filesystem(f"s3://{BUCKET}/b/c")[0] is fs and path == f"{BUCKET}/a"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")  # other credentials: another object
    assert storage.filesystem(f"s3://{BUCKET}/a")[0] is not fs
    monkeypatch.undo()
    storage.makedirs("s3://no-such-bucket/out")  # object stores have no folders: no request
    with pytest.raises(OutputWriteError, match="s3://no-such-bucket/out/summary.json: cannot write"):
        storage.write_text("s3://no-such-bucket/out/summary.json", "{}")
    assert "no-such-bucket" not in {b["Name"] for b in s3_server.list_buckets()["Buckets"]}


def _copied_inputs(s3, rows: list[dict], n: int, prefix: str) -> str:
    """``n`` distinct inputs under ``s3://BUCKET/prefix/`` copied from the corpus's studies (each
    WFDB header renamed to its record) and their CSV manifest's URI."""
    out = []
    for i in range(n):
        r, name = rows[i % len(rows)], f"in_{i:03d}"
        stem = r["ecg"].rsplit("/", 1)[-1].removesuffix(".hea")
        s3.copy_object(Bucket=BUCKET, Key=f"{prefix}/echo/{name}.dcm", CopySource=f"{BUCKET}/in/{r['echo']}")
        s3.copy_object(Bucket=BUCKET, Key=f"{prefix}/ecg/{name}.dat",
                       CopySource=f"{BUCKET}/in/{r['ecg'].replace('.hea', '.dat')}")
        header = s3.get_object(Bucket=BUCKET, Key=f"in/{r['ecg']}")["Body"].read().decode()
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/ecg/{name}.hea", Body=header.replace(stem, name).encode())
        out.append({**r, "echo": f"echo/{name}.dcm", "ecg": f"ecg/{name}.hea"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(out[0]))
    writer.writeheader()
    writer.writerows(out)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.csv", Body=buf.getvalue().encode())
    return f"s3://{BUCKET}/{prefix}/manifest.csv"


def _iam_users(endpoint: str) -> dict[str, dict[str, str]]:
    """An ``admin`` IAM user (everything) and an ``ingest`` user (``s3:*``) on the moto server; their keys."""
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    keys = {}
    for name, action in (("admin", "*"), ("ingest", "s3:*")):
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="base", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        keys[name] = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
    return keys


def _objects(s3, prefix: str) -> dict[str, str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listed}


def test_a_bucket_refusing_writes_mid_run_stops_cleanly_and_resume_finishes(
        s3_server, s3_moto, s3_corpus, ray_session, monkeypatch, capsys):
    """Part-way through an ingest the bucket refuses the later shards' PutObject (an IAM Deny that
    moto's server enforces once its authentication is on): the CLI names the refused file and
    says --resume continues (exit 3), every finished chunk keeps its data file, no multipart upload
    is left open; a --resume after the Deny is lifted finishes the run."""
    from echopulse.cli import EXIT_RESUMABLE, main

    manifest = _copied_inputs(s3_server, s3_corpus[1][:2], 6, "many")
    args = ["ingest", "--manifest", manifest, "--recipe", "tiny", "--inputs-per-task", "1"]

    keys = _iam_users(s3_moto.endpoint)
    admin = boto3.client("iam", endpoint_url=s3_moto.endpoint, region_name="us-east-1", **keys["admin"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["ingest"]["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["ingest"]["aws_secret_access_key"])
    out = f"s3://{BUCKET}/refused"
    # the last two non-empty groups (about one input per task; an input's group is its key's hash):
    # on the tests' 4 logical CPUs their tasks start after others end
    groups = sorted({group_of(input_key({"echo": f"echo/in_{i:03d}.dcm", "ecg": f"ecg/in_{i:03d}.hea"}), 6)
                     for i in range(6)})
    assert len(groups) >= 3
    refused = [f"arn:aws:s3:::{BUCKET}/refused/*/{shard_name(g * GROUP_STRIDE)}" for g in groups[-2:]]
    requests.post(f"{s3_moto.endpoint}/moto-api/reset-auth", data=b"0", timeout=30)  # IAM enforced from here
    try:
        admin.put_user_policy(UserName="ingest", PolicyName="refuse", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Deny", "Action": "s3:PutObject", "Resource": refused}]}))
        capsys.readouterr()
        assert main([*args, "--out", out]) == EXIT_RESUMABLE == 3
        err = capsys.readouterr().err.strip().splitlines()[-1]  # the CLI's one line
        assert err.startswith(f"error: {out}: the run stopped"), err
        assert any(f"{out}/clips/{shard_name(g * GROUP_STRIDE)}" in err for g in groups[-2:]), err  # the refused file
        assert "Access Denied" in err, err
        assert "rerun with --resume" in err, err
        ingest_s3 = boto3.client("s3", endpoint_url=s3_moto.endpoint, region_name="us-east-1", **keys["ingest"])
        done = _objects(ingest_s3, "refused/outcomes/")
        data = _objects(ingest_s3, "refused/clips/")
        assert done and len(done) < 6  # some chunks finished before the refusal, not all
        for key in done:  # every finished chunk has its data file
            assert key.replace("/outcomes/", "/clips/") in data
        assert not ingest_s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    finally:
        requests.post(f"{s3_moto.endpoint}/moto-api/reset-auth", data=b"inf", timeout=30)
    # the Deny lifted, --resume does only the rest and ends with every input counted once
    assert main([*args, "--out", out, "--resume"]) == 0
    summary = json.loads(boto3.client("s3", endpoint_url=s3_moto.endpoint).get_object(
        Bucket=BUCKET, Key="refused/summary.json")["Body"].read())
    assert (summary["inputs"], summary["quarantined"], summary["duplicates"]) == (6, 0, 0)
