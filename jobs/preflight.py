"""Checks a training runs before it starts Ray: bad input fails in seconds, with one clear line.

Each function raises :class:`~echopulse.errors.EchoPulseError` (the CLI's exit 2, one line, no
traceback) and reads only small things: ``dataset.json``, Parquet footers, the first row group of
one column, a checkpoint's ``config.json``, and a probe file written to (and removed from) the output.

- an empty dataset, or one of another schema or geometry than the recipe's;
- a tokens dataset made by another tokenizer than the one given (``tokenizer_id`` in
  ``dataset.json`` and in the rows, against the checkpoint's ``model_id``);
- an output location that cannot be written (read-only directory, missing bucket, no credentials).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow.parquet as pq

from echopulse import storage
from echopulse.errors import EchoPulseError
from echopulse.schema import CLIPS_SCHEMA, REQUIRED_CLIP_COLUMNS, TOKEN_COLUMNS, TOKENS_SCHEMA, missing_columns

log = logging.getLogger(__name__)


def _parts(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def first_rows_part(dataset: str, sub: str) -> tuple[Any, str, Any]:
    """``(fs, path, ParquetFile metadata schema)`` of the first non-empty Parquet part of
    ``dataset/sub``; raises when there is none (an empty dataset)."""
    root = storage.join(dataset, sub)
    fs, _ = storage.filesystem(root)
    for path in _parts(root):
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f)
                rows, schema = meta.metadata.num_rows, meta.schema_arrow
        except Exception as exc:
            raise EchoPulseError(f"{dataset}: {path} is not a readable Parquet file "
                                 f"({type(exc).__name__})") from exc
        if rows > 0:
            return fs, path, schema
    raise EchoPulseError(f"{dataset}: the dataset is empty (no rows under {sub}/)")


def _shape(schema, column: str) -> tuple[int, ...] | None:
    shape = getattr(schema.field(column).type, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def check_clips(clips: str, recipe) -> dict[str, Any]:
    """A non-empty ``clips/v1`` dataset whose clips have the recipe's geometry."""
    from echopulse.schema import read_dataset_info

    info = read_dataset_info(clips, CLIPS_SCHEMA)
    _, path, schema = first_rows_part(clips, "clips")
    missing = missing_columns(schema.names, REQUIRED_CLIP_COLUMNS)
    if missing:
        raise EchoPulseError(f"{clips}: not a clips/v1 dataset ({path} lacks column(s) "
                             f"{', '.join(missing)})")
    expected = (recipe.clip.frames, recipe.clip.size, recipe.clip.size)
    found = _shape(schema, "frames")
    if found is not None and found != expected:
        raise EchoPulseError(f"{clips}: clips of shape {found} (frames, height, width), but recipe "
                             f"{recipe.name!r} takes {expected}")
    return info


def tokenizer_model_id(tokenizer: str) -> str:
    """The ``model_id`` of a tokenizer checkpoint, from its ``config.json`` alone."""
    config = storage.join(tokenizer, "config.json")
    try:
        meta = json.loads(storage.read_text(config))
    except FileNotFoundError as exc:
        raise EchoPulseError(f"{tokenizer}: not a checkpoint (no config.json)") from exc
    except (OSError, ValueError) as exc:
        raise EchoPulseError(f"{tokenizer}: unreadable checkpoint config ({exc})") from exc
    if meta.get("kind") != "tokenizer":
        raise EchoPulseError(f"{tokenizer}: a {meta.get('kind')} checkpoint, expected a tokenizer")
    return str(meta.get("model_id"))


def check_tokens(tokens: str, recipe, tokenizer: str) -> dict[str, Any]:
    """A non-empty ``tokens/v1`` dataset of the recipe's token grid, made by ``tokenizer``."""
    from echopulse.schema import read_dataset_info

    info = read_dataset_info(tokens, TOKENS_SCHEMA)
    fs, path, schema = first_rows_part(tokens, "tokens")
    missing = missing_columns(schema.names, TOKEN_COLUMNS)
    if missing:
        raise EchoPulseError(f"{tokens}: not a tokens/v1 dataset ({path} lacks column(s) "
                             f"{', '.join(missing)})")
    grid = _shape(schema, "tokens")
    if grid is not None and grid != tuple(recipe.generator.token_grid):
        raise EchoPulseError(f"{tokens}: token grid {grid}, but recipe {recipe.name!r} generates "
                             f"{tuple(recipe.generator.token_grid)}")
    ecg = _shape(schema, "ecg")
    if ecg is not None and ecg[-1] != recipe.clip.ecg_samples:
        raise EchoPulseError(f"{tokens}: ECGs of {ecg[-1]} samples, but recipe {recipe.name!r} "
                             f"takes {recipe.clip.ecg_samples}")
    expected = tokenizer_model_id(tokenizer)
    with fs.open(path, "rb") as f:
        first = pq.ParquetFile(f).read_row_group(0, columns=["tokenizer_id"]).column(0)
    made_by = {info.get("tokenizer_id"), *(str(v) for v in first.unique().to_pylist())}
    if made_by != {expected}:
        other = ", ".join(sorted(str(m) for m in made_by - {expected})) or "?"
        raise EchoPulseError(f"{tokens}: tokens were made by tokenizer {other}, but {tokenizer} is "
                             f"tokenizer {expected}; tokenize again with it or pass the one used")
    return info


def check_writable(out: str) -> None:
    """``out`` (a directory or URI) can be written: a probe file is created and removed."""
    storage.check_writable(out)


def tokenizer_job(clips: str, out: str, recipe) -> None:
    """Everything ``train tokenizer`` needs before Ray starts."""
    check_clips(clips, recipe)
    check_writable(out)


def generator_job(tokens: str, tokenizer: str, out: str, recipe) -> None:
    """Everything ``train generator`` needs before Ray starts."""
    check_tokens(tokens, recipe, tokenizer)
    check_ecg_checkpoint(recipe.generator.ecg)
    check_writable(out)


def check_ecg_checkpoint(ecg_cfg) -> None:
    """A pretrained ECG encoder the config names must be a readable ST-MEM file that fits it."""
    if not ecg_cfg.checkpoint:
        return
    from echopulse.models.ecg_encoder import ECGEncoder, load_stmem_checkpoint

    try:
        load_stmem_checkpoint(ecg_cfg.checkpoint, ECGEncoder(ecg_cfg))
    except (ValueError, OSError) as exc:
        raise EchoPulseError(f"ECG encoder checkpoint {ecg_cfg.checkpoint}: {exc}") from None
