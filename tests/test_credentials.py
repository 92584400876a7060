"""AWS keys reach Ray workers without ever being in what Ray prints (runtime_env, stage arguments)."""

import os

from echopulse import storage
from pipelines.common import ray_remote_args, worker_credentials


def test_remote_args_carry_settings_and_credentials_hide_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    args = ray_remote_args("s3://bucket/manifest.csv", "/local/out")
    assert args == {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
                                                 "AWS_DEFAULT_REGION": "us-east-1"}}}
    assert ray_remote_args("/local/manifest.csv", "/local/out") == {}
    assert worker_credentials("/local/a", None) is None
    credentials = worker_credentials("/local/manifest.csv", "s3://bucket/out")
    for text in (repr(credentials), str(credentials), repr({"credentials": credentials})):
        assert "AKIAEXAMPLEKEY" not in text and "very-secret-value" not in text
        assert "AWS_SECRET_ACCESS_KEY" in text
    # a worker without the keys gets them from the object
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.apply_credentials(credentials)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLEKEY"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "very-secret-value"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # monkeypatch restores only what it set
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
