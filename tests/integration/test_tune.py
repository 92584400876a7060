"""A 3-trial masking-schedule sweep, interrupted and resumed, tracked on a real MLflow server."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from echopulse.config import replace
from echopulse.errors import ConfigError, EchoPulseError
from jobs.recipes import tiny
from jobs.tune_masking import search_space

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokens(tiny_quickstart):
    """The tiny chain's tokens/v1 dataset and the tokenizer that made it."""
    work, outputs = tiny_quickstart
    return work / "tokens", outputs["tokenizer"]


def test_search_space_grid_random_and_bad_input():
    cfg = replace(tiny().tune, trials=3, schedules=("cosine", "linear"), lr_factors=(1.0, 0.5))
    grid = search_space(cfg, 1e-3)
    assert [t["schedule"] for t in grid] == ["cosine", "linear", "cosine"]
    assert [t["lr"] for t in grid] == [1e-3, 1e-3, 5e-4]
    rand = search_space(replace(cfg, search="random", seed=1), 1e-3)
    assert len(rand) == 3 and rand == search_space(replace(cfg, search="random", seed=1), 1e-3)
    with pytest.raises(ConfigError, match="unknown masking schedule"):
        search_space(replace(cfg, schedules=("cosine", "zigzag")), 1e-3)
    with pytest.raises(ConfigError, match="empty"):
        search_space(replace(cfg, schedules=()), 1e-3)
    with pytest.raises(ConfigError, match="unknown search"):
        search_space(replace(cfg, search="bayes"), 1e-3)


def test_sweep_without_val_split_fails_before_any_trial(tokens, tmp_path):
    import json

    from jobs.tune_masking import tune_masking

    tokens_dir, tokenizer = tokens
    copy = tmp_path / "tokens"
    import shutil

    shutil.copytree(tokens_dir, copy)
    info = json.loads((copy / "dataset.json").read_text())
    info["split_counts"] = {"train": sum(info["split_counts"].values())}
    (copy / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(EchoPulseError, match="no val split"):
        tune_masking(str(copy), tokenizer, str(tmp_path / "out"), tiny(),
                     f"sqlite:///{tmp_path}/m.db")
    assert not (tmp_path / "out" / "ray").exists()


def test_interrupted_sweep_resumes_and_tracks_on_a_server(tokens, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    from jobs.recipes import get_recipe
    from jobs.tune_masking import tune_masking

    tokens_dir, tokenizer = tokens
    out = tmp_path / "sweep"
    base = [sys.executable, "-m", "echopulse.cli", "tune", "--tokens", str(tokens_dir),
            "--tokenizer", tokenizer, "--trials", "3", "--recipe", "tiny", "--out", str(out),
            "--schedules", "cosine,linear,sqrt", "--no-asha", "--tracking-uri", mlflow_server]
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    client = MlflowClient(tracking_uri=mlflow_server)

    def finished_children() -> list:
        exp = client.get_experiment_by_name("echopulse")
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], "tags.`echopulse.stage` = 'tune_trial'")
        return [r for r in runs if r.info.status == "FINISHED"]

    try:
        deadline = time.time() + 300
        while not finished_children() and time.time() < deadline and proc.poll() is None:
            time.sleep(2)
        assert finished_children(), "no trial finished before the interruption"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    done_before = {r.data.params["trial.schedule"] for r in finished_children()}
    assert 1 <= len(done_before) < 3 or proc.returncode == 0

    recipe = replace(tiny(), tune=replace(tiny().tune, schedules=("cosine", "linear", "sqrt"),
                                          asha=False))
    summary = tune_masking(str(tokens_dir), tokenizer, str(out), recipe, mlflow_server, trials=3,
                           resume=True)
    assert sorted(r["schedule"] for r in summary.trials) == ["cosine", "linear", "sqrt"]

    finished = finished_children()
    schedules = [r.data.params["trial.schedule"] for r in finished]
    assert sorted(schedules) == ["cosine", "linear", "sqrt"]  # the finished trial was not rerun
    parents = {r.data.tags["mlflow.parentRunId"] for r in finished}
    assert parents == {summary.run_id}
    parent = client.get_run(summary.run_id)
    assert parent.data.tags.get("echopulse.stage") == "tune"
    assert "best_val_ce" in parent.data.metrics
    for run in finished:
        assert {"val_ce", "val_acc", "val_ce_r25", "val_ce_r75", "gen_ssim", "gen_psnr", "gen_ecg_sync",
                "gen_s_per_clip"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"best_recipe.json", "trials.csv", "quality_vs_steps.png"} <= artifacts

    with open(summary.table, newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    best = get_recipe(summary.best_recipe)  # a recipe file the train commands take (--recipe FILE)
    assert best.generator.schedule == summary.best["schedule"]
    # the full training of the base recipe at the best trial's learning rate (train generator
    # --recipe FILE runs it like any recipe)
    assert best.name == "tiny-tuned"
    assert best.generator_train == replace(recipe.generator_train, lr=summary.best["lr"])


def test_sampling_orders_axis_and_fewest_steps():
    from jobs.tune_masking import fewest_steps

    cfg = replace(tiny().tune, trials=2, schedules=("cosine",), lr_factors=(1.0,),
                  sampling_orders=("confidence", "halton"))
    assert [t["sampling_order"] for t in search_space(cfg, 1e-3)] == ["confidence", "halton"]
    with pytest.raises(ConfigError, match="decoding order"):
        search_space(replace(cfg, sampling_orders=("raster",)), 1e-3)
    quality = {"gen_ssim_steps4": 0.50, "gen_ecg_sync_steps4": 0.60,
               "gen_ssim_steps8": 0.61, "gen_ecg_sync_steps8": 0.59,
               "gen_ssim_steps12": 0.62, "gen_ecg_sync_steps12": 0.60}
    assert fewest_steps(quality, (4, 8, 12), 0.02) == 8  # 4 steps lose 0.12 SSIM
    assert fewest_steps(quality, (4, 8, 12), 0.2) == 4
    assert fewest_steps({**quality, "gen_ecg_sync_steps8": 0.5}, (4, 8, 12), 0.02) == 12
