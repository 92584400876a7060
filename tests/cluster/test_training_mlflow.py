"""A training run recorded by a real ``mlflow server`` on loopback (PostgreSQL backend, artifacts
proxied to the S3 server), read back with ``MlflowClient``: the full config as params, per-step
metrics, the config artifact, the final checkpoint's URI and a sample generation GIF."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration


def _all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_generator_run_on_the_tracking_server(mlflow_server, s3_server, ray_session, tmp_path):
    from mlflow import MlflowClient

    from echopulse.config import replace, to_dict
    from echopulse.tracking import flatten_params
    from jobs.recipes import tiny
    from jobs.train_generator import train_generator
    from bench._common import write_random_tokens

    tokens = tmp_path / "tokens"
    tokenizer = write_random_tokens(str(tokens), tiny(), n=16, seed=6)
    train = replace(tiny().generator_train, steps=4, log_every=2, warmup_steps=1)
    recipe = replace(tiny(), generator_train=train)
    out = tmp_path / "generator"
    result = train_generator(str(tokens), tokenizer, str(out), recipe, mlflow_server["uri"],
                             workers=1, use_gpu=False)

    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # params: the whole recipe, flattened, and the inputs
    expected = flatten_params({"recipe": to_dict(recipe), "tokens": str(tokens),
                               "tokenizer": tokenizer, "out": str(out)})
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
    assert run.data.tags["checkpoint_uri"] == result.checkpoint == str(out / "checkpoint")
    assert os.path.isfile(os.path.join(result.checkpoint, "model.safetensors"))
    # a sample generation, decoded by the tokenizer, at the end of training
    gifs = [a for a in artifacts if a.startswith("samples/") and a.endswith(".gif")]
    assert gifs, artifacts
    gif = client.download_artifacts(result.run_id, gifs[-1], str(tmp_path))
    assert open(gif, "rb").read(6) in (b"GIF87a", b"GIF89a")
    # the artifacts went through the server into the S3 bucket
    keys = [o["Key"] for o in s3_server["client"].list_objects_v2(
        Bucket=s3_server["bucket"]).get("Contents", [])]
    assert any(k.endswith(f"{result.run_id}/artifacts/config/config.json") for k in keys), keys
