"""What both trainings share: the per-worker loop skeleton, scaling and export of the result."""

from __future__ import annotations

import logging
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


def augmented_batches(batches: Iterator[dict], seed: int = 0) -> Iterator[dict]:
    """``batches`` with every clip's ``frames`` augmented (:func:`echopulse.transforms.augment.augment_clips`;
    a fresh draw per clip per step, repeatable from ``seed``); the other columns pass as they are."""
    import torch

    from echopulse.transforms.augment import augment_clips

    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        yield {**batch, "frames": augment_clips(batch["frames"], generator)}


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


def maybe_fail_once(step: int, marker: str | None, rank: int) -> None:
    """Testing aid: with ``ECHOPULSE_FAIL_ONCE_AT_STEP=k`` rank 0 crashes once at step ``k``.

    A marker file in the run's storage keeps it to once, so the restarted worker group goes on.
    """
    at = os.environ.get(FAIL_ENV)
    if not at or marker is None or int(at) != step or rank != 0:
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


@dataclass(frozen=True)
class WorkerRuntime:
    """What a training worker takes from whatever runs it: a Ray Train worker group
    (:func:`ray_train_runtime`) or a single-worker Tune trial (:func:`tune_trial_runtime`)."""

    rank: int
    world: int
    local_world: int
    device: Any
    dataset: Callable[[str], Any]  # "train" / "val" -> something with iter_torch_batches
    prepare_model: Callable[[Any], Any]  # DDP wrap and move to the device
    get_checkpoint: Callable[[], Any]  # the checkpoint to resume from (a ray Checkpoint) or None
    report: Callable[[dict[str, float], str | None], None]  # (metrics, checkpoint directory or None)
    progress: Any = None  # a tqdm-like class for rank 0's bar


def ray_train_runtime() -> WorkerRuntime:
    """This Ray Train worker's rank, device, dataset shards, checkpoint and reporting."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    ctx = ray.train.get_context()

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    return WorkerRuntime(rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                         local_world=ctx.get_local_world_size(), device=ray.train.torch.get_device(),
                         dataset=ray.train.get_dataset_shard, prepare_model=ray.train.torch.prepare_model,
                         get_checkpoint=ray.train.get_checkpoint, report=report, progress=ray_tqdm)


def tune_trial_runtime(datasets: dict[str, Any], use_gpu: bool) -> WorkerRuntime:
    """A Tune trial that trains in its own process (one worker): the whole datasets, Tune's
    checkpoint and ``tune.report``. No TorchTrainer, so none of its actors (controller, worker
    group, split coordinators) start for the trial."""
    import torch
    from ray import tune
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    device = torch.device("cuda" if use_gpu else "cpu")

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    return WorkerRuntime(rank=0, world=1, local_world=1, device=device, dataset=datasets.__getitem__,
                         prepare_model=lambda model: model.to(device), get_checkpoint=tune.get_checkpoint,
                         report=report, progress=ray_tqdm)


def train_worker_loop(
    *,
    runtime: WorkerRuntime,
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
    """:class:`echopulse.training.loop.TrainingLoop` inside a training worker (``runtime``).

    From the runtime: rank and world, resume from this run's latest checkpoint (after a
    worker-group restart or a Tune restore), else ``resume_from`` (an earlier run's, found by
    :func:`latest_checkpoint`), else none; metrics and checkpoints go to its ``report``; rank 0's
    progress bar is Ray's own. Also the CPU threads of this worker and the test-only injected failure.
    """
    import torch

    from echopulse.models.checkpoint import unwrap
    from echopulse.training.loop import TrainingLoop
    from echopulse.training.state import load_train_state

    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(worker_threads(runtime.local_world))

    def restore(net, optimizer, ema) -> int:
        restored = runtime.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as path:
                return load_train_state(path, unwrap(net), optimizer, ema)
        if resume_from:
            with tempfile.TemporaryDirectory() as tmp:
                return load_train_state(storage.local_copy(resume_from, tmp), unwrap(net), optimizer, ema)
        return 0

    TrainingLoop(model=model, train=train, step_fn=step_fn, batches=batches, logger=logger, save=save,
                 report=runtime.report, restore=restore, rank=runtime.rank, world=runtime.world,
                 validate=validate, sample=sample, on_log=on_log,
                 before_step=lambda step: maybe_fail_once(step, fail_marker, runtime.rank),
                 progress=runtime.progress).run()


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


def data_config(workers: int):
    """Which datasets Ray Train shards between workers: the training split when there are several
    workers; never the validation split (each rank validates all of it, and ``gather_mean`` then
    averages equal figures), and nothing for one worker. An unsplit dataset reaches its worker as a
    plain iterator: no split-coordinator actor to start for it (seconds per run on a small machine)."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=["train"] if workers > 1 else [])


def summarize(kind: str, result: TrainResult) -> dict[str, Any]:
    return {"kind": kind, "checkpoint": result.checkpoint, "run_id": result.run_id,
            **{k: round(v, 5) for k, v in result.metrics.items()}}
