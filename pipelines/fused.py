"""One streaming pass: a manifest of echo + ECG pairs -> ``tokens/v1`` shards (Ray Data).

CPU tasks read, decode and cut each group of inputs (:func:`pipelines.ingest.make_input_fn`) and
emit one row per **chunk** (the group's clips up to about ``decode_chunk_mb``, as Arrow IPC bytes,
with the chunk's per-input outcomes); a pool of tokenizer actors (a GPU each when the cluster has
them) encodes each chunk with :class:`echopulse.tokenize.PartTokenizer` and writes its token shard
and outcome file (:mod:`pipelines.shards`). Ray Data's streaming executor bounds the chunks in
flight between the two operators, so decoders cannot run ahead of the encoders by more than the
object-store budget. A chunk travels as one row so Ray never splits it across blocks; a token shard
therefore holds one decoded chunk (tokens are ~50x smaller than frames at the paper's size).

``keep_clips`` also writes the ``clips/v1`` shards (and their own outcome log) to a second dataset.

Layout of OUT::

    tokens/shard-<index>.parquet    tokens/v1 rows (plus ecg_source, ecg_leads, source_uri)
    outcomes/shard-<index>.parquet  per-input outcomes (clips cut, tokens written)
    quarantine/quarantine.parquet, summary.json, dataset.json
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from echopulse import storage
from echopulse.config import ClipConfig, to_dict
from echopulse.errors import EchoPulseError
from echopulse.ingest import IngestOptions
from echopulse.schema import TOKENS_SCHEMA, write_dataset_info
from pipelines.isolate import isolated_inputs
from pipelines.plan import PlanCounts, manifest_format, plan_counts
from pipelines.shards import MB, ChunkWriter, ShardConfig, write_outcomes

log = logging.getLogger(__name__)

ENCODER_CPUS = 2.0
SMALL_ENCODER_CPUS, SMALL_DECODE_CPUS = 0.5, 0.75  # clusters of fewer than 4 CPUs
DECODE_CHUNK_MB = 64.0  # clip bytes per chunk handed to the encoders (below Ray's block target)
TOKEN_EXTRA = ("ecg_source", "ecg_leads", "source_uri")


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


def make_decode_task_fn(clip: ClipConfig, base_dir: str, out: str, salt: str | None,
                        options: IngestOptions | None, shards: ShardConfig,
                        clips_out: str | None = None, chunk_mb: float = DECODE_CHUNK_MB,
                        credentials: storage.Credentials | None = None):
    """One plan row (a group of inputs) -> chunk rows ``{"index", "clips" (IPC), "outcomes" (JSON)}``.

    A chunk without clips (every input quarantined) is finished here: its outcome file is written
    and no clips go to the encoders. The group's first row carries the plan's counts (a group with
    no chunk for the encoders sends one empty row for them).
    """

    from pipelines.ingest import make_input_fn

    def emit(index: int, tables: list[pa.Table], outcomes: list[dict[str, Any]]):
        if not tables:
            write_outcomes(out, index, [{**o, "tokens": 0} for o in outcomes])
            return []
        return [{"index": index, "clips": _ipc(pa.concat_tables(tables)), "outcomes": json.dumps(outcomes)}]

    def chunks(rows: list[dict[str, Any]]):
        keep = ChunkWriter(clips_out, "clips", shards) if clips_out else None
        index, tables, outcomes, size = None, [], [], 0
        with isolated_inputs(lambda: make_input_fn(clip, base_dir, salt, options), options) as process:
            for row in rows:
                outcome, table = process(row)
                i = int(row["_index"])
                if keep is not None:
                    keep.add(i, outcome, table)
                index = i if index is None else index
                outcomes.append({**outcome, "index": i})
                if table is not None:
                    tables.append(table)
                    size += table.nbytes
                if size >= min(chunk_mb, shards.shard_mb) * MB:
                    yield from emit(index, tables, outcomes)
                    index, tables, outcomes, size = None, [], [], 0
        if index is not None:
            yield from emit(index, tables, outcomes)
        if keep is not None:
            keep.close_chunk()

    def run(group: dict[str, Any]):
        storage.apply_credentials(credentials)
        counts = plan_counts(group)
        for chunk in chunks(json.loads(group["rows"])):
            yield {**chunk, **counts}
            counts = dict.fromkeys(counts, 0)
        if any(counts.values()):
            yield {"index": -1, "clips": b"", "outcomes": "[]", **counts}

    return run


class EncodeChunks:
    """Ray Data callable class: a tokenizer per actor; encodes chunk rows and writes their shards."""

    def __init__(self, tokenizer_uri: str, out: str, shards: ShardConfig, batch_size: int = 16,
                 use_gpu: bool = False, ecg_samples: int = 0,
                 credentials: storage.Credentials | None = None) -> None:
        import torch

        from echopulse.models.checkpoint import load_checkpoint
        from echopulse.tokenize import PartTokenizer

        storage.apply_credentials(credentials)
        self._tmp = tempfile.TemporaryDirectory()
        local = storage.local_copy(tokenizer_uri, self._tmp.name)
        model, _, info = load_checkpoint(local, expected_kind="tokenizer")
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        if device == "cpu":
            from pipelines.common import match_torch_threads_to_actor

            match_torch_threads_to_actor()
        self.out, self.shards, self.batch_size = out, shards, batch_size
        self.tokenizer = PartTokenizer(model, info["model_id"], batch_size, ecg_samples, device)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from echopulse.tokenize import ERROR, STAGE

        counts = {k: v for k, v in row.items() if k.startswith("plan_")}
        if not row["clips"]:  # a group's counts without clips
            return {"inputs": 0, "tokens": 0, **counts}
        clips = _from_ipc(row["clips"])
        outcomes = json.loads(row["outcomes"])
        # the chunk's clips are its inputs' clips in order: the input each clip row came from
        owner = np.repeat(np.arange(len(outcomes)), [o["clips"] for o in outcomes])
        good = np.zeros(len(outcomes), dtype=np.int64)
        errors: dict[int, list[str]] = {}
        writer = ChunkWriter(self.out, "tokens", self.shards)
        start = 0
        for batch in clips.to_batches(max_chunksize=self.batch_size):
            table = pa.Table.from_batches([batch])
            enc = self.tokenizer.encode_table(table)
            ok = np.asarray([not e for e in enc[ERROR]], dtype=bool)
            for i in np.flatnonzero(~ok):
                errors.setdefault(int(owner[start + i]), []).append(
                    f"{enc['clip_id'][i]}: {enc[STAGE][i]}: {enc[ERROR][i]}")
            np.add.at(good, owner[start:start + len(ok)][ok], 1)
            if ok.any():
                writer.add_rows(int(row["index"]), token_table(enc, table, ok))
            start += len(ok)
        for j, o in enumerate(outcomes):  # one outcome per input, with the tokens it got
            o["tokens"] = int(good[j])
            if o["clips"] and o["tokens"] < o["clips"]:
                o.update(stage="encode", error=f"{o['clips'] - o['tokens']} clip(s) not tokenized",
                         detail="; ".join(errors.get(j, []))[:2000])
        writer.index, writer.outcomes = int(row["index"]), outcomes
        writer.close_chunk()
        return {"inputs": len(outcomes), "tokens": int(good.sum()), **counts}


def token_table(enc: dict[str, Any], clips: pa.Table, ok: np.ndarray) -> pa.Table:
    """The good rows of an encoded batch as a ``tokens/v1`` Arrow table (plus the ECG flags)."""
    idx = np.flatnonzero(ok)
    tokens = np.ascontiguousarray(enc["tokens"][idx])
    ecg = np.ascontiguousarray(enc["ecg"][idx])
    cols = {
        "clip_id": pa.array([str(v) for v in enc["clip_id"][idx]], pa.string()),
        "tokens": pa.FixedShapeTensorArray.from_numpy_ndarray(tokens),
        "token_grid": pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.ascontiguousarray(enc["token_grid"][idx])),
        "tokenizer_id": pa.array([str(v) for v in enc["tokenizer_id"][idx]], pa.string()),
        "ecg": pa.FixedShapeTensorArray.from_numpy_ndarray(ecg),
        "view": pa.array([str(v) for v in enc["view"][idx]], pa.string()),
        "ef": pa.array(enc["ef"][idx], pa.float32()),
        "split": pa.array([str(v) for v in enc["split"][idx]], pa.string()),
    }
    for name in TOKEN_EXTRA:
        cols[name] = clips.column(name).take(pa.array(idx))
    return pa.table(cols)


@dataclass(frozen=True)
class FusedSummary:
    inputs: int
    inputs_with_tokens: int
    quarantined: int
    clips: int
    tokens: int
    out: str
    duplicates: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "inputs_with_tokens": self.inputs_with_tokens,
                "quarantined": self.quarantined, "clips": self.clips, "tokens": self.tokens,
                "duplicates": self.duplicates}


def run_ingest_tokens(manifest: str, out: str, clip: ClipConfig, tokenizer: str, salt: str | None = None,
                      resume: bool = False, options: IngestOptions | None = None,
                      shards: ShardConfig | None = None, keep_clips: str | None = None, actors: int = 1,
                      batch_size: int = 16, use_gpu: bool | None = None,
                      encoder_cpus: float | None = None) -> FusedSummary:
    """Ingest and tokenize in one Ray Data pass: ``manifest`` -> ``out`` (a ``tokens/v1`` dataset).

    Args:
        manifest, clip, salt, options: as :func:`pipelines.ingest.run_ingest`.
        out: the tokens dataset (directory or URI).
        tokenizer: a tokenizer checkpoint (its clip geometry must be ``clip``'s).
        resume: skip inputs already in ``out``'s outcome log.
        shards: file sizes and inputs per task.
        keep_clips: also write the ``clips/v1`` dataset here.
        actors: tokenizer actors; batch_size: clips per encode call; use_gpu: a GPU per actor
            (``None``: when the cluster has GPUs).
        encoder_cpus: CPUs each tokenizer actor reserves (torch's threads on a CPU encoder;
            default 2, or 0.5 on a cluster of fewer than 4 CPUs, where decode tasks take 0.75 so
            that two fit beside it). It differs from the decode tasks' CPUs on purpose: Ray Data
            fuses a task map into the next actor map when their resources match, which would put
            decoding on the encoders.

    Raises:
        EchoPulseError: a tokenizer of another clip geometry, or not one input tokenized.
    """
    from pipelines.ingest import prepare_out

    shards = shards or ShardConfig()
    if batch_size < 1 or actors < 1:
        raise EchoPulseError("--batch-size and --actors must be at least 1")
    tok_cfg, tok_info = _matching_tokenizer(tokenizer, clip)
    manifest_format(manifest)  # a bad manifest fails before Ray starts
    storage.makedirs(out)
    listing = prepare_out(out, "tokens", resume)
    if keep_clips:
        storage.makedirs(keep_clips)
        prepare_out(keep_clips, "clips", resume)
    counts = _run_fused_pass(manifest, out, clip, tokenizer, salt, resume, options, shards, keep_clips,
                             actors, batch_size, use_gpu, encoder_cpus, listing)
    fused = _write_summaries(out, counts, clip, tokenizer, tok_cfg, tok_info, shards, batch_size, keep_clips)
    if fused.tokens == 0:
        raise EchoPulseError(f"no input could be tokenized; reasons in {storage.join(out, 'quarantine')}")
    return fused


def _matching_tokenizer(tokenizer: str, clip: ClipConfig) -> tuple[Any, dict[str, Any]]:
    """The tokenizer checkpoint's config and info, checked against the clip geometry.

    Raises:
        EchoPulseError: the tokenizer takes another number of frames or another size.
    """
    from echopulse.models.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        _, tok_cfg, tok_info = load_checkpoint(storage.local_copy(tokenizer, tmp), expected_kind="tokenizer")
    if (tok_cfg.frames, tok_cfg.image_size) != (clip.frames, clip.size):
        raise EchoPulseError(f"{tokenizer}: tokenizer takes {tok_cfg.frames} frames of {tok_cfg.image_size}px; "
                             f"the clips have {clip.frames} of {clip.size}px")
    return tok_cfg, tok_info


def _run_fused_pass(manifest: str, out: str, clip: ClipConfig, tokenizer: str, salt: str | None,
                    resume: bool, options: IngestOptions | None, shards: ShardConfig,
                    keep_clips: str | None, actors: int, batch_size: int, use_gpu: bool | None,
                    encoder_cpus: float | None, listing: dict[str, list[str]] | None = None) -> PlanCounts:
    """The Ray Data pass: the plan, decode tasks, then a tokenizer actor pool; the plan's counts
    (``listing``: ``out`` as :func:`pipelines.ingest.prepare_out` listed it, resuming)."""
    import ray
    from ray.data import ActorPoolStrategy

    from echopulse.runtime import init_ray
    from pipelines.common import ray_remote_args, worker_credentials
    from pipelines.ingest import collect_counts
    from pipelines.plan import plan_dataset

    init_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    small = ray.cluster_resources().get("CPU", 1) < 4
    if encoder_cpus is None:
        encoder_cpus = SMALL_ENCODER_CPUS if small else ENCODER_CPUS
    # on a small cluster two decoders still fit beside the encoder (which waits for them most of
    # the time); 1 CPU each would leave a core's worth idle
    decode_cpus = SMALL_DECODE_CPUS if small else 1.0
    remote_args = ray_remote_args(manifest, out, tokenizer, keep_clips)
    credentials = worker_credentials(manifest, out, tokenizer, keep_clips)
    decode = make_decode_task_fn(clip, storage.parent(manifest), out, salt, options, shards, keep_clips,
                                 credentials=credentials)
    ds = plan_dataset(manifest, out, shards, resume, remote_args, listing)
    ds = ds.flat_map(decode, num_cpus=decode_cpus, **remote_args)
    ds = ds.map(EncodeChunks, fn_constructor_kwargs={
        "tokenizer_uri": tokenizer, "out": out, "shards": shards, "batch_size": batch_size,
        "use_gpu": bool(use_gpu), "ecg_samples": clip.ecg_samples, "credentials": credentials},
        compute=ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0, num_cpus=encoder_cpus, **remote_args)
    return collect_counts(out, ds)  # streams: one small counts row per chunk


def _write_summaries(out: str, plan: PlanCounts, clip: ClipConfig, tokenizer: str,
                     tok_cfg: Any, tok_info: dict[str, Any], shards: ShardConfig, batch_size: int,
                     keep_clips: str | None) -> FusedSummary:
    """Finish the outcome logs; write ``summary.json`` and the dataset info of both outputs."""
    from pipelines.ingest import finish

    summary = finish(out, plan)
    log_tokens = _tokens_and_splits(out)
    fused = FusedSummary(inputs=summary.inputs, inputs_with_tokens=summary.inputs_with_clips,
                         quarantined=summary.quarantined, clips=summary.clips, tokens=log_tokens[0],
                         out=out, duplicates=plan.duplicates)
    counts = fused.as_dict()
    storage.write_text(storage.join(out, "summary.json"), json.dumps(counts, indent=2))
    write_dataset_info(out, TOKENS_SCHEMA, {"tokenizer": tokenizer, "batch_size": batch_size,
                                            "clip": to_dict(clip), "shards": to_dict(shards)}, counts,
                       tokenizer_id=tok_info["model_id"], token_grid=list(tok_cfg.token_grid),
                       codebook_size=tok_cfg.codebook_size, split_counts=log_tokens[1])
    if keep_clips:
        from echopulse.schema import CLIPS_SCHEMA

        clips_summary = finish(keep_clips, plan)
        write_dataset_info(keep_clips, CLIPS_SCHEMA, {"clip": to_dict(clip), "shards": to_dict(shards)},
                           clips_summary.as_dict())
    return fused


def _tokens_and_splits(out: str) -> tuple[int, dict[str, int]]:
    """Token rows and rows per split, from the token shards' ``split`` column."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(storage.join(out, "tokens"))
    counts: dict[str, int] = {}
    if fs.exists(path):
        for p in sorted(p for p in fs.find(path) if p.endswith(".parquet")):
            with fs.open(p, "rb") as f:
                for s in pq.read_table(f, columns=["split"]).column("split").to_pylist():
                    counts[s] = counts.get(s, 0) + 1
    return sum(counts.values()), counts
