import pytest
import torch

from echopulse.config import GeneratorConfig
from echopulse.models.generator import MaskGIT
from echopulse.models.sampling import _draw, guidance_weights, sample
from echopulse.models.schedules import halton_order


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


@pytest.mark.parametrize("cached", [True, False])
def test_guidance_uses_one_batched_forward(trained_generator, cached):
    model, batch = trained_generator
    # the last block's MLP sees both branches' rows in one batch; the ECG is encoded once per call
    rows, ecg_calls = [], []
    hooks = [model.blocks[-1].mlp.register_forward_hook(lambda m, args, out: rows.append(out.shape[0])),
             model.ecg_encoder.register_forward_hook(lambda m, args, out: ecg_calls.append(1))]
    try:
        sample(model, batch["ecg"], steps=5, guidance=2.0, cached=cached)
        assert rows == [8] * 5 and ecg_calls == [1]
        rows.clear()
        sample(model, batch["ecg"], steps=5, guidance=0.0, cached=cached)
        assert rows == [4] * 5
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("guidance", [0.0, 3.0])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.5])
def test_fast_path_draws_the_same_tokens_as_the_plain_path(trained_generator, guidance, temperature):
    model, batch = trained_generator
    prime = batch["tokens"][:, 0]
    for kwargs in ({}, {"prime_tokens": prime}):
        fast = sample(model, batch["ecg"], steps=6, guidance=guidance, temperature=temperature, seed=5, **kwargs)
        plain = sample(model, batch["ecg"], steps=6, guidance=guidance, temperature=temperature, seed=5,
                       cached=False, **kwargs)
        assert torch.equal(fast, plain), (guidance, temperature, kwargs)


@pytest.mark.parametrize("frame_embedding", [True, False])
def test_fast_path_hidden_states_give_the_models_logits(frame_embedding):
    torch.manual_seed(0)
    # untrained: near-uniform logits, no room to hide errors
    model = MaskGIT(GeneratorConfig(ecg_frame_embedding=frame_embedding)).eval()
    ecg = torch.randn(3, 12, 300)
    ids = torch.randint(0, model.cfg.vocab_size + 1, (3, model.seq_len))  # some [MASK]
    with torch.no_grad():
        context, frames = model.encode_ecg(ecg), model.encode_ecg_frames(ecg)
        both = model.logits(torch.cat([ids, ids]), torch.cat([context, context]),
                            torch.tensor([True] * 3 + [False] * 3),
                            frames=None if frames is None else torch.cat([frames, frames]))
        hidden = model.sampling_hidden(ids, model.sampling_cache(context, guided=True, frames=frames))
        unguided = model.sampling_hidden(ids, model.sampling_cache(context, guided=False, frames=frames))
        # the frame embedding reaches the conditional rows only
        plain = model.logits(ids, context)
    torch.testing.assert_close(model.to_logits(hidden), both, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.to_logits(unguided), both[:3], atol=1e-5, rtol=1e-4)
    assert (plain - both[:3]).abs().max() > 1e-4 if frame_embedding else torch.equal(plain, both[:3])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draw_samples_the_tempered_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0, 0.5] * 2)  # 12 ids: blocks of 3
    rows = 40_000
    uniform = torch.rand(rows, generator=torch.Generator().manual_seed(0))
    sampled, confidence = _draw(logits.repeat(rows, 1), temperature, uniform)
    expected = torch.softmax(logits / temperature, -1)
    freq = torch.bincount(sampled, minlength=logits.numel()).float() / rows
    assert (freq - expected).abs().max() < 0.01, (freq, expected)
    torch.testing.assert_close(confidence, torch.log_softmax(logits, -1)[sampled])
    greedy, best = _draw(logits.repeat(2, 1), 0.0, None)
    assert greedy.tolist() == [0, 0]
    torch.testing.assert_close(best, torch.log_softmax(logits, -1)[[0, 0]])


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


@pytest.mark.parametrize("order", ["confidence", "halton"])
@pytest.mark.parametrize("guidance, share", [(0.0, 0.99), (3.0, 0.98)])
def test_bf16_sampling_draws_the_fp32_tokens(trained_generator, order, guidance, share):
    # at the recipes' guidance (0) >= 99% of tokens agree; strong guidance amplifies bf16's rounding
    # (measured 0.990-1.0 over seeds and thread counts at g=3), so it gets a looser bound
    model, batch = trained_generator
    prime = batch["tokens"][:, 0]
    fp32 = sample(model, batch["ecg"], steps=6, guidance=guidance, seed=2, order=order, prime_tokens=prime)
    bf16 = sample(model, batch["ecg"], steps=6, guidance=guidance, seed=2, order=order, prime_tokens=prime,
                  precision="bf16")
    assert (bf16 == fp32).float().mean() >= share
    assert torch.equal(bf16[:, 0], prime)


