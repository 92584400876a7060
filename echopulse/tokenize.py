"""Tokenize as plain functions: ``clips/v1`` Parquet parts -> ``tokens/v1`` rows, with quarantine.

Nothing is dropped silently: every clip ends as a token row or as a quarantined row.

- :func:`check_parts` reads each part's footer: a part that cannot be read (``decode``) or whose
  schema does not fit the tokenizer (``schema``: missing columns, another frame or ECG geometry)
  is quarantined whole (one row per clip when its ``clip_id`` column can be read, else one row for
  the file).
- :func:`make_tokenize_fn` encodes the readable parts; a row whose frames cannot be decoded
  (``decode``), whose ECG is not finite (``ecg``) or whose encoding fails (``encode``, retried row
  by row) comes back flagged with its stage and error.

``pipelines/tokenize.py`` wires these into a Ray Data actor pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from echopulse import storage
from echopulse.schema import REQUIRED_CLIP_COLUMNS, missing_columns

log = logging.getLogger(__name__)

CARRIED = ("clip_id", "frames", "ecg", "view", "ef", "split")
CARRIED_IF_PRESENT = ("ecg_sync",)  # clips/v1 columns older datasets lack
# flag columns on every output batch (empty for good rows); the pipeline drops them
ERROR, STAGE, SOURCE = "_error", "_stage", "_source"


def tensor_shape(field_type: pa.DataType) -> tuple[int, ...] | None:
    """The per-row shape of a fixed-shape tensor column (Arrow's or Ray's), else ``None``."""
    shape = getattr(field_type, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _tensor_to_numpy(column) -> np.ndarray:
    """A tensor column (Arrow's fixed-shape tensor or Ray's tensor extension) as one array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if hasattr(column, "to_numpy_ndarray"):
        return column.to_numpy_ndarray()
    return np.asarray(column.to_numpy(zero_copy_only=False))


def _rows_to_numpy(column: pa.ChunkedArray, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, list[str | None]]:
    """A tensor column as ``(n, *shape)``; rows that cannot be decoded are zeros with an error."""
    n = len(column)
    try:
        if column.null_count == 0:
            out = np.asarray(_tensor_to_numpy(column), dtype=dtype)
            if out.shape == (n, *shape):
                return out, [None] * n
    except Exception:  # fall back to row by row: find the rows that fail
        log.debug("column decode failed; decoding row by row", exc_info=True)
    out = np.zeros((n, *shape), dtype=dtype)
    errors: list[str | None] = [None] * n
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    for i in range(n):
        try:
            if not flat[i].is_valid:
                raise ValueError("null value")
            row = np.asarray(_tensor_to_numpy(flat.slice(i, 1)), dtype=dtype)[0]
            if row.shape != shape:
                raise ValueError(f"shape {row.shape}, expected {shape}")
            out[i] = row
        except Exception as exc:
            errors[i] = f"{type(exc).__name__}: {exc}"
    return out, errors


