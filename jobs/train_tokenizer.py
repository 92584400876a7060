"""Train the video tokenizer with Ray Train (``TorchTrainer``; DDP over ``workers``).

Reads the train split of a ``clips/v1`` dataset (validating on its val split); writes
``OUT/checkpoint`` (safetensors + JSON; the EMA weights when EMA is on) and logs one MLflow run
(params, the config, per-step metrics, validation PSNR/SSIM/MSE, reconstruction GIFs, the
checkpoint's files and URI).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from echopulse import storage
from echopulse.config import Recipe, from_dict, to_dict
from echopulse.errors import EchoPulseError
from echopulse.schema import CLIPS_SCHEMA
from echopulse.training.loop import gather_mean
from jobs import preflight
from jobs.train_common import (CachedBatches, TrainResult, augmented_batches, data_config, export_checkpoint,
                               fail_marker, latest_checkpoint, log_config_artifact, log_outcome, micro_batch_size,
                               repeat_batches, ray_train_runtime, run_config, run_name, scaling, train_worker_loop)

log = logging.getLogger(__name__)

# checkpoints are ranked (best K kept) by validation PSNR of the reconstructions
SCORE = ("val_psnr", "max")
SAMPLE_CLIPS = 2  # clips in each reconstruction GIF (original above, reconstruction below)


def reconstruction_gif(video, recon, fps: float, path: str) -> str:
    """Originals (top row) and reconstructions (bottom row) of up to :data:`SAMPLE_CLIPS` clips,
    ``(b, t, h, w)`` in [0, 1], as one GIF."""
    import numpy as np

    from echopulse.video_out import write_video

    a = video[:SAMPLE_CLIPS].float().cpu().numpy()
    b = recon[:SAMPLE_CLIPS].float().cpu().numpy()
    grid = np.concatenate([np.concatenate(list(a), axis=2), np.concatenate(list(b), axis=2)], axis=1)
    frames = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)  # (t, 2h, n*w)
    write_video(frames, fps, path, upscale=max(1, 128 // frames.shape[1]))
    return path


def tokenizer_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop: the model file knows nothing of this."""
    import torch

    from echopulse.models.checkpoint import save_checkpoint, unwrap
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.tracking import RunLogger
    from echopulse.training.steps import tokenizer_train_step, tokenizer_val_step

    recipe = from_dict(Recipe, config["recipe"])
    train = recipe.tokenizer_train
    runtime = ray_train_runtime()
    torch.manual_seed(train.seed)
    model = runtime.prepare_model(VideoTokenizer(recipe.tokenizer))
    logger = RunLogger(config["tracking_uri"], config["run_id"] if runtime.rank == 0 else None)
    device = runtime.device
    per_worker = micro_batch_size(train, runtime.world)
    batches = repeat_batches(runtime.dataset("train"), per_worker, device, seed=train.seed + runtime.rank)
    if train.augment:
        batches = augmented_batches(batches, seed=train.seed + runtime.rank)
    val_batches = CachedBatches(runtime.dataset("val"), per_worker, device)

    def validate(step: int) -> dict[str, float]:
        """Reconstruction quality over this rank's val shard, combined over ranks."""
        sums: dict[str, float] = {}
        n = 0
        for batch in val_batches:
            metrics, _ = tokenizer_val_step(model, batch)
            k = len(batch["frames"])
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * k
            n += k
        return {f"val_{k}": v for k, v in gather_mean(sums, n).items()}

    def sample(step: int, directory: str) -> list[str]:
        batch = val_batches.first  # from the last validation (all ranks read the shard there)
        if batch is None:
            return []
        batch = {k: v[:SAMPLE_CLIPS] for k, v in batch.items()}
        _, recon = tokenizer_val_step(model, batch)
        video = batch["frames"].float() / 255.0
        return [reconstruction_gif(video, recon, recipe.clip.fps,
                                   os.path.join(directory, f"reconstruction_step{step:07d}.gif"))]

    train_worker_loop(runtime=runtime, model=model, train=train, step_fn=tokenizer_train_step, batches=batches,
                      logger=logger, validate=validate, sample=sample,
                      fail_marker=config.get("fail_marker"),
                      resume_from=config.get("resume_from"),
                      save=lambda d: save_checkpoint(unwrap(model), recipe.tokenizer, d,
                                                     kind="tokenizer",
                                                     extra={"clip": to_dict(recipe.clip)}))


