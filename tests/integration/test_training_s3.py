"""Training outputs on S3 (moto's S3 server on loopback, no client mocks): the write probe before
a run, and the pickled Ray Train filesystem. A generator run with its checkpoints on S3 and a resume
from there is ``tests/cluster/test_training_mlflow.py`` (one training, tracked on the MLflow server).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

BUCKET = "echo-train"


@pytest.fixture(scope="module")
def s3(s3_server):
    """The loopback S3 server (``s3_server``, tests/integration/conftest.py) with this module's bucket."""
    s3_server.create_bucket(Bucket=BUCKET)
    return s3_server


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_unwritable_s3_output_fails_before_training(s3, tmp_path):
    from echopulse.errors import EchoPulseError
    from jobs import preflight

    with pytest.raises(EchoPulseError, match="cannot write there"):
        preflight.check_writable("s3://no-such-bucket/out")
    preflight.check_writable(f"s3://{BUCKET}/writable")
    assert not _keys(s3, "writable/")  # the probe is removed


def test_train_storage_carries_the_endpoint_to_processes_without_it(s3, monkeypatch, tmp_path):
    """Ray's controller and workers get the pickled filesystem; they may lack the AWS variables."""
    import pickle

    from echopulse import storage

    assert storage.train_storage(str(tmp_path / "out")) == (str((tmp_path / "out").resolve()), None)
    path, fs = storage.train_storage(f"s3://{BUCKET}/carry/ray/")
    assert path == f"{BUCKET}/carry/ray"
    blob = pickle.dumps(fs)
    for key in storage.AWS_ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    again = pickle.loads(blob)
    with again.open_output_stream(f"{path}/probe.txt") as f:
        f.write(b"reached")
    assert s3.get_object(Bucket=BUCKET, Key="carry/ray/probe.txt")["Body"].read() == b"reached"
