"""One streaming pass: a manifest of echo + ECG pairs -> ``tokens/v1`` shards (Ray Data + encoder actors).

Ray Data runs the plan and one CPU task per group of inputs
(:func:`pipelines.ingest.make_input_fn` reads, decodes and cuts each input). A task hands its
clips, a **chunk** of about ``chunk_mb`` at a time (as Arrow IPC bytes), to a pool of
tokenizer actors (:class:`Encoder`, a GPU each when the cluster has them; chunk ``k`` of group
``g`` goes to actor ``(g + k) mod N``), keeps at most ``IN_FLIGHT`` chunks waiting on them
(backpressure: a decoder cannot run ahead of the encoders by more than that), and writes the
tokens it gets back into its group's own token shards and outcome files
(:class:`pipelines.shards.ChunkWriter`, the same sized, deterministically named files as clips).
So the chunk, which bounds memory and the object store, is independent of the shard, which is
sized by ``--shard-mb`` of tokens (tokens are ~50x smaller than frames at the paper's size).

``keep_clips`` also writes the ``clips/v1`` shards (and their own outcome log) to a second dataset.

Layout of OUT::

    tokens/shard-<group>-<rank>.parquet    tokens/v1 rows (plus ecg_source, ecg_leads, source_uri)
    outcomes/shard-<group>-<rank>.parquet  per-input outcomes (clips cut, tokens written)
    quarantine/quarantine.parquet, summary.json, dataset.json
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections import deque
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
from pipelines.shards import GROUP_STRIDE, MB, ChunkWriter, ShardConfig

log = logging.getLogger(__name__)

ENCODER_CPUS = 2.0
SMALL_ENCODER_CPUS, SMALL_DECODE_CPUS = 0.5, 0.75  # below 4 cores (size_pass)
DECODE_CHUNK_MB = 2.0  # clip MiB per encode call (and at least batch_size clips)
IN_FLIGHT = 2  # chunks a decode task keeps waiting on the encoders
DATA_TASK_CPUS = 1.0  # what Ray Data's own tasks reserve by default: kept free beside the decoders
MIN_DECODE_CPUS = 0.25
TOKEN_EXTRA = ("ecg_source", "ecg_leads", "source_uri")
POS = "_pos"  # a token row's position in its chunk's clip table


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


class Encoder:
    """A tokenizer actor (wrapped with ``ray.remote`` by :func:`start_encoders`): clips in, tokens out.

    It holds no state between calls, so any actor can encode any chunk and a restarted one (a
    lost node, an out-of-memory GPU) can take the retried call.
    """

    def __init__(self, tokenizer_uri: str, batch_size: int = 16, use_gpu: bool = False,
                 ecg_samples: int = 0, credentials: storage.Credentials | None = None) -> None:
        import torch

        from echopulse.models.checkpoint import load_checkpoint
        from echopulse.tokenize import PartTokenizer

        storage.apply_credentials(credentials)
        with tempfile.TemporaryDirectory() as tmp:
            model, _, info = load_checkpoint(storage.local_copy(tokenizer_uri, tmp), expected_kind="tokenizer")
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        if device == "cpu":
            from pipelines.common import match_torch_threads_to_actor

            match_torch_threads_to_actor()
        self.tokenizer = PartTokenizer(model, info["model_id"], batch_size, ecg_samples, device)

    def encode(self, clips_ipc: bytes) -> dict[str, Any]:
        """A chunk's clip table (IPC) -> ``{"tokens": IPC of the good rows' tokens/v1 table with their
        position in the chunk (``_pos``), "errors": {position: reason}}``."""
        from echopulse.tokenize import ERROR, STAGE

        clips = _from_ipc(clips_ipc)
        tables, errors, start = [], {}, 0
        for batch in clips.to_batches(max_chunksize=self.tokenizer.batch_size):
            table = pa.Table.from_batches([batch])
            enc = self.tokenizer.encode_table(table)
            ok = np.asarray([not e for e in enc[ERROR]], dtype=bool)
            for i in np.flatnonzero(~ok):
                errors[start + int(i)] = f"{enc['clip_id'][i]}: {enc[STAGE][i]}: {enc[ERROR][i]}"
            if ok.any():
                good = token_table(enc, table, ok)
                tables.append(good.append_column(POS, pa.array(start + np.flatnonzero(ok), pa.int64())))
            start += len(ok)
        return {"tokens": _ipc(pa.concat_tables(tables)) if tables else b"", "errors": errors}


class GroupTokens:
    """One decode task's side of the encoders: sends its chunks round the pool, at most ``in_flight``
    waiting, and writes what comes back (in order) into the group's token shards and outcome files.

    With ``clips_out`` the clips go into that dataset's shards at the same time, and a clips shard
    and a token shard always close together (when either reaches ``shard_mb``, clips first): both
    logs then cover the same inputs, so ``--resume`` (which redoes the inputs missing from the
    tokens log) rewrites a clips shard under its own name instead of adding a second copy.
    """

    def __init__(self, out: str, shards: ShardConfig, encoders: list, first: int,
                 in_flight: int = IN_FLIGHT, clips_out: str | None = None) -> None:
        self.writer = ChunkWriter(out, "tokens", shards)
        self.clips = ChunkWriter(clips_out, "clips", shards) if clips_out else None
        self.encoders, self.turn, self.in_flight = encoders, first, in_flight
        self.pending: deque = deque()
        self.inputs = self.tokens = 0

    def submit(self, items: list[tuple[int, dict[str, Any], pa.Table | None]]) -> None:
        """One chunk: its inputs in order, each ``(index, outcome, clip table or None)``."""
        tables = [t for _, _, t in items if t is not None]
        ref = None
        if tables:
            encoder = self.encoders[self.turn % len(self.encoders)]
            ref = encoder.encode.remote(_ipc(pa.concat_tables(tables)))
            self.turn += 1
        self.pending.append((items, ref))
        while len(self.pending) > self.in_flight:
            self._write(*self.pending.popleft())

    def finish(self) -> dict[str, int]:
        """Wait for the rest, close the last shard; the task's counts."""
        while self.pending:
            self._write(*self.pending.popleft())
        self._close()
        return {"inputs": self.inputs, "tokens": self.tokens}

    def _close(self) -> None:
        if self.clips is not None:
            self.clips.close_chunk()
        self.writer.close_chunk()

    def _write(self, items: list[tuple[int, dict[str, Any], pa.Table | None]], ref) -> None:
        clips = [t.num_rows if t is not None else 0 for _, _, t in items]
        tokens, errors = _encoded(ref, sum(clips))
        owner = np.repeat(np.arange(len(items)), clips)  # the input each clip position came from
        rows_of = np.searchsorted(owner[tokens.column(POS).to_numpy()] if tokens.num_rows else
                                  np.zeros(0, np.int64), np.arange(len(items) + 1))
        tokens = tokens.drop_columns([POS]) if tokens.num_rows else tokens
        for j, (index, outcome, table) in enumerate(items):
            if self.clips is not None:
                self.clips.add(index, outcome, table, close=False)
            got = int(rows_of[j + 1] - rows_of[j])
            outcome = {**outcome, "tokens": got}
            if clips[j] and got < clips[j]:
                start = int(np.searchsorted(owner, j))
                reasons = [errors[p] for p in range(start, start + clips[j]) if p in errors]
                outcome.update(stage="encode", error=f"{clips[j] - got} clip(s) not tokenized",
                               detail="; ".join(reasons)[:2000])
            self.writer.add(index, outcome, tokens.slice(rows_of[j], got) if got else None, close=False)
            self.inputs, self.tokens = self.inputs + 1, self.tokens + got
            if self.writer.full or (self.clips is not None and self.clips.full):
                self._close()


