"""Shared fixtures: one local Ray cluster per test session (started only by tests that ask)."""

from __future__ import annotations

import os

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
