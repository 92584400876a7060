"""What both trainings share: the per-worker loop skeleton, scaling and export of the result."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from echopulse import storage
from echopulse.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    metrics: dict[str, float]
    run_id: str | None


def storage_path(out: str) -> str:
    """Where Ray Train keeps its run state for an output location (absolute, or a URI)."""
    if storage.is_remote(out):
        return storage.join(out, "ray")
    return os.path.abspath(os.path.join(out, "ray"))


def run_name(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def use_gpu_default() -> bool:
    """GPUs when the Ray cluster has any (the driver may be a CPU-only head node), else when this
    machine has CUDA."""
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # no cluster to ask: fall back to this machine
        log.debug("cannot read the cluster's resources", exc_info=True)
    import torch

    return torch.cuda.is_available()


CACHE_BYTES = int(os.environ.get("ECHOPULSE_SHARD_CACHE_MB", "1024")) * 2**20


def repeat_batches(shard, batch_size: int, device, seed: int = 0,
                   cache_bytes: int = CACHE_BYTES) -> Iterator[dict]:
    """Endless torch batches from a Ray dataset shard, one epoch after another.

    Starting a Ray Data epoch costs seconds, which dominates small datasets trained for many
    epochs; so a shard whose first epoch fits in ``cache_bytes`` (``ECHOPULSE_SHARD_CACHE_MB``) is
    kept in this worker's memory and reshuffled each later epoch. Larger shards stream every epoch.
    """
    import torch

    cached: list[dict] | None = []
    size = 0
    for batch in shard.iter_torch_batches(batch_size=batch_size):
        if cached is not None:
            cached.append(batch)
            size += sum(t.numel() * t.element_size() for t in batch.values())
            if size > cache_bytes:
                cached = None
        yield {k: v.to(device) for k, v in batch.items()}
    if cached == []:
        raise RuntimeError("this worker's dataset shard is empty")
    if cached is None:
        while True:
            for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
                yield batch
    data = {k: torch.cat([b[k] for b in cached]) for k in cached[0]}
    n = len(next(iter(data.values())))
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, max(n - batch_size, 0) + 1, batch_size):
            idx = order[i : i + batch_size]
            yield {k: v[idx].to(device) for k, v in data.items()}


class CachedBatches:
    """Re-iterable batches of a Ray dataset shard (validation): kept in memory when they fit.

    ``first`` is the first batch seen (for sample GIFs): reading it never starts an epoch of the
    shard, which one rank alone must not do (a streaming split's epochs are shared by all ranks).
    """

    def __init__(self, shard, batch_size: int, device, cache_bytes: int = CACHE_BYTES) -> None:
        self.shard, self.batch_size, self.device, self.cache_bytes = shard, batch_size, device, cache_bytes
        self._cached: list[dict] | None = None
        self._fits = True
        self.first: dict | None = None

    def __iter__(self) -> Iterator[dict]:
        if self._cached is not None:
            yield from self._cached
            return
        cached: list[dict] = []
        size = 0
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, device=self.device):
            if self.first is None:
                self.first = batch
            if self._fits:
                cached.append(batch)
                size += sum(t.numel() * t.element_size() for t in batch.values())
                self._fits = size <= self.cache_bytes
            yield batch
        if self._fits:
            self._cached = cached


FAIL_ENV = "ECHOPULSE_FAIL_ONCE_AT_STEP"


def maybe_fail_once(step: int, marker: str | None) -> None:
    """Testing aid: with ``ECHOPULSE_FAIL_ONCE_AT_STEP=k`` rank 0 crashes once at step ``k``.

    A marker file in the run's storage keeps it to once, so the restarted worker group goes on.
    """
    import ray.train

    at = os.environ.get(FAIL_ENV)
    if not at or marker is None or int(at) != step or ray.train.get_context().get_world_rank() != 0:
        return
    if storage.exists(marker):
        return
    storage.write_text(marker, f"failed once at step {step}\n")
    raise RuntimeError(f"{FAIL_ENV}={at}: injected failure at step {step}")


def worker_threads(local_workers: int) -> int:
    """Torch threads of a CPU training worker: the node's cores split between its workers.

    Ray sets ``OMP_NUM_THREADS`` from a worker's logical CPUs (1), which would leave one worker on
    a 2-core machine using half of it; local clusters also advertise more logical CPUs than cores.
    """
    return max(1, (os.cpu_count() or 1) // max(1, local_workers))


def micro_batch_size(train: TrainConfig, world: int) -> int:
    """Samples per micro-batch on one worker: ``batch_size`` is the global batch of one optimizer
    step, spread over ``world`` workers and ``grad_accum`` micro-batches."""
    parts = world * train.grad_accum
    if train.batch_size % parts:
        log.warning("batch_size %d is not a multiple of workers x grad_accum = %d; the global batch "
                    "is %d", train.batch_size, parts, max(1, train.batch_size // parts) * parts)
    return max(1, train.batch_size // parts)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch RNG seed of one (step, rank): random masks and dropout are reproducible, resume
    draws what an uninterrupted run would have drawn, and ranks draw differently."""
    return ((seed * 1_000_003 + step) * 1009 + rank) % (2**63 - 1)


def gather_mean(sums: dict[str, float], count: float, device=None) -> dict[str, float]:
    """``sum over ranks of sums / sum over ranks of count`` per key (a key missing on a rank, as
    after an empty validation shard, counts there as nothing). Without a process group: local."""
    import torch.distributed as dist

    parts = [(sums, count)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (dict(sums), float(count)))
    total = sum(c for _, c in parts)
    keys = sorted({k for s, _ in parts for k in s})
    return {k: sum(s.get(k, 0.0) for s, _ in parts) / max(total, 1e-12) for k in keys}


def train_worker_loop(
    *,
    model,
    train: TrainConfig,
    step_fn: Callable[..., dict[str, float]],
    batches: Iterator[dict],
    logger,
    save: Callable[[str], None],
    validate: Callable[[int], dict[str, float]] | None = None,
    sample: Callable[[int, str], list[str]] | None = None,
    on_log: Callable[[int, dict[str, float]], dict[str, float]] | None = None,
    fail_marker: str | None = None,
    resume_from: str | None = None,
) -> None:
    """Run ``train.steps`` optimizer steps, resuming where a checkpoint says.

    The checkpoint resumed from is this run's latest (after a worker-group restart), else
    ``resume_from`` (an earlier run's, found by :func:`latest_checkpoint`), else none.

    One optimizer step takes ``train.grad_accum`` micro-batches from ``batches`` (``step_fn`` gets
    them as a list; under DDP it syncs gradients on the last only), runs in bf16 autocast on GPU
    (``train.bf16``; never on CPU), and then updates the EMA (``train.ema_decay`` > 0). Before each
    step the torch RNG is seeded from (seed, step, rank) (:func:`step_seed`).

    Every ``train.log_every`` steps (and at the last) the window's metrics, averaged over ranks,
    plus ``lr`` and ``samples_per_s`` are logged (rank 0, through ``logger``) and reported to Ray.
    ``validate(step)`` (called on every rank; it must combine ranks itself, e.g. with
    :func:`gather_mean`) runs every ``train.val_every`` steps (0: at each logged step), at every
    checkpoint and at the end, on the EMA weights when EMA is on; its metrics go into the reports
    (the latest values until the next validation) so checkpoints can be ranked by them.
    ``sample(step, dir)`` (rank 0 only) writes files logged as MLflow artifacts under ``samples/``,
    every ``train.sample_every`` steps and at the end, also on the EMA weights.
    At the first logged step ``train.checkpoint_every`` or more steps after the last checkpoint
    (and at the end) rank 0 attaches a resumable
    checkpoint: ``save(dir)`` writes the model checkpoint (EMA weights when EMA is on); the
    optimizer state, step and raw training weights go beside it (:mod:`echopulse.training.state`).
    """
    import contextlib

    import ray.train
    import torch

    from echopulse.models.checkpoint import unwrap
    from echopulse.training.ema import EMA
    from echopulse.training.state import load_train_state, save_train_state
    from echopulse.training.steps import lr_at, make_optimizer

    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = next(model.parameters()).device
    if device.type == "cpu":
        torch.set_num_threads(worker_threads(ctx.get_local_world_size()))
    amp_dtype = torch.bfloat16 if train.bf16 and device.type == "cuda" else None
    optimizer = make_optimizer(model, train.lr, train.weight_decay)
    ema = EMA(model, train.ema_decay) if train.ema_decay > 0 else None
    start = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as path:
            start = load_train_state(path, unwrap(model), optimizer, ema)
    elif resume_from:
        with tempfile.TemporaryDirectory() as tmp:
            start = load_train_state(storage.local_copy(resume_from, tmp), unwrap(model), optimizer, ema)
    if start:
        log.info("resuming at step %d", start)

    def averaged():
        """The EMA weights in the model for validation, samples and checkpoints (when EMA is on)."""
        return ema.applied(model) if ema is not None else contextlib.nullcontext()

    def report(metrics: dict[str, float], step: int, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(dict(metrics))
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                with averaged():
                    save(tmp)
                save_train_state(tmp, optimizer, step, train_weights=model if ema is not None else None,
                                 ema_updates=ema.updates if ema is not None else 0)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(metrics), checkpoint=checkpoint)

    def run_validation(step: int) -> dict[str, float]:
        with averaged():
            metrics = validate(step) if validate is not None else {}
        logger.log_metrics(metrics, step)
        return metrics

    def run_sample(step: int) -> None:
        if sample is None or rank != 0 or not logger.active:
            return
        try:
            with tempfile.TemporaryDirectory() as tmp, averaged():
                for path in sample(step, tmp):
                    logger.log_artifact(path, "samples")
        except Exception:  # a sample GIF is a view on the run, never a reason to stop it
            log.exception("sample at step %d failed", step)

    last: dict[str, float] = {"step": float(start)}
    val_metrics: dict[str, float] = {}
    window: list[dict[str, float]] = []
    busy, samples = 0.0, 0
    last_checkpoint = start
    for step in range(start + 1, train.steps + 1):
        maybe_fail_once(step, fail_marker)
        lr = lr_at(step - 1, train.steps, train.warmup_steps, train.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(train.grad_accum)]
        torch.manual_seed(step_seed(train.seed, step, rank))
        metrics = step_fn(model, micro if len(micro) > 1 else micro[0], optimizer,
                          grad_clip=train.grad_clip, amp_dtype=amp_dtype)
        if ema is not None:
            ema.update(model)
        busy += time.perf_counter() - t0
        samples += sum(len(next(iter(b.values()))) for b in micro) * world
        window.append(metrics)
        logged = step % train.log_every == 0 or step == train.steps
        due = logged and (step == train.steps or bool(
            train.checkpoint_every and step - last_checkpoint >= train.checkpoint_every))
        if validate is not None and (due or (train.val_every and step % train.val_every == 0)
                                     or (not train.val_every and logged)):
            val_metrics = run_validation(step)
        if step == train.steps or (train.sample_every and step % train.sample_every == 0):
            run_sample(step)
        if not logged:
            continue
        keys = sorted({k for m in window for k in m})
        counts = {k: sum(1 for m in window if k in m) for k in keys}
        local = {k: sum(m.get(k, 0.0) for m in window) / counts[k] for k in keys}
        last = gather_mean(local, 1.0)  # every rank's window weighs the same (equal batches)
        last.update(lr=lr, step=step, samples_per_s=samples / max(busy, 1e-9), world_size=world)
        if on_log is not None:
            last.update(on_log(step, last))
        if not all(math.isfinite(v) for v in last.values()):
            raise FloatingPointError(f"non-finite metrics at step {step}: {last}")
        logger.log_metrics(last, step)
        window, samples, busy = [], 0, 0.0
        report({**last, **val_metrics}, step, with_checkpoint=due)
        last_checkpoint = step if due else last_checkpoint
    if start >= train.steps:  # nothing left to train: report the checkpoint resumed from
        if validate is not None:
            val_metrics = run_validation(start)
        report({**last, **val_metrics}, start, with_checkpoint=True)


def run_config(name: str, out: str, train: TrainConfig, callbacks: list | None = None,
               score: tuple[str, str] | None = None):
    """Ray Train's RunConfig for a training into ``out``: storage, restarts, checkpoints kept.

    ``score`` = (metric, "max" | "min"): keep the ``train.keep_checkpoints`` best checkpoints by
    that reported metric (else the most recent). Ray never deletes the latest checkpoint, which is
    the one a restart resumes from; :func:`latest_checkpoint` likewise resumes from the most
    advanced step, not the best score.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    # the testing aid reaches the workers explicitly (they do not inherit the driver's environment)
    env = {FAIL_ENV: os.environ[FAIL_ENV]} if os.environ.get(FAIL_ENV) else {}
    # remote storage (s3://): an explicit pyarrow filesystem with this process's endpoint, and
    # the AWS settings for the workers' own reads (resume, fail marker)
    path, filesystem = storage.train_storage(storage_path(out))
    if storage.is_remote(out):
        env.update(storage.aws_env())
    return RunConfig(name=name, storage_path=path, storage_filesystem=filesystem, callbacks=callbacks,
                     failure_config=FailureConfig(max_failures=train.max_failures),
                     checkpoint_config=CheckpointConfig(
                         num_to_keep=train.keep_checkpoints,
                         checkpoint_score_attribute=score[0] if score else None,
                         checkpoint_score_order=score[1] if score else "max"),
                     worker_runtime_env={"env_vars": env} if env else None)


def latest_checkpoint(out: str, config: dict[str, Any]) -> str | None:
    """The most advanced resumable checkpoint (a directory URI) of earlier runs into ``out``.

    Raises:
        EchoPulseError: when ``out`` holds checkpoints of a different model configuration.
    """
    import json

    from echopulse.errors import EchoPulseError

    fs, root = storage.filesystem(storage_path(out))
    best: tuple[int, str] | None = None
    for state in fs.glob(f"{root.rstrip('/')}/*/checkpoint_*/train_state.json"):
        with fs.open(state, "r") as f:
            step = int(json.load(f)["step"])
        if best is None or step > best[0]:
            best = (step, state.rsplit("/", 1)[0])
    if best is None:
        return None
    with fs.open(f"{best[1]}/config.json", "r") as f:
        found = json.load(f)["config"]
    if found != config:
        raise EchoPulseError(f"{out} holds checkpoints of another model configuration; "
                             f"use a new --out to start over")
    log.info("resuming from %s (step %d)", best[1], best[0])
    return f"{out.split('://')[0]}://{best[1]}" if storage.is_remote(out) else best[1]


def fail_marker(out: str, name: str) -> str:
    return storage.join(storage_path(out), name, "fail_once.marker")


def export_checkpoint(result, out: str, add: Callable[[str], None] | None = None) -> str:
    """Copy the run's final (last-step) checkpoint to ``OUT/checkpoint``: the model only (EMA
    weights when EMA is on), without optimizer state, step or raw training weights.

    The last, not the best-scoring: it is what the configured ``steps`` produced, it does not
    depend on a noisy small validation split, a longer resumed run replaces it predictably, and
    with EMA and a cosine schedule the end is usually the best anyway. The best one stays in Ray's
    storage (:func:`best_checkpoint`) and is named in the MLflow run.
    """
    from echopulse.training.state import TRAINING_ONLY_FILES

    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    target = storage.join(out, "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "checkpoint")
        result.checkpoint.to_directory(local)
        for name in TRAINING_ONLY_FILES:
            if os.path.exists(os.path.join(local, name)):
                os.unlink(os.path.join(local, name))
        if add is not None:
            add(local)
        storage.upload_dir(local, target)
    return target


def best_checkpoint(result, score: tuple[str, str]) -> tuple[str, float] | None:
    """``(uri, score)`` of the best kept checkpoint of a run by ``score`` = (metric, mode)."""
    metric, mode = score
    ranked = [(c, m[metric]) for c, m in (result.best_checkpoints or []) if metric in m]
    if not ranked:
        return None
    checkpoint, value = (max if mode == "max" else min)(ranked, key=lambda cv: cv[1])
    path = checkpoint.path
    fs_type = getattr(checkpoint.filesystem, "type_name", "local")
    uri = path if fs_type == "local" else f"{'s3' if fs_type == 's3' else fs_type}://{path}"
    return uri, float(value)


def log_outcome(logger, checkpoint: str, result, score: tuple[str, str] | None) -> None:
    """Tags: the exported checkpoint's URI, and the best kept checkpoint's (with its score)."""
    logger.set_tag("checkpoint_uri", checkpoint)
    best = best_checkpoint(result, score) if score else None
    if best is not None:
        logger.set_tag("best_checkpoint_uri", best[0])
        logger.set_tag(f"best_checkpoint_{score[0]}", f"{best[1]:.6g}")


def log_config_artifact(logger, config: dict[str, Any]) -> None:
    """The run's full config as ``config/config.json`` (besides the flattened params)."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        logger.log_artifact(path, "config")


def scaling(workers: int, use_gpu: bool | None):
    """Ray Train's ScalingConfig: ``workers`` DDP workers, one GPU each when ``use_gpu`` (default:
    when the cluster has GPUs). Ray Train's torch backend picks NCCL with GPUs, gloo without."""
    from ray.train import ScalingConfig

    gpu = use_gpu_default() if use_gpu is None else use_gpu
    # ECHOPULSE_PLACEMENT_STRATEGY=STRICT_SPREAD puts each worker on its own node (default PACK)
    placement = os.environ.get("ECHOPULSE_PLACEMENT_STRATEGY", "PACK")
    return ScalingConfig(num_workers=workers, use_gpu=gpu, placement_strategy=placement)


def summarize(kind: str, result: TrainResult) -> dict[str, Any]:
    return {"kind": kind, "checkpoint": result.checkpoint, "run_id": result.run_id,
            **{k: round(v, 5) for k, v in result.metrics.items()}}
