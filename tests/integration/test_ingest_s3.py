"""Ingest from and to S3: a real S3-protocol server (moto's server mode) on loopback, no client mocks."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from echopulse import storage
from echopulse.synth.phantom import write_corpus
from jobs.recipes import tiny
from pipelines.ingest import run_ingest

pytestmark = pytest.mark.integration

BUCKET = "echo-archive"


@pytest.fixture(scope="module")
def s3_corpus(s3_server, tmp_path_factory):
    """Two phantom studies uploaded under s3://BUCKET/in/ with a Parquet manifest (and one bad row)."""
    root = tmp_path_factory.mktemp("s3corpus")
    manifest = write_corpus(root, studies=2, seed=21, duration_s=2.5)
    rows = list(csv.DictReader(open(manifest, newline="")))
    rows.append({**rows[0], "echo": "echo/absent.dcm"})
    s3_server.create_bucket(Bucket=BUCKET)
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".dcm", ".hea", ".dat"):
            s3_server.upload_file(str(path), BUCKET, f"in/{path.relative_to(root).as_posix()}")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    s3_server.put_object(Bucket=BUCKET, Key="in/manifest.parquet", Body=buf.getvalue())
    return f"s3://{BUCKET}/in/manifest.parquet", rows


def test_ingest_from_and_to_s3(s3_server, s3_corpus, ray_session):
    manifest, rows = s3_corpus
    out = f"s3://{BUCKET}/clips"
    summary = run_ingest(manifest, out, tiny().clip)
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

    # resume skips everything already done; the clip ids are the same
    again = run_ingest(manifest, out, tiny().clip, resume=True)
    assert again.as_dict() == summary.as_dict()
    assert storage.exists(f"{out}/dataset.json")
