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
    context, frames = model.encode_ecg(batch["ecg"]), model.encode_ecg_frames(batch["ecg"])
    with torch.no_grad():
        cond = model.logits(tokens_in, context, torch.ones(4, dtype=torch.bool), frames=frames)
        uncond = model.logits(tokens_in, context, torch.zeros(4, dtype=torch.bool), frames=frames)
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


@pytest.fixture(scope="module")
def view_ef_generator():
    """A tiny MaskGIT with view and EF conditioning, overfit to 4 sequences that share one ECG and
    differ only in (view, EF): only those inputs can tell them apart. ~3 s on 2 CPU cores."""
    torch.manual_seed(0)
    cfg = GeneratorConfig(num_views=2, ef_conditioning=True, cond_dropout=0.15)
    model = MaskGIT(cfg)
    rng = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (4, *cfg.token_grid), generator=rng)
    ecg = torch.randn(1, cfg.ecg.leads, cfg.ecg.samples, generator=rng).expand(4, -1, -1)
    view = torch.tensor([0, 0, 1, 1])
    ef = torch.tensor([0.35, 0.65, 0.35, 0.65])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(200):
        loss, _ = model(tokens, ecg, view=view, ef=ef)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), {"tokens": tokens, "ecg": ecg, "view": view, "ef": ef}


def test_view_and_ef_steer_the_generator(view_ef_generator):
    model, b = view_ef_generator
    rng = torch.Generator().manual_seed(0)
    right = model.masked_eval(b["tokens"], b["ecg"], mask_ratio=1.0, generator=rng, view=b["view"], ef=b["ef"])
    assert right["acc"] > 0.9, right
    # EF swapped within each view: predictions follow the EF input
    swapped_ef = model.masked_eval(b["tokens"], b["ecg"], mask_ratio=1.0, generator=rng, view=b["view"],
                                   ef=b["ef"][[1, 0, 3, 2]])
    assert swapped_ef["acc"] < 0.5, swapped_ef
    swapped_view = model.masked_eval(b["tokens"], b["ecg"], mask_ratio=1.0, generator=rng,
                                     view=1 - b["view"], ef=b["ef"])
    assert swapped_view["acc"] < 0.5, swapped_view

    masked = torch.full((4, model.seq_len), model.mask_id)
    context = model.encode_ecg(b["ecg"])
    with torch.no_grad():
        low = model.logits(masked, context, view=b["view"], ef=torch.full((4,), 0.35))
        high = model.logits(masked, context, view=b["view"], ef=torch.full((4,), 0.65))
        # condition dropout drops view and EF with the ECG: the null branch ignores them
        null_low = model.logits(masked, context, torch.zeros(4, dtype=torch.bool), view=b["view"],
                                ef=torch.full((4,), 0.35))
        null_high = model.logits(masked, context, torch.zeros(4, dtype=torch.bool), view=1 - b["view"],
                                 ef=torch.full((4,), 0.65))
    assert (low - high).abs().mean() > 0.5
    torch.testing.assert_close(null_low, null_high)


def test_sampler_threads_view_and_ef(view_ef_generator):
    model, b = view_ef_generator
    out = model.generate(b["ecg"], steps=6, guidance=0.0, temperature=0.0, view=b["view"], ef=b["ef"])
    assert (out == b["tokens"]).float().mean() > 0.9
    swap = [1, 0, 3, 2]  # the other EF, same view
    for guidance in (0.0, 1.0):  # the plain and the guided path both see the EF
        swapped = model.generate(b["ecg"], steps=6, guidance=guidance, temperature=0.0, view=b["view"],
                                 ef=b["ef"][swap])
        assert (swapped == b["tokens"][swap]).float().mean() > 0.7, guidance
        assert (swapped == b["tokens"]).float().mean() < 0.3, guidance


