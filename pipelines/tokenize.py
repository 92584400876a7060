"""Tokenize: ``clips/v1`` -> ``tokens/v1`` Parquet with a pool of tokenizer actors (Ray Data).

Ray is only the wiring here: the driver checks each part's footer (:func:`echopulse.tokenize.
check_parts`), then one tokenizer per actor (on a GPU when the pool asks for one, by default when
the cluster has GPUs) maps part rows through :func:`echopulse.tokenize.make_tokenize_fn`. Every
clip ends as a token row or as a quarantine row; one bad clip never fails the run.

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

import numpy as np
import pyarrow.parquet as pq

from echopulse import storage
from echopulse.errors import EchoPulseError
from echopulse.schema import CLIPS_SCHEMA, TOKENS_SCHEMA, read_dataset_info, write_dataset_info, write_quarantine
from echopulse.tokenize import ERROR, SOURCE, STAGE, check_parts, make_tokenize_fn, part_files, tensor_shape
from echopulse.tracking import dataset_digest

log = logging.getLogger(__name__)


class TokenizeParts:
    """Ray Data callable class: loads the tokenizer once per actor and maps part rows through
    :func:`echopulse.tokenize.make_tokenize_fn`."""

    def __init__(self, tokenizer_uri: str, batch_size: int = 16, use_gpu: bool = False,
                 ecg_samples: int = 0, credentials: storage.Credentials | None = None) -> None:
        import torch

        from echopulse.models.checkpoint import load_checkpoint

        storage.apply_credentials(credentials)
        self._tmp = tempfile.TemporaryDirectory()
        local = storage.local_copy(tokenizer_uri, self._tmp.name)
        model, _, info = load_checkpoint(local, expected_kind="tokenizer")
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        if device == "cpu":
            from pipelines.common import match_torch_threads_to_actor

            match_torch_threads_to_actor()
        self.fn = make_tokenize_fn(model, info["model_id"], batch_size, ecg_samples, device)

    def __call__(self, batch: dict[str, np.ndarray]):
        for part in batch["path"]:
            yield from self.fn({"path": str(part)})


@dataclass(frozen=True)
class TokenizeSummary:
    clips: int
    tokens: int
    tokenizer_id: str
    out: str
    quarantined: int = 0


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
    from echopulse.models.checkpoint import load_checkpoint

    if batch_size < 1 or actors < 1:
        raise EchoPulseError("--batch-size and --actors must be at least 1")
    read_dataset_info(clips, CLIPS_SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        _, tok_cfg, tok_info = load_checkpoint(storage.local_copy(tokenizer, tmp),
                                               expected_kind="tokenizer")
    ecg_samples = (tok_info.get("extra", {}).get("clip") or {}).get("ecg_samples")
    frames_shape = (tok_cfg.frames, tok_cfg.image_size, tok_cfg.image_size)
    parts = part_files(clips)
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
        bad, split_counts = _encode_parts(good, n_good, clips, tokenizer, target, int(ecg_samples or 0),
                                          actors, batch_size, use_gpu)
        quarantine += bad
        n_tokens = sum(split_counts.values())

    write_quarantine(out, quarantine)
    summary = TokenizeSummary(clips=n_clips, tokens=n_tokens, tokenizer_id=tok_info["model_id"],
                              out=out, quarantined=len(quarantine))
    counts = {"clips": n_clips, "tokens": n_tokens, "quarantined": len(quarantine)}
    storage.write_text(storage.join(out, "summary.json"), json.dumps(counts, indent=2))
    write_dataset_info(out, TOKENS_SCHEMA, {"tokenizer": tokenizer, "batch_size": batch_size}, counts,
                       tokenizer_id=tok_info["model_id"], token_grid=list(tok_cfg.token_grid),
                       codebook_size=tok_cfg.codebook_size, split_counts=split_counts,
                       clips=clips, clips_digest=dataset_digest(clips))  # lineage
    for q in quarantine[:20]:
        log.warning("quarantined %s (%s): %s", q["clip_id"] or q["source_uri"], q["stage"], q["error"])
    if n_tokens == 0:
        raise EchoPulseError(f"no clip could be tokenized; reasons in {storage.join(out, 'quarantine')}")
    return summary


def _encode_parts(good: list[str], n_good: int, clips: str, tokenizer: str, target: str, ecg_samples: int,
                  actors: int, batch_size: int,
                  use_gpu: bool | None) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Tokenize the readable parts (``n_good`` clips) with an actor pool; write the good rows to ``target``.

    Returns:
        ``(quarantine rows of the clips that failed, token rows per split)``.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from echopulse.runtime import init_ray
    from pipelines.common import read_parquet_dir

    init_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if not ecg_samples:  # an older tokenizer checkpoint: the parts' own ECG length
        with storage.filesystem(good[0])[0].open(storage.filesystem(good[0])[1], "rb") as f:
            ecg_samples = (tensor_shape(pq.ParquetFile(f).schema_arrow.field("ecg").type) or (0,))[-1]
    from pipelines.common import ray_remote_args, worker_credentials

    remote_args = ray_remote_args(clips, tokenizer, target)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items([{"path": p} for p in good],
                             override_num_blocks=min(len(good), max(2 * cpus, 2 * actors, 1)))
    encoded = ds.map_batches(
        TokenizeParts,
        fn_constructor_kwargs={"tokenizer_uri": tokenizer, "batch_size": batch_size,
                               "use_gpu": bool(use_gpu), "ecg_samples": int(ecg_samples),
                               "credentials": worker_credentials(clips, tokenizer, target)},
        batch_size=1,
        compute=ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        **remote_args,
    ).materialize()
    bad = encoded.filter(lambda r: bool(r[ERROR])).select_columns(
        ["clip_id", SOURCE, STAGE, ERROR]).take_all()
    quarantine = [{"clip_id": str(r["clip_id"]), "source_uri": str(r[SOURCE]), "stage": str(r[STAGE]),
                   "error": str(r[ERROR]).splitlines()[0][:500], "detail": str(r[ERROR])[:2000]}
                  for r in bad]
    split_counts: dict[str, int] = {}
    if len(bad) < n_good:
        ok = encoded.filter(lambda r: not r[ERROR]).drop_columns([ERROR, STAGE, SOURCE])
        afs, apath = storage.arrow_filesystem(target)
        ok.write_parquet(apath, filesystem=afs)
        for batch in read_parquet_dir(target).select_columns(["split"]).iter_batches(
                batch_format="numpy", batch_size=4096):
            for s in batch["split"]:
                split_counts[str(s)] = split_counts.get(str(s), 0) + 1
    return quarantine, split_counts
