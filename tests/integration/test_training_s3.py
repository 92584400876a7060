"""Checkpoints on S3 (moto's S3 server on loopback, no client mocks) and a resume from there.

``--out s3://bucket/prefix``: Ray Train keeps its run under ``prefix/ray/`` through an explicit
pyarrow S3 filesystem built from ``AWS_ENDPOINT_URL_S3`` (``echopulse.storage.train_storage``); the
same command again continues from the most advanced checkpoint found there.
"""

from __future__ import annotations

import json
import os

import pytest

from echopulse.config import replace
from jobs.recipes import tiny

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


def _logged_steps(uri: str, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(int(m.step) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"))


def test_generator_checkpoints_on_s3_and_resume(s3, tmp_path, ray_session):
    from jobs.train_generator import train_generator
    from bench._common import write_random_tokens

    tokens = tmp_path / "tokens"
    tokenizer = write_random_tokens(str(tokens), tiny(), n=16, seed=4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = f"s3://{BUCKET}/runs/generator"
    train = replace(tiny().generator_train, steps=4, log_every=2, checkpoint_every=2, warmup_steps=1)
    first = train_generator(str(tokens), tokenizer, out, replace(tiny(), generator_train=train), uri,
                            workers=1, use_gpu=False)
    assert first.checkpoint == f"{out}/checkpoint"
    assert _logged_steps(uri, first.run_id) == [2, 4]
    keys = _keys(s3, "runs/generator/")
    states = [k for k in keys if k.startswith("runs/generator/ray/") and k.endswith("train_state.json")]
    assert states, keys  # Ray Train's checkpoints went to S3
    exported = {k.rsplit("/", 1)[1] for k in keys if k.startswith("runs/generator/checkpoint/")}
    assert {"config.json", "model.safetensors"} <= exported and "optimizer.pt" not in exported
    assert "runs/generator/checkpoint/tokenizer/config.json" in keys  # the tokenizer is bundled
    assert not (tmp_path / "runs").exists() and not os.path.exists("s3:")  # nothing local by mistake

    # the same command with more steps continues at step 4 from the checkpoint on S3
    longer = replace(train, steps=6)
    second = train_generator(str(tokens), tokenizer, out, replace(tiny(), generator_train=longer), uri,
                             workers=1, use_gpu=False)
    assert _logged_steps(uri, second.run_id) == [6]
    assert second.metrics["step"] == 6
    body = s3.get_object(Bucket=BUCKET, Key="runs/generator/checkpoint/config.json")["Body"].read()
    assert json.loads(body)["kind"] == "generator"
    steps = sorted(json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())["step"]
                   for k in _keys(s3, "runs/generator/ray/") if k.endswith("train_state.json"))
    assert steps[-1] == 6


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