class PartTokenizer:
    """Tokenizes whole ``clips/v1`` Parquet parts with a loaded tokenizer (no Ray).

    It reads each part itself, ``batch_size`` clips at a time, so a part Arrow cannot read (for
    example a null inside a fixed-shape tensor column, which Parquet writes but cannot read back)
    becomes quarantine rows instead of an exception. Output batches carry ``_error``/``_stage``/
    ``_source``, empty for good rows.
    """

    def __init__(self, model, tokenizer_id: str, batch_size: int = 16, ecg_samples: int = 0,
                 device: str = "cpu") -> None:
        import torch

        self.model = model
        self.cfg = model.cfg
        self.tokenizer_id = tokenizer_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.frames_shape = (self.cfg.frames, self.cfg.image_size, self.cfg.image_size)
        self.ecg_shape = (12, int(ecg_samples))
        self.grid = tuple(self.cfg.token_grid)
        self.token_dtype = np.int16 if self.cfg.codebook_size < 2**15 else np.int32

    def tokenize_part(self, part: str):
        done: set[str] = set()
        try:
            fs, path = storage.filesystem(part)
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                names = parquet.schema_arrow.names
                columns = [*CARRIED, *[c for c in CARRIED_IF_PRESENT if c in names]]
                for record_batch in parquet.iter_batches(batch_size=self.batch_size, columns=columns):
                    out = self.encode_table(pa.Table.from_batches([record_batch]), part)
                    done.update(str(c) for c in out["clip_id"])
                    yield out
        except Exception as exc:  # the rest of this part cannot be read: quarantine its clips
            log.debug("reading %s failed", part, exc_info=True)
            error = f"unreadable rows ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
            try:
                with fs.open(path, "rb") as f:
                    ids = pq.read_table(f, columns=["clip_id"]).column("clip_id").to_pylist()
            except Exception:
                ids = [""]
            left = [str(i or "") for i in ids if str(i or "") not in done] or [""]
            yield self._quarantined(left, part, "decode", error)

    def _quarantined(self, ids: list[str], part: str, stage: str, error: str) -> dict[str, Any]:
        n = len(ids)
        return {
            "clip_id": np.asarray(ids, dtype=object),
            "tokens": np.zeros((n, *self.grid), dtype=self.token_dtype),
            "token_grid": np.tile(np.asarray(self.grid, dtype=np.int32), (n, 1)),
            "tokenizer_id": np.asarray([self.tokenizer_id] * n, dtype=object),
            "ecg": np.zeros((n, *self.ecg_shape), dtype=np.float32),
            "view": np.asarray([""] * n, dtype=object),
            "ef": np.full(n, np.nan, dtype=np.float32),
            "split": np.asarray([""] * n, dtype=object),
            "ecg_sync": np.zeros(n, dtype=bool),
            SOURCE: np.asarray([part] * n, dtype=object),
            STAGE: np.asarray([stage] * n, dtype=object),
            ERROR: np.asarray([error] * n, dtype=object),
        }

    def _encode(self, frames: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            video = torch.as_tensor(frames, device=self.device).float() / 255.0  # (b, t, h, w)
            return self.model.encode(video).cpu().numpy()  # (b, t', h', w')

    def encode_table(self, table: pa.Table, source: str = "") -> dict[str, Any]:
        """Token rows for a table of clips; rows that fail carry their stage and error."""
        n = table.num_rows
        errors: list[tuple[str, str] | None] = [None] * n
        frames, bad = _rows_to_numpy(table.column("frames"), self.frames_shape, np.uint8)
        for i, e in enumerate(bad):
            if e:
                errors[i] = ("decode", f"frames: {e}")
        ecg, bad = _rows_to_numpy(table.column("ecg"), self.ecg_shape, np.float32)
        for i, e in enumerate(bad):
            if e and errors[i] is None:
                errors[i] = ("decode", f"ecg: {e}")
        for i in np.flatnonzero(~np.isfinite(ecg.reshape(n, -1)).all(axis=1)):
            if errors[i] is None:
                errors[i] = ("ecg", "ECG has non-finite values (NaN/inf)")

        tokens = np.zeros((n, *self.grid), dtype=self.token_dtype)
        good = [i for i in range(n) if errors[i] is None]
        if good:
            try:
                tokens[good] = self._encode(frames[good])
            except Exception:  # one bad row must not lose the batch: retry row by row
                log.debug("batch encode failed; encoding row by row", exc_info=True)
                for i in good:
                    try:
                        tokens[i] = self._encode(frames[i : i + 1])[0]
                    except Exception as exc:
                        errors[i] = ("encode", f"{type(exc).__name__}: {exc}")

        def column(name: str, fill: Any) -> np.ndarray:
            values = table.column(name).to_pylist()
            return np.asarray([fill if v is None else v for v in values], dtype=object)

        return {
            "clip_id": column("clip_id", ""),
            "tokens": tokens,
            "token_grid": np.tile(np.asarray(self.grid, dtype=np.int32), (n, 1)),
            "tokenizer_id": np.asarray([self.tokenizer_id] * n, dtype=object),
            "ecg": ecg,
            "view": column("view", ""),
            "ef": table.column("ef").to_numpy(zero_copy_only=False).astype(np.float32),
            "split": column("split", ""),
            "ecg_sync": _ecg_sync(table, ecg),
            SOURCE: np.asarray([source] * n, dtype=object),
            STAGE: np.asarray([e[0] if e else "" for e in errors], dtype=object),
            ERROR: np.asarray([e[1] if e else "" for e in errors], dtype=object),
        }


def _ecg_sync(table: pa.Table, ecg: np.ndarray) -> np.ndarray:
    """Per clip, whether its ECG was recorded with the echo: the ``ecg_sync`` column, or for a
    clips dataset written before that column, any clip with an ECG (those came only from embedded
    waveforms and manifest pairs taken as time-aligned)."""
    if "ecg_sync" in table.column_names:
        return np.asarray([bool(v) for v in table.column("ecg_sync").to_pylist()], dtype=bool)
    return np.abs(ecg.reshape(len(ecg), -1)).max(axis=1) > 0 if len(ecg) else np.zeros(0, dtype=bool)


def make_tokenize_fn(model, tokenizer_id: str, batch_size: int = 16, ecg_samples: int = 0,
                     device: str = "cpu") -> Callable[[dict[str, Any]], Iterator[dict[str, Any]]]:
    """The tokenize stage as a plain function: a row naming one Parquet part -> its token rows.

    Args:
        model: a loaded :class:`echopulse.models.tokenizer.VideoTokenizer` (already on ``device``,
            in eval mode).
        tokenizer_id: the checkpoint's ``model_id``, written into every token row.
        batch_size: clips per encode call.
        ecg_samples: the ECG length of the clips (12 x ``ecg_samples``).
        device: where the model runs.

    Returns:
        ``fn({"path": part})`` yielding column batches (``tokens/v1`` columns plus ``_error``,
        ``_stage``, ``_source``; a row with a non-empty ``_error`` is a quarantined clip). It never
        raises for bad data.
    """
    tokenizer = PartTokenizer(model, tokenizer_id, batch_size, ecg_samples, device)

    def tokenize(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from tokenizer.tokenize_part(str(row["path"]))

    return tokenize


def part_files(clips: str) -> list[str]:
    """The Parquet parts of a clips dataset, as URIs (remote) or paths (local)."""
    root = storage.join(clips, "clips")
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return []
    found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if storage.is_remote(clips):
        scheme = str(clips).split("://", 1)[0]
        return [f"{scheme}://{p}" for p in found]
    return found


def check_parts(parts: list[str], frames_shape: tuple[int, ...],
                ecg_samples: int | None) -> tuple[list[str], list[dict[str, str]], int]:
    """Split parts into readable ones of the expected schema and quarantine rows for the rest.

    Reads only each part's footer (and the ``clip_id`` column of a part that is quarantined).

    Returns:
        ``(good parts, quarantine rows, clips in good parts)``.
    """
    good: list[str] = []
    rows: list[dict[str, str]] = []
    n_good = 0
    for part in parts:
        fs, path = storage.filesystem(part)
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f)
                schema, n = meta.schema_arrow, meta.metadata.num_rows
        except Exception as exc:
            rows.append({"clip_id": "", "source_uri": part, "stage": "decode",
                         "error": f"unreadable Parquet part ({type(exc).__name__})",
                         "detail": str(exc)[:500]})
            continue
        problem = None
        missing = missing_columns(schema.names, REQUIRED_CLIP_COLUMNS)
        if missing:
            problem = f"lacks column(s) {', '.join(missing)}"
        else:
            shape = tensor_shape(schema.field("frames").type)
            ecg = tensor_shape(schema.field("ecg").type)
            if shape is not None and shape != tuple(frames_shape):
                problem = f"frames of shape {shape}; the tokenizer takes {tuple(frames_shape)}"
            elif ecg is not None and ecg_samples and ecg[-1] != ecg_samples:
                problem = f"ECG of {ecg[-1]} samples; the tokenizer's clips have {ecg_samples}"
        if problem is None:
            good.append(part)
            n_good += n
            continue
        try:
            with fs.open(path, "rb") as f:
                ids = pq.read_table(f, columns=["clip_id"]).column("clip_id").to_pylist()
        except Exception:
            ids = [""]
        rows += [{"clip_id": str(i or ""), "source_uri": part, "stage": "schema", "error": problem,
                  "detail": ""} for i in ids]
    return good, rows, n_good
