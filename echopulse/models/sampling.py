"""MaskGIT iterative parallel decoding with classifier-free guidance and first-frame priming.

Start with every unknown position masked. At each of ``steps`` steps: one batched forward gives
the ECG-conditioned and the null-conditioned logits; guide them; sample a token at every masked
position; keep the most confident new tokens and re-mask the rest so that ``schedule(progress)``
of the unknown positions stay masked. Decoded and primed tokens are never changed again.

Guidance convention: ``guided = cond + guidance * (cond - uncond)``, so ``guidance = 0`` is the plain
conditional model (and skips the null branch). In the ``uncond + s * (cond - uncond)`` convention this
is ``s = 1 + guidance``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange

from echopulse.models.schedules import get_schedule

if TYPE_CHECKING:
    from echopulse.models.generator import MaskGIT


def _gumbel(shape: tuple[int, ...], rng: torch.Generator, device: torch.device) -> torch.Tensor:
    # noise comes from a CPU generator so a seed gives the same draws on every device
    u = torch.rand(shape, generator=rng).clamp_(1e-20, 1.0 - 1e-7)
    return (-torch.log(-torch.log(u))).to(device)


def _prime_prefix(prime_tokens: torch.Tensor, grid: tuple[int, int, int], batch: int) -> torch.Tensor:
    """Known leading token frames as ``(b, k * h' * w')`` ids."""
    t, h, w = grid
    p = prime_tokens
    if p.ndim == 3 and tuple(p.shape[1:]) == (h, w):
        p = rearrange(p, "b h w -> b (h w)")  # one token frame (the first frame)
    elif p.ndim == 4 and tuple(p.shape[2:]) == (h, w) and 1 <= p.shape[1] <= t:
        p = rearrange(p, "b k h w -> b (k h w)")  # leading token frames (chaining windows)
    elif p.ndim == 2 and p.shape[1] % (h * w) == 0 and 1 <= p.shape[1] // (h * w) <= t:
        pass
    else:
        raise ValueError(
            f"prime_tokens must be (b, {h}, {w}), (b, k, {h}, {w}) or (b, k * {h * w}) with 1 <= k <= {t}, "
            f"got {tuple(prime_tokens.shape)}"
        )
    if p.shape[0] == 1 and batch > 1:
        p = p.expand(batch, -1)
    if p.shape[0] != batch:
        raise ValueError(f"prime_tokens batch {p.shape[0]} does not match ECG batch {batch}")
    return p.long()


@torch.no_grad()
def sample(
    model: "MaskGIT",
    ecg: torch.Tensor,
    steps: int = 8,
    guidance: float = 2.0,
    temperature: float = 1.0,
    schedule: str = "cosine",
    seed: int = 0,
    prime_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate token ids for each ECG.

    Args:
        model: a :class:`~echopulse.models.generator.MaskGIT` (unwrapped).
        ecg: ``(b, 12, L)`` standardized ECG.
        steps: decoding steps (>= 1).
        guidance: classifier-free guidance weight; ``guided = cond + guidance * (cond - uncond)``.
        temperature: sampling temperature at the first step, annealed linearly towards 0; it also
            scales the Gumbel noise added to the confidences (annealed the same way). 0 is greedy.
        schedule: masking schedule name (see :mod:`echopulse.models.schedules`).
        seed: seeds a private ``torch.Generator``: the same seed gives the same tokens.
        prime_tokens: known leading token frames, ``(b, h', w')`` (the first frame's tokens),
            ``(b, k, h', w')`` or ``(b, k * h' * w')``; batch 1 broadcasts. Returned unchanged.

    Returns:
        ``(b, t', h', w')`` long ids in ``[0, vocab_size)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    schedule_fn = get_schedule(schedule)
    grid = tuple(model.cfg.token_grid)
    n, mask_id = model.seq_len, model.mask_id
    device = next(model.parameters()).device
    ecg = ecg.to(device)
    b = ecg.shape[0]
    rng = torch.Generator().manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        ids = torch.full((b, n), mask_id, dtype=torch.long, device=device)  # (b, n)
        num_known = 0
        if prime_tokens is not None:
            prime = _prime_prefix(prime_tokens, grid, b).to(device)  # (b, k)
            if int(prime.min()) < 0 or int(prime.max()) >= model.cfg.vocab_size:
                raise ValueError(f"prime_tokens must lie in [0, {model.cfg.vocab_size})")
            num_known = prime.shape[1]
            ids[:, :num_known] = prime
        num_unknown = n - num_known

        context = model.encode_ecg(ecg)  # (b, m, d): once, outside the loop
        guided = guidance != 0
        if guided:
            # rows [0, b) see the ECG, rows [b, 2b) the null condition: one forward for both
            context = torch.cat([context, model.null_context(b, context.shape[1]).to(context.dtype)])

        for step in range(steps):
            if num_unknown == 0:
                break
            progress = (step + 1) / steps
            is_masked = ids == mask_id  # (b, n)
            if guided:
                cond, uncond = model.logits(torch.cat([ids, ids]), context).float().chunk(2)
                logits = cond + guidance * (cond - uncond)  # (b, n, vocab)
            else:
                logits = model.logits(ids, context).float()
            log_probs = F.log_softmax(logits, dim=-1)

            sample_temperature = temperature * (1 - step / steps)
            if sample_temperature > 0:  # Gumbel-max: a draw from softmax(logits / T)
                sampled = (log_probs / sample_temperature + _gumbel(log_probs.shape, rng, device)).argmax(-1)
            else:
                sampled = log_probs.argmax(-1)  # (b, n)

            confidence = log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)  # log p(sampled)
            noise_scale = temperature * (1 - progress)
            if noise_scale > 0:
                confidence = confidence + noise_scale * _gumbel(confidence.shape, rng, device)
            confidence = confidence.masked_fill(~is_masked, math.inf)  # decoded tokens stay
            ids = torch.where(is_masked, sampled, ids)

            # how many unknown positions stay masked; decode at least one new token per step
            num_remask = int(math.floor(float(schedule_fn(progress)) * num_unknown))
            num_remask = min(num_remask, int(is_masked.sum(-1).min()) - 1)
            if num_remask > 0:
                ranks = confidence.argsort(dim=-1).argsort(dim=-1)  # (b, n), 0 = least confident
                ids = ids.masked_fill(ranks < num_remask, mask_id)
    finally:
        model.train(was_training)
    return rearrange(ids, "b (t h w) -> b t h w", t=grid[0], h=grid[1], w=grid[2])