def _no_tokens() -> pa.Table:
    return pa.table({POS: pa.array([], pa.int64())})


def _encoded(ref, n_clips: int) -> tuple[pa.Table, dict[int, str]]:
    """An encode call's tokens and errors; a call that failed after Ray's retries (its actor died,
    the GPU ran out of memory) makes every clip of the chunk an error, never a stopped run.

    Raises:
        EchoPulseError: the actor could not start (its tokenizer did not load on that worker).
    """
    import ray

    if ref is None:
        return _no_tokens(), {}
    try:
        result = ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        if exc.actor_init_failed:  # the tokenizer cannot load on a worker: every chunk would fail
            raise EchoPulseError(f"a tokenizer actor could not start: {exc}") from None
        return _failed(exc, n_clips)
    except Exception as exc:
        return _failed(exc, n_clips)
    tokens = _from_ipc(result["tokens"]) if result["tokens"] else _no_tokens()
    return tokens, result["errors"]


def _failed(exc: Exception, n_clips: int) -> tuple[pa.Table, dict[int, str]]:
    log.warning("an encode call failed: %s", exc)
    last = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
    reason = f"encoder failed: {type(exc).__name__}: {last}"
    return _no_tokens(), dict.fromkeys(range(n_clips), reason)


def make_decode_task_fn(clip: ClipConfig, base_dir: str, out: str, salt: str | None,
                        options: IngestOptions | None, shards: ShardConfig, encoders: list,
                        clips_out: str | None = None, chunk_mb: float = DECODE_CHUNK_MB,
                        batch_size: int = 16, credentials: storage.Credentials | None = None):
    """One plan row (a group of inputs) -> one counts row ``{"inputs", "tokens", "plan_*"}``, after
    the group's inputs are decoded, encoded by ``encoders`` (actor handles) and written."""

    from pipelines.ingest import make_input_fn

    def run(group: dict[str, Any]):
        storage.apply_credentials(credentials)
        counts = plan_counts(group)
        rows = json.loads(group["rows"])
        if not rows:
            yield {"inputs": 0, "tokens": 0, **counts}
            return
        sink = GroupTokens(out, shards, encoders, int(rows[0]["_index"]) // GROUP_STRIDE, clips_out=clips_out)
        items, size, n_clips = [], 0, 0
        with isolated_inputs(lambda: make_input_fn(clip, base_dir, salt, options), options) as process:
            for row in rows:
                outcome, table = process(row)
                items.append((int(row["_index"]), outcome, table))
                if table is not None:
                    size, n_clips = size + table.nbytes, n_clips + table.num_rows
                if size >= chunk_mb * MB and n_clips >= batch_size:
                    sink.submit(items)
                    items, size, n_clips = [], 0, 0
        if items:
            sink.submit(items)
        yield {**sink.finish(), **counts}

    return run


def start_encoders(tokenizer: str, actors: int, batch_size: int, use_gpu: bool, ecg_samples: int,
                   encoder_cpus: float, credentials: storage.Credentials | None,
                   remote_args: dict[str, Any]) -> list:
    """``actors`` tokenizer actors, started without waiting (they load while the plan runs; the
    driver has already loaded the checkpoint, and an actor that cannot start stops the run at the
    first chunk sent to it); a lost actor restarts and its calls are retried once."""
    import ray

    cls = ray.remote(Encoder).options(num_cpus=encoder_cpus, num_gpus=1 if use_gpu else 0,
                                      max_restarts=1, max_task_retries=1, **remote_args)
    return [cls.remote(tokenizer, batch_size, use_gpu, ecg_samples, credentials) for _ in range(actors)]


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
                      encoder_cpus: float | None = None, chunk_mb: float = DECODE_CHUNK_MB) -> FusedSummary:
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
            default 2, or 0.5 below 4 cores, where decode tasks take 0.75 so that two fit beside
            it: :func:`size_pass`; a local cluster counts the machine's cores, not its CPUs).
        chunk_mb: clip bytes a decode task sends per encode call (at least ``batch_size`` clips);
            with ``IN_FLIGHT`` it bounds what each decoder keeps in the object store.

    Raises:
        EchoPulseError: a tokenizer of another clip geometry, or not one input tokenized.
    """
    from pipelines.ingest import prepare_out

    shards = shards or ShardConfig()
    if batch_size < 1 or actors < 1 or chunk_mb <= 0:
        raise EchoPulseError("--batch-size and --actors must be at least 1, the chunk size positive")
    tok_cfg, tok_info = _matching_tokenizer(tokenizer, clip)
    manifest_format(manifest)  # a bad manifest fails before Ray starts
    storage.makedirs(out)
    listing = prepare_out(out, "tokens", resume)
    if keep_clips:
        storage.makedirs(keep_clips)
        prepare_out(keep_clips, "clips", resume)
    counts = _run_fused_pass(manifest, out, clip, tokenizer, salt, resume, options, shards, keep_clips,
                             actors, batch_size, use_gpu, encoder_cpus, chunk_mb, listing)
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
                    encoder_cpus: float | None, chunk_mb: float,
                    listing: dict[str, list[str]] | None = None) -> PlanCounts:
    """The pass: the encoder actors, then the plan and the decode tasks (Ray Data); the plan's
    counts (``listing``: ``out`` as :func:`pipelines.ingest.prepare_out` listed it, resuming)."""
    import ray
    from ray.data import TaskPoolStrategy

    from echopulse.runtime import init_ray, joined_cluster
    from pipelines.common import machine_cores, ray_remote_args, worker_credentials
    from pipelines.ingest import collect_counts
    from pipelines.plan import plan_dataset

    init_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    cpus = ray.cluster_resources().get("CPU", 1)
    fixed = not joined_cluster()
    encoder_cpus, decoders, decode_cpus = size_pass(cpus, machine_cores(cpus) if fixed else cpus, actors,
                                                    encoder_cpus, fixed)
    remote_args = ray_remote_args(manifest, out, tokenizer, keep_clips)
    credentials = worker_credentials(manifest, out, tokenizer, keep_clips)
    encoders = start_encoders(tokenizer, actors, batch_size, bool(use_gpu), clip.ecg_samples, encoder_cpus,
                              credentials, remote_args)
    try:
        decode = make_decode_task_fn(clip, storage.parent(manifest), out, salt, options, shards, encoders,
                                     keep_clips, chunk_mb, batch_size, credentials)
        ds = plan_dataset(manifest, out, shards, resume, remote_args, listing)
        # on the local cluster, as many decoders as the CPUs beside the encoders hold: a decoder
        # waiting on an encoder lends Ray its CPU, and more would only hold more chunks in the store
        ds = ds.flat_map(decode, num_cpus=decode_cpus, compute=TaskPoolStrategy(size=decoders), **remote_args)
        # Ray Data's per-operator CPU reservations held a late plan row's 1-CPU shuffle-reduce task
        # back while the first decoder ran, so a run's groups were at times decoded one after the
        # other; without them any free CPU serves (this dataset's own context, not the process's)
        ds.context.op_resource_reservation_enabled = False
        return collect_counts(out, ds)  # streams: one small counts row per group
    finally:
        for encoder in encoders:
            ray.kill(encoder)


def size_pass(cpus: float, cores: float, actors: int, encoder_cpus: float | None,
              fixed: bool = True) -> tuple[float, int | None, float]:
    """``(encoder_cpus, decoders, decode_cpus)`` for ``actors`` encoders on a cluster of ``cpus``
    logical CPUs backed by ``cores`` (:func:`pipelines.common.machine_cores`; ``cpus`` on a joined cluster);
    ``decoders`` is ``None`` on a joined cluster (Ray Data decides).

    Below 4 cores an encoder takes 0.5 CPU (one torch thread) and decode tasks 0.75, so two
    decoders still fit beside it (it waits for them most of the time; 1 CPU each would leave a
    core's worth idle); from 4 cores an encoder takes 2. Never more decoders than the cores hold
    beside the encoders, and their reservations leave room for Ray Data's tasks (:func:`decoder_share`).

    Raises:
        EchoPulseError: on a fixed cluster, the encoders leave no room for one decoder.
    """
    small = cores < 4
    if encoder_cpus is None:
        encoder_cpus = SMALL_ENCODER_CPUS if small else ENCODER_CPUS
    decode_cpus = SMALL_DECODE_CPUS if small else 1.0
    decoders = decoder_count(cpus, actors, encoder_cpus, decode_cpus, fixed=fixed)
    if decoders is not None:
        if cores < cpus:
            decoders = min(decoders, max(1, int((cores - actors * encoder_cpus) / decode_cpus + 1e-9)))
        decode_cpus = decoder_share(cpus, actors * encoder_cpus, decoders, decode_cpus)
    return encoder_cpus, decoders, decode_cpus


def decoder_count(cpus: float, actors: int, encoder_cpus: float, decode_cpus: float,
                  fixed: bool = True) -> int | None:
    """Decode tasks that fit beside ``actors`` encoders of ``encoder_cpus`` on ``cpus`` (a cluster of
    ``fixed`` size, the local one); ``None`` on a joined cluster, which may grow (Ray Data decides).

    Raises:
        EchoPulseError: on a fixed cluster, the encoders leave no room for one decoder (the run
            would wait forever).
    """
    free = cpus - actors * encoder_cpus
    if not fixed:
        if free < decode_cpus - 1e-9:
            log.warning("%d tokenizer actor(s) of %g CPUs leave no CPU of the cluster's %g for decoding: "
                        "the run waits for the cluster to grow", actors, encoder_cpus, cpus)
        return None
    if free < decode_cpus - 1e-9:
        raise EchoPulseError(f"{actors} tokenizer actor(s) of {encoder_cpus:g} CPUs leave {max(free, 0):g} of the "
                             f"cluster's {cpus:g} CPUs, and a decode task needs {decode_cpus:g}: "
                             "use fewer --actors or a larger cluster")
    return max(1, int(free / decode_cpus + 1e-9))


def decoder_share(cpus: float, encoders_cpus: float, decoders: int, decode_cpus: float) -> float:
    """The CPUs each of ``decoders`` decode tasks reserves on a fixed cluster of ``cpus``: ``decode_cpus``,
    or less so that ``DATA_TASK_CPUS`` stay free beside them and the encoders (never under a quarter).

    Ray Data's own tasks reserve 1 CPU (the plan's shuffle-reduce and repartition tasks). With the
    decoders and encoders holding every CPU, a plan row that came after the first decoder had
    started waited for that decoder to end, and the run's two groups were decoded one after the
    other (31-33 s instead of 21-25 s at 1,000 inputs on 2 cores, in 3 of 11 runs). A reservation is
    only a token for Ray's scheduler: the decoders still run on all the cores.
    """
    spare = cpus - encoders_cpus - decoders * decode_cpus
    if spare >= DATA_TASK_CPUS - 1e-9:
        return decode_cpus
    return max(MIN_DECODE_CPUS, (cpus - encoders_cpus - DATA_TASK_CPUS) / decoders)


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
