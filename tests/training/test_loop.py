"""The training loop without Ray: report cadence, checkpoints, and resume that matches an
uninterrupted run exactly (weights, optimizer state, EMA)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from torch import nn

from echopulse.config import TrainConfig
from echopulse.models.checkpoint import WEIGHTS_FILE
from echopulse.tracking import RunLogger
from echopulse.training.loop import PACE_STEPS, TrainingLoop
from echopulse.training.state import load_train_state
from echopulse.training.steps import lr_at


def _step(model, batch, optimizer, grad_clip=None, amp_dtype=None):
    optimizer.zero_grad()
    noise = torch.randn_like(batch["x"]) * 0.1  # draws from the per-step seed
    loss = ((model(batch["x"] + noise) - batch["y"]) ** 2).mean()
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach())}


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(4, 3, generator=g)
        yield {"x": x, "y": x.sum(-1, keepdim=True)}


def _run(train, tmp_path, name, restore=None, batches=None):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = nn.Linear(3, 1)
    reports, saved = [], {}

    def report(metrics, checkpoint_dir):
        reports.append((int(metrics["step"]), checkpoint_dir is not None))
        if checkpoint_dir:
            saved[int(metrics["step"])] = shutil.copytree(checkpoint_dir, tmp_path / f"{name}-{metrics['step']:.0f}")

    def save(d):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{d}/{WEIGHTS_FILE}")

    loop = TrainingLoop(model=model, train=train, step_fn=_step, batches=batches or _batches(),
                        logger=RunLogger(None, None), save=save, report=report,
                        validate=lambda step: {"val_loss": float(step)},
                        **({"restore": restore} if restore else {}))
    loop.run()
    return model, loop, reports, saved


def test_cadence_and_resume_match_an_uninterrupted_run(tmp_path):
    train = TrainConfig(steps=6, log_every=2, checkpoint_every=4, warmup_steps=1, ema_decay=0.9, lr=0.05)
    model, loop, reports, saved = _run(train, tmp_path, "full")
    assert reports == [(2, False), (4, True), (6, True)]
    assert loop.val_metrics == {"val_loss": 6.0}

    # resume from step 4: the batches stream continues where step 4 left it
    batches = _batches()
    for _ in range(4):
        next(batches)
    resumed, _, reports2, _ = _run(
        train, tmp_path, "resumed", batches=batches,
        restore=lambda net, opt, ema: load_train_state(str(saved[4]), net, opt, ema))
    assert reports2 == [(6, True)]
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Recorder:
    """A logger that keeps what the loop logs (no MLflow)."""

    active = False

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def test_a_deadline_shortens_the_run_and_its_lr_schedule():
    train = TrainConfig(steps=10_000, log_every=10, warmup_steps=1, ema_decay=0.0, lr=0.05)
    logger, reports, started = _Recorder(), [], []

    def slow_step(model, batch, optimizer, grad_clip=None, amp_dtype=None):
        started.append(time.monotonic())
        time.sleep(0.005)
        return _step(model, batch, optimizer, grad_clip, amp_dtype)

    # a first short run pays the one-off costs (lazy imports, the optimizer's first step) that a
    # loaded machine can stretch to seconds, so the deadline below measures steps
    TrainingLoop(model=nn.Linear(3, 1), train=TrainConfig(steps=2, ema_decay=0.0), step_fn=_step,
                 batches=_batches(), logger=_Recorder()).run()
    deadline = time.monotonic() + 1.0
    loop = TrainingLoop(model=nn.Linear(3, 1), train=train, step_fn=slow_step, batches=_batches(),
                        logger=logger, save=lambda d: None,
                        report=lambda m, c: reports.append((int(m["step"]), c is not None)), deadline=deadline)
    ran = loop.run()
    assert PACE_STEPS <= ran == loop.step == loop.total == len(started) < train.steps
    # once judged (after PACE_STEPS steps), no step but the planned last starts past the deadline
    assert all(t < deadline for t in started[PACE_STEPS:-1])
    assert reports[-1] == (ran, True)  # the shortened end is the end: logged and checkpointed
    assert [s for s, _ in reports[:-1]] == list(range(10, ran, 10))
    last_step, last = logger.logged[-1]
    assert last_step == ran
    # the schedule decays to the shortened end, not to train.steps
    assert last["lr"] == pytest.approx(lr_at(ran - 1, ran, train.warmup_steps, train.lr))
    assert last["lr"] < 0.12 * train.lr


def test_a_distant_deadline_changes_nothing_and_ranks_cannot_share_one():
    train = TrainConfig(steps=25, log_every=5, warmup_steps=1, ema_decay=0.0, lr=0.05)
    logger = _Recorder()
    loop = TrainingLoop(model=nn.Linear(3, 1), train=train, step_fn=_step, batches=_batches(), logger=logger,
                        deadline=time.monotonic() + 3600)
    assert loop.run() == 25 and loop.total == 25
    assert logger.logged[-1][1]["lr"] == pytest.approx(lr_at(24, 25, 1, 0.05))
    with pytest.raises(ValueError, match="deadline"):
        TrainingLoop(model=nn.Linear(3, 1), train=train, step_fn=_step, batches=_batches(), logger=logger,
                     world=2, deadline=time.monotonic() + 3600).run()
