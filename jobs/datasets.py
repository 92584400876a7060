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


def is_synchronized(batch: dict[str, Any]):
    """Which rows' ECG was recorded with the echo: the ``ecg_sync`` column when the tokens carry it,
    else every row (tokens made before the column existed; see README, "Real archives")."""
    import numpy as np

    if "ecg_sync" in batch:
        return np.asarray(batch["ecg_sync"], dtype=bool)
    return np.ones(len(batch["split"]), dtype=bool)


def _with_ecg(batch: dict[str, Any], allow_unsynchronized: bool = False) -> dict[str, Any]:
    keep = has_ecg(batch)
    if not allow_unsynchronized:
        keep &= is_synchronized(batch)
    return {k: v[keep] for k, v in batch.items()}


def _ecg_flags(batch: dict[str, Any]) -> dict[str, Any]:
    return {"split": batch["split"], "has_ecg": has_ecg(batch), "sync": is_synchronized(batch)}


def _flag_columns(names: list[str]) -> list[str]:
    """The column that tells which rows have an ECG (``ecg_source``, else ``ecg_leads``, else the
    ECG itself), among a dataset's column ``names``."""
    flags = [c for c in ECG_FLAG_COLUMNS if c in names]
    return flags[:1] or ["ecg"]


def _numpy_batch(batch) -> dict[str, Any]:
    """A pyarrow record batch as has_ecg / is_synchronized take it (lists as nested arrays)."""
    import numpy as np

    out: dict[str, Any] = {}
    for name, column in zip(batch.schema.names, batch.columns):
        if name in ("ecg", "ecg_leads"):
            out[name] = np.asarray(column.to_pylist(), dtype=np.float32 if name == "ecg" else None)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def ecg_counts(tokens: str) -> dict[str, dict[str, int]]:
    """Per split, how many rows of a ``tokens/v1`` dataset have an ECG and how many have none, and
    how many of those with an ECG are not synchronized with their echo (``unsynchronized``).

    Reads the split and the ECG flag columns alone (``ecg_source``, else ``ecg_leads``; the ECG
    itself only for datasets older than both), in this process without Ray.
    """
    from collections import Counter

    from pipelines.common import parquet_dataset

    dataset = parquet_dataset(storage.join(tokens, "tokens"))
    counts: Counter = Counter()
    if dataset is not None:
        names = dataset.schema.names
        for batch in dataset.to_batches(columns=["split", *_flag_columns(names), *_sync_column(names)]):
            flags = _ecg_flags(_numpy_batch(batch))
            counts.update(zip(flags["split"].tolist(), flags["has_ecg"].tolist(), flags["sync"].tolist()))
    splits = sorted({split for split, _, _ in counts})
    return {split: {"with_ecg": counts[(split, True, True)] + counts[(split, True, False)],
                    "without_ecg": counts[(split, False, True)] + counts[(split, False, False)],
                    "unsynchronized": counts[(split, True, False)]}
            for split in splits}


def _sync_column(names: list[str]) -> list[str]:
    return ["ecg_sync"] if "ecg_sync" in names else []


