"""Issue 5, test (a): 2 DDP workers on CPU (gloo) reproduce the loss curve of 1 worker with the
same global batch.

Why the comparison is meaningful: the tokenizer's loss is deterministic (FSQ, no dropout, no random
masks), and the train split is exactly one global batch (8 clips, ``batch_size`` 8). One worker
steps on all 8 clips each step; each of 2 workers gets an equal Ray Data shard of 4 clips (Train's
``streaming_split(equal=True)``), so the union of their per-rank batches is the 1-worker batch
whatever the split, and DDP's mean of the two half-batch gradients is the full-batch gradient
(MSE is a mean of per-clip means, equal sizes). The logged loss is the mean over ranks.

Tolerance: relative 1e-3 per step. What differs is only float32 summation order (one 8-clip
reduction vs two 4-clip ones plus gloo's all-reduce), ~1e-7 relative per step; Adam's first steps
(~lr * sign(g)) can flip near-zero gradient elements, which moves the loss far less than 1e-3 over
a few steps. Ranks stepping on their own half-batch gradients (no all-reduce), or batches that
are not the 1-worker batch, move it by percent: the curve itself moves by ~20% over the 5 steps,
which the test checks, so the tolerance can tell them apart. (A sum instead of a mean of the
ranks' gradients would pass: Adam is invariant to the gradient's scale, so the curve is too.)
"""

from __future__ import annotations

import numpy as np
import pytest

from echopulse.config import replace
from jobs.recipes import tiny

pytestmark = pytest.mark.integration

CLIPS = 8
RTOL = 1e-3


def _write_clips(root, n: int, seed: int = 0) -> str:
    """A small clips/v1 dataset (all train) of smooth moving patterns, without Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from echopulse.schema import CLIPS_SCHEMA, clip_schema
    from echopulse.schema import write_dataset_info

    clip = tiny().clip
    rng = np.random.default_rng(seed)
    t = np.arange(clip.frames)[:, None, None]
    y, x = np.mgrid[0 : clip.size, 0 : clip.size]
    frames = np.stack([
        127.5 + 120 * np.sin(x / rng.uniform(2, 6) + y / rng.uniform(2, 6) + t * rng.uniform(0.2, 1.0)
                             + rng.uniform(0, 6.28))
        for _ in range(n)]).astype(np.uint8)
    ecg = rng.standard_normal((n, 12, clip.ecg_samples)).astype(np.float32)
    schema = clip_schema(clip.frames, clip.size, clip.ecg_samples)
    columns = {
        "clip_id": [f"clip-{i}" for i in range(n)], "study_key": [f"s{i}" for i in range(n)],
        "split": ["train"] * n, "view": ["A4C"] * n,
        "frames": pa.FixedShapeTensorArray.from_numpy_ndarray(frames),
        "fps": [clip.fps] * n, "ecg": pa.FixedShapeTensorArray.from_numpy_ndarray(ecg),
        "ecg_leads": [[True] * 12] * n, "ecg_source": ["synthetic"] * n, "ecg_sync": [True] * n,
        "heart_rate_bpm": [60.0] * n, "r_peaks": [[0]] * n, "t_start_s": [0.0] * n,
        "t_end_s": [clip.seconds] * n, "ef": [0.6] * n, "source_uri": [f"mem://{i}" for i in range(n)],
        "provenance": ["test_ddp"] * n,
    }
    table = pa.Table.from_arrays([pa.array(columns[f.name], type=f.type)
                                  if not isinstance(columns[f.name], pa.Array) else columns[f.name]
                                  for f in schema], schema=schema)
    out = root / "clips"
    (out / "clips").mkdir(parents=True)
    pq.write_table(table, out / "clips" / "part-0.parquet")
    write_dataset_info(str(out), CLIPS_SCHEMA, config={}, counts={"clips": n},
                       split_counts={"train": n})
    return str(out)


def _curve(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    return sorted((int(m.step), m.value) for m in history)


def _world(uri: str, run_id: str) -> set[float]:
    from mlflow import MlflowClient

    return {m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "world_size")}


def test_two_ddp_workers_reproduce_one_worker_loss_curve(tmp_path, ray_session, monkeypatch):
    from jobs.train_tokenizer import train_tokenizer

    clips = _write_clips(tmp_path, CLIPS)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # mlflow.set_tracking_uri (called by echopulse.tracking) exports MLFLOW_TRACKING_URI; undo it
    # after the test so later tests' default tracking URI is not this one
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train = replace(tiny().tokenizer_train, steps=5, batch_size=CLIPS, log_every=1, warmup_steps=1,
                    checkpoint_every=0, val_every=5, sample_every=0, ema_decay=0.0, grad_accum=1)
    recipe = replace(tiny(), tokenizer_train=train)
    one = train_tokenizer(clips, str(tmp_path / "w1"), recipe, uri, workers=1, use_gpu=False)
    two = train_tokenizer(clips, str(tmp_path / "w2"), recipe, uri, workers=2, use_gpu=False)

    assert _world(uri, one.run_id) == {1.0} and _world(uri, two.run_id) == {2.0}
    a, b = _curve(uri, one.run_id), _curve(uri, two.run_id)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 6))
    losses_1, losses_2 = np.array([v for _, v in a]), np.array([v for _, v in b])
    # the curve moves far more than the tolerance, so a wrong gradient average would show
    assert np.ptp(losses_1) > 20 * RTOL * losses_1.max()
    print("1 worker:", losses_1.tolist(), "2 workers:", losses_2.tolist(),
          "max rel diff:", float(np.max(np.abs(losses_2 - losses_1) / losses_1)))
    np.testing.assert_allclose(losses_2, losses_1, rtol=RTOL)
