"""The one training loop: accumulation, EMA, validation / sample / checkpoint cadence. No Ray.

Everything that depends on where the loop runs comes from outside: ``restore`` (where to resume),
``report`` (where metrics and checkpoints go), ``rank`` / ``world``, a ``before_step`` hook and an
optional ``deadline``. ``jobs/train_common.py`` adapts it to Ray Train; ``bench/quality.py``,
``bench/long_video.py`` and the tests run it as is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from echopulse.config import TrainConfig

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir): checkpoint_dir is a directory holding a resumable checkpoint
# (rank 0, when one is due) or None; it is deleted after report returns
Report = Callable[[dict[str, float], "str | None"], None]
PACE_STEPS = 20  # steps run before a deadline is judged from the pace (the first steps are slow)


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


@dataclass
class TrainingLoop:
    """Run ``train.steps`` optimizer steps of ``step_fn`` over ``batches``, resuming where
    ``restore`` says.

    One optimizer step takes ``train.grad_accum`` micro-batches from ``batches`` (``step_fn`` gets
    them as a list; under DDP it syncs gradients on the last only), runs in bf16 autocast on GPU
    (``train.bf16``; never on CPU), and then updates the EMA (``train.ema_decay`` > 0). Before each
    step the torch RNG is seeded from (seed, step, rank) (:func:`step_seed`).

    Every ``train.log_every`` steps (and at the last) the window's metrics, averaged over ranks,
    plus ``lr`` and ``samples_per_s`` are logged (through ``logger``) and passed to ``report``.
    ``validate(step)`` (called on every rank; it must combine ranks itself, e.g. with
    :func:`gather_mean`) runs every ``train.val_every`` steps (0: at each logged step), at every
    checkpoint and at the end, on the EMA weights when EMA is on; its metrics go into the reports
    (the latest values until the next validation) so checkpoints can be ranked by them.
    ``sample(step, dir)`` (rank 0 only) writes files logged as artifacts under ``samples/``,
    every ``train.sample_every`` steps and at the end, also on the EMA weights.
    At the first logged step ``train.checkpoint_every`` or more steps after the last checkpoint
    (and at the end) rank 0 writes a resumable checkpoint for ``report``: ``save(dir)`` writes
    the model checkpoint (EMA weights when EMA is on); the optimizer state, step and raw training
    weights go beside it (:mod:`echopulse.training.state`).

    ``restore(model, optimizer, ema)`` loads the state to resume from and returns its step (0:
    fresh start). Without ``save`` no checkpoints are written (``report`` always gets None).

    ``deadline`` (a ``time.monotonic()`` value; one process only): after :data:`PACE_STEPS`
    steps, the run is re-planned before every step to the steps that fit before it at the pace so
    far (never more than ``train.steps``; the step about to run at least, so a deadline already
    past makes it the last), and that step's LR, and the last-step log, validation, samples and
    checkpoint, follow the planned end. ``total`` is the planned end, ``step`` the last step run.
    """

    model: Any
    train: TrainConfig
    step_fn: Callable[..., dict[str, float]]
    batches: Iterator[dict]
    logger: Any
    save: Callable[[str], None] | None = None
    report: Report = lambda metrics, checkpoint_dir: None
    restore: Callable[[Any, Any, Any], int] = lambda model, optimizer, ema: 0
    rank: int = 0
    world: int = 1
    validate: Callable[[int], dict[str, float]] | None = None
    sample: Callable[[int, str], list[str]] | None = None
    on_log: Callable[[int, dict[str, float]], dict[str, float]] | None = None
    before_step: Callable[[int], None] | None = None
    progress: Callable[..., Any] | None = None  # a tqdm-like class for rank 0's bar (default tqdm)
    deadline: float | None = None  # time.monotonic() by which to end (shortens the run; see above)

    def run(self) -> int:
        """Train to the planned end; returns the last step run (the step resumed from when none)."""
        import torch

        from echopulse.training.ema import EMA
        from echopulse.training.steps import make_optimizer

        train = self.train
        if self.deadline is not None and self.world > 1:
            raise ValueError("a deadline is judged by one process's pace; ranks would plan different ends")
        device = next(self.model.parameters()).device
        self.amp_dtype = torch.bfloat16 if train.bf16 and device.type == "cuda" else None
        self.optimizer = make_optimizer(self.model, train.lr, train.weight_decay)
        self.ema = EMA(self.model, train.ema_decay) if train.ema_decay > 0 else None
        start = self.restore(self.model, self.optimizer, self.ema)
        if start:
            log.info("resuming at step %d", start)
        self.total, self.step = train.steps, start
        self.last: dict[str, float] = {"step": float(start)}
        self.val_metrics: dict[str, float] = {}
        bar = None
        if self.rank == 0 and start < train.steps:
            bar = (self.progress or tqdm)(total=train.steps - start, desc="train", unit="step")
        try:
            self._steps(start, bar)
        finally:
            if bar is not None:
                bar.close()
        if start >= train.steps:  # nothing left to train: report the checkpoint resumed from
            if self.validate is not None:
                self.val_metrics = self._validation(start)
            self._report({**self.last, **self.val_metrics}, start, with_checkpoint=True)
        return self.step

    def _steps(self, start: int, bar) -> None:
        train = self.train
        window: list[dict[str, float]] = []
        busy, samples = 0.0, 0
        last_checkpoint = last_logged = start
        began = time.perf_counter()
        while self.step < self.total:
            done = self.step - start
            if self.deadline is not None and done >= PACE_STEPS:  # plan before the step: its LR
                self._replan(self.step + 1, (time.perf_counter() - began) / done, bar, start)
            step = self.step = self.step + 1
            if self.before_step is not None:
                self.before_step(step)
            t0 = time.perf_counter()
            lr, micro, metrics = self._one_step(step)
            busy += time.perf_counter() - t0
            samples += sum(len(next(iter(b.values()))) for b in micro) * self.world
            window.append(metrics)
            end = step == self.total
            logged = step % train.log_every == 0 or end
            due = logged and (end or bool(
                train.checkpoint_every and step - last_checkpoint >= train.checkpoint_every))
            if self.validate is not None and (due or (train.val_every and step % train.val_every == 0)
                                              or (not train.val_every and logged)):
                self.val_metrics = self._validation(step)
            if end or (train.sample_every and step % train.sample_every == 0):
                self._sample(step)
            if not logged:
                continue
            self._log_window(step, lr, window, samples / max(busy, 1e-9))
            if bar is not None:
                bar.update(step - last_logged)
            last_logged = step
            window, samples, busy = [], 0, 0.0
            self._report({**self.last, **self.val_metrics}, step, with_checkpoint=due)
            last_checkpoint = step if due else last_checkpoint

    def _replan(self, step: int, pace: float, bar, start: int) -> None:
        """The planned end before ``step``: the steps that fit before the deadline at ``pace``
        seconds a step, ``step`` itself at least (so the last step run is planned as the end)."""
        left = max(0.0, self.deadline - time.monotonic())
        fit = min(self.train.steps, max(step, step - 1 + int(left / max(pace, 1e-9))))
        if fit == self.total:
            return
        if self.total == self.train.steps:
            log.warning("the deadline fits about %d of %d steps; shortening the run", fit, self.train.steps)
        self.total = fit
        if bar is not None:
            bar.total = fit - start
            bar.refresh()

    def _one_step(self, step: int) -> tuple[float, list[dict], dict[str, float]]:
        import torch

        from echopulse.training.steps import lr_at

        train = self.train
        lr = lr_at(step - 1, self.total, train.warmup_steps, train.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [next(self.batches) for _ in range(train.grad_accum)]
        torch.manual_seed(step_seed(train.seed, step, self.rank))
        metrics = self.step_fn(self.model, micro if len(micro) > 1 else micro[0], self.optimizer,
                               grad_clip=train.grad_clip, amp_dtype=self.amp_dtype)
        if self.ema is not None:
            self.ema.update(self.model)
        return lr, micro, metrics

    def _log_window(self, step: int, lr: float, window: list[dict[str, float]], rate: float) -> None:
        keys = sorted({k for m in window for k in m})
        counts = {k: sum(1 for m in window if k in m) for k in keys}
        local = {k: sum(m.get(k, 0.0) for m in window) / counts[k] for k in keys}
        last = gather_mean(local, 1.0)  # every rank's window weighs the same (equal batches)
        last.update(lr=lr, step=step, samples_per_s=rate, world_size=self.world)
        if self.on_log is not None:
            last.update(self.on_log(step, last))
        if not all(math.isfinite(v) for v in last.values()):
            raise FloatingPointError(f"non-finite metrics at step {step}: {last}")
        self.logger.log_metrics(last, step)
        self.last = last

    def _averaged(self):
        """The EMA weights in the model for validation, samples and checkpoints (when EMA is on)."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    def _report(self, metrics: dict[str, float], step: int, with_checkpoint: bool) -> None:
        from echopulse.training.state import save_train_state

        if not with_checkpoint or self.save is None:
            self.report(dict(metrics), None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                with self._averaged():
                    self.save(tmp)
                ema = self.ema
                save_train_state(tmp, self.optimizer, step, train_weights=self.model if ema is not None else None,
                                 ema_updates=ema.updates if ema is not None else 0)
                checkpoint = tmp
            self.report(dict(metrics), checkpoint)

    def _validation(self, step: int) -> dict[str, float]:
        with self._averaged():
            metrics = self.validate(step) if self.validate is not None else {}
        self.logger.log_metrics(metrics, step)
        return metrics

    def _sample(self, step: int) -> None:
        if self.sample is None or self.rank != 0 or not self.logger.active:
            return
        try:
            with tempfile.TemporaryDirectory() as tmp, self._averaged():
                for path in self.sample(step, tmp):
                    self.logger.log_artifact(path, "samples")
        except Exception:  # a sample GIF is a view on the run, never a reason to stop it
            log.exception("sample at step %d failed", step)
