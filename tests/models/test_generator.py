import pytest
import torch

from echopulse.config import GeneratorConfig
from echopulse.models.generator import MaskGIT
from echopulse.training.steps import generator_eval_step


def paired_set(n: int = 4, cfg: GeneratorConfig = GeneratorConfig()) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (n, *cfg.token_grid), generator=rng)
    ecg = torch.randn(n, cfg.ecg.leads, cfg.ecg.samples, generator=rng)
    return {"tokens": tokens, "ecg": ecg}


def test_forward_loss_and_metrics():
    torch.manual_seed(0)
    cfg = GeneratorConfig()
    model = MaskGIT(cfg)
    batch = paired_set(cfg=cfg)
    loss, metrics = model(batch["tokens"], batch["ecg"])
    assert loss.ndim == 0 and loss.requires_grad
    assert {"loss", "masked_acc"} <= set(metrics)
    # untrained: CE close to log(vocab)
    assert abs(metrics["loss"] - torch.log(torch.tensor(125.0)).item()) < 0.5
    loss_flat, _ = model(batch["tokens"].flatten(1), batch["ecg"])  # (b, n) accepted too
    assert loss_flat.ndim == 0


def test_forward_rejects_bad_tokens():
    model = MaskGIT(GeneratorConfig())
    ecg = torch.randn(2, 12, 300)
    with pytest.raises(ValueError, match=r"\(b, 3, 4, 4\)"):
        model(torch.zeros(2, 3, 4, 5, dtype=torch.long), ecg)
    with pytest.raises(ValueError, match=r"\[0, 125\)"):
        model(torch.full((2, 48), 125), ecg)
    with pytest.raises(ValueError, match="schedule"):
        MaskGIT(GeneratorConfig(schedule="nope"))


def test_generator_overfits_and_uses_the_ecg(trained_generator):
    model, batch = trained_generator
    rng = torch.Generator().manual_seed(0)
    half = generator_eval_step(model, batch, mask_ratio=0.5, generator=rng)
    assert half["acc"] > 0.9, half
    # with every token masked only the ECG tells the 4 sequences apart
    full = model.masked_eval(batch["tokens"], batch["ecg"], mask_ratio=1.0, generator=rng)
    assert full["acc"] > 0.9, full
    # ECGs swapped between samples: predictions follow the ECG, not the sequence
    swapped = model.masked_eval(batch["tokens"], batch["ecg"].roll(1, dims=0), mask_ratio=1.0, generator=rng)
    assert swapped["acc"] < 0.3, swapped


def test_guided_and_unguided_logits_differ(trained_generator):
    model, batch = trained_generator
    tokens_in = torch.full((4, model.seq_len), model.mask_id)
    context = model.encode_ecg(batch["ecg"])
    with torch.no_grad():
        cond = model.logits(tokens_in, context, torch.ones(4, dtype=torch.bool))
        uncond = model.logits(tokens_in, context, torch.zeros(4, dtype=torch.bool))
    assert (cond - uncond).abs().mean() > 0.5
    # the conditional branch is right, the null branch cannot be (it sees no ECG)
    target = batch["tokens"].flatten(1)
    assert (cond.argmax(-1) == target).float().mean() > 0.9
    assert (uncond.argmax(-1) == target).float().mean() < 0.6


def test_cond_dropout_only_in_training():
    torch.manual_seed(0)
    model = MaskGIT(GeneratorConfig(cond_dropout=0.5))
    batch = paired_set(cfg=model.cfg)
    model.eval()
    torch.manual_seed(1)
    a, _ = model(batch["tokens"], batch["ecg"])
    torch.manual_seed(1)
    b, _ = model(batch["tokens"], batch["ecg"])
    assert torch.equal(a, b)  # seeded -> deterministic
