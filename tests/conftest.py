"""Shared fixtures: one local Ray cluster per test session (started only by tests that ask)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Tests must never touch a user's tracking server or cluster.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster started in-process, shared by every integration test."""
    import ray

    from echopulse.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_quickstart(tmp_path_factory, ray_session):
    """The whole chain with the tiny recipe, run once through the CLI and shared by the tests
    that check its outputs or build on them (tokens and tokenizer for the sweep tests)."""
    import json

    from echopulse.cli import main

    work = tmp_path_factory.mktemp("quickstart")
    code = main(["quickstart", "--workdir", str(work), "--recipe", "tiny", "--seed", "3"])
    assert code == 0
    return work, json.loads((work / "quickstart.json").read_text())


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on loopback with a sqlite backend."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_loopback_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a shared 2-core machine can take minutes
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((root / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        else:
            raise TimeoutError("mlflow server did not start in 300 s")
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its uvicorn workers may not stop in time
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
