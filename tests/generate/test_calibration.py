"""Guidance picked per model on validation clips (echopulse.calibration) and the pixel score it uses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from echopulse.calibration import calibrate_checkpoint, calibrate_guidance, pick_weight
from echopulse.config import SamplingConfig, from_dict
from echopulse.metrics import motion_agreement


def pulsing_disc(bpm: float, phase: float = 0.0, frames: int = 12, fps: float = 10.0, size: int = 32,
                 offset: float = 0.0) -> np.ndarray:
    """A bright sector-like square with a dark disc whose radius beats at ``bpm`` (pixels only)."""
    t = np.arange(frames) / fps
    radius = 6 + 3 * np.sin(2 * np.pi * bpm / 60 * t + phase)
    yy, xx = np.mgrid[:size, :size] - size / 2
    video = np.full((frames, size, size), 0.6 + offset)
    for k, r in enumerate(radius):
        video[k][np.hypot(yy, xx) < r] = 0.1 + offset
    video[:, :2] = 0.0  # a black border outside the "sector"
    return video


def test_motion_agreement_follows_the_reference_motion_not_its_look():
    ref = pulsing_disc(60)
    assert motion_agreement(ref, ref) == pytest.approx(1.0)
    assert motion_agreement(pulsing_disc(60, offset=0.2), ref) > 0.99  # brighter, same motion
    assert motion_agreement(pulsing_disc(60, phase=np.pi), ref) < -0.9  # half a beat late
    assert abs(motion_agreement(pulsing_disc(150, phase=1.0), ref)) < 0.5  # another rate
    still = np.repeat(ref[:1], len(ref), axis=0)
    assert motion_agreement(still, ref) == 0.0
    assert np.isnan(motion_agreement(ref, still))  # nothing to follow


def test_motion_agreement_skips_the_given_frames():
    ref = pulsing_disc(60)
    late = pulsing_disc(60, phase=np.pi)
    late[:2] = ref[:2]  # the primed frames are copies of the reference
    assert motion_agreement(late, ref, first=2) < motion_agreement(late, ref, first=0)


def test_a_weight_is_picked_only_when_it_beats_g0_beyond_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, 40)
    clear = base + 0.08 + rng.normal(0, 0.05, 40)  # +0.08, about 11 standard errors
    noisy = base + 0.01 + rng.normal(0, 0.2, 40)  # +0.01 in noise of 0.03
    worse = base - 0.1
    picked, gains, se = pick_weight((0.0, 0.5, 1.0, 2.0), np.stack([base, noisy, clear, worse]))
    assert picked == 1.0
    assert gains[2] > 2 * se[2] and gains[3] < 0
    assert pick_weight((0.0, 0.5), np.stack([base, noisy]))[0] == 0.0
    assert pick_weight((0.0, 1.0, 2.0), np.stack([base, worse, worse]))[0] == 0.0
    # of two weights that both beat g=0, the better-scoring one
    assert pick_weight((0.0, 1.0, 2.0), np.stack([base, clear, clear + 0.05]))[0] == 2.0


def _val_rows(checkpoint, clips_dataset, n=8):
    import pyarrow.parquet as pq

    from echopulse.models.checkpoint import load_checkpoint
    from echopulse.schema import tensor_column_to_numpy

    table = pq.read_table(clips_dataset / "clips" / "part-0.parquet")
    frames = torch.as_tensor(np.array(tensor_column_to_numpy(table.column("frames"))))[:n]
    ecg = np.array(tensor_column_to_numpy(table.column("ecg")), dtype=np.float32)[:n]
    tokenizer, _, _ = load_checkpoint(checkpoint / "tokenizer", expected_kind="tokenizer")
    with torch.no_grad():
        tokens = tokenizer.encode(frames).reshape(len(frames), -1).numpy()
    # as a Parquet read hands them over: one flat ECG list per row
    return {"tokens": tokens, "ecg": ecg.reshape(len(ecg), -1)}


def test_calibration_writes_the_picked_weight_into_the_checkpoint(tiny_checkpoint, clips_dataset, tmp_path):
    import echopulse

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["extra"]["sampling"]["guidance"] = 7.0  # a weight no candidate has: the pick must replace it
    meta["extra"]["sampling"]["guidance_candidates"] = [0.0, 1.0]
    (ckpt / "config.json").write_text(json.dumps(meta))
    result = calibrate_checkpoint(str(ckpt), _val_rows(ckpt, clips_dataset))
    assert result.candidates == (0.0, 1.0) and result.picked in (0.0, 1.0)
    assert result.clips >= 2 and all(-1.0 <= s <= 1.0 for s in result.scores)
    extra = json.loads((ckpt / "config.json").read_text())["extra"]
    assert extra["sampling"]["guidance"] == result.picked
    assert extra["guidance_calibration"]["scores"] == list(result.scores)
    assert echopulse.load(str(ckpt)).sampling.guidance == result.picked  # the model's default now
    # same weights, same id: only the metadata changed
    assert extra["tokenizer_id"] == meta["extra"]["tokenizer_id"]


def test_calibration_scores_each_weight_from_its_own_draws(tiny_checkpoint, clips_dataset):
    """The score of a weight is what that weight's videos measure: drawing at g=0 twice over gives
    the same score, and a different weight a different one."""
    from echopulse.models.checkpoint import load_checkpoint

    generator, _, info = load_checkpoint(tiny_checkpoint, expected_kind="generator")
    tokenizer, _, _ = load_checkpoint(tiny_checkpoint / "tokenizer", expected_kind="tokenizer")
    rows = _val_rows(tiny_checkpoint, clips_dataset)
    sampling = from_dict(SamplingConfig, {**info["extra"]["sampling"], "guidance_candidates": (0.0, 3.0),
                                          "calibration_seeds": 1})
    ecg = rows["ecg"].reshape(len(rows["ecg"]), 12, -1)
    first = calibrate_guidance(generator, tokenizer, rows["tokens"], ecg, sampling)
    again = calibrate_guidance(generator, tokenizer, rows["tokens"], ecg, sampling)
    assert first.scores == again.scores
    assert first.scores[0] != first.scores[1]


def test_calibration_needs_two_validation_clips(tiny_checkpoint, clips_dataset):
    from echopulse.models.checkpoint import load_checkpoint

    generator, _, info = load_checkpoint(tiny_checkpoint, expected_kind="generator")
    tokenizer, _, _ = load_checkpoint(tiny_checkpoint / "tokenizer", expected_kind="tokenizer")
    rows = _val_rows(tiny_checkpoint, clips_dataset, n=1)
    sampling = from_dict(SamplingConfig, info["extra"]["sampling"])
    with pytest.raises(ValueError, match="two validation clips"):
        calibrate_guidance(generator, tokenizer, rows["tokens"], rows["ecg"].reshape(1, 12, -1), sampling)


def test_no_candidates_leaves_the_checkpoint_alone(tiny_checkpoint, clips_dataset, tmp_path):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["extra"]["sampling"]["guidance_candidates"] = []
    (ckpt / "config.json").write_text(json.dumps(meta))
    before = (ckpt / "config.json").read_text()
    assert calibrate_checkpoint(str(ckpt), _val_rows(ckpt, clips_dataset)) is None
    assert (ckpt / "config.json").read_text() == before


@pytest.mark.parametrize("rows", [8, 1])
def test_finished_training_calibrates_in_a_ray_task_or_keeps_the_model(ray_session, tiny_checkpoint, clips_dataset,
                                                                       tmp_path, rows):
    """What ``train generator`` does to its exported checkpoint: bundle the tokenizer, then
    calibrate in a Ray task; a calibration that cannot run (one validation clip) leaves the
    checkpoint whole, at the recipe's weight, and says why."""
    import ray

    from jobs.recipes import tiny
    from jobs.train_generator import finish_checkpoint

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, ckpt, ignore=shutil.ignore_patterns("tokenizer"))
    val_rows = _val_rows(tiny_checkpoint, clips_dataset, n=rows)
    val = ray.data.from_items([{"tokens": t, "ecg": e} for t, e in zip(val_rows["tokens"], val_rows["ecg"])])
    found: dict = {}
    finish_checkpoint(str(tiny_checkpoint / "tokenizer"), val, tiny(), found)(str(ckpt))
    assert (ckpt / "tokenizer" / "config.json").is_file()  # bundled either way
    extra = json.loads((ckpt / "config.json").read_text())["extra"]
    if rows == 1:
        assert "two validation clips" in found["calibration_error"] and "calibration" not in found
        assert "guidance_calibration" not in extra and extra["sampling"]["guidance"] == tiny().sampling.guidance
    else:
        assert 2 <= found["calibration"].clips <= rows  # clips whose real motion can be followed
        assert extra["guidance_calibration"]["picked"] == extra["sampling"]["guidance"] == found["calibration"].picked