def split_counts(clips: str) -> dict[str, int]:
    """Clips per split of a ``clips/v1`` dataset (its split column alone, read without Ray)."""
    from collections import Counter

    from pipelines.common import read_columns

    counts: Counter = Counter()
    for batch in read_columns(storage.join(clips, "clips"), ["split"]):
        counts.update(batch.column("split").to_pylist())
    return dict(counts)


def clips_dataset(clips: str, split: str = "train", counts: dict[str, int] | None = None):
    """The clips' frames for one split (all clips when that split is empty); ``counts``: the
    dataset's :func:`split_counts` when the caller has them."""
    from ray.data.expressions import col

    from pipelines.common import read_parquet_dir

    counts = split_counts(clips) if counts is None else counts
    if not sum(counts.values()):
        raise EchoPulseError(f"{clips}: the clips dataset is empty")
    ds = read_parquet_dir(storage.join(clips, "clips")).select_columns(["frames", "split"])
    if counts.get(split, 0):
        picked = ds.filter(expr=col("split") == split)  # an Arrow filter, no Python per row
    else:
        log.warning("%s: no %r clips; using all clips for %s", clips, split, split)
        picked = ds
    return picked.select_columns(["frames"])


def train_tokenizer(clips: str, out: str, recipe: Recipe, tracking_uri: str,
                    workers: int | None = None, use_gpu: bool | None = None,
                    parent_run_id: str | None = None) -> TrainResult:
    """Train the tokenizer on ``clips`` and write ``OUT/checkpoint``.

    Args:
        clips: a ``clips/v1`` dataset (ingest output).
        out: output directory or URI.
        recipe: the run recipe (its ``tokenizer`` and ``tokenizer_train`` parts are used).
        tracking_uri: MLflow tracking URI.
        workers: Ray Train workers (default: the recipe's).
        use_gpu: one GPU per worker (default: when CUDA is available).
        parent_run_id: nest the MLflow run under this one.
    """
    from ray.train.torch import TorchTrainer

    from echopulse.runtime import init_ray
    from echopulse.registry import publish_training_run
    from echopulse.tracking import RunLogger, create_run, log_dataset_inputs, system_metrics

    if recipe.clip.frames != recipe.tokenizer.frames or recipe.clip.size != recipe.tokenizer.image_size:
        raise EchoPulseError("recipe mismatch: clip geometry differs from the tokenizer's input")
    from echopulse.schema import read_dataset_info

    read_dataset_info(clips, CLIPS_SCHEMA)  # a bad path fails here, before Ray starts
    preflight.tokenizer_job(clips, out, recipe)  # empty/wrong-schema clips, unwritable out
    resume_from = latest_checkpoint(out, to_dict(recipe.tokenizer))
    init_ray()
    counts = split_counts(clips)
    datasets = {"train": clips_dataset(clips, "train", counts), "val": clips_dataset(clips, "val", counts)}
    storage.makedirs(out)
    name = run_name("tokenizer")
    run_id = create_run(tracking_uri, name, {"recipe": to_dict(recipe), "clips": clips, "out": out},
                        parent_run_id=parent_run_id, tags={"echopulse.stage": "train_tokenizer"})
    logger = RunLogger(tracking_uri, run_id)
    log_config_artifact(logger, {"recipe": to_dict(recipe), "clips": clips, "out": out})
    trainer = TorchTrainer(
        tokenizer_loop,
        train_loop_config={"recipe": to_dict(recipe), "tracking_uri": tracking_uri, "run_id": run_id,
                           "fail_marker": fail_marker(out, name),
                           "resume_from": resume_from},
        scaling_config=scaling(workers or recipe.tokenizer_train.workers, use_gpu),
        dataset_config=data_config(workers or recipe.tokenizer_train.workers),
        run_config=run_config(name, out, recipe.tokenizer_train, score=SCORE),
        datasets=datasets,
    )
    log_dataset_inputs(tracking_uri, run_id, clips)  # lineage: clips -> manifest
    try:
        with system_metrics(tracking_uri, run_id):
            result = trainer.fit()
        checkpoint = export_checkpoint(result, out)
    except BaseException:
        logger.finish("FAILED")
        raise
    log_outcome(logger, checkpoint, result, SCORE)
    publish_training_run(tracking_uri, run_id, result, checkpoint, kind="tokenizer")
    logger.finish()
    return TrainResult(checkpoint=checkpoint, metrics=dict(result.metrics or {}), run_id=run_id)

