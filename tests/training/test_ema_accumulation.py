"""EMA, gradient accumulation and the loop's helpers: fast, no Ray."""

import contextlib
import math

import numpy as np
import pytest
import torch

from echopulse.config import TokenizerConfig, TrainConfig
from echopulse.models.tokenizer import VideoTokenizer
from echopulse.training.ema import EMA
from echopulse.training.state import TRAIN_WEIGHTS_FILE, load_train_state, save_train_state
from echopulse.training.steps import make_optimizer, tokenizer_train_step


SMALL = TokenizerConfig(dim=32, spatial_depth=1, temporal_depth=1, heads=2)  # fast on a busy CPU


def _tokenizer(seed: int = 0) -> VideoTokenizer:
    torch.manual_seed(seed)
    return VideoTokenizer(SMALL)


def _frames(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 5, 32, 32), dtype=torch.uint8, generator=g)


def _split(frames: torch.Tensor, sizes: list[int]) -> list[dict]:
    return [{"frames": part} for part in torch.split(frames, sizes)]


@pytest.mark.parametrize("sizes", [[2, 2], [3, 1], [1, 1, 1, 1]])
def test_accumulated_micro_batches_equal_one_batch(sizes):
    """grad_accum micro-batches (even or not) give the update of the whole batch: same gradient,
    same clipped norm, same weights after the step, sample-weighted metrics. (SGD: Adam's first
    step is ~lr * sign(grad), which turns float rounding in near-zero gradients into lr-sized
    differences and would hide what is compared.)"""
    frames = _frames(4)
    whole, accum = _tokenizer(), _tokenizer()
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.1)
    opt_accum = torch.optim.SGD(accum.parameters(), lr=0.1)
    a = tokenizer_train_step(whole, {"frames": frames}, opt_whole, grad_clip=0.5)
    b = tokenizer_train_step(accum, _split(frames, sizes), opt_accum, grad_clip=0.5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # MSE: mean of per-sample means
    for (name, p), q in zip(whole.named_parameters(), accum.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_accumulation_differs_from_a_single_micro_batch():
    """The check above can fail: stepping on half the batch moves the weights elsewhere."""
    frames = _frames(4)
    whole, half = _tokenizer(), _tokenizer()
    tokenizer_train_step(whole, {"frames": frames}, torch.optim.SGD(whole.parameters(), lr=0.1))
    tokenizer_train_step(half, {"frames": frames[:2]}, torch.optim.SGD(half.parameters(), lr=0.1))
    assert any(not torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(whole.parameters(), half.parameters()))


def test_no_sync_for_all_but_the_last_micro_batch():
    calls: list[str] = []

    class FakeDDP(torch.nn.Module):  # the surface of DistributedDataParallel the step uses
        def __init__(self, module):
            super().__init__()
            self.module = module

        @contextlib.contextmanager
        def no_sync(self):
            calls.append("no_sync")
            yield

        def forward(self, *args, **kwargs):
            calls.append("forward")
            return self.module(*args, **kwargs)

    model = FakeDDP(_tokenizer())
    tokenizer_train_step(model, _split(_frames(3), [1, 1, 1]), make_optimizer(model, 1e-3))
    assert calls == ["no_sync", "forward", "no_sync", "forward", "forward"]


def test_step_logs_every_numeric_metric_the_model_returns():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, video, l1_weight=0.0):
            loss = (self.w * video.mean()) ** 2
            return video, loss, {"loss": loss.item(), "perplexity": torch.tensor(7.0),
                                 "codebook_usage": 0.5, "note": "text", "hist": torch.zeros(3)}

    model = Model()
    metrics = tokenizer_train_step(model, _split(_frames(2), [1, 1]), make_optimizer(model, 1e-3))
    assert set(metrics) == {"loss", "perplexity", "codebook_usage", "grad_norm"}
    assert metrics["perplexity"] == 7.0 and metrics["codebook_usage"] == 0.5


def test_ema_update_warmup_and_swap():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # warm-up decay after 0 updates: min(0.99, 1/10) = 0.1
    assert ema.shadow["weight"].flatten().tolist() == pytest.approx([0.9, 0.9])
    assert ema.current_decay() == pytest.approx(2 / 11)
    for _ in range(2000):
        ema.update(model)
    assert ema.current_decay() == 0.99
    assert ema.shadow["weight"].flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with torch.no_grad():
        model.weight.fill_(5.0)
    with ema.applied(model):
        assert model.weight.flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert model.weight.tolist() == [[5.0, 5.0]]  # training weights are back
    with pytest.raises(ValueError):
        EMA(model, 1.0)


def test_ema_and_training_weights_survive_a_checkpoint(tmp_path):
    from echopulse.models.checkpoint import load_checkpoint, save_checkpoint

    cfg = SMALL
    model = _tokenizer()
    optimizer = make_optimizer(model, 1e-3)
    ema = EMA(model, 0.9)
    for seed in range(3):
        tokenizer_train_step(model, {"frames": _frames(2, seed)}, optimizer)
        ema.update(model)
    with ema.applied(model):  # what the loop does: the checkpoint's model is the EMA
        save_checkpoint(model, cfg, tmp_path, kind="tokenizer")
    save_train_state(str(tmp_path), optimizer, step=3, train_weights=model, ema_updates=ema.updates)
    assert (tmp_path / TRAIN_WEIGHTS_FILE).exists()

    exported, _, _ = load_checkpoint(tmp_path, expected_kind="tokenizer")
    for k, v in ema.shadow.items():
        torch.testing.assert_close(exported.state_dict()[k], v)

    fresh = _tokenizer(seed=5)
    fresh_ema = EMA(fresh, 0.9)
    step = load_train_state(str(tmp_path), fresh, make_optimizer(fresh, 1e-3), fresh_ema)
    assert step == 3 and fresh_ema.updates == 3
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name  # the raw training weights, not the EMA
    for k, v in ema.shadow.items():
        assert torch.equal(fresh_ema.shadow[k], v), k
    assert any(not torch.equal(ema.shadow[k], v) for k, v in model.state_dict().items() if k in ema.shadow)


def test_checkpoint_without_ema_seeds_the_ema(tmp_path):
    from echopulse.models.checkpoint import save_checkpoint

    model = _tokenizer()
    optimizer = make_optimizer(model, 1e-3)
    save_checkpoint(model, SMALL, tmp_path, kind="tokenizer")
    save_train_state(str(tmp_path), optimizer, step=2)
    fresh = _tokenizer(seed=5)
    ema = EMA(fresh, 0.9)
    assert load_train_state(str(tmp_path), fresh, make_optimizer(fresh, 1e-3), ema) == 2
    assert ema.updates == 0
    for k, v in model.state_dict().items():
        if k in ema.shadow:
            assert torch.equal(ema.shadow[k], v), k


def test_train_config_checks():
    assert TrainConfig().grad_accum == 1
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_loop_helpers():
    from echopulse.training.loop import gather_mean, step_seed
    from jobs.train_common import micro_batch_size

    assert micro_batch_size(TrainConfig(batch_size=8, grad_accum=2), world=2) == 2
    assert micro_batch_size(TrainConfig(batch_size=8), world=1) == 8
    assert micro_batch_size(TrainConfig(batch_size=2, grad_accum=4), world=1) == 1
    seeds = {step_seed(0, s, r) for s in range(1, 50) for r in range(4)}
    assert len(seeds) == 49 * 4 and step_seed(0, 3, 1) == step_seed(0, 3, 1)
    assert gather_mean({"a": 6.0, "b": 3.0}, 3) == {"a": 2.0, "b": 1.0}  # no process group: local
    assert gather_mean({}, 0) == {}


def test_has_ecg_uses_source_then_leads_then_signal():
    from jobs.datasets import _with_ecg, has_ecg

    ecg = np.zeros((3, 12, 10), dtype=np.float32)
    ecg[1, 0, 3] = 0.5
    assert has_ecg({"ecg": ecg}).tolist() == [False, True, False]
    assert has_ecg({"ecg": ecg, "ecg_source": np.array(["none", "wfdb", "dicom"])}).tolist() == [
        False, True, True]
    leads = np.array([np.zeros(12, bool), np.ones(12, bool), np.eye(12, dtype=bool)[0]], dtype=object)
    assert has_ecg({"ecg": ecg, "ecg_leads": leads}).tolist() == [False, True, True]
    assert has_ecg({"ecg": np.zeros((0, 12, 10))}).tolist() == []
    kept = _with_ecg({"ecg": ecg, "tokens": np.arange(3), "split": np.array(["train"] * 3)})
    assert kept["tokens"].tolist() == [1] and kept["ecg"].shape == (1, 12, 10)
    assert math.isfinite(float(kept["ecg"].sum()))


def test_generator_refuses_tokens_without_any_ecg_clip(tmp_path):
    """Checked from the counts, before any Ray Data work."""
    import json

    from echopulse.errors import EchoPulseError
    from jobs.recipes import tiny
    from jobs.datasets import tokens_datasets

    recipe = tiny()
    (tmp_path / "dataset.json").write_text(json.dumps({
        "schema": "tokens/v1", "token_grid": list(recipe.generator.token_grid),
        "codebook_size": recipe.generator.vocab_size, "split_counts": {"train": 3, "val": 1}}))
    counts = {"train": {"with_ecg": 0, "without_ecg": 3}, "val": {"with_ecg": 1, "without_ecg": 0}}
    with pytest.raises(EchoPulseError, match="no train clip has an ECG \\(3 without one skipped\\)"):
        tokens_datasets(str(tmp_path), recipe, counts)
