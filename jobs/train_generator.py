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
from typing import Any, Callable

from echopulse import storage
from echopulse.config import Recipe, from_dict, to_dict
from echopulse.errors import EchoPulseError
from echopulse.training.loop import gather_mean
from jobs import preflight
from jobs.datasets import check_tokens_info, ecg_counts, tokens_datasets
from jobs.train_common import (CachedBatches, TrainResult, WorkerRuntime, data_config, export_checkpoint,
                               fail_marker, latest_checkpoint, log_config_artifact, log_outcome, micro_batch_size,
                               ray_train_runtime, repeat_batches, run_config, run_name, scaling,
                               train_worker_loop)

log = logging.getLogger(__name__)

# fixed mask ratios, so validation numbers compare across masking schedules; val_ce / val_acc are
# at the first, the others are reported as val_ce_r25 / val_acc_r75 and so on
VAL_MASK_RATIOS = (0.5, 0.25, 0.75)
# checkpoints are ranked (best K kept) by validation cross-entropy at mask ratio 0.5
SCORE = ("val_ce", "min")
SAMPLE_CLIPS = 2  # clips in each generation GIF (tokenizer decoding of the real tokens above)


def generation_gif(tokenizer, real_tokens, generated, fps: float, path: str) -> str:
    """The tokenizer's decoding of the real tokens (top row) and of the generated ones (bottom)."""
    import numpy as np
    import torch

    from echopulse.video_out import write_video

    with torch.no_grad():
        real = tokenizer.decode_from_indices(real_tokens.long().cpu()).numpy()
        fake = tokenizer.decode_from_indices(generated.long().cpu()).numpy()
    grid = np.concatenate([np.concatenate(list(real), axis=2), np.concatenate(list(fake), axis=2)], axis=1)
    frames = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    write_video(frames, fps, path, upscale=max(1, 128 // frames.shape[1]))
    return path


def make_validate(model, val_batches) -> Callable[[int], dict[str, float]]:
    """Validation cross-entropy / accuracy at the fixed mask ratios, combined over ranks."""
    import torch

    from echopulse.models.checkpoint import unwrap
    from echopulse.training.steps import generator_eval_step

    def validate(step: int) -> dict[str, float]:
        # with val_every 0 every logged step reports val metrics, so Tune schedulers can compare
        # trials early; masks are seeded per batch so evaluations compare across steps
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
        return {f"val_{k}": v for k, v in gather_mean(totals, n).items()}


    return validate


def make_sample(model, config: dict[str, Any], recipe: Recipe, val_batches) -> Callable[[int, str], list[str]]:
    """A generation GIF from the first val clips' ECGs, decoded by the tokenizer (rank 0)."""
    import torch

    from echopulse.models.checkpoint import unwrap

    tokenizer_cache: dict[str, Any] = {}

    def sample(step: int, directory: str) -> list[str]:
        """Generations from the first val clips' ECGs, decoded by the tokenizer (rank 0)."""
        from echopulse.models.checkpoint import load_checkpoint
        from echopulse.training.steps import generator_conditions

        if not config.get("tokenizer_path"):
            return []
        batch = val_batches.first  # from the last validation (all ranks read the shard there)
        if batch is None:
            return []
        if "model" not in tokenizer_cache:
            with tempfile.TemporaryDirectory() as tmp:
                tok, _, _ = load_checkpoint(storage.local_copy(config["tokenizer_path"], tmp),
                                            expected_kind="tokenizer")
            tokenizer_cache["model"] = tok.eval()
        s = recipe.sampling
        bare = unwrap(model)
        bare.eval()
        try:
            with torch.no_grad():
                first = {k: v[:SAMPLE_CLIPS] for k, v in batch.items()}
                generated = bare.generate(first["ecg"].float(), steps=s.steps,
                                          guidance=s.guidance, temperature=s.temperature,
                                          schedule=s.schedule, order=s.order, seed=step,
                                          **generator_conditions(bare, first, first["ecg"].device))
        finally:
            bare.train()
        grid = tuple(recipe.generator.token_grid)
        real = batch["tokens"][:SAMPLE_CLIPS].reshape(-1, *grid)
        return [generation_gif(tokenizer_cache["model"], real, generated.reshape(-1, *grid),
                               recipe.clip.fps, os.path.join(directory, f"generation_step{step:07d}.gif"))]


    return sample


def generator_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop for the generator."""
    generator_worker(config, ray_train_runtime())


def generator_worker(config: dict[str, Any], runtime: WorkerRuntime) -> None:
    """Train the generator on this worker (a Ray Train worker, or a single-worker Tune trial)."""
    import torch

    from echopulse.models.checkpoint import save_checkpoint, unwrap
    from echopulse.models.generator import MaskGIT
    from echopulse.tracking import RunLogger
    from echopulse.training.steps import generator_train_step

    recipe = from_dict(Recipe, config["recipe"])
    train = recipe.generator_train
    torch.manual_seed(train.seed)
    device = runtime.device
    generator = MaskGIT(recipe.generator)
    if recipe.generator.ecg.checkpoint:  # a pretrained ST-MEM encoder (checked by preflight)
        from echopulse.models.ecg_encoder import load_stmem_checkpoint

        load_stmem_checkpoint(recipe.generator.ecg.checkpoint, generator.ecg_encoder,
                              freeze=recipe.generator.ecg.freeze)
    model = runtime.prepare_model(generator)
    logger = RunLogger(config["tracking_uri"], config["run_id"] if runtime.rank == 0 else None)
    per_worker = micro_batch_size(train, runtime.world)
    batches = repeat_batches(runtime.dataset("train"), per_worker, device, seed=train.seed + runtime.rank)
    val_batches = CachedBatches(runtime.dataset("val"), per_worker, device)

    validate = make_validate(model, val_batches)
    sample = make_sample(model, config, recipe, val_batches)

    extra = {"tokenizer_id": config["tokenizer_id"], "clip": to_dict(recipe.clip),
             "sampling": to_dict(recipe.sampling)}
    train_worker_loop(runtime=runtime, model=model, train=train, step_fn=generator_train_step, batches=batches,
                      logger=logger, validate=validate, sample=sample,
                      fail_marker=config.get("fail_marker"),
                      resume_from=config.get("resume_from"),
                      save=lambda d: save_checkpoint(unwrap(model), recipe.generator, d,
                                                     kind="generator", extra=extra))


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
                            callbacks: list | None = None, resume_from: str | None = None,
                            tokenizer_path: str | None = None):
    """The ``TorchTrainer`` for one generator training (shared by training and Tune trials).

    Ray keeps the run under ``out`` (the best ``keep_checkpoints`` by ``val_ce`` plus the latest);
    ``resume_from`` is an earlier run's checkpoint to continue from
    (:func:`jobs.train_common.latest_checkpoint`); ``tokenizer_path`` (a tokenizer checkpoint)
    lets rank 0 decode sample generations into GIFs for MLflow.
    """
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        generator_loop,
        train_loop_config={"recipe": to_dict(recipe), "tracking_uri": tracking_uri,
                           "run_id": run_id, "tokenizer_id": tokenizer_id,
                           "fail_marker": fail_marker(out, name),
                           "resume_from": resume_from, "tokenizer_path": tokenizer_path},
        scaling_config=scaling(workers or recipe.generator_train.workers, use_gpu),
        dataset_config=data_config(workers or recipe.generator_train.workers),
        run_config=run_config(name, out, recipe.generator_train, callbacks, score=SCORE),
        datasets=datasets,
    )


def bundle_tokenizer(tokenizer: str):
    """A function that copies the tokenizer checkpoint into a generator checkpoint directory."""

    def add(checkpoint_dir: str) -> None:
        target = os.path.join(checkpoint_dir, "tokenizer")
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(storage.local_copy(tokenizer, tmp), target)

    return add


def _measure_files(files: dict[str, bytes], batch: dict[str, Any]) -> dict[str, Any] | None:
    """Ray task body: write the checkpoint ``files`` to a temporary directory and measure its
    guidance calibration there (on this worker's GPU when it has one)."""
    from echopulse.calibration import measure_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        for rel, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
        result = measure_checkpoint(tmp, batch)
    return None if result is None else result.to_dict()


def calibrate_remotely(checkpoint_dir: str, batch: dict[str, Any], use_gpu: bool | None = None):
    """The guidance calibration of a local checkpoint directory, measured in a Ray task (one GPU
    when ``use_gpu``, default: when the cluster has GPUs), so a CPU-only head node does not sample
    a paper-size model; written into the directory here. ``None`` without candidates."""
    import ray

    from echopulse.calibration import GuidanceCalibration, write_calibration
    from jobs.train_common import use_gpu_default

    files = {}
    for root, _, names in os.walk(checkpoint_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, checkpoint_dir)] = f.read()
    gpu = use_gpu_default() if use_gpu is None else use_gpu
    task = ray.remote(_measure_files).options(num_cpus=1, num_gpus=1 if gpu else 0)
    found = ray.get(task.remote(files, batch))
    if found is None:
        return None
    result = GuidanceCalibration.from_dict(found)
    write_calibration(checkpoint_dir, result)
    return result


def finish_checkpoint(tokenizer: str, val, recipe: Recipe, found: dict[str, Any], use_gpu: bool | None = None):
    """What the exported checkpoint gets before upload: the tokenizer bundled, then the guidance
    weight picked on up to ``recipe.sampling.calibration_clips`` rows of the ``val`` dataset
    (:func:`calibrate_remotely`; the result is put in ``found["calibration"]``). A calibration
    that fails (too few moving clips, a crashed task) keeps the recipe's weight, with a warning and
    the reason in ``found["calibration_error"]``."""
    bundle = bundle_tokenizer(tokenizer)

    def add(checkpoint_dir: str) -> None:
        bundle(checkpoint_dir)
        if not recipe.sampling.guidance_candidates:
            return
        try:
            batch = val.take_batch(recipe.sampling.calibration_clips, batch_format="numpy")
            found["calibration"] = calibrate_remotely(checkpoint_dir, batch, use_gpu)
        except Exception as exc:  # the trained model is kept either way, at the recipe's weight
            found["calibration_error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            log.warning("guidance not calibrated, the recipe's %g is kept: %s", recipe.sampling.guidance,
                        found["calibration_error"])

    return add


def log_calibration(logger, calibration, error: str | None = None) -> None:
    """The guidance calibration in the MLflow run: the picked weight and each weight's score (or
    why there is none)."""
    if error:
        logger.set_tag("guidance_calibrated", f"failed: {error}")
    if calibration is None:
        return
    logger.set_tag("guidance_calibrated", f"{calibration.picked:g}")
    metrics = {"guidance_picked": calibration.picked}
    for weight, score, gain in zip(calibration.candidates, calibration.scores, calibration.gains):
        metrics[f"calibration_agreement_g{weight:g}"] = score
        metrics[f"calibration_gain_g{weight:g}"] = gain
    logger.log_metrics(metrics, step=0)


def train_generator(tokens: str, tokenizer: str, out: str, recipe: Recipe, tracking_uri: str,
                    workers: int | None = None, use_gpu: bool | None = None,
                    parent_run_id: str | None = None, register: str | None = None,
                    allow_unsynchronized: bool = False) -> TrainResult:
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
        register: also register the run's model (``runs:/RUN_ID/model``) as a version of this name.
        allow_unsynchronized: also train on clips whose ECG was not recorded with the echo.
    """
    from echopulse.registry import publish_training_run
    from echopulse.runtime import init_ray
    from echopulse.tracking import RunLogger, create_run, log_dataset_inputs, system_metrics

    preflight.generator_job(tokens, tokenizer, out, recipe)  # empty/other tokens, unwritable out
    tok_info = check_tokenizer(check_tokens_info(tokens, recipe), tokenizer)
    resume_from = latest_checkpoint(out, to_dict(recipe.generator))
    init_ray()
    counts = ecg_counts(tokens)
    datasets, _ = tokens_datasets(tokens, recipe, counts, allow_unsynchronized)
    storage.makedirs(out)
    name = run_name("generator")
    params = {"recipe": to_dict(recipe), "tokens": tokens, "tokenizer": tokenizer, "out": out,
              "allow_unsynchronized": allow_unsynchronized}
    unsync = sum(c.get("unsynchronized", 0) for c in counts.values())
    run_id = create_run(tracking_uri, name,
                        {**params, "clips_without_ecg": sum(c["without_ecg"] for c in counts.values()),
                         "clips_ecg_synchronized": sum(c["with_ecg"] for c in counts.values()) - unsync,
                         "clips_ecg_unsynchronized": unsync},
                        parent_run_id=parent_run_id, tags={"echopulse.stage": "train_generator"})
    logger = RunLogger(tracking_uri, run_id)
    log_config_artifact(logger, params)
    trainer = build_generator_trainer(datasets, recipe, tok_info["model_id"], tracking_uri, run_id,
                                      name, out, workers, use_gpu, resume_from=resume_from,
                                      tokenizer_path=tokenizer)
    log_dataset_inputs(tracking_uri, run_id, tokens)  # lineage: tokens -> clips -> manifest
    found: dict[str, Any] = {}  # the guidance calibration, once the checkpoint is exported
    finish = finish_checkpoint(tokenizer, datasets["val"], recipe, found, use_gpu)
    try:
        with system_metrics(tracking_uri, run_id):
            result = trainer.fit()
        checkpoint = export_checkpoint(result, out, add=finish)
    except BaseException:
        logger.finish("FAILED")
        raise
    log_outcome(logger, checkpoint, result, SCORE)
    log_calibration(logger, found.get("calibration"), found.get("calibration_error"))
    publish_training_run(tracking_uri, run_id, result, checkpoint, register=register)
    logger.finish()
    metrics = dict(result.metrics or {})
    if found.get("calibration") is not None:
        metrics["guidance_picked"] = found["calibration"].picked
    return TrainResult(checkpoint=checkpoint, metrics=metrics, run_id=run_id)