def test_view_and_ef_inputs_are_checked():
    ecg = torch.randn(2, 12, 300)
    tokens = torch.zeros(2, 48, dtype=torch.long)
    plain = MaskGIT(GeneratorConfig())
    with pytest.raises(ValueError, match="no view conditioning"):
        plain(tokens, ecg, view=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no EF conditioning"):
        plain(tokens, ecg, ef=torch.tensor([0.5, 0.5]))
    model = MaskGIT(GeneratorConfig(num_views=3, ef_conditioning=True))
    with pytest.raises(ValueError, match="pass view="):
        model(tokens, ecg, ef=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="pass ef="):
        model(tokens, ecg, view=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model(tokens, ecg, view=torch.tensor([0, 3]), ef=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"\(b,\) = \(2,\)"):
        model(tokens, ecg, view=torch.tensor([0]), ef=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(tokens, ecg, view=torch.tensor([0, 1]), ef=torch.tensor([55.0, 60.0]))  # percent, not fraction
    with pytest.raises(ValueError, match="num_views"):
        MaskGIT(GeneratorConfig(num_views=-1))
    loss, _ = model(tokens, ecg, view=torch.tensor([0, 2]), ef=torch.tensor([0.3, 0.6]))
    loss.backward()  # every conditioning parameter gets a gradient (no unused parameters for DDP)
    assert all(p.grad is not None for p in [*model.view_embed.parameters(), *model.ef_mlp.parameters()])


def test_ecg_frame_embedding_sees_each_token_frames_own_time():
    """A change to the ECG at one instant moves only the embeddings of token frames whose
    window covers it: frame 0 at t = 0, token frame j at video frames 2j - 1 and 2j."""
    torch.manual_seed(0)
    cfg = GeneratorConfig(token_grid=(3, 4, 4), fps=5.0)  # 50 ECG samples per video frame
    model = MaskGIT(cfg).eval()
    ecg = torch.randn(1, cfg.ecg.leads, cfg.ecg.samples)
    base = model.encode_ecg_frames(ecg)
    assert base.shape == (1, 3, cfg.dim)
    spf = cfg.ecg_samples_per_frame
    for sample, moved in ((10, {0}), (4 * spf, {2}), (int(1.25 * spf), {1}), (cfg.ecg.samples - 1, set())):
        bumped = ecg.clone()
        bumped[:, :, sample] += 5.0
        changed = (model.encode_ecg_frames(bumped) - base).abs().amax(-1)[0] > 1e-6
        assert {j for j in range(3) if changed[j]} == moved, (sample, changed)
    assert MaskGIT(GeneratorConfig(ecg_frame_embedding=False)).encode_ecg_frames(ecg) is None
    with pytest.raises(ValueError, match=r"\(b, 12, 300\)"):
        model.encode_ecg_frames(torch.randn(1, 12, 250))


def test_ecg_frame_embedding_follows_a_temporal_patch_of_one():
    """With one frame per token frame (``temporal_patch=1``), token frame j is video frame j and
    its window is the ECG from frame j - 1 to frame j + 1."""
    torch.manual_seed(0)
    cfg = GeneratorConfig(token_grid=(5, 4, 4), fps=5.0, temporal_patch=1)  # 50 samples per frame
    model = MaskGIT(cfg).eval()
    ecg = torch.randn(1, cfg.ecg.leads, cfg.ecg.samples)
    base = model.encode_ecg_frames(ecg)
    spf = cfg.ecg_samples_per_frame
    for sample, moved in ((10, {0, 1}), (int(2.5 * spf), {2, 3}), (4 * spf, {4})):
        bumped = ecg.clone()
        bumped[:, :, sample] += 5.0
        changed = (model.encode_ecg_frames(bumped) - base).abs().amax(-1)[0] > 1e-6
        assert {j for j in range(5) if changed[j]} == moved, (sample, changed)


def test_primed_training_rows_never_mask_the_first_frame():
    torch.manual_seed(0)
    # every position drawn for masking: only priming can leave the first token frame visible
    cfg = GeneratorConfig(prime_prob=1.0, mask_ratio_min=0.999)
    model = MaskGIT(cfg).train()
    batch = paired_set(n=8, cfg=cfg)
    hw = cfg.token_grid[1] * cfg.token_grid[2]
    for _ in range(5):
        _, metrics = model(batch["tokens"], batch["ecg"])
        assert metrics["mask_ratio"] <= (cfg.seq_len - hw) / cfg.seq_len + 1e-6
        # floor(ratio * n) may leave one more position visible, never more
        assert metrics["mask_ratio"] >= (cfg.seq_len - hw - 1) / cfg.seq_len - 1e-6
    unprimed = MaskGIT(GeneratorConfig(prime_prob=0.0, mask_ratio_min=0.999)).train()
    assert unprimed(batch["tokens"], batch["ecg"])[1]["mask_ratio"] > (cfg.seq_len - hw) / cfg.seq_len + 0.1
    with pytest.raises(ValueError, match="prime_prob"):
        MaskGIT(GeneratorConfig(prime_prob=1.5))


def test_training_primes_with_first_frame_or_a_chained_windows_prefix():
    torch.manual_seed(0)
    cfg = GeneratorConfig(token_grid=(6, 4, 4), prime_prob=1.0)
    assert cfg.chain_prime_token_frames == 2  # what generate.py primes each chained window with
    model = MaskGIT(cfg).train()
    hw = 16
    mask = model._prime_rows(torch.ones(400, cfg.seq_len, dtype=torch.bool))
    visible = (~mask).sum(-1)
    # every row is primed with 1 token frame (a first frame) or 2 (a chained window), both often
    assert set(visible.tolist()) == {hw, 2 * hw}
    assert 0.35 < (visible == 2 * hw).float().mean() < 0.65
    assert not (~mask[:, hw * 2:]).any()  # only leading frames are given


def test_lead_mask_is_a_model_input():
    torch.manual_seed(0)
    model = MaskGIT(GeneratorConfig()).eval()
    ecg = torch.zeros(2, 12, 300)
    ecg[:, 0] = torch.randn(2, 300)  # lead I only, like a watch
    one = torch.zeros(2, 12, dtype=torch.bool)
    one[:, 0] = True
    tokens_in = torch.full((2, model.seq_len), model.mask_id)
    with torch.no_grad():
        derived = model.logits(tokens_in, model.encode_ecg(ecg), frames=model.encode_ecg_frames(ecg))
        given = model.logits(tokens_in, model.encode_ecg(ecg, one), frames=model.encode_ecg_frames(ecg, one))
        claimed = model.logits(tokens_in, model.encode_ecg(ecg, torch.ones_like(one)),
                               frames=model.encode_ecg_frames(ecg, torch.ones_like(one)))
    assert torch.allclose(derived, given)  # the default mask is read off the all-zero leads
    assert (derived - claimed).abs().max() > 1e-3  # the same signal with another mask is another input


def test_lead_dropout_keeps_single_leads_and_subsets():
    torch.manual_seed(0)
    model = MaskGIT(GeneratorConfig(lead_dropout=1.0)).train()
    ecg = torch.randn(400, 12, 300)
    dropped, keep = model.drop_leads(ecg)
    assert keep.any(-1).all()  # never no lead at all
    assert torch.equal(dropped.abs().amax(-1) > 0, keep)  # dropped leads are zero, kept ones untouched
    assert torch.equal(dropped[keep], ecg[keep])
    single = keep.sum(-1) == 1
    lead_i_or_ii = single & (keep[:, 0] | keep[:, 1])
    assert 0.4 < lead_i_or_ii.float().mean() < 0.7  # half the rows: lead I or II alone, like a watch
    assert (keep.sum(-1) > 1).float().mean() > 0.3  # the others: random subsets


def test_lead_dropout_teaches_the_generator_single_lead_ecgs(trained_generator, lead_dropout_generator):
    # lead II alone: the model trained with lead dropout still tells the 4 sequences apart; the
    # same model trained on full 12-lead ECGs only does much worse
    def gap(model, batch):
        only_ii = torch.zeros_like(batch["ecg"])
        only_ii[:, 1] = batch["ecg"][:, 1]
        rng = torch.Generator().manual_seed(0)
        matched = model.masked_eval(batch["tokens"], only_ii, mask_ratio=1.0, generator=rng)["acc"]
        swapped = model.masked_eval(batch["tokens"], only_ii.roll(1, dims=0), mask_ratio=1.0, generator=rng)["acc"]
        return matched, swapped

    matched, swapped = gap(*lead_dropout_generator)
    assert matched > 0.9 and swapped < 0.2, (matched, swapped)
    plain_matched, plain_swapped = gap(*trained_generator)
    assert plain_matched - plain_swapped < matched - swapped - 0.2, (plain_matched, plain_swapped)