def tokens_datasets(tokens: str, recipe: Recipe, counts: dict[str, dict[str, int]] | None = None,
                    allow_unsynchronized: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and val Ray datasets of a ``tokens/v1`` dataset, checked against the recipe.

    Clips without an ECG are filtered out (the generator is conditioned on it), and so are clips
    whose ECG was not recorded with the echo (``ecg_sync`` false: paired only by patient and nearest
    time) unless ``allow_unsynchronized``: such an ECG says nothing about the frames. ``counts``
    (:func:`ecg_counts`, read by the caller) picks the val fallback and refuses a dataset with no
    train clip that has an ECG; without it the filter is lazy (no pass over the data here, as in a
    Tune trial) and the val split is taken when ``dataset.json`` counts one.

    Raises:
        EchoPulseError: when no train clip has an ECG (with ``counts``).
    """
    from ray.data.expressions import col

    from pipelines.common import read_parquet_dir

    info = check_tokens_info(tokens, recipe)
    if counts is not None:
        skipped = sum(c["without_ecg"] for c in counts.values())
        unsync = 0 if allow_unsynchronized else sum(c.get("unsynchronized", 0) for c in counts.values())

        def usable(split: str) -> int:
            c = counts.get(split, {})
            return c.get("with_ecg", 0) - (0 if allow_unsynchronized else c.get("unsynchronized", 0))

        if skipped:
            log.warning("%s: skipping %d clip(s) without an ECG (%s)", tokens, skipped,
                        ", ".join(f"{k}: {v['without_ecg']}" for k, v in counts.items() if v["without_ecg"]))
        if unsync:
            log.warning("%s: skipping %d clip(s) whose ECG is not synchronized with the echo "
                        "(--allow-unsynchronized keeps them)", tokens, unsync)
        train = counts.get("train", {})
        if not train.get("with_ecg", 0):
            raise EchoPulseError(
                f"{tokens}: no train clip has an ECG ({train.get('without_ecg', 0)} "
                f"without one skipped); the generator is conditioned on the ECG")
        if not usable("train"):
            raise EchoPulseError(
                f"{tokens}: no train clip has an ECG recorded with its echo ({train['with_ecg']} paired "
                "only by patient and time skipped); --allow-unsynchronized trains on them anyway")
        has_val = bool(usable("val"))
    else:
        has_val = bool(info["split_counts"].get("val"))
    ds = read_parquet_dir(storage.join(tokens, "tokens"))
    # view / EF conditioning: the tokens/v1 columns, as ids and fractions (unknown: -1 / NaN)
    gen = recipe.generator
    conditions = [c for c, on in (("view", gen.num_views > 0), ("ef", gen.ef_conditioning)) if on]
    columns = ["tokens", "ecg", *conditions]
    names = ds.schema().names
    flags = [c for c in _flag_columns(names) if c != "ecg"]
    ds = ds.select_columns(["tokens", "ecg", "split", *conditions, *flags, *_sync_column(names)])
    ds = ds.map_batches(_with_ecg, batch_format="numpy",
                        fn_kwargs={"allow_unsynchronized": allow_unsynchronized})
    if conditions:
        ds = ds.map_batches(make_condition_columns_fn(gen.num_views, gen.ef_conditioning), batch_format="numpy")
    train = ds.filter(expr=col("split") == "train").select_columns(columns)  # Arrow filters
    if has_val:
        val = ds.filter(expr=col("split") == "val").select_columns(columns)
    else:
        log.warning("%s: no val clips with an ECG; validating on train rows", tokens)
        val = train
    return {"train": train, "val": val}, info


def validation_rows(tokens: str, n: int, allow_unsynchronized: bool = False) -> dict[str, Any]:
    """Up to ``n`` rows of a ``tokens/v1`` dataset's val split that train the generator (an ECG,
    recorded with the echo unless ``allow_unsynchronized``), as numpy columns ``tokens``, ``ecg``
    and ``view``/``ef`` when the dataset has them; read in this process, no Ray. Rows of the train
    split stand in (with a warning) when the val split has none.

    Raises:
        EchoPulseError: no usable row in either split.
    """
    import numpy as np
    import pyarrow.compute as pc

    from pipelines.common import parquet_dataset

    dataset = parquet_dataset(storage.join(tokens, "tokens"))
    if dataset is None:
        raise EchoPulseError(f"{tokens}: no token rows")
    names = dataset.schema.names
    columns = ["tokens", "ecg", "split", *[c for c in ("view", "ef") if c in names],
               *[c for c in _flag_columns(names) if c != "ecg"], *_sync_column(names)]
    for split in ("val", "train"):
        out: dict[str, list] = {}
        for batch in dataset.to_batches(columns=columns, filter=pc.field("split") == split):
            rows = _with_ecg(_numpy_batch(batch), allow_unsynchronized)
            for key in ("tokens", "ecg", "view", "ef"):
                if key in rows:
                    out.setdefault(key, []).extend(rows[key])
            if len(out.get("tokens", [])) >= n:
                break
        if out.get("tokens"):
            if split == "train":
                log.warning("%s: no usable val rows; calibrating on train rows", tokens)
            return {k: np.stack(v[:n]) if k in ("tokens", "ecg") else np.asarray(v[:n]) for k, v in out.items()}
    raise EchoPulseError(f"{tokens}: no row with an ECG recorded with its echo to calibrate on")
