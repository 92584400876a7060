"""Tokenize: ``clips/v1`` -> ``tokens/v1`` Parquet with a pool of tokenizer actors (Ray Data).

One tokenizer per actor (on a GPU when the pool asks for one, by default when the cluster has
GPUs); each batch of clips becomes a batch of token grids carrying the conditioning columns forward.

Like ingest, nothing is dropped silently and one bad clip never fails the run: every clip ends as a
token row or as a quarantine row.

- Before Ray reads anything, the driver checks each Parquet part's footer: a part that cannot be
  read (``decode``) or whose schema does not fit the tokenizer (``schema``: missing columns, another
  frame or ECG geometry) is quarantined whole (one row per clip when its ``clip_id`` column can be
  read, else one row for the file).
- Inside the actors a row whose frames cannot be decoded (``decode``), whose ECG is not finite
  (``ecg``) or whose encoding fails (``encode``, retried row by row) is quarantined.

Layout of OUT::

    tokens/*.parquet               tokens/v1 rows
    quarantine/quarantine.parquet  source_uri, clip_id, stage, error, detail
    summary.json, dataset.json     counts (clips, tokens, quarantined)
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from echopulse import storage
from echopulse.errors import EchoPulseError
from echopulse.schema import (CLIP_COLUMNS, CLIPS_SCHEMA, TOKENS_SCHEMA, missing_columns, read_dataset_info,
                              write_dataset_info, write_quarantine)

log = logging.getLogger(__name__)

CARRIED = ("clip_id", "frames", "ecg", "view", "ef", "split")
_ERROR, _STAGE, _SOURCE = "_error", "_stage", "_source"


def _tensor_shape(field_type: pa.DataType) -> tuple[int, ...] | None:
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


class TokenizeParts:
    """Ray Data callable class: loads the tokenizer once per actor and tokenizes whole Parquet parts.

    Each input row names one part; the actor reads it itself, ``batch_size`` clips at a time, so
    a part Arrow cannot read (for example a null inside a fixed-shape tensor column, which Parquet
    writes but cannot read back) becomes quarantine rows instead of failing a Ray Data read task,
    and with it the run. Output rows carry ``_error``/``_stage``/``_source``, empty for good rows.
    """

    def __init__(self, tokenizer_uri: str, batch_size: int = 16, use_gpu: bool = False,
                 ecg_samples: int = 0) -> None:
        import torch

        from echopulse.models.checkpoint import load_checkpoint

        self._tmp = tempfile.TemporaryDirectory()
        local = storage.local_copy(tokenizer_uri, self._tmp.name)
        self.model, self.cfg, info = load_checkpoint(local, expected_kind="tokenizer")
        self.tokenizer_id = info["model_id"]
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.frames_shape = (self.cfg.frames, self.cfg.image_size, self.cfg.image_size)
        self.ecg_shape = (12, int(ecg_samples))
        self.grid = tuple(self.cfg.token_grid)
        self.token_dtype = np.int16 if self.cfg.codebook_size < 2**15 else np.int32

    def __call__(self, batch: dict[str, np.ndarray]):
        for part in batch["path"]:
            yield from self.tokenize_part(str(part))

    def tokenize_part(self, part: str):
        done: set[str] = set()
        try:
            fs, path = storage.filesystem(part)
            with fs.open(path, "rb") as f:
                for record_batch in pq.ParquetFile(f).iter_batches(batch_size=self.batch_size,
                                                                   columns=list(CARRIED)):
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
            _SOURCE: np.asarray([part] * n, dtype=object),
            _STAGE: np.asarray([stage] * n, dtype=object),
            _ERROR: np.asarray([error] * n, dtype=object),
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
            _SOURCE: np.asarray([source] * n, dtype=object),
            _STAGE: np.asarray([e[0] if e else "" for e in errors], dtype=object),
            _ERROR: np.asarray([e[1] if e else "" for e in errors], dtype=object),
        }


@dataclass(frozen=True)
class TokenizeSummary:
    clips: int
    tokens: int
    tokenizer_id: str
    out: str
    quarantined: int = 0


def _part_files(clips: str) -> list[str]:
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
        missing = missing_columns(schema.names, CLIP_COLUMNS)
        if missing:
            problem = f"lacks column(s) {', '.join(missing)}"
        else:
            shape = _tensor_shape(schema.field("frames").type)
            ecg = _tensor_shape(schema.field("ecg").type)
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


def run_tokenize(clips: str, tokenizer: str, out: str, actors: int = 1, batch_size: int = 16,
                 use_gpu: bool | None = None) -> TokenizeSummary:
    """Encode every clip of a ``clips/v1`` dataset into ``out`` (a ``tokens/v1`` dataset).

    Clips that cannot be tokenized go to ``out/quarantine/quarantine.parquet``; the counts go to
    ``out/summary.json`` and ``out/dataset.json``.

    Args:
        clips: an ingest output directory or URI.
        tokenizer: a tokenizer checkpoint directory or URI.
        out: output directory or URI; replaced if it exists.
        actors: tokenizer actors in the pool.
        batch_size: clips per batch (per encode call on an actor).
        use_gpu: one GPU per actor; ``None``: when the Ray cluster has GPUs.

    Raises:
        EchoPulseError: no clips at all, or not one clip could be tokenized (after writing the
            quarantine, which says why).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from echopulse.models.checkpoint import load_checkpoint
    from echopulse.runtime import init_ray
    from pipelines.common import read_parquet_dir

    if batch_size < 1 or actors < 1:
        raise EchoPulseError("--batch-size and --actors must be at least 1")
    read_dataset_info(clips, CLIPS_SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        _, tok_cfg, tok_info = load_checkpoint(storage.local_copy(tokenizer, tmp),
                                               expected_kind="tokenizer")
    ecg_samples = (tok_info.get("extra", {}).get("clip") or {}).get("ecg_samples")
    frames_shape = (tok_cfg.frames, tok_cfg.image_size, tok_cfg.image_size)
    parts = _part_files(clips)
    good, quarantine, n_good = check_parts(parts, frames_shape, ecg_samples)
    n_clips = n_good + sum(1 for q in quarantine if q["clip_id"] or q["stage"] == "decode")
    if n_clips == 0:
        raise EchoPulseError(f"{clips}: the clips dataset is empty")

    for sub in ("tokens", "quarantine"):
        target = storage.join(out, sub)
        if storage.exists(target):
            fs, path = storage.filesystem(target)
            fs.rm(path, recursive=True)
    target = storage.join(out, "tokens")
    n_tokens = 0
    split_counts: dict[str, int] = {}
    if good:
        init_ray()
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        if not ecg_samples:  # an older tokenizer checkpoint: the parts' own ECG length
            with storage.filesystem(good[0])[0].open(storage.filesystem(good[0])[1], "rb") as f:
                ecg_samples = (_tensor_shape(pq.ParquetFile(f).schema_arrow.field("ecg").type) or (0,))[-1]
        remote_args: dict[str, Any] = {}
        env = storage.aws_env()
        if env and (storage.is_remote(clips) or storage.is_remote(tokenizer)):
            remote_args["runtime_env"] = {"env_vars": env}
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.from_items([{"path": p} for p in good],
                                 override_num_blocks=min(len(good), max(2 * cpus, 2 * actors, 1)))
        encoded = ds.map_batches(
            TokenizeParts,
            fn_constructor_kwargs={"tokenizer_uri": tokenizer, "batch_size": batch_size,
                                   "use_gpu": bool(use_gpu), "ecg_samples": int(ecg_samples)},
            batch_size=1,
            compute=ActorPoolStrategy(size=actors),
            num_gpus=1 if use_gpu else 0,
            **remote_args,
        ).materialize()
        bad = encoded.filter(lambda r: bool(r[_ERROR])).select_columns(
            ["clip_id", _SOURCE, _STAGE, _ERROR]).take_all()
        quarantine += [{"clip_id": str(r["clip_id"]), "source_uri": str(r[_SOURCE]), "stage": str(r[_STAGE]),
                        "error": str(r[_ERROR]).splitlines()[0][:500], "detail": str(r[_ERROR])[:2000]}
                       for r in bad]
        if len(bad) < n_good:
            ok = encoded.filter(lambda r: not r[_ERROR]).drop_columns([_ERROR, _STAGE, _SOURCE])
            afs, apath = storage.arrow_filesystem(target)
            ok.write_parquet(apath, filesystem=afs)
            for batch in read_parquet_dir(target).select_columns(["split"]).iter_batches(
                    batch_format="numpy", batch_size=4096):
                for s in batch["split"]:
                    split_counts[str(s)] = split_counts.get(str(s), 0) + 1
            n_tokens = sum(split_counts.values())

    write_quarantine(out, quarantine)
    summary = TokenizeSummary(clips=n_clips, tokens=n_tokens, tokenizer_id=tok_info["model_id"],
                              out=out, quarantined=len(quarantine))
    counts = {"clips": n_clips, "tokens": n_tokens, "quarantined": len(quarantine)}
    storage.write_text(storage.join(out, "summary.json"), json.dumps(counts, indent=2))
    write_dataset_info(out, TOKENS_SCHEMA, {"tokenizer": tokenizer, "batch_size": batch_size}, counts,
                       tokenizer_id=tok_info["model_id"], token_grid=list(tok_cfg.token_grid),
                       codebook_size=tok_cfg.codebook_size, split_counts=split_counts)
    for q in quarantine[:20]:
        log.warning("quarantined %s (%s): %s", q["clip_id"] or q["source_uri"], q["stage"], q["error"])
    if n_tokens == 0:
        raise EchoPulseError(f"no clip could be tokenized; reasons in {storage.join(out, 'quarantine')}")
    return summary


def write_random_tokens(out: str, recipe, n: int = 32, seed: int = 0, val_fraction: float = 0.25,
                        tokenizer_out: str | None = None) -> str:
    """A small ``tokens/v1`` dataset of random tokens and ECGs, plus the (untrained) tokenizer
    checkpoint it claims to come from: for benchmarks and tests that need a generator's input
    without training a tokenizer. Returns the tokenizer checkpoint directory.
    """
    from echopulse.models.checkpoint import save_checkpoint
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.config import to_dict

    import torch

    torch.manual_seed(seed)
    tokenizer_out = tokenizer_out or storage.join(out, "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        tok_id = save_checkpoint(VideoTokenizer(recipe.tokenizer), recipe.tokenizer, tmp,
                                 kind="tokenizer", extra={"clip": to_dict(recipe.clip)})
        storage.upload_dir(tmp, tokenizer_out)
    rng = np.random.default_rng(seed)
    grid = tuple(recipe.tokenizer.token_grid)
    n_val = int(round(n * val_fraction))
    splits = ["val"] * n_val + ["train"] * (n - n_val)
    tokens = rng.integers(0, recipe.tokenizer.codebook_size, size=(n, *grid)).astype(np.int16)
    ecg = rng.standard_normal((n, 12, recipe.clip.ecg_samples)).astype(np.float32)
    table = pa.table({
        "clip_id": [f"random-{seed}-{i}" for i in range(n)],
        "tokens": pa.FixedShapeTensorArray.from_numpy_ndarray(tokens),
        "token_grid": [list(grid)] * n,
        "tokenizer_id": [tok_id] * n,
        "ecg": pa.FixedShapeTensorArray.from_numpy_ndarray(ecg),
        "view": ["A4C"] * n,
        "ef": rng.uniform(0.3, 0.7, n).astype(np.float32),
        "split": splits,
    })
    storage.makedirs(storage.join(out, "tokens"))
    fs, path = storage.filesystem(storage.join(out, "tokens", "part-0.parquet"))
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    counts = {"clips": n, "tokens": n, "quarantined": 0}
    write_dataset_info(out, TOKENS_SCHEMA, {"random": True, "seed": seed}, counts, tokenizer_id=tok_id,
                       token_grid=list(grid), codebook_size=recipe.tokenizer.codebook_size,
                       split_counts={"train": n - n_val, **({"val": n_val} if n_val else {})})
    return tokenizer_out
