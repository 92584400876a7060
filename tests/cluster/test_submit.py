"""`echopulse submit` and `echopulse jobs` against a real Ray head on loopback (cluster/local.sh),
and a training run tracked by the MLflow server of cluster/mlflow/ (PostgreSQL + S3)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

pytestmark = pytest.mark.integration


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_head):
    work = tmp_path_factory.mktemp("submit")
    made = ray_head["cli"]("synth", "--out", str(work / "synth"), "--studies", "2", "--seconds", "2",
                           timeout=120)
    assert made.returncode == 0, made.stderr
    return work


@pytest.fixture(scope="module")
def ingested(corpus, ray_head):
    """`echopulse submit -- ingest ...` run once; the tests check what it did."""
    started = time.monotonic()
    proc = ray_head["cli"]("submit", "--timeout", "240", "--", "ingest", "--manifest",
                           str(corpus / "synth" / "manifest.csv"), "--out", str(corpus / "clips"),
                           "--recipe", "tiny", timeout=300)
    return proc, time.monotonic() - started


def test_ingest_through_submit_succeeds_with_outputs(ingested, corpus):
    proc, _ = ingested
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in _last_line(proc.stderr)
    summary = json.loads((corpus / "clips" / "summary.json").read_text())
    assert summary["inputs"] == 2 and summary["inputs_with_clips"] == 2 and summary["clips"] > 0
    assert list((corpus / "clips" / "clips").glob("*.parquet"))
    # the job's own output streamed to our stdout: ingest prints its summary as JSON
    assert '"inputs_with_clips": 2' in proc.stdout


def test_jobs_list_and_logs_show_the_job(ingested, ray_head):
    proc, _ = ingested
    job_id = proc.stderr.split("submitted ", 1)[1].split()[0]
    listed = ray_head["cli"]("jobs", "list", "--json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {row["submission_id"]: row for row in json.loads(listed.stdout)}
    assert rows[job_id]["status"] == "SUCCEEDED" and rows[job_id]["exit_code"] == 0
    assert "echopulse.cli ingest" in rows[job_id]["entrypoint"]
    table = ray_head["cli"]("jobs", "list", timeout=60)
    assert job_id in table.stdout and "SUCCEEDED" in table.stdout
    logs = ray_head["cli"]("jobs", "logs", job_id, timeout=60)
    assert logs.returncode == 0 and '"inputs_with_clips": 2' in logs.stdout


def test_training_through_submit_is_tracked_by_the_mlflow_server(ingested, corpus, ray_head,
                                                                 mlflow_server, s3_server):
    from mlflow.tracking import MlflowClient

    assert ingested[0].returncode == 0, "ingest failed; see test_ingest_through_submit_..."
    out = corpus / "tokenizer"
    proc = ray_head["cli"]("submit", "--timeout", "300", "--tracking-uri", mlflow_server["uri"],
                           "--env", "ECHOPULSE_STUDY_SALT=cluster-test", "--", "train", "tokenizer",
                           "--clips", str(corpus / "clips"), "--out", str(out), "--recipe", "tiny",
                           timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in _last_line(proc.stderr)
    assert "env passed: ECHOPULSE_STUDY_SALT, MLFLOW_TRACKING_URI" in proc.stderr
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert (out / "checkpoint" / "config.json").is_file()

    summary = json.loads(proc.stdout[proc.stdout.index('{\n  "kind"'):].split("\n}\n")[0] + "\n}")
    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["recipe.name"] == "tiny"
    assert run.data.params["clips"] == str(corpus / "clips")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) >= 2 and all(m.value == m.value for m in history)  # logged per step, no NaN
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert "checkpoint/config.json" in artifacts
    # the artifact went through the server to the S3 bucket
    keys = [o["Key"] for o in s3_server["client"].list_objects_v2(
        Bucket=s3_server["bucket"]).get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/checkpoint/config.json") for k in keys), keys
    body = s3_server["client"].get_object(
        Bucket=s3_server["bucket"],
        Key=next(k for k in keys if k.endswith("checkpoint/config.json")))["Body"].read()
    assert json.loads(body) == json.loads((out / "checkpoint" / "config.json").read_text())


def test_failing_job_reports_its_real_exit_status(ray_head, tmp_path):
    started = time.monotonic()
    proc = ray_head["cli"]("submit", "--timeout", "120", "--", "ingest", "--manifest",
                           "/nonexistent/manifest.csv", "--out", str(tmp_path / "clips"),
                           "--recipe", "tiny", timeout=180)
    assert proc.returncode == 2  # the job's driver exited 2 (bad input); not a generic 1
    last = _last_line(proc.stderr)
    assert last.startswith("error: job ") and "FAILED (exit 2)" in last
    assert "/nonexistent/manifest.csv" in proc.stdout  # the job's own one-line error, streamed
    assert time.monotonic() - started < 120


def test_timeout_stops_the_job(ray_head, tmp_path):
    job_id = f"echopulse-test-timeout-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    proc = ray_head["cli"]("submit", "--timeout", "3", "--submission-id", job_id, "--",
                           "synth", "--out", str(tmp_path / "big"), "--studies", "500", timeout=120)
    assert proc.returncode == 124, proc.stderr
    assert "--timeout" in _last_line(proc.stderr) and "stopped" in _last_line(proc.stderr)
    assert time.monotonic() - started < 60
    listed = ray_head["cli"]("jobs", "list", "--json", timeout=60)
    status = {r["submission_id"]: r["status"] for r in json.loads(listed.stdout)}[job_id]
    assert status in ("STOPPED", "FAILED")  # never left running


def test_missing_token_is_one_clear_line(ray_head, tmp_path, cli_for):
    env = cli_for(HOME=str(tmp_path), RAY_API_SERVER_ADDRESS=ray_head["address"]).env
    proc = ray_head["cli"]("jobs", "list", env=env, timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "requires a token and none was found" in err and "RAY_AUTH_TOKEN" in err

    env["RAY_AUTH_TOKEN"] = "not-the-token"
    proc = ray_head["cli"]("submit", "--", "synth", "--out", str(tmp_path / "s"), env=env, timeout=60)
    assert proc.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in proc.stderr

    env.pop("RAY_AUTH_TOKEN")
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-such-token")
    proc = ray_head["cli"]("jobs", "list", env=env, timeout=60)
    assert proc.returncode == 2 and "RAY_AUTH_TOKEN_PATH" in proc.stderr


def test_stop_and_logs_of_unknown_job(ray_head):
    for action in ("stop", "logs"):
        proc = ray_head["cli"]("jobs", action, "raysubmit_doesnotexist", timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == "error: no job raysubmit_doesnotexist on this cluster"


def test_unreachable_address_fails_fast(tmp_path, cli_for, unused_port):
    cli = cli_for(HOME=str(tmp_path))
    address = f"http://127.0.0.1:{unused_port}"  # nothing listens there
    started = time.monotonic()
    proc = cli("submit", "--address", address, "--", "synth", "--out", str(tmp_path / "s"), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: cannot reach the Ray job server at {address}")
    proc = cli("jobs", "list", "--address", address, timeout=60)
    assert proc.returncode == 2 and "cannot reach" in proc.stderr
    assert time.monotonic() - started < 30


def test_missing_working_dir_and_bad_command(tmp_path, cli_for):
    cli = cli_for(HOME=str(tmp_path))
    missing = tmp_path / "no-such-dir"
    proc = cli("submit", "--working-dir", str(missing), "--", "synth", "--out", "s", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --working-dir {missing}: no such directory"
    proc = cli("submit", "--", "bogus", timeout=60)
    assert proc.returncode == 2 and "expected an echopulse command" in proc.stderr
    proc = cli("submit", "--", "ingest", "--out", "o", timeout=60)  # its own flags checked here
    assert proc.returncode == 2 and "--manifest" in proc.stderr
