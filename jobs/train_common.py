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


def train_worker_loop(
    *,
    model,
    train: TrainConfig,
    step_fn: Callable[..., dict[str, float]],
    batches: Iterator[dict],
    logger,
    on_log: Callable[[int, dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Run ``train.steps`` optimizer steps; log every ``train.log_every``; report to Ray Train.

    Returns the last logged metrics (rank 0's view).
    """
    import ray.train

    from echopulse.training.steps import lr_at, make_optimizer

    optimizer = make_optimizer(model, train.lr, train.weight_decay)
    world = ray.train.get_context().get_world_size()
    last: dict[str, float] = {}
    window: list[dict[str, float]] = []
    t0 = time.perf_counter()
    samples = 0
    for step in range(1, train.steps + 1):
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
                ray.train.report(dict(last))
    return last


def report_final(metrics: dict[str, float], save: Callable[[str], None]) -> None:
    """Report the final metrics; rank 0 attaches the checkpoint written by ``save(dir)``."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(dict(metrics), checkpoint=checkpoint)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def export_checkpoint(result, out: str, add: Callable[[str], None] | None = None) -> str:
    """Copy the run's final Ray checkpoint to ``OUT/checkpoint`` (our format), optionally extended."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    target = storage.join(out, "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "checkpoint")
        result.checkpoint.to_directory(local)
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
