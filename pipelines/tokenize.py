"""Tokenize: ``clips/v1`` -> ``tokens/v1`` Parquet with a pool of tokenizer actors (Ray Data).

One tokenizer per actor (on a GPU when the pool asks for one); each batch of clips becomes a
batch of token grids carrying the conditioning columns forward.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from echopulse import storage
from echopulse.errors import EchoPulseError
from echopulse.schema import CLIP_COLUMNS, CLIPS_SCHEMA, TOKENS_SCHEMA, missing_columns
from pipelines.common import read_dataset_info, read_parquet_dir, write_dataset_info

log = logging.getLogger(__name__)


class TokenizeBatch:
    """Ray Data callable class: loads the tokenizer once per actor, encodes batches of clips."""

    def __init__(self, tokenizer_uri: str, use_gpu: bool = False) -> None:
        import torch

        from echopulse.models.checkpoint import load_checkpoint

        self._tmp = tempfile.TemporaryDirectory()
        local = storage.local_copy(tokenizer_uri, self._tmp.name)
        self.model, self.cfg, info = load_checkpoint(local, expected_kind="tokenizer")
        self.tokenizer_id = info["model_id"]
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        frames = torch.as_tensor(np.asarray(batch["frames"]), device=self.device)
        with torch.inference_mode():
            video = frames.float() / 255.0  # (b, t, h, w)
            tokens = self.model.encode(video).cpu().numpy()  # (b, t', h', w')
        n = len(tokens)
        return {
            "clip_id": batch["clip_id"],
            "tokens": tokens.astype(np.int16 if self.cfg.codebook_size < 2**15 else np.int32),
            "token_grid": np.tile(np.asarray(self.cfg.token_grid, dtype=np.int32), (n, 1)),
            "tokenizer_id": np.asarray([self.tokenizer_id] * n),
            "ecg": batch["ecg"],
            "view": batch["view"],
            "ef": batch["ef"],
            "split": batch["split"],
        }


@dataclass(frozen=True)
class TokenizeSummary:
    clips: int
    tokens: int
    tokenizer_id: str
    out: str


def run_tokenize(clips: str, tokenizer: str, out: str, actors: int = 1, batch_size: int = 16,
                 use_gpu: bool = False) -> TokenizeSummary:
    """Encode every clip of a ``clips/v1`` dataset into ``out`` (a ``tokens/v1`` dataset).

    Args:
        clips: an ingest output directory or URI.
        tokenizer: a tokenizer checkpoint directory or URI.
        out: output directory or URI; replaced if it exists.
        actors: tokenizer actors in the pool.
        batch_size: clips per batch.
        use_gpu: one GPU per actor.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from echopulse.models.checkpoint import load_checkpoint
    from echopulse.runtime import init_ray

    read_dataset_info(clips, CLIPS_SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        _, tok_cfg, tok_info = load_checkpoint(storage.local_copy(tokenizer, tmp),
                                               expected_kind="tokenizer")
    init_ray()
    ds = read_parquet_dir(storage.join(clips, "clips"))
    missing = missing_columns(ds.schema().names, CLIP_COLUMNS)
    if missing:
        raise EchoPulseError(f"{clips}: clips dataset lacks column(s) {', '.join(missing)}")
    n_clips = ds.count()
    if n_clips == 0:
        raise EchoPulseError(f"{clips}: the clips dataset is empty")
    tokens = ds.select_columns(["clip_id", "frames", "ecg", "view", "ef", "split"]).map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"tokenizer_uri": tokenizer, "use_gpu": use_gpu},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
    )
    target = storage.join(out, "tokens")
    if storage.exists(target):
        fs, path = storage.filesystem(target)
        fs.rm(path, recursive=True)
    fs, path = storage.arrow_filesystem(target)
    tokens.write_parquet(path, filesystem=fs)
    n_tokens = read_parquet_dir(target).count()
    counts = {"clips": n_clips, "tokens": n_tokens}
    write_dataset_info(out, TOKENS_SCHEMA, {"tokenizer": tokenizer}, counts,
                       tokenizer_id=tok_info["model_id"], token_grid=list(tok_cfg.token_grid),
                       codebook_size=tok_cfg.codebook_size,
                       split_counts=_split_counts(target))
    return TokenizeSummary(clips=n_clips, tokens=n_tokens, tokenizer_id=tok_info["model_id"],
                           out=out)


def _split_counts(tokens_uri: str) -> dict[str, int]:
    ds = read_parquet_dir(tokens_uri).select_columns(["split"])
    counts: dict[str, int] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
        for s in batch["split"]:
            counts[str(s)] = counts.get(str(s), 0) + 1
    return counts