def _neighbour_pairs(positions: list[int], grid: tuple[int, int, int]) -> int:
    """Pairs of grid neighbours (frame, row or column apart by one) among flat positions."""
    t, h, w = grid
    chosen = set(positions)
    pairs = 0
    for p in positions:
        f, r, c = p // (h * w), p % (h * w) // w, p % w
        pairs += (f + 1 < t and p + h * w in chosen) + (r + 1 < h and p + w in chosen) + (c + 1 < w and p + 1 in chosen)
    return pairs


def test_halton_order_spreads_each_step_over_the_grid():
    grid = (3, 4, 4)
    order = halton_order(grid).tolist()
    assert sorted(order) == list(range(48))
    # the first quarter (one step's worth) has few neighbouring pairs: fewer than random picks
    rng = torch.Generator().manual_seed(0)
    random = sum(_neighbour_pairs(torch.randperm(48, generator=rng)[:12].tolist(), grid) for _ in range(50)) / 50
    assert _neighbour_pairs(order[:12], grid) < 0.6 * random


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_halton_order(trained_generator, guidance, monkeypatch):
    model, batch = trained_generator
    prime = batch["tokens"][:, 0]
    if guidance == 0:
        # greedy decoding in Halton order recovers the sequences the model was fit to
        out = sample(model, batch["ecg"], steps=4, guidance=guidance, temperature=0.0, order="halton")
        assert (out == batch["tokens"]).float().mean() > 0.9
    # the fast path (only the step's positions projected) draws the plain path's tokens
    fast = sample(model, batch["ecg"], steps=5, guidance=guidance, seed=3, order="halton", prime_tokens=prime)
    plain = sample(model, batch["ecg"], steps=5, guidance=guidance, seed=3, order="halton", prime_tokens=prime,
                   cached=False)
    assert torch.equal(fast, plain) and torch.equal(fast[:, 0], prime)
    # each step projects only the positions it decodes: the unknown 32 positions in all, once each
    rows, linear = [], torch.nn.functional.linear

    def counting_linear(x, weight, bias=None):
        if weight is model.to_logits.weight:
            rows.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    sample(model, batch["ecg"], steps=5, guidance=guidance, order="halton", prime_tokens=prime)
    assert sum(rows) == 4 * 32 and len(rows) == 5


def test_compiled_sampling_draws_the_same_tokens(trained_generator):
    model, batch = trained_generator
    # the eager backend traces with TorchDynamo (the plumbing) without inductor's code generation
    plain = sample(model, batch["ecg"][:2], steps=3, guidance=2.0, seed=4)
    compiled = sample(model, batch["ecg"][:2], steps=3, guidance=2.0, seed=4,
                      compile_mode="reduce-overhead", compile_backend="eager")
    assert torch.equal(compiled, plain)


def test_bad_sampling_options(trained_generator):
    model, batch = trained_generator
    with pytest.raises(ValueError, match="decoding order"):
        sample(model, batch["ecg"], order="random")
    with pytest.raises(ValueError, match="precision"):
        sample(model, batch["ecg"], precision="fp8")


@pytest.mark.parametrize("frame_embedding", [True, False])
def test_negative_ecg_branch_gives_the_models_logits_for_that_ecg(frame_embedding):
    torch.manual_seed(0)
    model = MaskGIT(GeneratorConfig(ecg_frame_embedding=frame_embedding)).eval()
    ecg, negative = torch.randn(3, 12, 300), torch.randn(3, 12, 300)
    ids = torch.randint(0, model.cfg.vocab_size + 1, (3, model.seq_len))
    with torch.no_grad():
        neg = (model.encode_ecg(negative), model.encode_ecg_frames(negative))
        cache = model.sampling_cache(model.encode_ecg(ecg), guided=True, frames=model.encode_ecg_frames(ecg),
                                     negative=neg)
        hidden = model.sampling_hidden(ids, cache)  # (6, n, d)
        own = model.logits(ids, model.encode_ecg(ecg), frames=model.encode_ecg_frames(ecg))
        other = model.logits(ids, neg[0], frames=neg[1])
    torch.testing.assert_close(model.to_logits(hidden[:3]), own, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.to_logits(hidden[3:]), other, atol=1e-5, rtol=1e-4)


