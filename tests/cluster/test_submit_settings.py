"""How `echopulse submit` finds the token and address and builds the runtime env (no servers)."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest

from echopulse.submit import (
    SubmitError,
    build_runtime_env,
    entrypoint_for,
    exit_code_for,
    find_auth_token,
    parse_env,
    passthrough_env,
    resolve_address,
)


def test_token_precedence_follows_ray(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default\n")
    path = tmp_path / "token"
    path.write_text("from-path\n")
    assert find_auth_token({"HOME": str(home)}) == ("from-default", str(home / ".ray" / "auth_token"))
    assert find_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path)})[0] == "from-path"
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path), "RAY_AUTH_TOKEN": "from-env"}
    assert find_auth_token(env) == ("from-env", "RAY_AUTH_TOKEN")
    token, looked = find_auth_token({"HOME": str(tmp_path / "empty")})
    assert token is None and "RAY_AUTH_TOKEN" in looked
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH"):  # set but unreadable: an error
        find_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_address_resolution():
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert resolve_address("10.0.0.5:8265", {}) == "http://10.0.0.5:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == "http://127.0.0.1:8265"
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://a:1"}) == "http://a:1"
    with pytest.raises(SubmitError, match="ray://"):
        resolve_address("ray://head:10001", {})


def test_only_named_settings_pass_through(tmp_path):
    environ = {"MLFLOW_TRACKING_URI": "http://m:5000", "AWS_REGION": "eu-west-1",
               "ECHOPULSE_STUDY_SALT": "s", "SECRET_THING": "x", "HOME": "/root", "PATH": "/bin",
               "AWS_PROFILE": "dev", "MLFLOW_S3_ENDPOINT_URL": ""}
    assert passthrough_env(environ) == {"MLFLOW_TRACKING_URI": "http://m:5000",
                                        "AWS_REGION": "eu-west-1", "ECHOPULSE_STUDY_SALT": "s"}
    assert parse_env(["A=1", "SECRET_THING"], environ) == {"A": "1", "SECRET_THING": "x"}
    with pytest.raises(SubmitError, match="not set"):
        parse_env(["NOT_SET_ANYWHERE"], environ)
    with pytest.raises(SubmitError, match="NAME=VALUE"):
        parse_env(["1BAD=x"], environ)
    env = build_runtime_env(tmp_path, {"A": "1"})
    assert env["working_dir"] == str(tmp_path) and env["env_vars"] == {"A": "1"}
    assert {".venv", ".git", "demo", "*.db"} <= set(env["excludes"])
    assert "pip" not in env
    with pytest.raises(SubmitError, match="no such directory"):
        build_runtime_env(tmp_path / "nope")


def test_entrypoint_quotes_arguments():
    entry = entrypoint_for(["ingest", "--manifest", "my data/m.csv", "--out", "s3://b/c; rm -rf /"])
    assert shlex.split(entry) == ["python", "-m", "echopulse.cli", "ingest", "--manifest",
                                  "my data/m.csv", "--out", "s3://b/c; rm -rf /"]
    with pytest.raises(SubmitError):
        entrypoint_for([])


@pytest.mark.parametrize("status, code, expected", [
    ("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", 1, 1), ("FAILED", None, 1),
    ("FAILED", -9, 137), ("STOPPED", None, 1),
])
def test_exit_status_is_the_jobs(status, code, expected):
    assert exit_code_for(SimpleNamespace(status=status, driver_exit_code=code)) == expected
