from __future__ import annotations

import pytest

from echopulse.tracking import (RunLogger, create_run, finished_child_metrics, flatten_params, resolve_tracking_uri,
                                tracked_run)


def test_flatten_params():
    assert flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]",
                                                                        "d": "x"}


def test_default_uri_is_sqlite_in_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(str(tmp_path)) == "http://127.0.0.1:5000"


def test_runs_metrics_and_nesting_land_in_the_store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = create_run(uri, "parent", {"recipe": {"name": "tiny"}})
    with tracked_run(uri, "child", {"lr": 0.1}, parent_run_id=parent) as child:
        child.log_metrics({"loss": 2.0, "note": "not a number"}, step=1)
        child.log_metrics({"loss": 1.0}, step=2)
    with pytest.raises(RuntimeError):
        with tracked_run(uri, "broken") as broken:
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=uri)
    c = client.get_run(child.run_id)
    assert c.info.status == "FINISHED"
    assert c.data.tags["mlflow.parentRunId"] == parent
    assert [m.value for m in client.get_metric_history(child.run_id, "loss")] == [2.0, 1.0]
    assert client.get_run(parent).data.params["recipe.name"] == "tiny"
    assert client.get_run(broken.run_id).info.status == "FAILED"
    assert not RunLogger(uri, None).active  # ranks > 0 log nothing


def test_a_run_in_one_store_does_not_redirect_later_default_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    create_run(f"sqlite:///{tmp_path}/a.db", "first")
    # the next run that asks for the default store must get WORKDIR/mlflow.db, not a.db
    assert resolve_tracking_uri(str(tmp_path / "work")) == f"sqlite:///{tmp_path / 'work'}/mlflow.db"
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_lineage_figure_and_system_metrics_land_in_the_run(tmp_path):
    import json

    import pandas as pd
    from mlflow import MlflowClient

    from echopulse.tracking import dataset_digest, log_dataset_inputs, log_training_figure, system_metrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("echo,ecg\na.dcm,a.hea\n")
    clips, tokens = tmp_path / "clips", tmp_path / "tokens"
    clips.mkdir(), tokens.mkdir()
    (clips / "dataset.json").write_text(json.dumps({"schema": "clips/v1", "counts": {"clips": 7},
                                                    "manifest": str(manifest)}))
    (tokens / "dataset.json").write_text(json.dumps({"schema": "tokens/v1", "counts": {"tokens": 7},
                                                     "split_counts": {"train": 5, "val": 2},
                                                     "clips": str(clips)}))
    run_id = create_run(uri, "train")
    assert log_dataset_inputs(uri, run_id, str(tokens)) == [str(tokens), str(clips), str(manifest)]
    history = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5], "val_ce": [None, 2.5, 2.0]})
    assert log_training_figure(uri, run_id, history, "generator") == "figures/generator.png"
    with system_metrics(uri, run_id, interval_s=0.2):
        import time

        time.sleep(1.5)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"tokens/v1", "clips/v1", "manifest"}
    assert inputs["tokens/v1"].dataset.digest == dataset_digest(str(tokens))
    assert json.loads(inputs["tokens/v1"].dataset.profile)["split_counts"] == {"train": 5, "val": 2}
    assert json.loads(inputs["clips/v1"].dataset.source)["uri"] == str(clips)
    assert [t.value for t in inputs["tokens/v1"].tags] == ["training"]
    assert [t.value for t in inputs["manifest"].tags] == ["source"]
    assert "figures/generator.png" in [a.path for a in client.list_artifacts(run_id, "figures")]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert any(k.startswith("system/system_memory") for k in run.data.metrics)


def test_sweep_closes_stopped_trials_as_killed_and_keeps_real_failures(tmp_path):
    """A trial ASHA stops can end RUNNING (its process killed) or FAILED (the stop interrupted it
    inside run_trial); both are KILLED after the sweep. A trial Tune records as errored stays
    FAILED, and a finished one stays FINISHED."""
    from mlflow import MlflowClient

    from echopulse.tracking import end_run
    from jobs.tune_masking import _close_stopped_children

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = create_run(uri, "tune-tiny", {})
    ids = {}
    for name, status in (("trial-cosine-ab12_00000", "FINISHED"), ("trial-linear-ab12_00001", "FAILED"),
                         ("trial-square-ab12_00002", "FAILED"), ("trial-cubic-ab12_00003", None)):
        ids[name] = create_run(uri, name, {}, parent_run_id=parent)
        if status:
            end_run(uri, ids[name], status)
    errored = {"run_trial_ab12_00002_2_trial=schedule_square_2026-12-02_06-45-27"}
    _close_stopped_children(uri, parent, errored)
    client = MlflowClient(tracking_uri=uri)
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"trial-cosine-ab12_00000": "FINISHED", "trial-linear-ab12_00001": "KILLED",
                      "trial-square-ab12_00002": "FAILED", "trial-cubic-ab12_00003": "KILLED"}
    assert client.get_run(ids["trial-linear-ab12_00001"]).data.tags["echopulse.stopped_early"] == "true"


def test_a_finished_trial_is_found_by_parent_and_name_and_a_running_one_is_not(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    parent = create_run(uri, "sweep")
    other = create_run(uri, "other-sweep")
    done = create_run(uri, "trial-cosine-a1", parent_run_id=parent)
    RunLogger(uri, done).log_metrics({"val_ce": 2.5, "gen_ssim": 0.6}, step=15)
    RunLogger(uri, done).finish()
    create_run(uri, "trial-linear-b2", parent_run_id=parent)  # still running: interrupted mid-trial
    elsewhere = create_run(uri, "trial-sqrt-c3", parent_run_id=other)
    RunLogger(uri, elsewhere).finish()

    assert finished_child_metrics(uri, parent, "trial-cosine-a1") == {"val_ce": 2.5, "gen_ssim": 0.6}
    assert finished_child_metrics(uri, parent, "trial-linear-b2") is None
    assert finished_child_metrics(uri, parent, "trial-sqrt-c3") is None  # another sweep's trial
    # a name with quotes is matched as it is, not with its quotes stripped
    quoted = create_run(uri, "trial-'cos'-d4", parent_run_id=parent)
    RunLogger(uri, quoted).log_metrics({"val_ce": 1.5}, step=15)
    RunLogger(uri, quoted).finish()
    assert finished_child_metrics(uri, parent, "trial-'cos'-d4") == {"val_ce": 1.5}
    assert finished_child_metrics(uri, parent, "trial-cos-d4") is None
