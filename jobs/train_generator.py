"""Train the ECG-conditioned MaskGIT generator with Ray Train on a ``tokens/v1`` dataset.

The finished checkpoint bundles the tokenizer it was trained against (``checkpoint/tokenizer/``),
so ``echopulse generate --checkpoint`` needs nothing else. ``jobs/tune_masking.py`` reuses
``generator_loop`` and ``build_generator_trainer`` for every trial.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from echopulse import storage
from echopulse.config import Recipe, from_dict, to_dict
from echopulse.errors import EchoPulseError
from echopulse.schema import TOKENS_SCHEMA
from jobs.train_common import (
    CachedBatches,
    TrainResult,
    export_checkpoint,
    fail_marker,
    latest_checkpoint,
    repeat_batches,
    run_config,
    run_name,
    scaling,
    train_worker_loop,
)

log = logging.getLogger(__name__)

# fixed mask ratios, so validation numbers compare across masking schedules; val_ce / val_acc are
# at the first, the others are reported as val_ce_r25 / val_acc_r75 and so on
VAL_MASK_RATIOS = (0.5, 0.25, 0.75)


def generator_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop for the generator."""
    import ray.train
    import ray.train.torch
    import torch

    from echopulse.models.checkpoint import save_checkpoint, unwrap
    from echopulse.models.generator import MaskGIT
    from echopulse.tracking import RunLogger
    from echopulse.training.steps import generator_eval_step, generator_train_step

    recipe = from_dict(Recipe, config["recipe"])
    train = recipe.generator_train
    ctx = ray.train.get_context()
    torch.manual_seed(train.seed)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(MaskGIT(recipe.generator))
    logger = RunLogger(config["tracking_uri"], config["run_id"] if ctx.get_world_rank() == 0 else None)
    per_worker = max(1, train.batch_size // ctx.get_world_size())
    batches = repeat_batches(ray.train.get_dataset_shard("train"), per_worker, device,
                             seed=train.seed + ctx.get_world_rank())
    val_shard = ray.train.get_dataset_shard("val")

    val_batches = CachedBatches(val_shard, per_worker, device)

    def validate(step: int, _: dict[str, float]) -> dict[str, float]:
        # every logged step reports val metrics, so Tune schedulers can compare trials early
        unwrap(model).eval()
        totals: dict[str, float] = {}
        n = 0
        for batch in val_batches:
            k = len(batch["tokens"])
            for i, ratio in enumerate(VAL_MASK_RATIOS):
                m = generator_eval_step(unwrap(model), batch, mask_ratio=ratio,
                                        generator=torch.Generator().manual_seed(n))
                suffix = "" if i == 0 else f"_r{round(ratio * 100)}"
                for key, value in m.items():
                    totals[key + suffix] = totals.get(key + suffix, 0.0) + value * k
            n += k
        unwrap(model).train()
        return {f"val_{k}": v / max(n, 1) for k, v in totals.items()}

    extra = {"tokenizer_id": config["tokenizer_id"], "clip": to_dict(recipe.clip),
             "sampling": to_dict(recipe.sampling)}
    train_worker_loop(model=model, train=train, step_fn=generator_train_step, batches=batches,
                      logger=logger, on_log=validate, fail_marker=config.get("fail_marker"),
                      resume_from=config.get("resume_from"),
                      save=lambda d: save_checkpoint(unwrap(model), recipe.generator, d,
                                                     kind="generator", extra=extra))


def check_tokens_info(tokens: str, recipe: Recipe) -> dict[str, Any]:
    """Read a ``tokens/v1`` dataset's description and check it against the recipe (no Ray)."""
    from pipelines.common import read_dataset_info

    info = read_dataset_info(tokens, TOKENS_SCHEMA)
    grid = tuple(info.get("token_grid", ()))
    if grid != tuple(recipe.generator.token_grid):
        raise EchoPulseError(f"{tokens}: token grid {grid} does not match the recipe's generator "
                             f"grid {tuple(recipe.generator.token_grid)}")
    if info.get("codebook_size") != recipe.generator.vocab_size:
        raise EchoPulseError(f"{tokens}: codebook size {info.get('codebook_size')} does not match "
                             f"the recipe's vocab size {recipe.generator.vocab_size}")
    if not info.get("split_counts", {}).get("train"):
        raise EchoPulseError(f"{tokens}: no train split rows")
    return info


def tokens_datasets(tokens: str, recipe: Recipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and val Ray datasets of a ``tokens/v1`` dataset, checked against the recipe."""
    from pipelines.common import read_parquet_dir

    info = check_tokens_info(tokens, recipe)
    ds = read_parquet_dir(storage.join(tokens, "tokens")).select_columns(["tokens", "ecg", "split"])
    train = ds.filter(lambda r: r["split"] == "train").select_columns(["tokens", "ecg"])
    if info["split_counts"].get("val"):
        val = ds.filter(lambda r: r["split"] == "val").select_columns(["tokens", "ecg"])
    else:
        log.warning("%s: no val split; validating on train rows", tokens)
        val = train
    return {"train": train, "val": val}, info


def check_tokenizer(tokens_info: dict[str, Any], tokenizer: str) -> dict[str, Any]:
    """The tokenizer checkpoint's info; refuses tokens made by another tokenizer."""
    from echopulse.models.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        _, _, info = load_checkpoint(storage.local_copy(tokenizer, tmp), expected_kind="tokenizer")
    if tokens_info.get("tokenizer_id") != info["model_id"]:
        raise EchoPulseError(
            f"tokens were made by tokenizer {tokens_info.get('tokenizer_id')}, "
            f"but {tokenizer} is tokenizer {info['model_id']}")
    return info


def build_generator_trainer(datasets: dict[str, Any], recipe: Recipe, tokenizer_id: str,
                            tracking_uri: str, run_id: str | None, name: str, out: str,
                            workers: int | None = None, use_gpu: bool | None = None,
                            callbacks: list | None = None, resume_from: str | None = None):
    """The ``TorchTrainer`` for one generator training (shared by training and Tune trials).

    Ray keeps the run under ``out``; ``resume_from`` is an earlier run's checkpoint to continue
    from (:func:`jobs.train_common.latest_checkpoint`).
    """
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        generator_loop,
        train_loop_config={"recipe": to_dict(recipe), "tracking_uri": tracking_uri,
                           "run_id": run_id, "tokenizer_id": tokenizer_id,
                           "fail_marker": fail_marker(out, name),
                           "resume_from": resume_from},
        scaling_config=scaling(workers or recipe.generator_train.workers, use_gpu),
        run_config=run_config(name, out, recipe.generator_train, callbacks),
        datasets=datasets,
    )


def bundle_tokenizer(tokenizer: str):
    """A function that copies the tokenizer checkpoint into a generator checkpoint directory."""

    def add(checkpoint_dir: str) -> None:
        target = os.path.join(checkpoint_dir, "tokenizer")
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(storage.local_copy(tokenizer, tmp), target)

    return add


def train_generator(tokens: str, tokenizer: str, out: str, recipe: Recipe, tracking_uri: str,
                    workers: int | None = None, use_gpu: bool | None = None,
                    parent_run_id: str | None = None) -> TrainResult:
    """Train the generator on ``tokens`` and write ``OUT/checkpoint`` (tokenizer bundled).

    Args:
        tokens: a ``tokens/v1`` dataset (tokenize output).
        tokenizer: the tokenizer checkpoint the tokens came from (checked by id).
        out: output directory or URI.
        recipe: the run recipe (``generator``, ``generator_train``, ``sampling``, ``clip``).
        tracking_uri: MLflow tracking URI.
        workers: Ray Train workers (default: the recipe's).
        use_gpu: one GPU per worker (default: when CUDA is available).
        parent_run_id: nest the MLflow run under this one.
    """
    from echopulse.runtime import init_ray
    from echopulse.tracking import RunLogger, create_run

    tok_info = check_tokenizer(check_tokens_info(tokens, recipe), tokenizer)
    resume_from = latest_checkpoint(out, to_dict(recipe.generator))
    init_ray()
    datasets, _ = tokens_datasets(tokens, recipe)
    storage.makedirs(out)
    name = run_name("generator")
    run_id = create_run(tracking_uri, name, {"recipe": to_dict(recipe), "tokens": tokens,
                                             "tokenizer": tokenizer, "out": out},
                        parent_run_id=parent_run_id, tags={"echopulse.stage": "train_generator"})
    logger = RunLogger(tracking_uri, run_id)
    trainer = build_generator_trainer(datasets, recipe, tok_info["model_id"], tracking_uri, run_id,
                                      name, out, workers, use_gpu, resume_from=resume_from)
    try:
        result = trainer.fit()
        checkpoint = export_checkpoint(result, out, add=bundle_tokenizer(tokenizer))
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.set_tag("checkpoint_uri", checkpoint)
    logger.finish()
    return TrainResult(checkpoint=checkpoint, metrics=dict(result.metrics or {}), run_id=run_id)
