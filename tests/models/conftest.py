import pytest
import torch

from echopulse.config import GeneratorConfig
from echopulse.models.generator import MaskGIT
from echopulse.training.steps import generator_train_step, make_optimizer


def overfit_generator(cfg: GeneratorConfig, steps: int):
    """A MaskGIT of ``cfg`` trained ``steps`` steps on 4 (random ECG, random tokens) pairs."""
    torch.manual_seed(0)
    model = MaskGIT(cfg)
    rng = torch.Generator().manual_seed(1)
    batch = {
        "tokens": torch.randint(0, cfg.vocab_size, (4, *cfg.token_grid), generator=rng),
        "ecg": torch.randn(4, cfg.ecg.leads, cfg.ecg.samples, generator=rng),
    }
    optimizer = make_optimizer(model, lr=2e-3)
    for _ in range(steps):
        generator_train_step(model, batch, optimizer)
    return model.eval(), batch


@pytest.fixture(scope="session")
def trained_generator():
    """A tiny MaskGIT overfit to 4 (ECG, tokens) pairs, each sequence tied to its own random ECG,
    trained with the default condition dropout (0.15) and no lead dropout: 250 steps, ~4 s on 2
    CPU cores.

    Shared read-only by the generator and sampling tests: do not train it further.
    """
    return overfit_generator(GeneratorConfig(lead_dropout=0.0), steps=250)


@pytest.fixture(scope="session")
def lead_dropout_generator():
    """The :func:`trained_generator` setup with the default lead dropout (0.3), 350 steps (~5 s)."""
    cfg = GeneratorConfig()
    assert cfg.lead_dropout > 0
    return overfit_generator(cfg, steps=350)
