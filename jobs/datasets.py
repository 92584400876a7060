"""Token datasets for generator training and the masking sweep: read, check, count, filter.

Both ``jobs/train_generator.py`` and ``jobs/tune_masking.py`` take their Ray datasets from here,
so a sweep does not import a training job for its data.
"""

from __future__ import annotations

import logging
from typing import Any

from echopulse import storage
from echopulse.config import Recipe
from echopulse.errors import EchoPulseError
from echopulse.schema import TOKENS_SCHEMA, read_dataset_info
from echopulse.training.steps import make_condition_columns_fn

log = logging.getLogger(__name__)


def check_tokens_info(tokens: str, recipe: Recipe) -> dict[str, Any]:
    """Read a ``tokens/v1`` dataset's description and check it against the recipe (no Ray)."""
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


ECG_FLAG_COLUMNS = ("ecg_source", "ecg_leads")  # used when a tokens dataset carries them


def has_ecg(batch: dict[str, Any]):
    """Which rows of a numpy batch carry an ECG: ``ecg_source != "none"`` when the column is there,
    else any of ``ecg_leads``, else a non-zero ``ecg`` (ingest writes zeros, no leads and source
    "none" for clips without one)."""
    import numpy as np

    if "ecg_source" in batch:
        return np.asarray([s != "none" for s in batch["ecg_source"]], dtype=bool)
    if "ecg_leads" in batch:
        return np.asarray([bool(np.any(leads)) for leads in batch["ecg_leads"]], dtype=bool)
    ecg = np.asarray(batch["ecg"])
    if len(ecg) == 0:
        return np.zeros(0, dtype=bool)
    return np.abs(ecg.reshape(len(ecg), -1)).max(axis=1) > 0


def _with_ecg(batch: dict[str, Any]) -> dict[str, Any]:
    keep = has_ecg(batch)
    return {k: v[keep] for k, v in batch.items()}


def _ecg_flags(batch: dict[str, Any]) -> dict[str, Any]:
    return {"split": batch["split"], "has_ecg": has_ecg(batch)}


def _flag_columns(ds) -> list[str]:
    names = ds.schema().names
    flags = [c for c in ECG_FLAG_COLUMNS if c in names]
    return flags[:1] or ["ecg"]


def ecg_counts(tokens: str) -> dict[str, dict[str, int]]:
    """Per split, how many rows of a ``tokens/v1`` dataset have an ECG and how many have none
    (one pass over the ECG column, or over ``ecg_source`` when the dataset carries it)."""
    from collections import Counter

    from pipelines.common import read_parquet_dir

    ds = read_parquet_dir(storage.join(tokens, "tokens"))
    flags = ds.select_columns([*_flag_columns(ds), "split"]).map_batches(_ecg_flags, batch_format="numpy")
    counts: Counter = Counter()
    for batch in flags.iter_batches(batch_format="numpy"):
        counts.update(zip(batch["split"].tolist(), batch["has_ecg"].tolist()))
    splits = sorted({split for split, _ in counts})
    return {split: {"with_ecg": counts[(split, True)], "without_ecg": counts[(split, False)]}
            for split in splits}


def tokens_datasets(tokens: str, recipe: Recipe,
                    counts: dict[str, dict[str, int]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and val Ray datasets of a ``tokens/v1`` dataset, checked against the recipe.

    Clips without an ECG are filtered out (the generator is conditioned on it). ``counts``
    (:func:`ecg_counts`, read by the caller) picks the val fallback and refuses a dataset with no
    train clip that has an ECG; without it the filter is lazy (no pass over the data here, as in a
    Tune trial) and the val split is taken when ``dataset.json`` counts one.

    Raises:
        EchoPulseError: when no train clip has an ECG (with ``counts``).
    """
    from pipelines.common import read_parquet_dir

    info = check_tokens_info(tokens, recipe)
    if counts is not None:
        skipped = sum(c["without_ecg"] for c in counts.values())
        train_n = counts.get("train", {}).get("with_ecg", 0)
        if skipped:
            log.warning("%s: skipping %d clip(s) without an ECG (%s)", tokens, skipped,
                        ", ".join(f"{k}: {v['without_ecg']}" for k, v in counts.items() if v["without_ecg"]))
        if not train_n:
            raise EchoPulseError(
                f"{tokens}: no train clip has an ECG ({counts.get('train', {}).get('without_ecg', 0)} "
                f"without one skipped); the generator is conditioned on the ECG")
        has_val = bool(counts.get("val", {}).get("with_ecg"))
    else:
        has_val = bool(info["split_counts"].get("val"))
    ds = read_parquet_dir(storage.join(tokens, "tokens"))
    # view / EF conditioning: the tokens/v1 columns, as ids and fractions (unknown: -1 / NaN)
    gen = recipe.generator
    conditions = [c for c, on in (("view", gen.num_views > 0), ("ef", gen.ef_conditioning)) if on]
    columns = ["tokens", "ecg", *conditions]
    flags = [c for c in _flag_columns(ds) if c != "ecg"]
    ds = ds.select_columns(["tokens", "ecg", "split", *conditions, *flags])
    ds = ds.map_batches(_with_ecg, batch_format="numpy")
    if conditions:
        ds = ds.map_batches(make_condition_columns_fn(gen.num_views, gen.ef_conditioning), batch_format="numpy")
    train = ds.filter(lambda r: r["split"] == "train").select_columns(columns)
    if has_val:
        val = ds.filter(lambda r: r["split"] == "val").select_columns(columns)
    else:
        log.warning("%s: no val clips with an ECG; validating on train rows", tokens)
        val = train
    return {"train": train, "val": val}, info
