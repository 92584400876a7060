"""Sweep masking schedules (and learning rate) with Ray Tune; MLflow parent run + child per trial.

Each trial runs the generator training of ``jobs/train_generator.py`` (the same loop and trainer
builder, no copy) for ``recipe.tune.steps`` steps and is scored by validation masked-token
cross-entropy at a fixed mask ratio, which compares across schedules.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

from echopulse import storage
from echopulse.config import Recipe, from_dict, replace, to_dict
from echopulse.errors import ConfigError
from jobs.train_common import run_name, storage_path
from jobs.train_generator import (
    build_generator_trainer,
    check_tokenizer,
    check_tokens_info,
    tokens_datasets,
)

log = logging.getLogger(__name__)

METRIC = "val_ce"
LEARNING_RATE_FACTORS = (1.0, 0.5, 2.0)


@dataclass(frozen=True)
class TuneSummary:
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    best_recipe: str
    table: str
    run_id: str


def trial_configs(recipe: Recipe, trials: int) -> list[dict[str, Any]]:
    """The first ``trials`` points of the (schedule x learning rate) grid, schedules varying fastest."""
    from echopulse.models.schedules import SCHEDULES

    unknown = [s for s in recipe.tune.schedules if s not in SCHEDULES]
    if unknown:
        raise ConfigError(f"unknown masking schedule(s) {unknown}; known: {', '.join(SCHEDULES)}")
    if trials < 1 or not recipe.tune.schedules:
        raise ConfigError("the search space is empty: need at least one trial and one schedule")
    grid = [{"schedule": s, "lr": recipe.generator_train.lr * f}
            for f in LEARNING_RATE_FACTORS for s in recipe.tune.schedules]
    return grid[:trials]


def trial_recipe(recipe: Recipe, trial: dict[str, Any]) -> Recipe:
    """The recipe one trial trains: the trial's schedule for training and sampling, its lr."""
    return replace(
        recipe,
        generator=replace(recipe.generator, schedule=trial["schedule"]),
        generator_train=replace(recipe.generator_train, steps=recipe.tune.steps, lr=trial["lr"],
                                log_every=max(1, min(recipe.generator_train.log_every,
                                                     recipe.tune.steps))),
        sampling=replace(recipe.sampling, schedule=trial["schedule"]),
    )


def run_trial(config: dict[str, Any]) -> None:
    """One Tune trial: a child MLflow run and a generator ``TorchTrainer`` reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from echopulse.tracking import RunLogger, create_run

    trial = config["trial"]
    recipe = trial_recipe(from_dict(Recipe, config["recipe"]), trial)
    datasets, _ = tokens_datasets(config["tokens"], recipe)
    name = run_name(f"trial-{trial['schedule']}")
    run_id = create_run(config["tracking_uri"], name, {"trial": trial, "recipe": to_dict(recipe)},
                        parent_run_id=config["parent_run_id"],
                        tags={"echopulse.stage": "tune_trial"})
    logger = RunLogger(config["tracking_uri"], run_id)
    trainer = build_generator_trainer(datasets, recipe, config["tokenizer_id"],
                                      config["tracking_uri"], run_id, name, config["storage"],
                                      workers=config["workers"], use_gpu=config["use_gpu"],
                                      callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish()


def tune_masking(tokens: str, tokenizer: str, out: str, recipe: Recipe, tracking_uri: str,
                 trials: int | None = None, max_concurrent: int | None = None,
                 workers: int = 1, use_gpu: bool | None = None,
                 parent_run_id: str | None = None) -> TuneSummary:
    """Run the sweep; write ``OUT/best_recipe.json`` and ``OUT/trials.csv``.

    Args:
        tokens: a ``tokens/v1`` dataset.
        tokenizer: the tokenizer checkpoint the tokens came from.
        out: output directory or URI.
        recipe: base recipe; ``recipe.tune`` holds schedules and steps per trial.
        tracking_uri: MLflow tracking URI.
        trials: number of trials (default ``recipe.tune.trials``).
        max_concurrent: concurrent trials (default ``recipe.tune.max_concurrent``).
        workers: Ray Train workers per trial.
        use_gpu: one GPU per worker (default: when CUDA is available).
        parent_run_id: nest the sweep's parent run under this one.
    """
    from ray import tune

    from echopulse.runtime import init_ray
    from echopulse.tracking import RunLogger, create_run

    configs = trial_configs(recipe, trials or recipe.tune.trials)
    # a bad dataset or tokenizer fails here, before Ray starts or any trial runs
    tok_info = check_tokenizer(check_tokens_info(tokens, recipe), tokenizer)
    init_ray()
    storage.makedirs(out)
    name = run_name("tune")
    run_id = create_run(tracking_uri, name, {"recipe": to_dict(recipe), "trials": len(configs),
                                             "tokens": tokens},
                        parent_run_id=parent_run_id, tags={"echopulse.stage": "tune"})
    parent = RunLogger(tracking_uri, run_id)
    base = {"recipe": to_dict(recipe), "tokens": tokens, "tracking_uri": tracking_uri,
            "parent_run_id": run_id, "tokenizer_id": tok_info["model_id"],
            "storage": storage_path(storage.join(out, "trials")), "workers": workers,
            "use_gpu": use_gpu}
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": 1}),
        param_space={**base, "trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(metric=METRIC, mode="min",
                                    max_concurrent_trials=max_concurrent or recipe.tune.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage_path(out), verbose=0),
    )
    try:
        grid = tuner.fit()
        rows = []
        for result in grid:
            if result.error:
                log.warning("trial %s failed: %s", result.config["trial"], result.error)
                continue
            rows.append({**result.config["trial"],
                         **{k: float(v) for k, v in result.metrics.items()
                            if k.startswith("val_") or k in ("loss", "masked_acc")}})
        if not rows:
            raise RuntimeError("every trial failed; see the Ray logs")
        best = min(rows, key=lambda r: r[METRIC])
        best_recipe = replace(trial_recipe(recipe, best), name=f"{recipe.name}-tuned",
                              generator_train=replace(recipe.generator_train, lr=best["lr"]))
        best_path = storage.join(out, "best_recipe.json")
        storage.write_text(best_path, json.dumps(to_dict(best_recipe), indent=2))
        table_path = storage.join(out, "trials.csv")
        storage.write_text(table_path, _csv(rows))
        parent.log_metrics({f"best_{k}": v for k, v in best.items() if isinstance(v, float)}, step=0)
        parent.set_tag("best_schedule", best["schedule"])
        if not storage.is_remote(out):
            parent.log_artifact(best_path)
            parent.log_artifact(table_path)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return TuneSummary(best=best, trials=rows, best_recipe=best_path, table=table_path, run_id=run_id)


def _csv(rows: list[dict[str, Any]]) -> str:
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("schedule", "lr"), k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
