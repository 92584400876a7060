"""A generator run recorded by a real ``mlflow server`` on loopback (PostgreSQL backend, artifacts
proxied to the S3 server), read back with ``MlflowClient`` (the full config as params, per-step
metrics, the config artifact, the final checkpoint's URI and a sample generation GIF), with its
checkpoints on that S3 server (``--out s3://bucket/prefix``: Ray Train keeps its run under
``prefix/ray/`` through an explicit pyarrow S3 filesystem, ``echopulse.storage.train_storage``) and
a second command continuing from the checkpoint found there. One training serves both checks."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def _all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def _keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _logged_steps(client, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, "loss"))


def test_generator_run_on_the_tracking_server_with_checkpoints_on_s3(mlflow_server, s3_server, ray_session,
                                                                     tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from bench._common import write_random_tokens
    from echopulse.config import replace, to_dict
    from echopulse.tracking import flatten_params
    from jobs.recipes import tiny
    from jobs.train_generator import train_generator

    s3, bucket = s3_server["client"], "echo-train"
    s3.create_bucket(Bucket=bucket)
    for key, value in {**s3_server["creds"], "AWS_ENDPOINT_URL_S3": s3_server["endpoint"]}.items():
        monkeypatch.setenv(key, value)
    tokens = tmp_path / "tokens"
    tokenizer = write_random_tokens(str(tokens), tiny(), n=16, seed=6)
    train = replace(tiny().generator_train, steps=4, log_every=2, checkpoint_every=2, warmup_steps=1)
    recipe = replace(tiny(), generator_train=train)
    out = f"s3://{bucket}/runs/generator"
    result = train_generator(str(tokens), tokenizer, out, recipe, mlflow_server["uri"],
                             workers=1, use_gpu=False)

    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # params: the whole recipe, flattened, and the inputs
    expected = flatten_params({"recipe": to_dict(recipe), "tokens": str(tokens),
                               "tokenizer": tokenizer, "out": out})
    missing = {k: v for k, v in expected.items() if run.data.params.get(k) != v}
    assert not missing, missing
    # per-step metrics, every logged step, finite
    for key in ("loss", "lr", "samples_per_s"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == [2, 4], (key, history)
        assert all(m.value == m.value for m in history)
    assert any(k.startswith("val_") for k in run.data.metrics), run.data.metrics
    # artifacts: the config; the final checkpoint's URI as a tag
    artifacts = _all_artifacts(client, result.run_id)
    assert "config/config.json" in artifacts, artifacts
    local = client.download_artifacts(result.run_id, "config/config.json", str(tmp_path))
    config = json.loads(open(local).read())
    assert config["recipe"] == json.loads(json.dumps(to_dict(recipe)))
    assert run.data.tags["checkpoint_uri"] == result.checkpoint == f"{out}/checkpoint"
    # a sample generation, decoded by the tokenizer, at the end of training
    gifs = [a for a in artifacts if a.startswith("samples/") and a.endswith(".gif")]
    assert gifs, artifacts
    gif = client.download_artifacts(result.run_id, gifs[-1], str(tmp_path))
    assert open(gif, "rb").read(6) in (b"GIF87a", b"GIF89a")
    # the artifacts went through the server into its S3 bucket
    keys = _keys(s3, s3_server["bucket"], "")
    assert any(k.endswith(f"{result.run_id}/artifacts/config/config.json") for k in keys), keys

    # the checkpoints: Ray Train's on S3, the exported one (weights only, tokenizer bundled) too
    keys = _keys(s3, bucket, "runs/generator/")
    states = [k for k in keys if k.startswith("runs/generator/ray/") and k.endswith("train_state.json")]
    assert states, keys
    exported = {k.rsplit("/", 1)[1] for k in keys if k.startswith("runs/generator/checkpoint/")}
    assert {"config.json", "model.safetensors"} <= exported and "optimizer.pt" not in exported
    assert "runs/generator/checkpoint/tokenizer/config.json" in keys
    assert not (tmp_path / "runs").exists()  # nothing local by mistake

    # the same command with more steps continues at step 4 from the checkpoint on S3
    longer = replace(train, steps=6)
    second = train_generator(str(tokens), tokenizer, out, replace(tiny(), generator_train=longer),
                             mlflow_server["uri"], workers=1, use_gpu=False)
    assert _logged_steps(client, second.run_id) == [6]
    assert second.metrics["step"] == 6
    body = s3.get_object(Bucket=bucket, Key="runs/generator/checkpoint/config.json")["Body"].read()
    assert json.loads(body)["kind"] == "generator"
    steps = sorted(json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read())["step"]
                   for k in _keys(s3, bucket, "runs/generator/ray/") if k.endswith("train_state.json"))
    assert steps[-1] == 6
