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


def client_for(tracking_uri: str):
    """An ``MlflowClient`` bound to ``tracking_uri`` (and to it as the registry URI)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)


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


def finished_child_metrics(tracking_uri: str, parent_run_id: str, run_name: str,
                           experiment: str = DEFAULT_EXPERIMENT) -> dict[str, float] | None:
    """The latest metrics of a FINISHED child run of ``parent_run_id`` named ``run_name``, or
    ``None`` when there is none (how a resumed sweep recognises a trial that finished before the
    interruption reached the sweep's own state)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    # the name is matched here rather than in the filter string, so any character in it matches
    # exactly (the filter's quoting would need escaping rules of its own); a sweep has few trials
    runs = client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=10_000)
    for run in runs:
        if run.data.tags.get("mlflow.runName") == run_name:
            return dict(run.data.metrics)
    return None


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


# ---- what a training run records besides metrics: system metrics, figures, lineage ----------

SYSTEM_METRICS_INTERVAL_S = float(os.environ.get("ECHOPULSE_SYSTEM_METRICS_S", "5"))


@contextlib.contextmanager
def system_metrics(tracking_uri: str | None, run_id: str | None,
                   interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network, and
    GPU utilisation/memory when ``pynvml`` finds a GPU) logged to ``run_id`` while the body runs.

    They describe the machine this process runs on (the driver; on one node, the whole job).
    Needs psutil; a monitor that cannot start is a warning, never a failed run.
    """
    monitor = None
    if tracking_uri and run_id:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s,
                                           tracking_uri=tracking_uri)
            monitor.start()
        except Exception as exc:  # psutil missing, ...
            log.warning("no system metrics for run %s: %s", run_id, exc)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def log_training_figure(tracking_uri: str, run_id: str, history, name: str = "training") -> str | None:
    """Loss and validation curves against the step as ``figures/NAME.png`` (``log_figure``).

    Args:
        history: the rows Ray Train reported (``Result.metrics_dataframe``), a pandas DataFrame.
    """
    if history is None or len(history) == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name = "step" if "step" in history.columns else "training_iteration"
    curves = [c for c in history.columns
              if c == "loss" or (c.startswith("val_") and not c.startswith("val_acc"))]
    curves = [c for c in curves if history[c].notna().any()]
    if not curves or x_name not in history.columns:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for column in curves:
        rows = history[[x_name, column]].dropna()
        ax.plot(rows[x_name], rows[column], label=column, marker="." if len(rows) < 30 else None)
    ax.set_xlabel(x_name)
    ax.set_ylabel("cross-entropy / loss")
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = f"figures/{name}.png"
    _client(tracking_uri).log_figure(run_id, fig, path)
    plt.close(fig)
    return path


def dataset_digest(uri: str) -> str:
    """A dataset's digest: the first 16 hex digits of the sha256 of its ``dataset.json``."""
    import hashlib

    from echopulse import storage
    from echopulse.schema import DATASET_INFO_FILE

    text = storage.read_text(storage.join(uri, DATASET_INFO_FILE))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def log_dataset_inputs(tracking_uri: str | None, run_id: str | None, uri: str,
                       context: str = "training") -> list[str]:
    """Record a dataset and, following ``dataset.json``, the datasets it was made from, as inputs
    of ``run_id``: tokens/v1 (``context``) -> clips/v1 (``source``) -> the manifest (``source``).

    Each input carries the path, the ``dataset.json`` digest, its schema and counts, so a model
    version (whose run holds these) traces back to the manifest its clips came from.

    Returns:
        The URIs recorded.
    """
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from echopulse import storage
    from echopulse.schema import DATASET_INFO_FILE

    if not (tracking_uri and run_id):
        return []
    inputs, seen = [], []
    current, ctx = uri, context
    while current and current not in seen and len(seen) < 4:
        seen.append(current)
        info_path = storage.join(current, DATASET_INFO_FILE)
        if not storage.exists(info_path):  # the manifest (a file): recorded by path and digest
            digest = _file_digest(current)
            inputs.append(DatasetInput(
                Dataset(name="manifest", digest=digest or "unknown", source_type=_source_type(current),
                        source=json.dumps({"uri": current}), schema=None, profile=None),
                tags=[InputTag("mlflow.data.context", ctx)]))
            break
        info = json.loads(storage.read_text(info_path))
        profile = {k: info[k] for k in ("counts", "split_counts", "tokenizer_id", "token_grid",
                                        "codebook_size", "created_unix", "echopulse_version")
                   if k in info}
        parent = info.get("clips") or info.get("manifest")
        if parent:
            profile["made_from"] = parent
        inputs.append(DatasetInput(
            Dataset(name=str(info.get("schema", "dataset")), digest=dataset_digest(current),
                    source_type=_source_type(current), source=json.dumps({"uri": current}),
                    schema=json.dumps({"echopulse_schema": info.get("schema")}),
                    profile=json.dumps(profile, default=str)[:5000]),
            tags=[InputTag("mlflow.data.context", ctx)]))
        current, ctx = parent, "source"
    _client(tracking_uri).log_inputs(run_id, datasets=inputs)
    return seen


def _source_type(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "local"


def _file_digest(uri: str) -> str | None:
    import hashlib

    from echopulse import storage

    try:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (OSError, ValueError):
        return None
