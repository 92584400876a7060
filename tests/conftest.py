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
