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
    """Re-iterable batches of a Ray dataset shard (validation): kept in memory when they fit."""

    def __init__(self, shard, batch_size: int, device, cache_bytes: int = CACHE_BYTES) -> None:
        self.shard, self.batch_size, self.device, self.cache_bytes = shard, batch_size, device, cache_bytes
        self._cached: list[dict] | None = None
        self._fits = True

    def __iter__(self) -> Iterator[dict]:
        if self._cached is not None:
            yield from self._cached
            return
        cached: list[dict] = []
        size = 0
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, device=self.device):
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


def train_worker_loop(
    *,
    model,
    train: TrainConfig,
    step_fn: Callable[..., dict[str, float]],
    batches: Iterator[dict],
    logger,
    save: Callable[[str], None],
    on_log: Callable[[int, dict[str, float]], dict[str, float]] | None = None,
    fail_marker: str | None = None,
    resume_from: str | None = None,
) -> None:
    """Run ``train.steps`` optimizer steps, resuming where a checkpoint says.

    The checkpoint resumed from is this run's latest (after a worker-group restart), else
    ``resume_from`` (an earlier run's, found by :func:`latest_checkpoint`), else none.

    Logs every ``train.log_every`` steps (rank 0, through ``logger``) and reports to Ray Train;
    every ``train.checkpoint_every`` steps (and at the end) rank 0 attaches a resumable
    checkpoint: ``save(dir)`` writes the model checkpoint, the optimizer state and step go beside it.
    """
    import ray.train

    from echopulse.models.checkpoint import unwrap
    from echopulse.training.state import load_train_state, save_train_state
    from echopulse.training.steps import lr_at, make_optimizer

    optimizer = make_optimizer(model, train.lr, train.weight_decay)
    start = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as path:
            start = load_train_state(path, unwrap(model), optimizer)
    elif resume_from:
        with tempfile.TemporaryDirectory() as tmp:
            start = load_train_state(storage.local_copy(resume_from, tmp), unwrap(model), optimizer)
    if start:
        log.info("resuming at step %d", start)
    ctx = ray.train.get_context()
    world = ctx.get_world_size()

    def report(metrics: dict[str, float], step: int, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(dict(metrics))
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ctx.get_world_rank() == 0:
                save(tmp)
                save_train_state(tmp, optimizer, step)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(metrics), checkpoint=checkpoint)

    last: dict[str, float] = {"step": float(start)}
    window: list[dict[str, float]] = []
    t0 = time.perf_counter()
    samples = 0
    last_checkpoint = start
    for step in range(start + 1, train.steps + 1):
        maybe_fail_once(step, fail_marker)
        lr = lr_at(step - 1, train.steps, train.warmup_steps, train.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        metrics = step_fn(model, batch, optimizer, grad_clip=train.grad_clip)
        samples += len(next(iter(batch.values()))) * world
        window.append(metrics)
        if step % train.log_every == 0 or step == train.steps:
            elapsed = time.perf_counter() - t0
            last = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
            last.update(lr=lr, step=step, samples_per_s=samples / max(elapsed, 1e-9))
            if on_log is not None:
                last.update(on_log(step, last))
            if not all(math.isfinite(v) for v in last.values()):
                raise FloatingPointError(f"non-finite metrics at step {step}: {last}")
            logger.log_metrics(last, step)
            window, samples, t0 = [], 0, time.perf_counter()
            if step != train.steps:
                due = train.checkpoint_every and step - last_checkpoint >= train.checkpoint_every
                report(last, step, with_checkpoint=bool(due))
                last_checkpoint = step if due else last_checkpoint
    report(last, train.steps, with_checkpoint=True)


def run_config(name: str, out: str, train: TrainConfig, callbacks: list | None = None):
    """Ray Train's RunConfig for a training into ``out``: storage, restarts, checkpoints kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    # the testing aid reaches the workers explicitly (they do not inherit the driver's environment)
    env = {FAIL_ENV: os.environ[FAIL_ENV]} if os.environ.get(FAIL_ENV) else {}
    return RunConfig(name=name, storage_path=storage_path(out), callbacks=callbacks,
                     failure_config=FailureConfig(max_failures=train.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
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
    """Copy the run's final checkpoint to ``OUT/checkpoint``: the model only, no optimizer state."""
    from echopulse.training.state import OPTIMIZER_FILE, STATE_FILE

    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    target = storage.join(out, "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "checkpoint")
        result.checkpoint.to_directory(local)
        for name in (OPTIMIZER_FILE, STATE_FILE):
            if os.path.exists(os.path.join(local, name)):
                os.unlink(os.path.join(local, name))
        if add is not None:
            add(local)
        storage.upload_dir(local, target)
    return target


def scaling(workers: int, use_gpu: bool | None):
    from ray.train import ScalingConfig

    gpu = use_gpu_default() if use_gpu is None else use_gpu
    return ScalingConfig(num_workers=workers, use_gpu=gpu)


def summarize(kind: str, result: TrainResult) -> dict[str, Any]:
    return {"kind": kind, "checkpoint": result.checkpoint, "run_id": result.run_id,
            **{k: round(v, 5) for k, v in result.metrics.items()}}
