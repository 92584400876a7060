"""The whole chain with the tiny recipe in one local Ray session, checking every stage's real output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from echopulse.schema import CLIP_COLUMNS
from jobs.recipes import tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chain(tiny_quickstart):
    return tiny_quickstart


def test_ingest_output_is_clips_v1(chain):
    work, _ = chain
    summary = json.loads((work / "clips" / "summary.json").read_text())
    assert summary["inputs"] == tiny().synth_studies
    assert summary["inputs"] == summary["inputs_with_clips"] + summary["quarantined"]
    table = pq.read_table(work / "clips" / "clips")
    assert table.num_rows == summary["clips"] > 0
    assert tuple(table.column_names) == CLIP_COLUMNS
    frames = table.column("frames").combine_chunks().to_numpy_ndarray()
    clip = tiny().clip
    assert frames.shape[1:] == (clip.frames, clip.size, clip.size)
    assert frames.dtype == np.uint8 and frames.std() > 5  # real pixels, not a blank placeholder
    assert len(set(table.column("clip_id").to_pylist())) == table.num_rows
    info = json.loads((work / "clips" / "dataset.json").read_text())
    assert info["schema"] == "clips/v1" and info["counts"]["clips"] == table.num_rows
    # the demo corpus has studies whose only ECG is the trace on screen; their clips are synchronized
    sources = table.column("ecg_source").to_pylist()
    splits = table.column("split").to_pylist()
    assert ("screen", "train") in set(zip(sources, splits)) and "wfdb" in sources
    assert all(table.column("ecg_sync").to_pylist())
    assert summary["clips_ecg_synchronized"] == table.num_rows and summary["clips_ecg_unsynchronized"] == 0
    tokens = pq.read_table(work / "tokens" / "tokens", columns=["ecg_sync"])
    assert tokens.num_rows > 0 and all(tokens.column("ecg_sync").to_pylist())  # all train the generator


def test_tokens_come_from_the_trained_tokenizer(chain):
    from echopulse.models.checkpoint import load_checkpoint

    work, out = chain
    tokenizer, cfg, tok_info = load_checkpoint(out["tokenizer"], expected_kind="tokenizer")
    tokens = pq.read_table(work / "tokens" / "tokens")
    clips = pq.read_table(work / "clips" / "clips")
    assert tokens.num_rows == clips.num_rows
    assert set(tokens.column("tokenizer_id").to_pylist()) == {tok_info["model_id"]}
    # re-encode one clip with the reloaded checkpoint: the stored tokens are exactly its encoding
    import torch

    clip_ids = clips.column("clip_id").to_pylist()
    frames = clips.column("frames").combine_chunks().to_numpy_ndarray()
    row = tokens.slice(0, 1).to_pylist()[0]
    i = clip_ids.index(row["clip_id"])
    with torch.inference_mode():
        expect = tokenizer.eval().encode(torch.as_tensor(frames[i : i + 1]).float() / 255.0)
    stored = np.asarray(row["tokens"]).reshape(cfg.token_grid)
    np.testing.assert_array_equal(stored, expect[0].numpy())


def test_generator_checkpoint_reloads_and_generates(chain):
    import echopulse

    _, out = chain
    model = echopulse.load(out["generator"])
    ecg = np.random.default_rng(0).standard_normal((12, model.clip.ecg_samples)).astype(np.float32)
    a = model.generate(ecg, seed=1)
    b = model.generate(ecg, seed=1)
    assert a.shape == (model.clip.frames, model.clip.size, model.clip.size) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_generator_guidance_was_picked_on_validation_clips(chain):
    """The exported checkpoint's guidance is the weight its calibration picked, measured on the
    validation split for every candidate; the MLflow run records the same pick."""
    from mlflow import MlflowClient

    _, out = chain
    extra = json.loads((Path(out["generator"]) / "config.json").read_text())["extra"]
    calibration = extra["guidance_calibration"]
    candidates = tiny().sampling.guidance_candidates
    assert calibration["candidates"] == sorted({0.0, *candidates})
    assert len(calibration["scores"]) == len(calibration["candidates"]) and calibration["clips"] >= 2
    assert calibration["picked"] in calibration["candidates"]
    assert extra["sampling"]["guidance"] == calibration["picked"]
    client = MlflowClient(tracking_uri=out["tracking_uri"])
    exp = client.get_experiment_by_name("echopulse")
    run, = [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get("echopulse.stage") == "train_generator"]
    assert run.data.metrics["guidance_picked"] == calibration["picked"]
    assert run.data.metrics["calibration_agreement_g0"] == calibration["scores"][0]


def test_calibrate_command_repicks_a_checkpoints_guidance(chain, tmp_path, capsys):
    import shutil

    from echopulse.cli import main

    work, out = chain
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(out["generator"], ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    del meta["extra"]["guidance_calibration"]  # as a checkpoint from before calibration
    meta["extra"]["sampling"]["guidance"] = 3.0  # an old recipe's weight, not a candidate
    (ckpt / "config.json").write_text(json.dumps(meta))
    rc = main(["calibrate", "--checkpoint", str(ckpt), "--tokens", str(work / "tokens"),
               "--candidates", "1", "--seeds", "1"])
    assert rc == 0
    extra = json.loads((ckpt / "config.json").read_text())["extra"]
    assert extra["guidance_calibration"]["candidates"] == [0.0, 1.0]
    assert extra["sampling"]["guidance"] == extra["guidance_calibration"]["picked"] in (0.0, 1.0)
    assert "<- picked" in capsys.readouterr().out
    # clips are not tokens: one line, exit 2, the checkpoint untouched
    before = (ckpt / "config.json").read_text()
    assert main(["calibrate", "--checkpoint", str(ckpt), "--tokens", str(work / "clips")]) == 2
    assert (ckpt / "config.json").read_text() == before


def test_videos_decode(chain):
    import imageio.v3 as iio
    from PIL import Image

    _, out = chain
    gif, mp4 = (Path(v) for v in out["videos"])
    clip = tiny().clip
    with Image.open(gif) as im:
        n = im.n_frames
        assert abs(im.info["duration"] - 1000 / clip.fps) <= 10
    assert n > clip.frames  # chained windows: long enough to read a heart rate
    frames = iio.imread(mp4, plugin="pyav") if _has_pyav() else iio.imread(mp4)
    assert len(frames) == n
    beat = out["video_heart_rate"]  # from the pixels, against the ECG's (nan: no beat found)
    assert 40 <= beat["ecg_bpm"] <= 150 and isinstance(beat["within_5bpm"], bool)
    assert beat["within_5bpm"] == (abs(beat["video_bpm"] - beat["ecg_bpm"]) <= 5.0)


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def test_mlflow_holds_every_run_with_metrics(chain):
    from mlflow import MlflowClient

    _, out = chain
    client = MlflowClient(tracking_uri=out["tracking_uri"])
    exp = client.get_experiment_by_name("echopulse")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    stages = [r.data.tags.get("echopulse.stage") for r in runs]
    assert stages.count("quickstart") == 1
    assert stages.count("train_tokenizer") == 1 and stages.count("train_generator") == 1
    assert stages.count("tune") == 1 and stages.count("tune_trial") >= 2
    for r in runs:  # a trial ASHA stopped early is closed as KILLED, everything else finished
        expected = {"FINISHED", "KILLED"} if r.data.tags.get("echopulse.stage") == "tune_trial" \
            else {"FINISHED"}
        assert r.info.status in expected, (r.data.tags.get("echopulse.stage"), r.info.status)
    by_stage = {r.data.tags.get("echopulse.stage"): r for r in runs}
    tune_parent = by_stage["tune"].info.run_id
    trials = [r for r in runs if r.data.tags.get("echopulse.stage") == "tune_trial"]
    assert all(r.data.tags.get("mlflow.parentRunId") == tune_parent for r in trials)
    assert all("val_ce" in r.data.metrics for r in trials)
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert finished and all("gen_ssim" in r.data.metrics for r in finished)
    # training really learned: the logged loss falls
    for stage in ("train_tokenizer", "train_generator"):
        history = client.get_metric_history(by_stage[stage].info.run_id, "loss")
        assert len(history) >= 2
        ordered = sorted(history, key=lambda m: m.step)
        assert ordered[-1].value < ordered[0].value, stage


def test_tune_wrote_a_loadable_best_recipe(chain):
    from jobs.recipes import get_recipe

    _, out = chain
    best = get_recipe(out["tune"]["best_recipe"])
    assert best.generator.schedule == out["tune"]["best_schedule"]
    assert Path(out["tune"]["trials_csv"]).read_text().count("\n") >= 3  # header + 2 trials
