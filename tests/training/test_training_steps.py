import math

import pytest
import torch

from echopulse.config import GeneratorConfig, TokenizerConfig
from echopulse.models.generator import MaskGIT
from echopulse.models.tokenizer import VideoTokenizer
from echopulse.training.steps import (
    generator_eval_step,
    generator_train_step,
    lr_at,
    make_optimizer,
    tokenizer_eval_step,
    tokenizer_train_step,
)


def test_tokenizer_steps_take_uint8_and_report_floats():
    torch.manual_seed(0)
    cfg = TokenizerConfig()
    model = VideoTokenizer(cfg)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.01)
    batch = {"frames": torch.randint(0, 256, (2, cfg.frames, cfg.image_size, cfg.image_size), dtype=torch.uint8)}
    before = [p.detach().clone() for p in model.parameters()]
    metrics = tokenizer_train_step(model, batch, optimizer, grad_clip=1.0, lr=5e-4)
    assert {"loss", "psnr", "mse", "grad_norm", "codebook_usage"} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert optimizer.param_groups[0]["lr"] == 5e-4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.train()
    evaluated = tokenizer_eval_step(model, batch)
    assert model.training and {"loss", "psnr"} <= set(evaluated)


def test_generator_steps_accept_grid_or_flat_tokens():
    torch.manual_seed(0)
    cfg = GeneratorConfig()
    model = MaskGIT(cfg)
    optimizer = make_optimizer(model, lr=1e-3)
    tokens = torch.randint(0, cfg.vocab_size, (3, *cfg.token_grid), dtype=torch.int16)  # tokens/v1 dtype
    ecg = torch.randn(3, 12, cfg.ecg.samples)
    for batch in ({"tokens": tokens, "ecg": ecg}, {"tokens": tokens.flatten(1).numpy(), "ecg": ecg.numpy()}):
        metrics = generator_train_step(model, batch, optimizer)
        assert {"loss", "masked_acc", "grad_norm"} <= set(metrics)
    rng = torch.Generator().manual_seed(0)
    a = generator_eval_step(model, {"tokens": tokens, "ecg": ecg}, mask_ratio=0.5, generator=rng)
    b = generator_eval_step(model, {"tokens": tokens, "ecg": ecg}, mask_ratio=0.5,
                            generator=torch.Generator().manual_seed(0))
    assert a == b and set(a) == {"ce", "acc"}


def test_steps_work_through_a_wrapper():
    """The jobs pass a DDP-wrapped model; steps must only need ``model(...)`` and ``.module``."""

    class Wrapper(torch.nn.Module):  # same surface as DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    cfg = GeneratorConfig()
    wrapped = Wrapper(MaskGIT(cfg))
    batch = {"tokens": torch.randint(0, 125, (2, 48)), "ecg": torch.randn(2, 12, 300)}
    generator_train_step(wrapped, batch, make_optimizer(wrapped, 1e-3))
    assert set(generator_eval_step(wrapped, batch)) == {"ce", "acc"}


def test_lr_schedule():
    base = 1e-3
    assert lr_at(0, 100, 10, base) == pytest.approx(base / 10)
    assert lr_at(9, 100, 10, base) == pytest.approx(base)
    assert lr_at(10, 100, 10, base) == pytest.approx(base)
    assert lr_at(100, 100, 10, base) == pytest.approx(0.1 * base)
    values = [lr_at(s, 100, 10, base) for s in range(10, 101)]
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))
    assert lr_at(5, 10, 0, base) < base and lr_at(0, 10, 0, base) == pytest.approx(base)


def test_make_optimizer_decays_matrices_only():
    model = MaskGIT(GeneratorConfig())
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_steps_under_real_ddp(tmp_path):
    """One-process gloo DDP (what Ray Train builds on CPU): every parameter gets a gradient without
    ``find_unused_parameters``, and checkpoints unwrap the DDP module."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from echopulse.models.checkpoint import load_checkpoint, save_checkpoint

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        gen_cfg, tok_cfg = GeneratorConfig(cond_dropout=0.0), TokenizerConfig()
        generator = DistributedDataParallel(MaskGIT(gen_cfg))
        tokenizer = DistributedDataParallel(VideoTokenizer(tok_cfg))
        gen_opt, tok_opt = make_optimizer(generator, 1e-3), make_optimizer(tokenizer, 1e-3)
        gen_batch = {"tokens": torch.randint(0, 125, (2, 3, 4, 4)), "ecg": torch.randn(2, 12, 300)}
        tok_batch = {"frames": torch.randint(0, 256, (2, 5, 32, 32), dtype=torch.uint8)}
        for _ in range(2):
            generator_train_step(generator, gen_batch, gen_opt)
            tokenizer_train_step(tokenizer, tok_batch, tok_opt)
        generator_eval_step(generator, gen_batch)
        tokenizer_eval_step(tokenizer, tok_batch)
        save_checkpoint(generator, gen_cfg, tmp_path / "gen", "generator")
        loaded, _, _ = load_checkpoint(tmp_path / "gen", expected_kind="generator")
        for (name, a), b in zip(generator.module.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
    finally:
        dist.destroy_process_group()


def test_mixed_precision_steps_run():
    """The GPU path uses bf16 autocast; check on CPU that it runs and stays finite (tiny, one step)."""
    torch.manual_seed(0)
    tokenizer, generator = VideoTokenizer(TokenizerConfig()), MaskGIT(GeneratorConfig())
    tok = tokenizer_train_step(tokenizer, {"frames": torch.randint(0, 256, (2, 5, 32, 32), dtype=torch.uint8)},
                               make_optimizer(tokenizer, 1e-3), amp_dtype=torch.bfloat16)
    gen = generator_train_step(generator, {"tokens": torch.randint(0, 125, (2, 48)), "ecg": torch.randn(2, 12, 300)},
                               make_optimizer(generator, 1e-3), amp_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in [*tok.values(), *gen.values()])
    assert all(p.dtype == torch.float32 for p in generator.parameters())


def test_condition_columns_turn_tokens_v1_views_and_ef_into_model_inputs():
    import numpy as np

    from echopulse.training.steps import make_condition_columns_fn

    batch = {"tokens": np.zeros((4, 3)), "view": np.array(["A4C", "a2c", "", "PLAX"], dtype=object),
             "ef": np.array([0.55, np.nan, 0.3, 0.6], dtype=np.float32)}
    out = make_condition_columns_fn(num_views=2, ef_conditioning=True)(batch)
    # A4C and A2C are the first two known views; an empty or (for 2 views) unknown one is -1
    assert out["view"].tolist() == [0, 1, -1, -1] and out["view"].dtype == np.int64
    assert np.isnan(out["ef"][1]) and out["ef"][0] == np.float32(0.55)
    dropped = make_condition_columns_fn(num_views=0, ef_conditioning=False)(batch)
    assert set(dropped) == {"tokens"}
