"""MLflow tracking: one run per job, nested child runs per Tune trial; rank 0 logs only.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a sqlite store in the work directory
(MLflow refuses plain ``file:`` stores from 3.13 on). Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "echopulse"


def resolve_tracking_uri(workdir: str | None = None, tracking_uri: str | None = None) -> str:
    """The tracking URI to use: explicit, then ``MLFLOW_TRACKING_URI``, then ``WORKDIR/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = Path(workdir or ".").resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    """Nested config dicts as dotted MLflow params (values stringified, MLflow's 6000-char cap)."""
    flat: dict[str, Any] = {}
    _flatten("", params, flat)
    return {k: str(v)[:6000] for k, v in flat.items()}


def _client(tracking_uri: str):
    # a client bound to this URI, never ``mlflow.set_tracking_uri``: that also sets
    # MLFLOW_TRACKING_URI for the whole process, so a later run meant for the default store (or
    # another one) would land in this one
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def create_run(
    tracking_uri: str,
    run_name: str,
    params: dict[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a run (a child of ``parent_run_id`` when given) and return its id."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    all_tags = dict(tags or {})
    all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
    if params:
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


class RunLogger:
    """Logs metrics/artifacts to an existing run; a no-op when ``run_id`` is ``None`` (ranks > 0)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.run_id = run_id
        self._client = _client(tracking_uri) if (tracking_uri and run_id) else None

    @property
    def active(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._client:
            return
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _is_number(v)]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self._client:
            self._client.log_artifact(self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        if self._client:
            self._client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self._client:
            self._client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def tracked_run(
    tracking_uri: str,
    run_name: str,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> Iterator[RunLogger]:
    """A run that ends FINISHED on success and FAILED when the body raises."""
    run_id = create_run(tracking_uri, run_name, params, experiment, parent_run_id)
    logger = RunLogger(tracking_uri, run_id)
    try:
        yield logger
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish("FINISHED")


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True
