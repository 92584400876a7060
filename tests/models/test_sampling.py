import pytest
import torch

from echopulse.models.sampling import sample


def test_generate_is_deterministic_and_in_range(trained_generator):
    model, batch = trained_generator
    a = model.generate(batch["ecg"], steps=6, guidance=2.0, seed=3)
    b = model.generate(batch["ecg"], steps=6, guidance=2.0, seed=3)
    c = model.generate(batch["ecg"], steps=6, guidance=2.0, seed=4)
    assert a.shape == (4, 3, 4, 4) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < model.cfg.vocab_size
    assert model.training is False


def test_generate_follows_the_ecg(trained_generator):
    model, batch = trained_generator
    for guidance in (0.0, 2.0):
        out = sample(model, batch["ecg"], steps=8, guidance=guidance, temperature=0.0)
        assert (out == batch["tokens"]).float().mean() > 0.9, guidance


def test_guidance_changes_the_samples(trained_generator):
    model, batch = trained_generator
    plain = model.generate(batch["ecg"], guidance=0.0, seed=0)
    guided = model.generate(batch["ecg"], guidance=5.0, seed=0)
    assert not torch.equal(plain, guided)


def test_guidance_uses_one_batched_forward(trained_generator, monkeypatch):
    model, batch = trained_generator
    calls = []
    original = model.logits
    monkeypatch.setattr(model, "logits", lambda ids, ctx, m=None: calls.append(ids.shape[0]) or original(ids, ctx, m))
    ecg_calls = []
    encode = model.encode_ecg
    monkeypatch.setattr(model, "encode_ecg", lambda e: ecg_calls.append(1) or encode(e))
    model.generate(batch["ecg"], steps=5, guidance=2.0)
    assert calls == [8] * 5 and ecg_calls == [1]
    calls.clear()
    model.generate(batch["ecg"], steps=5, guidance=0.0)
    assert calls == [4] * 5


@pytest.mark.parametrize("schedule", ["cosine", "linear", "sqrt", "arccos"])
@pytest.mark.parametrize("steps", [1, 3, 12])
def test_every_position_decoded(trained_generator, schedule, steps):
    model, batch = trained_generator
    out = model.generate(batch["ecg"][:2], steps=steps, schedule=schedule, temperature=1.0)
    assert int(out.min()) >= 0 and int(out.max()) < model.cfg.vocab_size  # no [MASK] left


def test_prime_tokens_come_back_unchanged(trained_generator):
    model, batch = trained_generator
    prime = torch.randint(0, model.cfg.vocab_size, (4, 4, 4), generator=torch.Generator().manual_seed(9))
    out = model.generate(batch["ecg"], prime_tokens=prime, seed=1)
    assert torch.equal(out[:, 0], prime)
    # several leading token frames (chaining windows), and batch-1 broadcast
    prime2 = torch.randint(0, model.cfg.vocab_size, (1, 2, 4, 4))
    out2 = model.generate(batch["ecg"], prime_tokens=prime2)
    assert torch.equal(out2[:, :2], prime2.expand(4, -1, -1, -1))
    with pytest.raises(ValueError, match="prime_tokens"):
        model.generate(batch["ecg"], prime_tokens=torch.zeros(4, 5, 5, dtype=torch.long))


def test_bad_arguments(trained_generator):
    model, batch = trained_generator
    with pytest.raises(ValueError, match="steps"):
        model.generate(batch["ecg"], steps=0)
    with pytest.raises(ValueError, match="schedule"):
        model.generate(batch["ecg"], schedule="nope")
