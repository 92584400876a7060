"""MaskGIT iterative parallel decoding with classifier-free guidance and first-frame priming.

Start with every unknown position masked. At each of ``steps`` steps: one batched forward gives
the ECG-conditioned and the null-conditioned logits; guide them; sample a token at every masked
position; keep the most confident new tokens and re-mask the rest so that ``schedule(progress)``
of the unknown positions stay masked. Decoded and primed tokens are never changed again.

Guidance convention: ``guided = cond + guidance * (cond - uncond)``, so ``guidance = 0`` is the plain
conditional model (and skips the null branch). In the ``uncond + s * (cond - uncond)`` convention this
is ``s = 1 + guidance``.

Speed (the default ``cached=True`` path; ``cached=False`` recomputes everything through
``MaskGIT.logits`` and draws the same tokens): the ECG context's cross-attention keys/values are
computed once per sample, the null branch's cross-attention is a constant, the first
self-attention is shared by both branches (when the model has no ECG frame embedding), and the
vocabulary projection -- as costly as the whole transformer at the paper size -- runs once, on the
guided hidden state (the projection is linear, so guiding before it is exact), at still-masked
positions only. Tokens are drawn by inverse CDF
(one uniform per position) rather than Gumbel-max over the vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

from echopulse.models.schedules import check_order, get_schedule, halton_order


class Decodable(Protocol):
    """What decoding needs from a masked-token model (:class:`~echopulse.models.generator.MaskGIT`
    is one); sampling depends on this, not on the model class, so the two modules stay one-way."""

    cfg: Any  # token_grid, vocab_size
    seq_len: int
    mask_id: int
    training: bool
    to_logits: torch.nn.Linear

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def eval(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def encode_ecg(self, ecg: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor: ...
    def encode_ecg_frames(self, ecg: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor | None: ...
    def with_extra_conditions(self, context: torch.Tensor, view: torch.Tensor | None,
                              ef: torch.Tensor | None) -> torch.Tensor: ...
    def null_context(self, batch: int, num_tokens: int) -> torch.Tensor: ...
    def sampling_cache(self, context: torch.Tensor, guided: bool, frames: torch.Tensor | None = None,
                       negative: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Any: ...
    def sampling_hidden(self, tokens_in: torch.Tensor, cache: Any) -> torch.Tensor: ...
    def logits(self, tokens_in: torch.Tensor, context: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...


PRECISIONS = ("fp32", "bf16")
GUIDANCE_SCHEDULES = ("constant", "falling", "rising")

# logits rows materialised at once (1 GiB in fp32): bounds memory at large batch x vocabulary
_MAX_LOGIT_ELEMENTS = 1 << 28


class RowNoise:
    """The sampler's random draws, row by row: batch row ``i`` draws only from its own CPU generator,
    seeded with its own seed, so a row's tokens depend on its inputs and seed and not on which
    other rows share its batch (or where it sits). CPU generators: a seed gives the same draws on
    every device."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def uniform(self, counts: Sequence[int]) -> torch.Tensor:
        """``sum(counts)`` uniforms in [0, 1), batch-major: ``counts[i]`` from row ``i``."""
        return torch.cat([torch.rand(int(c), generator=g) for g, c in zip(self.generators, counts)])

    def gumbel(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Standard Gumbel noise ``(b, ...)``, row ``i`` from generator ``i``."""
        u = torch.stack([torch.rand(shape[1:], generator=g) for g in self.generators]).clamp_(1e-20, 1.0 - 1e-7)
        return (-torch.log(-torch.log(u))).to(device)


def _row_seeds(seed: int | Sequence[int], b: int) -> list[int]:
    try:
        seeds = [int(seed)] * b
    except TypeError:  # one seed per row
        seeds = [int(s) for s in seed]
    if len(seeds) == 1:
        seeds = seeds * b
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for a batch of {b} ECGs")
    return seeds


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


def sample(
    model: Decodable,
    ecg: torch.Tensor,
    steps: int = 8,
    guidance: float = 2.0,
    temperature: float = 1.0,
    schedule: str = "cosine",
    seed: int | Sequence[int] = 0,
    prime_tokens: torch.Tensor | None = None,
    view: torch.Tensor | None = None,
    ef: torch.Tensor | None = None,
    cached: bool = True,
    lead_mask: torch.Tensor | None = None,
    order: str = "confidence",
    precision: str = "fp32",
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    negative_ecg: torch.Tensor | None = None,
    guidance_schedule: str = "constant",
) -> torch.Tensor:
    """Generate token ids for each ECG.

    Args:
        model: a :class:`Decodable`, e.g. an (unwrapped) :class:`~echopulse.models.generator.MaskGIT`.
        ecg: ``(b, 12, L)`` standardized ECG.
        steps: decoding steps (>= 1).
        guidance: classifier-free guidance weight; ``guided = cond + guidance * (cond - uncond)``.
        temperature: sampling temperature at the first step, annealed linearly towards 0; it also
            scales the Gumbel noise added to the confidences (annealed the same way). 0 is greedy.
        schedule: masking schedule name (see :mod:`echopulse.models.schedules`).
        seed: one seed for every row, or one per row: each row draws from its own private
            ``torch.Generator`` seeded with its seed, so the same ECG and seed give the same tokens
            whatever else is in the batch.
        prime_tokens: known leading token frames, ``(b, h', w')`` (the first frame's tokens),
            ``(b, k, h', w')`` or ``(b, k * h' * w')``; batch 1 broadcasts. Returned unchanged.
        view, ef: ``(b,)`` echo view ids / ejection fractions, when the model conditions on them.
        lead_mask: ``(b, 12)`` bool, the recorded leads (default: the ECG's non-zero leads).
        cached: the fast path (module docstring); ``False`` is the straightforward one, for tests.
        order: which masked positions a step decodes. ``"confidence"`` (MaskGIT): sample every
            masked position, keep the most confident (with annealed Gumbel noise), re-mask the
            rest. ``"halton"``: decode the next positions of a fixed Halton order over the token
            grid (:func:`~echopulse.models.schedules.halton_order`); only those positions are
            projected to the vocabulary, so a step's projection covers just the tokens it decodes.
        precision: ``"fp32"``, or ``"bf16"`` to run the transformer and the vocabulary projection
            under ``torch.autocast(dtype=bfloat16)`` (sampling itself stays fp32).
        compile_mode: when set, the per-step network (``model.sampling_hidden``; fixed shapes for
            a given batch) runs through ``torch.compile(mode=compile_mode, dynamic=False)``, e.g.
            ``"reduce-overhead"`` (CUDA graphs on a GPU). Compiled once per model and setting.
        compile_backend: the ``torch.compile`` backend (``"eager"``/``"aot_eager"`` trace only:
            for tests).
        negative_ecg: ``(b, 12, L)``: with guidance, the guided-against branch sees this ECG
            instead of the null condition (``guided = cond(ecg) + g * (cond(ecg) -
            cond(negative_ecg))``), e.g. :func:`~echopulse.transforms.ecg.shifted_ecg` (the same
            ECG half a beat later): what is amplified is then what depends on the beat's timing.
        guidance_schedule: how the weight changes over the steps (:data:`GUIDANCE_SCHEDULES`):
            ``"constant"`` (``guidance`` at every step), ``"falling"`` (``guidance`` at the first
            step, linearly down to ``guidance / steps`` at the last: guide the early steps, which
            lay out the video's motion) or ``"rising"`` (from 0 at the first step up to
            ``guidance`` at the last).

    Returns:
        ``(b, t', h', w')`` long ids in ``[0, vocab_size)``.
    """
    _check_options(steps, temperature, order, guidance_schedule, precision)
    schedule_fn = get_schedule(schedule)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    hidden_fn = _compiled_hidden(model, compile_mode, compile_backend) if compile_mode else None
    try:
        with torch.inference_mode(), autocast:
            ids = _decode(model, ecg, steps, guidance, temperature, schedule_fn, seed, prime_tokens,
                          view, ef, cached, lead_mask, order, hidden_fn, negative_ecg, guidance_schedule)
    finally:
        model.train(was_training)
    return ids.clone()  # an ordinary tensor: inference tensors cannot enter autograd later


def _check_options(steps: int, temperature: float, order: str, guidance_schedule: str, precision: str) -> None:
    """Raise ``ValueError`` for a sampling option out of range."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    check_order(order)
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"unknown guidance schedule {guidance_schedule!r}; known: {', '.join(GUIDANCE_SCHEDULES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown sampling precision {precision!r}; known: {', '.join(PRECISIONS)}")


def _decode(model, ecg, steps, guidance, temperature, schedule_fn, seed, prime_tokens, view, ef, cached,
            lead_mask=None, order="confidence", hidden_fn=None, negative_ecg=None,
            guidance_schedule="constant"):
    grid = tuple(model.cfg.token_grid)
    device = next(model.parameters()).device
    ecg = ecg.to(device)
    b = ecg.shape[0]
    rng = RowNoise(_row_seeds(seed, b))
    ids, num_known = _initial_ids(model, prime_tokens, grid, b, device)  # (b, n)
    if negative_ecg is not None and tuple(negative_ecg.shape) != tuple(ecg.shape):
        raise ValueError(f"negative_ecg must be shaped like the ECG {tuple(ecg.shape)}, got {tuple(negative_ecg.shape)}")
    negative = negative_ecg.to(device) if negative_ecg is not None else None
    step_logits = _guided_logits_fn(model, ecg, guidance, view, ef, cached, lead_mask, hidden_fn, negative)
    weights = guidance_weights(guidance, steps, guidance_schedule)
    if order == "halton":
        _decode_halton(ids, step_logits, grid, num_known, weights, temperature, schedule_fn, rng)
    else:
        _decode_confidence(ids, step_logits, model.mask_id, num_known, weights, temperature, schedule_fn, rng)
    return rearrange(ids, "b (t h w) -> b t h w", t=grid[0], h=grid[1], w=grid[2])


def guidance_weights(guidance: float, steps: int, schedule: str = "constant") -> list[float]:
    """The guidance weight at each of ``steps`` decoding steps under ``schedule``
    (see :func:`sample`)."""
    if schedule == "falling":
        return [guidance * (steps - step) / steps for step in range(steps)]
    if schedule == "rising":
        return [guidance * step / max(1, steps - 1) for step in range(steps)]
    return [guidance] * steps


def _initial_ids(model, prime_tokens, grid: tuple[int, int, int], b: int,
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """All-masked ids with the primed token frames as a known prefix.

    Returns:
        ``(ids, num_known)``: ``(b, n)`` long ids and the length of the primed prefix.

    Raises:
        ValueError: a primed token outside the vocabulary.
    """
    ids = torch.full((b, model.seq_len), model.mask_id, dtype=torch.long, device=device)  # (b, n)
    num_known = 0
    if prime_tokens is not None:
        prime = _prime_prefix(prime_tokens, grid, b).to(device)  # (b, k)
        if int(prime.min()) < 0 or int(prime.max()) >= model.cfg.vocab_size:
            raise ValueError(f"prime_tokens must lie in [0, {model.cfg.vocab_size})")
        num_known = prime.shape[1]
        ids[:, :num_known] = prime
    return ids, num_known


def _guided_logits_fn(model, ecg, guidance, view, ef, cached, lead_mask, hidden_fn, negative_ecg=None):
    """Encode the condition once and return ``step_logits``.

    ``step_logits(ids, select, step_guidance)`` gives the logits guided with ``step_guidance`` (the step's share
    of ``guidance``; nonzero ``guidance`` decides whether the other branch is computed at all) at
    the positions ``select`` picks from a ``(b, n, ...)`` tensor, in chunks of rows: ``(r, vocab)``
    each.
    """
    b = ecg.shape[0]
    guided = guidance != 0
    # (b, m, d): once, outside the loop
    context = model.with_extra_conditions(model.encode_ecg(ecg, lead_mask), view, ef)
    frames = model.encode_ecg_frames(ecg, lead_mask)  # (b, t', d) or None
    negative = None
    if guided and negative_ecg is not None:  # the negative ECG has the same leads recorded
        negative = (model.with_extra_conditions(model.encode_ecg(negative_ecg, lead_mask), view, ef),
                    model.encode_ecg_frames(negative_ecg, lead_mask))
    if cached:
        cache = model.sampling_cache(context, guided, frames, negative)
    elif guided:
        # rows [0, b) see the condition, rows [b, 2b) the null condition (or the negative ECG):
        # one forward for both
        other = negative[0] if negative else model.null_context(b, context.shape[1]).to(context.dtype)
        context = torch.cat([context, other])
        if frames is not None:
            frames = torch.cat([frames, negative[1] if negative else torch.zeros_like(frames)])

    def step_logits(ids, select, step_guidance):
        if cached:
            if hidden_fn is not None:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are read already
            hidden = (hidden_fn or model.sampling_hidden)(ids, cache)  # (b or 2b, n, d)
            rows = select(hidden[:b]).float()  # (r, d): a copy
            if guided and step_guidance:
                rows = rows.mul_(1 + step_guidance).sub_(select(hidden[b:]).float(), alpha=step_guidance)
            weight, bias = model.to_logits.weight, model.to_logits.bias
            return (F.linear(chunk, weight, bias) for chunk in rows.split(_chunk_rows(weight.shape[0])))
        if guided:
            cond, uncond = model.logits(torch.cat([ids, ids]), context, frames=frames).float().chunk(2)
            logits = cond + step_guidance * (cond - uncond)  # (b, n, vocab)
        else:
            logits = model.logits(ids, context, frames=frames).float()
        return select(logits).split(_chunk_rows(logits.shape[-1]))

    return step_logits


def _decode_halton(ids, step_logits, grid, num_known, weights, temperature, schedule_fn, rng) -> None:
    """Fill the unknown positions of ``ids`` in place, in Halton order, a scheduled number per step."""
    b, n = ids.shape
    num_unknown = n - num_known
    # the unknown positions in Halton order (primed token frames are a prefix: left out)
    positions = halton_order(grid).to(ids.device)
    positions = positions[positions >= num_known]  # (num_unknown,)
    decoded = 0
    steps = len(weights)
    for step in range(steps):
        if decoded == num_unknown:
            break
        progress = (step + 1) / steps
        remaining = int(math.floor(float(schedule_fn(progress)) * num_unknown))
        remaining = min(remaining, num_unknown - decoded - 1)  # at least one new token per step
        now = positions[decoded:num_unknown - remaining]  # (k,): this step's positions
        chunks = step_logits(ids, lambda t: t[:, now].flatten(0, 1), weights[step])  # rows (b * k, ...), batch-major
        sample_temperature = temperature * (1 - step / steps)
        uniform = rng.uniform([now.numel()] * b) if sample_temperature > 0 else None
        sampled = torch.cat([d[0] for d in _draw_chunks(chunks, sample_temperature, uniform)])
        ids[:, now] = sampled.view(b, -1)
        decoded += now.numel()


def _decode_confidence(ids, step_logits, mask_id, num_known, weights, temperature, schedule_fn, rng) -> None:
    """Fill ``ids`` in place MaskGIT-style: sample every masked position, re-mask the least confident."""
    b, n = ids.shape
    device = ids.device
    num_unknown = n - num_known
    steps = len(weights)
    for step in range(steps):
        if num_unknown == 0:
            break
        progress = (step + 1) / steps
        is_masked = ids == mask_id  # (b, n)
        sample_temperature = temperature * (1 - step / steps)

        # guided logits at the masked positions
        chunks = step_logits(ids, lambda t: t[is_masked], weights[step])
        uniform = rng.uniform(is_masked.sum(-1).tolist()) if sample_temperature > 0 else None
        drawn = _draw_chunks(chunks, sample_temperature, uniform)
        sampled = torch.cat([d[0] for d in drawn])  # (r,)
        confidence = torch.full((b, n), math.inf, device=device)  # decoded tokens stay
        confidence[is_masked] = torch.cat([d[1] for d in drawn])  # log p(sampled) at T = 1
        ids[is_masked] = sampled
        noise_scale = temperature * (1 - progress)
        if noise_scale > 0:
            confidence += noise_scale * rng.gumbel(tuple(confidence.shape), device)

        # how many unknown positions stay masked; decode at least one new token per step
        num_remask = int(math.floor(float(schedule_fn(progress)) * num_unknown))
        num_remask = min(num_remask, int(is_masked.sum(-1).min()) - 1)
        if num_remask > 0:
            least_confident = confidence.topk(num_remask, dim=-1, largest=False, sorted=False).indices
            ids.scatter_(1, least_confident, mask_id)


def _compiled_hidden(model: Decodable, mode: str, backend: str):
    """``torch.compile`` of ``model.sampling_hidden``, made once per model and setting (kept on the
    model, so it goes when the model does)."""
    compiled = model.__dict__.setdefault("_compiled_sampling_hidden", {})
    if (mode, backend) not in compiled:
        options = {"mode": mode} if backend == "inductor" else {}  # modes are inductor's
        compiled[mode, backend] = torch.compile(model.sampling_hidden, backend=backend, dynamic=False, **options)
    return compiled[mode, backend]


def _chunk_rows(vocab: int) -> int:
    return max(1, _MAX_LOGIT_ELEMENTS // vocab)


def _draw_chunks(chunks, temperature: float, uniform: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_draw` over consecutive row chunks, each with its share of ``uniform``."""
    out, start = [], 0
    for chunk in chunks:
        rows = chunk.shape[0]
        out.append(_draw(chunk.float(), temperature, None if uniform is None else uniform[start:start + rows]))
        start += rows
    return out


def _draw(logits: torch.Tensor, temperature: float, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A token per row from ``softmax(logits / T)`` and its log-probability at ``T = 1``.

    Args:
        logits: ``(r, vocab)``; overwritten.
        temperature: > 0 inverts each row's CDF at its ``uniform`` (``(r,)``); 0 takes the argmax.

    Returns:
        ``(sampled, confidence)``, both ``(r,)``: ids and ``log softmax(logits)[sampled]``.
    """
    top = logits.amax(-1, keepdim=True)  # (r, 1)
    if temperature == 0:
        sampled = logits.argmax(-1)
    shifted = logits.sub_(top)  # in place: logits - max <= 0
    if temperature in (0.0, 1.0):
        weights = shifted.exp_()  # the unnormalised probabilities, max entry 1
        log_total = weights.sum(-1).log()  # log sum exp(logits - max): the log-softmax shift
        if temperature == 0:
            return sampled, -log_total  # the argmax's logit is the max
    else:
        # the T = 1 shift from cache-sized pieces, then exp((logits - max) / T) in place (max 1,
        # so only tokens negligible next to the best one underflow)
        log_total = torch.cat([piece.exp().sum(-1) for piece in shifted.split(64)]).log()
        weights = shifted.mul_(1.0 / temperature).exp_()
    sampled = _inverse_cdf(weights, uniform.to(weights.device))
    picked = weights.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)  # exp((logit - max) / T)
    return sampled, temperature * picked.log() - log_total


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative ``weights (r, V)`` given ``uniform (r,)`` in [0, 1).

    Two levels (block totals, then within the chosen block), so no full-length cumulative sum is
    written.
    """
    r, vocab = weights.shape
    size = _block_size(vocab)
    blocks = weights.view(r, vocab // size, size)  # (r, nb, bs)
    block_cdf = blocks.sum(-1).cumsum_(-1)  # (r, nb)
    target = (uniform * block_cdf[:, -1]).unsqueeze(-1)  # (r, 1)
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[1] - 1)  # (r, 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_(min=0)), 0.0)  # (r, 1)
    inner = blocks.gather(1, block.unsqueeze(-1).expand(r, 1, size)).squeeze(1)  # (r, bs)
    inner = inner.cumsum_(-1).add_(before)
    within = torch.searchsorted(inner, target, right=True).clamp_(max=size - 1)  # (r, 1)
    return (block * size + within).squeeze(-1)


def _block_size(vocab: int) -> int:
    """The largest divisor of ``vocab`` not above about ``sqrt(vocab)``."""
    limit = max(1, int(math.isqrt(vocab)))
    return max(d for d in range(1, limit + 1) if vocab % d == 0)
