"""Sweep masking schedules with Ray Tune; MLflow parent run per sweep, child run per trial.

Each trial trains the generator with ``jobs/train_generator.py``'s worker loop (no copy; one
worker trains inside the trial's own process, more run its ``TorchTrainer``) for
``recipe.tune.steps`` steps, with its training schedule, mask-ratio bounds and learning rate;
ASHA can stop weak trials early on validation masked-token cross-entropy (at a fixed mask
ratio, so it compares across schedules). A finished trial then generates a fixed validation subset
at every ``sampling_steps`` value, primed with the real first frame and given the real ECG, and
scores it against the tokenizer's reconstruction of the real clip (full-frame SSIM, PSNR) and its
ECG-control score with the evaluation core (``echopulse.evaluate``), with seconds per clip.

Outputs in OUT: ``trials.csv``, ``best_recipe.json`` (a recipe ``--recipe`` accepts),
``quality_vs_steps.png``, ``sweep.json`` (the MLflow parent run, for ``--resume``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from echopulse import storage
from echopulse.config import Recipe, TuneConfig, from_dict, replace, to_dict
from echopulse.errors import ConfigError, EchoPulseError
from jobs.train_common import storage_path
from jobs.datasets import check_tokens_info, tokens_datasets
from jobs.train_generator import build_generator_trainer, check_tokenizer

log = logging.getLogger(__name__)

METRIC = "val_ce"
SWEEP_NAME = "sweep"
EVAL_SUBSET_FILE = "eval_subset.npz"
QUALITY = "gen_ssim"


@dataclass(frozen=True)
class TuneSummary:
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    best_recipe: str
    table: str
    plot: str | None
    run_id: str


def search_space(tune_cfg: TuneConfig, base_lr: float) -> list[dict[str, Any]]:
    """The trials to run: the first ``trials`` grid points, or ``trials`` random draws.

    Raises:
        ConfigError: an unknown schedule or search, an empty axis, bad bounds or steps.
    """
    from echopulse.models.schedules import ORDERS, SCHEDULES

    axes = {
        "schedule": tune_cfg.schedules,
        "mask_ratio_bounds": tune_cfg.mask_ratio_bounds,
        "lr_factor": tune_cfg.lr_factors,
        "sampling_schedule": tune_cfg.sampling_schedules,
        "guidance": tune_cfg.guidance,
        "temperature": tune_cfg.temperature,
        "sampling_order": tune_cfg.sampling_orders,
    }
    empty = [name for name, values in axes.items() if not values]
    if empty or not tune_cfg.sampling_steps or tune_cfg.trials < 1:
        raise ConfigError(f"the search space is empty (no values for: "
                          f"{', '.join(empty or ['sampling_steps' if not tune_cfg.sampling_steps else 'trials'])})")
    unknown = sorted({s for s in (*tune_cfg.schedules, *tune_cfg.sampling_schedules)
                      if s not in SCHEDULES})
    if unknown:
        raise ConfigError(f"unknown masking schedule(s) {', '.join(unknown)}; "
                          f"known: {', '.join(SCHEDULES)}")
    for lo, hi in tune_cfg.mask_ratio_bounds:
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"mask ratio bounds must satisfy 0 <= min < max <= 1, got [{lo}, {hi}]")
    bad_orders = sorted(set(tune_cfg.sampling_orders) - set(ORDERS))
    if bad_orders:
        raise ConfigError(f"unknown decoding order(s) {', '.join(bad_orders)}; known: {', '.join(ORDERS)}")
    if any(s < 1 for s in tune_cfg.sampling_steps):
        raise ConfigError(f"sampling steps must be >= 1, got {tune_cfg.sampling_steps}")
    names = list(axes)
    # product with the first axis varying fastest: schedules are compared first
    grid = [dict(zip(reversed(names), values))
            for values in itertools.product(*(axes[n] for n in reversed(names)))]
    if tune_cfg.search == "grid":
        points = grid[: tune_cfg.trials]
    elif tune_cfg.search == "random":
        rng = random.Random(tune_cfg.seed)
        points = (rng.sample(grid, tune_cfg.trials) if tune_cfg.trials <= len(grid)
                  else [rng.choice(grid) for _ in range(tune_cfg.trials)])
    else:
        raise ConfigError(f"unknown search {tune_cfg.search!r}: use grid or random")
    trials = []
    for point in points:
        lo, hi = point.pop("mask_ratio_bounds")
        trials.append({"schedule": point["schedule"], "mask_ratio_min": float(lo),
                       "mask_ratio_max": float(hi), "lr": base_lr * point.pop("lr_factor"),
                       **{k: point[k] for k in ("sampling_schedule", "guidance", "temperature", "sampling_order")}})
    return trials


def trial_recipe(recipe: Recipe, trial: dict[str, Any]) -> Recipe:
    """The recipe one trial trains and samples with: it validates at every logged step (whatever
    the recipe's ``val_every``), so the scheduler can compare trials early."""
    steps = recipe.tune.steps
    return replace(
        recipe,
        generator=replace(recipe.generator, schedule=trial["schedule"],
                          mask_ratio_min=trial["mask_ratio_min"],
                          mask_ratio_max=trial["mask_ratio_max"]),
        generator_train=replace(recipe.generator_train, steps=steps, lr=trial["lr"],
                                log_every=max(1, min(recipe.generator_train.log_every, steps)), val_every=0),
        sampling=replace(recipe.sampling, schedule=trial["sampling_schedule"],
                         guidance=trial["guidance"], temperature=trial["temperature"],
                         order=trial.get("sampling_order", recipe.sampling.order)),
    )


def validation_subset(tokens: str, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` val rows by clip id: the same clips for every trial.

    Read once by the driver and saved for the trials (Ray Data tasks cannot be scheduled inside a
    trial's placement group), see :func:`save_subset`.
    """
    from pipelines.common import read_parquet_dir

    ds = read_parquet_dir(storage.join(tokens, "tokens")).select_columns(
        ["clip_id", "tokens", "ecg", "split"])
    rows = ds.filter(lambda r: r["split"] == "val").sort("clip_id").limit(n)
    return rows.take_batch(n, batch_format="numpy")


def save_subset(subset: dict[str, np.ndarray], uri: str) -> None:
    """Write the validation subset as ``.npz`` (plain arrays, no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, tokens=np.asarray(subset["tokens"]), ecg=np.asarray(subset["ecg"]),
             clip_id=np.asarray(subset["clip_id"]).astype(str))
    fs, path = storage.filesystem(uri)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())


def load_subset(uri: str) -> dict[str, np.ndarray]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return {k: data[k] for k in data.files}


def generation_metrics(generator, tokenizer, subset: dict[str, np.ndarray], recipe: Recipe,
                       sampling_steps: tuple[int, ...]) -> dict[str, float]:
    """Generate the subset at each number of sampling steps and score it.

    Each clip is generated from its real ECG, primed with its real first token frame, and compared
    with the tokenizer's decoding of its real tokens (what a perfect generator would give back).
    Keys: ``gen_ssim_stepsK``, ``gen_psnr_stepsK``, ``gen_ecg_sync_stepsK``, ``gen_s_per_clip_stepsK`` for each K,
    the same without ``_stepsK`` at the recipe's own sampling steps (or the largest K), and
    ``gen_fewest_steps`` (:func:`fewest_steps`: what the best recipe samples with).
    """
    import torch

    from echopulse.evaluate import fidelity, sync_scores

    tokens = torch.as_tensor(np.asarray(subset["tokens"]).astype(np.int64))  # (n, t', h', w')
    ecg = torch.as_tensor(np.asarray(subset["ecg"]), dtype=torch.float32)  # (n, 12, L)
    s = recipe.sampling
    out: dict[str, float] = {}
    with torch.inference_mode():
        reference = tokenizer.decode_from_indices(tokens).clamp(0, 1)  # (n, t, h, w)
        for k in sampling_steps:
            t0 = time.perf_counter()
            generated = generator.generate(ecg, **{**s.options(), "steps": k}, seed=0,
                                           prime_tokens=tokens[:, 0])
            video = tokenizer.decode_from_indices(generated).clamp(0, 1)
            seconds = (time.perf_counter() - t0) / len(tokens)
            scores = fidelity(video, reference)  # batched on the model's device
            out[f"gen_ssim_steps{k}"] = float(np.mean(scores["ssim"]))
            out[f"gen_psnr_steps{k}"] = float(np.mean(scores["psnr"]))
            sync = sync_scores(video.cpu().numpy(), ecg.numpy(), recipe.clip.fps)
            out[f"gen_ecg_sync_steps{k}"] = float(np.nanmean(sync)) if np.isfinite(sync).any() else float("nan")
            out[f"gen_s_per_clip_steps{k}"] = seconds
    primary = s.steps if s.steps in sampling_steps else max(sampling_steps)
    for name in ("gen_ssim", "gen_psnr", "gen_ecg_sync", "gen_s_per_clip"):
        out[name] = out[f"{name}_steps{primary}"]
    out["gen_fewest_steps"] = float(fewest_steps(out, sampling_steps, recipe.tune.steps_tolerance))
    return out


def fewest_steps(quality: dict[str, float], sampling_steps: tuple[int, ...], tolerance: float) -> int:
    """The fewest steps whose SSIM and ECG-control score (``gen_ssim_stepsK``,
    ``gen_ecg_sync_stepsK``) are within ``tolerance`` of the most steps' (a NaN score is not
    compared)."""
    most = max(sampling_steps)

    def close(name: str, k: int) -> bool:
        value, best = quality[f"{name}_steps{k}"], quality[f"{name}_steps{most}"]
        return not (value == value and best == best) or value >= best - tolerance

    return min(k for k in sampling_steps if close("gen_ssim", k) and close("gen_ecg_sync", k))


def run_trial(config: dict[str, Any]) -> None:
    """One Tune trial: child MLflow run, generator training reporting to Tune, then sampling.

    One worker trains inside the trial's own process (:func:`_train_in_trial`); more workers run a
    nested ``TorchTrainer`` (:func:`_train_with_trainer`).
    """
    from ray import tune

    from echopulse.models.checkpoint import load_checkpoint
    from echopulse.tracking import RunLogger, create_run, finished_child_metrics

    trial = config["trial"]
    recipe = trial_recipe(from_dict(Recipe, config["recipe"]), trial)
    datasets, _ = tokens_datasets(config["tokens"], recipe)
    name = f"trial-{trial['schedule']}-{tune.get_context().get_trial_id()}"
    done = finished_child_metrics(config["tracking_uri"], config["parent_run_id"], name)
    if done is not None:  # it finished before an interruption reached the sweep's state
        log.info("%s finished before the sweep was interrupted; reporting its metrics", name)
        tune.report(done)
        return
    run_id = create_run(config["tracking_uri"], name, {"trial": trial, "recipe": to_dict(recipe)},
                        parent_run_id=config["parent_run_id"],
                        tags={"echopulse.stage": "tune_trial"})
    logger = RunLogger(config["tracking_uri"], run_id)
    train = _train_in_trial if config["workers"] == 1 else _train_with_trainer
    try:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = train(config, datasets, recipe, run_id, name, f"{tmp}/g")
            generator, _, _ = load_checkpoint(f"{tmp}/g", expected_kind="generator")
            tokenizer, _, _ = load_checkpoint(storage.local_copy(config["tokenizer"], f"{tmp}/t"),
                                              expected_kind="tokenizer")
        quality = generation_metrics(generator, tokenizer, load_subset(config["eval_subset"]), recipe,
                                     tuple(recipe.tune.sampling_steps))
        final = {**{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, **quality}
        logger.log_metrics(quality, step=recipe.generator_train.steps)
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish()
    tune.report(final)


def _train_with_trainer(config: dict[str, Any], datasets: dict[str, Any], recipe: Recipe, run_id: str,
                        name: str, checkpoint_dir: str) -> dict[str, Any]:
    """Train with a nested ``TorchTrainer`` (several workers), its reports forwarded to Tune;
    the final checkpoint is copied to ``checkpoint_dir``; returns the final metrics."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_generator_trainer(datasets, recipe, config["tokenizer_id"],
                                      config["tracking_uri"], run_id, name, config["trials_out"],
                                      workers=config["workers"], use_gpu=config["use_gpu"],
                                      callbacks=[TuneReportCallback()])
    result = trainer.fit()
    result.checkpoint.to_directory(checkpoint_dir)
    return dict(result.metrics or {})


def _train_in_trial(config: dict[str, Any], datasets: dict[str, Any], recipe: Recipe, run_id: str,
                    name: str, checkpoint_dir: str) -> dict[str, Any]:
    """Train with one worker in this trial's process (:func:`jobs.train_common.tune_trial_runtime`):
    reports and checkpoints go to Tune (a restored sweep resumes the trial from its checkpoint);
    the last checkpoint is also copied to ``checkpoint_dir``; returns the final metrics.

    No TorchTrainer: a nested one would start a controller, a worker group and split coordinators
    for each trial (tens of seconds and a second CPU per trial on a small machine)."""
    import shutil

    from jobs.train_common import tune_trial_runtime, use_gpu_default
    from jobs.train_generator import generator_worker

    runtime = tune_trial_runtime(datasets, use_gpu_default() if config["use_gpu"] is None else config["use_gpu"])
    last: dict[str, Any] = {}

    def report(metrics: dict[str, float], checkpoint: str | None) -> None:
        if checkpoint:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            shutil.copytree(checkpoint, checkpoint_dir)
        last.clear()
        last.update(metrics)
        runtime.report(metrics, checkpoint)

    worker_config = {"recipe": to_dict(recipe), "tracking_uri": config["tracking_uri"], "run_id": run_id,
                     "tokenizer_id": config["tokenizer_id"]}
    generator_worker(worker_config, replace(runtime, report=report))
    if not os.path.isdir(checkpoint_dir):
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    return last


def _parent_run(out: str, resume: bool, tracking_uri: str, recipe: Recipe,
                trials: list[dict[str, Any]], tokens: str, parent_run_id: str | None) -> str:
    from echopulse.tracking import create_run

    state = storage.join(out, "sweep.json")
    if resume and storage.exists(state):
        return json.loads(storage.read_text(state))["mlflow_run_id"]
    run_id = create_run(tracking_uri, f"tune-{recipe.name}",
                        {"recipe": to_dict(recipe), "trials": len(trials), "tokens": tokens},
                        parent_run_id=parent_run_id, tags={"echopulse.stage": "tune"})
    storage.write_text(state, json.dumps({"mlflow_run_id": run_id, "trials": trials}, indent=2))
    return run_id


def tune_masking(tokens: str, tokenizer: str, out: str, recipe: Recipe, tracking_uri: str,
                 trials: int | None = None, max_concurrent: int | None = None,
                 workers: int = 1, use_gpu: bool | None = None, resume: bool = False,
                 parent_run_id: str | None = None) -> TuneSummary:
    """Run (or ``resume``) the sweep into ``out``.

    Args:
        tokens: a ``tokens/v1`` dataset with a val split.
        tokenizer: the tokenizer checkpoint the tokens came from.
        out: output directory or URI.
        recipe: base recipe; ``recipe.tune`` holds the search space.
        tracking_uri: MLflow tracking URI.
        trials: number of trials (default ``recipe.tune.trials``).
        max_concurrent: concurrent trials (default ``recipe.tune.max_concurrent``).
        workers: Ray Train workers per trial.
        use_gpu: one GPU per worker (default: when CUDA is available).
        resume: continue an interrupted sweep in ``out`` (finished trials are not rerun).
        parent_run_id: nest the sweep's parent run under this one.
    """
    from echopulse.runtime import init_ray
    from echopulse.tracking import RunLogger

    if trials is not None:
        recipe = replace(recipe, tune=replace(recipe.tune, trials=trials))
    if max_concurrent is not None:
        recipe = replace(recipe, tune=replace(recipe.tune, max_concurrent=max_concurrent))
    configs = search_space(recipe.tune, recipe.generator_train.lr)
    # a bad dataset or tokenizer fails here, before Ray starts or any trial runs
    info = check_tokens_info(tokens, recipe)
    if not info.get("split_counts", {}).get("val"):
        raise EchoPulseError(f"{tokens}: no val split; a sweep needs validation clips")
    tok_info = check_tokenizer(info, tokenizer)
    storage.makedirs(out)
    init_ray()
    run_id = _parent_run(out, resume, tracking_uri, recipe, configs, tokens, parent_run_id)
    subset_uri = storage.join(out, EVAL_SUBSET_FILE)
    if not (resume and storage.exists(subset_uri)):
        save_subset(validation_subset(tokens, recipe.tune.eval_clips), subset_uri)
    parent = RunLogger(tracking_uri, run_id)
    try:
        tuner = _make_tuner(recipe, configs, tokens, tokenizer, tracking_uri, run_id, tok_info, out,
                            workers, use_gpu, resume)
        grid = tuner.fit()
        _close_stopped_children(tracking_uri, run_id, _errored_trial_ids(grid))
        rows = _trial_rows(grid)
        best = min(rows, key=lambda r: r[METRIC])
        best_path, table_path, plot_path = _write_results(recipe, rows, best, out, parent)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return TuneSummary(best=best, trials=rows, best_recipe=best_path, table=table_path,
                       plot=plot_path, run_id=run_id)


def _make_tuner(recipe: Recipe, configs: list[dict[str, Any]], tokens: str, tokenizer: str, tracking_uri: str,
                run_id: str, tok_info: dict[str, Any], out: str, workers: int, use_gpu: bool | None,
                resume: bool):
    """A ``tune.Tuner``: restored from ``out`` when resuming one there, else a fresh sweep."""
    from ray import tune

    trainable = tune.with_resources(run_trial, _trial_resources(workers, use_gpu))
    experiment = storage.join(storage_path(out), SWEEP_NAME)
    if resume and tune.Tuner.can_restore(experiment):
        log.info("resuming the sweep in %s", experiment)
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    if storage.exists(experiment):
        fs, path = storage.filesystem(experiment)
        fs.rm(path, recursive=True)
    return tune.Tuner(trainable, param_space=_param_space(recipe, configs, tokens, tokenizer,
                                                          tracking_uri, run_id, tok_info,
                                                          out, workers, use_gpu),
                      tune_config=_tune_config(recipe),
                      run_config=tune.RunConfig(name=SWEEP_NAME,
                                                storage_path=storage_path(out), verbose=0))


def _trial_resources(workers: int, use_gpu: bool | None):
    """What a trial holds. A one-worker trial trains in its own process: it holds that worker's
    CPU (and GPU) and one CPU more for the Ray Data tasks that read its tokens (a trial's child
    tasks run inside its placement group). A trial with more workers holds one CPU and its
    TorchTrainer asks for the rest."""
    from ray import tune

    from jobs.train_common import use_gpu_default

    if workers > 1:
        return {"cpu": 1}
    gpu = use_gpu_default() if use_gpu is None else use_gpu
    return tune.PlacementGroupFactory([{"CPU": 1, **({"GPU": 1} if gpu else {})}, {"CPU": 1}])


def _write_results(recipe: Recipe, rows: list[dict[str, Any]], best: dict[str, Any], out: str,
                   parent: Any) -> tuple[str, str, str | None]:
    """Write ``best_recipe.json``, ``trials.csv`` and the plot; log the best trial to the parent run.

    Returns:
        The paths of the best recipe, the trials table and the plot (``None`` when not drawn).
    """
    best_recipe = trial_recipe(recipe, best)
    steps = int(best.get("gen_fewest_steps") or best_recipe.sampling.steps)  # NaN-free: ints
    best_recipe = replace(best_recipe, name=f"{recipe.name}-tuned",
                          generator_train=replace(recipe.generator_train, lr=best["lr"]),
                          sampling=replace(best_recipe.sampling, steps=steps))
    best_path = storage.join(out, "best_recipe.json")
    storage.write_text(best_path, json.dumps(to_dict(best_recipe), indent=2))
    table_path = storage.join(out, "trials.csv")
    storage.write_text(table_path, _csv(rows))
    plot_path = _plot(rows, recipe.tune.sampling_steps, out)
    parent.log_metrics({f"best_{k}": v for k, v in best.items() if isinstance(v, float)}, step=0)
    parent.set_tag("best_schedule", best["schedule"])
    if not storage.is_remote(out):
        for path in (best_path, table_path, plot_path):
            if path:
                parent.log_artifact(path)
    return best_path, table_path, plot_path


def _errored_trial_ids(grid) -> set[str]:
    """Ids of the trials Tune records as errored (their directory names hold the id)."""
    return {os.path.basename(str(r.path)) for r in grid if r.error is not None}


def _close_stopped_children(tracking_uri: str, parent_run_id: str, errored: set[str]) -> None:
    """Trials stopped early (ASHA) or lost to an interruption never close their MLflow run, or
    close it FAILED when the stop interrupts them inside ``run_trial`` (e.g. while the trainer
    shuts down): once the sweep is over, mark any child still RUNNING, and any FAILED child whose
    trial Tune does not record as errored (a real error in a trial is a Tune error too), KILLED.

    Args:
        errored: directory names of the errored trials (:func:`_errored_trial_ids`).
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status != 'FINISHED'")
    for child in children:
        trial_id = (child.info.run_name or "").rsplit("-", 1)[-1]
        stopped = child.info.status == "RUNNING" or (
            child.info.status == "FAILED" and not any(f"_{trial_id}_" in d for d in errored))
        if stopped:
            client.set_tag(child.info.run_id, "echopulse.stopped_early", "true")
            client.set_terminated(child.info.run_id, status="KILLED")


def _param_space(recipe, configs, tokens, tokenizer, tracking_uri, run_id, tok_info, out, workers,
                 use_gpu) -> dict[str, Any]:
    from ray import tune

    return {"recipe": to_dict(recipe), "tokens": tokens, "tokenizer": tokenizer,
            "tracking_uri": tracking_uri, "parent_run_id": run_id,
            "tokenizer_id": tok_info["model_id"],
            "trials_out": storage.join(out, "trials"), "workers": workers,
            "use_gpu": use_gpu, "eval_subset": storage.join(out, EVAL_SUBSET_FILE),
            "trial": tune.grid_search(configs)}


def _tune_config(recipe: Recipe):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if recipe.tune.asha:
        reports = -(-recipe.tune.steps // max(1, min(recipe.generator_train.log_every,
                                                     recipe.tune.steps))) + 1
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports,
                                  grace_period=max(1, reports // 3), reduction_factor=2)
    return tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler,
                           max_concurrent_trials=recipe.tune.max_concurrent)


def _trial_rows(grid) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        if result.error:
            log.warning("trial %s failed: %s", result.config["trial"], result.error)
            continue
        metrics = result.metrics or {}
        row = {**result.config["trial"],
               **{k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and (k.startswith(("val_", "gen_"))
                                                       or k in ("loss", "masked_acc", "step"))}}
        row["stopped_early"] = QUALITY not in row
        if METRIC in row:
            rows.append(row)
    if not rows:
        raise RuntimeError("every trial failed; see the Ray logs")
    return rows


def _plot(rows: list[dict[str, Any]], steps: tuple[int, ...], out: str) -> str | None:
    """Quality against sampling steps, one line per trial (labelled by its schedule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    drawn = 0
    for row in rows:
        ys = [row.get(f"{QUALITY}_steps{k}") for k in steps]
        if any(y is None for y in ys):
            continue  # stopped early by ASHA: never sampled
        ax.plot(steps, ys, marker="o", label=f"{row['schedule']} (lr {row['lr']:.1e})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("SSIM vs real clip (val)")
    ax.set_title("Generation quality against sampling steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = storage.join(out, "quality_vs_steps.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    fs, p = storage.filesystem(path)
    with fs.open(p, "wb") as f:
        f.write(buf.getvalue())
    return path


def _csv(rows: list[dict[str, Any]]) -> str:
    first = ("schedule", "mask_ratio_min", "mask_ratio_max", "lr", "sampling_schedule", "sampling_order",
             "guidance", "temperature", METRIC, "val_acc", "gen_fewest_steps", QUALITY)
    fields = [f for f in first if any(f in r for r in rows)]
    fields += sorted({k for r in rows for k in r} - set(fields))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width summary of the trials for the terminal."""
    cols = ("schedule", "mask_ratio_min", "mask_ratio_max", "lr", METRIC, "val_acc", QUALITY,
            "gen_psnr", "gen_ecg_sync", "gen_s_per_clip")
    lines = ["  ".join(f"{c:>14}" for c in cols)]
    for r in sorted(rows, key=lambda r: r[METRIC]):
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:>14.4g}" if isinstance(v, float) else f"{str(v):>14}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