def test_negative_ecg_guidance_fast_and_plain_paths_agree(trained_generator):
    model, batch = trained_generator
    negative = torch.roll(batch["ecg"], 40, dims=-1)
    kwargs = {"steps": 6, "guidance": 3.0, "seed": 2, "negative_ecg": negative}
    fast = sample(model, batch["ecg"], **kwargs)
    assert torch.equal(fast, sample(model, batch["ecg"], cached=False, **kwargs))
    # it is a different guidance from the null condition's, and ignored without guidance
    assert not torch.equal(fast, sample(model, batch["ecg"], steps=6, guidance=3.0, seed=2))
    assert torch.equal(sample(model, batch["ecg"], steps=6, guidance=0.0, seed=2, negative_ecg=negative),
                       sample(model, batch["ecg"], steps=6, guidance=0.0, seed=2))
    with pytest.raises(ValueError, match="negative_ecg"):
        sample(model, batch["ecg"], steps=2, guidance=1.0, negative_ecg=negative[:, :, :10])


def test_shifted_ecg_moves_each_beat_by_half_its_interval():
    import numpy as np

    from echopulse.config import ECG_LEADS
    from echopulse.synth.ecg_sim import simulate_ecg
    from echopulse.transforms.ecg import detect_r_peaks, prepare_ecg, shifted_ecg

    rows = []
    for bpm in (60, 120):
        sim = simulate_ecg(6.0, bpm, fs=500, seed=1)
        rows.append(prepare_ecg(sim.signal, 500, list(ECG_LEADS)).ecg[:, :1000])
    batch = np.stack(rows)
    for given in (None, np.array([60.0, 120.0])):
        out = shifted_ecg(batch, given)
        for row, moved, bpm in zip(batch, out, (60, 120)):
            before, after = detect_r_peaks(row, 250), detect_r_peaks(moved, 250)
            half = 0.5 * 250 * 60 / bpm
            inner = after[(after > 30) & (after < 970)]  # away from the roll's seam
            # every moved beat sits about half an interval from the nearest original beat
            gaps = np.abs(inner[:, None] - before[None, :]).min(axis=1)
            assert np.all(np.abs(gaps - half) <= 0.1 * half), (bpm, gaps, half)  # the simulation has HRV


def test_guidance_schedules_weight_each_step():
    assert guidance_weights(2.0, 4, "constant") == [2.0] * 4
    assert guidance_weights(2.0, 4, "falling") == [2.0, 1.5, 1.0, 0.5]
    assert guidance_weights(3.0, 4, "rising") == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("cached", [True, False])
def test_guidance_schedule_reaches_every_step(trained_generator, cached):
    model, batch = trained_generator
    kwargs = {"steps": 6, "guidance": 3.0, "seed": 1, "cached": cached}
    constant = sample(model, batch["ecg"], **kwargs)
    falling = sample(model, batch["ecg"], guidance_schedule="falling", **kwargs)
    assert not torch.equal(falling, constant)
    # fast and plain paths agree under a schedule too
    assert torch.equal(falling, sample(model, batch["ecg"], guidance_schedule="falling",
                                       **{**kwargs, "cached": not cached}))
    # one rising step has weight 0: the plain conditional model's tokens
    assert torch.equal(sample(model, batch["ecg"], guidance_schedule="rising", **{**kwargs, "steps": 1}),
                       sample(model, batch["ecg"], **{**kwargs, "steps": 1, "guidance": 0.0}))
    with pytest.raises(ValueError, match="guidance schedule"):
        sample(model, batch["ecg"], guidance_schedule="cosine")


@pytest.mark.parametrize("order", ["confidence", "halton"])
def test_a_rows_tokens_do_not_depend_on_its_batch(trained_generator, order):
    """Each row draws from its own seed: the same ECG and seed give the same tokens alone, first or
    second in a batch, beside any other ECG; another seed gives other tokens."""
    model, batch = trained_generator
    ecg = batch["ecg"][:3]
    kw = {"steps": 4, "temperature": 1.0, "order": order}
    alone = sample(model, ecg[1:2], seed=9, **kw)
    second = sample(model, ecg[[0, 1]], seed=[5, 9], **kw)
    first = sample(model, ecg[[1, 2]], seed=[9, 3], **kw)
    torch.testing.assert_close(second[1:], alone, rtol=0, atol=0)
    torch.testing.assert_close(first[:1], alone, rtol=0, atol=0)
    assert not torch.equal(sample(model, ecg[1:2], seed=10, **kw), alone)
    with pytest.raises(ValueError, match="seeds for a batch"):
        sample(model, ecg, seed=[1, 2], **kw)
