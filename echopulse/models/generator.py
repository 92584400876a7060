"""MaskGIT generator over video token ids, conditioned on ECG tokens by cross-attention.

Training (``forward``): mask a schedule-drawn fraction of each sequence, predict the masked ids from
the rest and the ECG. With probability ``cond_dropout`` a sample's ECG tokens are replaced by a
learned null condition, so the same network also gives the unconditional logits that
classifier-free guidance needs at sampling time (``generate``, see ``sampling.py``).

ECG frame embedding (``GeneratorConfig.ecg_frame_embedding``, on by default): every token of
token frame ``j`` also gets an embedding of the raw 12-lead ECG window around that frame's time
(frame 0 alone, then the frames of the tokenizer's temporal patch, ``2j - 1, 2j`` with a patch of
2; the ECG starts at the clip's first frame). Cross-attention alone has to discover which ECG
patch belongs to which frame, and in CPU-sized training runs it did not; the frame embedding
hands the timing of each beat to the frames it shapes. It is dropped with the rest of the
condition.

Optional extra conditions (``GeneratorConfig.num_views``, ``ef_conditioning``): a learned embedding
of the echo view id and an MLP of the ejection fraction are added to every ECG context token (each
token then carries them, as a position embedding would); condition dropout drops them together
with the ECG. A view id of -1 or an EF of NaN means "not known": that condition adds nothing, so
training can use clips without a view or EF label, and generation may leave either out.

Lead mask (``GeneratorConfig.lead_mask_input``): which of the 12 leads were recorded, ``(b, 12)``
bool, by default read off the ECG (a lead that is all zeros is absent, which is how
``prepare_ecg`` writes one). Absent leads' ECG tokens are replaced by a learned per-lead "missing"
token, and the mask is fed beside the raw ECG to the frame embedding. Training drops leads at
random (``lead_dropout``: single lead I or II, or a random subset), so a one-lead watch ECG is a
condition the model has seen.

Priming (``prime_prob``): some training rows keep their leading token frames unmasked, either the
first alone (a given first frame) or ``chain_prime_token_frames`` of them (how every chained
window of a long video starts, see ``echopulse/generate.py``), so training shows both patterns
generation uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from echopulse.config import GeneratorConfig
from echopulse.models.ecg_encoder import ECGEncoder
from echopulse.models.layers import TransformerBlock, init_weights
from echopulse.models.sampling import sample
from echopulse.models.schedules import get_schedule


class MaskGIT(nn.Module):
    """Bidirectional transformer over ``seq_len = t' * h' * w'`` token ids with ECG cross-attention."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        get_schedule(cfg.schedule)  # fail at construction, not mid-training
        if not 0.0 <= cfg.mask_ratio_min < cfg.mask_ratio_max <= 1.0:
            raise ValueError(f"mask ratio bounds must satisfy 0 <= min < max <= 1, got "
                             f"[{cfg.mask_ratio_min}, {cfg.mask_ratio_max}]")
        if not 0.0 <= cfg.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cfg.cond_dropout}")
        if cfg.num_views < 0:
            raise ValueError(f"num_views must be >= 0 (0 disables view conditioning), got {cfg.num_views}")
        self.cfg = cfg
        self.mask_id = cfg.vocab_size  # one extra embedding row for [MASK]
        self.token_embed = nn.Embedding(cfg.vocab_size + 1, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(cfg.seq_len, cfg.dim) * 0.02)

        self.ecg_encoder = ECGEncoder(cfg.ecg)
        self.ecg_proj = nn.Linear(cfg.ecg.dim, cfg.dim)
        # stands in for the ECG tokens when the condition is dropped (and for the unguided branch)
        self.null_cond = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        if not 0.0 <= cfg.prime_prob <= 1.0:
            raise ValueError(f"prime_prob must be in [0, 1], got {cfg.prime_prob}")
        if not 0.0 <= cfg.lead_dropout <= 1.0:
            raise ValueError(f"lead_dropout must be in [0, 1], got {cfg.lead_dropout}")
        self.frame_window = 2 * cfg.ecg_samples_per_frame  # ECG samples seen by one token frame
        # the frame embedding sees each lead's window and, with the lead mask input, the mask
        frame_in = cfg.ecg.leads * (self.frame_window + int(cfg.lead_mask_input))
        self.ecg_frame_embed = (
            nn.Sequential(nn.LayerNorm(frame_in), nn.Linear(frame_in, cfg.dim), nn.GELU(),
                          nn.Linear(cfg.dim, cfg.dim))
            if cfg.ecg_frame_embedding else None
        )
        # stands in for each absent lead's ECG tokens
        self.missing_lead = (nn.Parameter(torch.randn(cfg.ecg.leads, cfg.dim) * 0.02)
                             if cfg.lead_mask_input else None)
        self.view_embed = nn.Embedding(cfg.num_views, cfg.dim) if cfg.num_views > 0 else None
        self.ef_mlp = (nn.Sequential(nn.Linear(1, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim))
                       if cfg.ef_conditioning else None)

        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.heads, context_dim=cfg.dim) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.vocab_size)  # never predicts [MASK]
        self.apply(init_weights)

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    # ---- inputs -------------------------------------------------------------------------------

    def _flatten_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(b, t', h', w')`` or ``(b, n)`` ids -> ``(b, n)`` long, validated."""
        grid = self.cfg.token_grid
        if tokens.ndim == 4 and tuple(tokens.shape[1:]) == tuple(grid):
            tokens = rearrange(tokens, "b t h w -> b (t h w)")
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"expected tokens (b, {grid[0]}, {grid[1]}, {grid[2]}) or (b, {self.seq_len}), "
                f"got {tuple(tokens.shape)}"
            )
        tokens = tokens.long()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.vocab_size}), "
                f"got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        return tokens

    def lead_mask(self, ecg: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(b, leads)`` bool: the given mask (checked), else the leads of ``ecg`` not all zero."""
        b, leads = ecg.shape[0], self.cfg.ecg.leads
        if lead_mask is None:
            return ecg.detach().abs().amax(-1) > 0
        lead_mask = torch.as_tensor(lead_mask, device=ecg.device).bool()
        if lead_mask.ndim == 1 and b == 1:
            lead_mask = lead_mask[None]
        if tuple(lead_mask.shape) != (b, leads):
            raise ValueError(f"expected lead_mask ({b}, {leads}) [b, leads], got {tuple(lead_mask.shape)}")
        return lead_mask

    def encode_ecg(self, ecg: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ECG ``(b, 12, L)`` -> context tokens ``(b, m, dim)`` for cross-attention.

        With the lead mask input, each absent lead's tokens (``lead_mask`` False; default: the
        all-zero leads) are the learned missing-lead token of that lead.
        """
        tokens = self.ecg_proj(self.ecg_encoder(ecg))  # (b, l * n, d), lead-major
        if self.missing_lead is None:
            return tokens
        present = self.lead_mask(ecg, lead_mask)  # (b, l)
        per_token = present.repeat_interleave(self.ecg_encoder.num_patches, dim=1)  # (b, l * n)
        missing = self.missing_lead.repeat_interleave(self.ecg_encoder.num_patches, dim=0)  # (l * n, d)
        return torch.where(per_token[..., None], tokens, missing.to(tokens.dtype))

    def drop_leads(self, ecg: torch.Tensor, lead_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time lead dropout: ``(ecg with dropped leads zeroed, new lead mask)``.

        A ``lead_dropout`` share of the rows loses leads: half of those keep lead I or II alone,
        the others a random subset (at least one lead). A row keeps its recorded leads when the
        draw would leave none of them. Uses the global torch RNG.
        """
        present = self.lead_mask(ecg, lead_mask)
        b, leads = present.shape
        device = ecg.device
        dropped = torch.rand(b, device=device) < self.cfg.lead_dropout
        single_lead = torch.where(torch.rand(b, device=device) < 0.5, 0, min(1, leads - 1))  # I or II
        single = F.one_hot(single_lead, leads).bool()
        subset = torch.rand(b, leads, device=device) < torch.rand(b, 1, device=device)
        keep = torch.where((torch.rand(b, device=device) < 0.5)[:, None], single, subset)
        keep = torch.where(dropped[:, None], keep & present, present)
        keep = torch.where(keep.any(-1, keepdim=True), keep, present)
        return ecg * keep[..., None].to(ecg.dtype), keep

    def encode_ecg_frames(self, ecg: torch.Tensor, lead_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """ECG ``(b, 12, L)`` -> one embedding per token frame ``(b, t', dim)``, or ``None`` when
        the config has no ECG frame embedding.

        Token frame 0 is video frame 0 (time 0); token frame ``j >= 1`` holds frames
        ``p(j - 1) + 1 .. pj`` (``p``: ``GeneratorConfig.temporal_patch``). Each token frame sees
        the ``2 * ECG_FS / fps`` ECG samples centred on its frames (zero-padded past either end of
        the ECG).
        """
        if self.ecg_frame_embed is None:
            return None
        cfg = self.cfg
        if ecg.ndim != 3 or ecg.shape[1] != cfg.ecg.leads or ecg.shape[2] != cfg.ecg.samples:
            raise ValueError(f"expected ECG (b, {cfg.ecg.leads}, {cfg.ecg.samples}) [b, leads, samples], "
                             f"got {tuple(ecg.shape)}")
        spf, window = cfg.ecg_samples_per_frame, self.frame_window
        t = cfg.token_grid[0]
        # window starts on the padded ECG (padded by `window` on the left)
        p = cfg.temporal_patch  # token frame j >= 1 is centred on frame pj - (p - 1) / 2
        centres = [0] + [round((p * j - (p - 1) / 2) * spf) for j in range(1, t)]
        starts = torch.tensor([window + c - window // 2 for c in centres], device=ecg.device)
        padded = F.pad(ecg.float(), (window, window))  # (b, l, L + 2 window)
        index = starts[:, None] + torch.arange(window, device=ecg.device)  # (t', window)
        windows = padded[:, :, index]  # (b, l, t', window)
        if cfg.lead_mask_input:
            present = self.lead_mask(ecg, lead_mask).to(windows.dtype)  # (b, l)
            windows = torch.cat([windows, repeat(present, "b l -> b l t 1", t=t)], dim=-1)
        return self.ecg_frame_embed(rearrange(windows, "b l t s -> b t (l s)"))  # (b, t', d)

    def _frame_bias(self, frames: torch.Tensor | None, cond_mask: torch.Tensor | None) -> torch.Tensor | None:
        """``(b, n, d)`` per-token ECG frame embedding, zero where the condition is dropped."""
        if frames is None:
            return None
        if cond_mask is not None:
            frames = frames * rearrange(cond_mask, "b -> b 1 1").to(frames.dtype)
        hw = self.cfg.token_grid[1] * self.cfg.token_grid[2]
        return frames.repeat_interleave(hw, dim=1)  # (b, t' h' w', d)

    def null_context(self, batch: int, num_tokens: int) -> torch.Tensor:
        """The null condition shaped like a context: ``(batch, num_tokens, dim)``."""
        return repeat(self.null_cond, "d -> b m d", b=batch, m=num_tokens)

    def with_extra_conditions(
        self, context: torch.Tensor, view: torch.Tensor | None = None, ef: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Add the view and EF embeddings the config asks for to every token of an ECG context.

        Args:
            context: ``(b, m, dim)`` from :meth:`encode_ecg`.
            view: ``(b,)`` view ids in ``[0, num_views)`` (-1: unknown, no embedding); required iff
                ``num_views > 0``.
            ef: ``(b,)`` ejection fractions in ``[0, 1]`` (NaN: unknown, no embedding); required
                iff ``ef_conditioning``.

        Returns:
            ``(b, m, dim)``; unchanged when the config has neither condition.
        """
        b = context.shape[0]
        extra = []
        if self.view_embed is None:
            if view is not None:
                raise ValueError("view given, but this generator has no view conditioning (num_views = 0)")
        else:
            if view is None:
                raise ValueError(f"this generator is conditioned on the echo view: pass view=, "
                                 f"(b,) ids in [0, {self.cfg.num_views})")
            view = torch.as_tensor(view, device=context.device).long().reshape(-1)
            if view.shape[0] != b:
                raise ValueError(f"expected view ids (b,) = ({b},), got {tuple(view.shape)}")
            if int(view.min()) < -1 or int(view.max()) >= self.cfg.num_views:
                raise ValueError(f"view ids must lie in [0, {self.cfg.num_views}) (-1: unknown), "
                                 f"got [{int(view.min())}, {int(view.max())}]")
            known = rearrange(view >= 0, "b -> b 1").to(context.dtype)
            extra.append(self.view_embed(view.clamp(min=0)) * known)  # (b, d); unknown adds nothing
        if self.ef_mlp is None:
            if ef is not None:
                raise ValueError("ef given, but this generator has no EF conditioning (ef_conditioning = False)")
        else:
            if ef is None:
                raise ValueError("this generator is conditioned on the ejection fraction: pass ef=, (b,) in [0, 1]")
            ef = torch.as_tensor(ef, device=context.device).to(context.dtype).reshape(-1)
            if ef.shape[0] != b:
                raise ValueError(f"expected ef (b,) = ({b},), got {tuple(ef.shape)}")
            known = ~torch.isnan(ef)
            if not bool(((ef[known] >= 0) & (ef[known] <= 1)).all()):
                raise ValueError(f"ef must be a fraction in [0, 1] (NaN: unknown), "
                                 f"got [{float(ef[known].min())}, {float(ef[known].max())}]")
            # centred on a typical EF and scaled, so the MLP starts in its useful range
            embedded = self.ef_mlp(rearrange((torch.nan_to_num(ef, nan=0.55) - 0.55) / 0.15, "b -> b 1"))
            extra.append(embedded * rearrange(known, "b -> b 1").to(context.dtype))  # (b, d)
        if not extra:
            return context
        return context + rearrange(sum(extra), "b d -> b 1 d").to(context.dtype)

    # ---- network ------------------------------------------------------------------------------

    def logits(
        self,
        tokens_in: torch.Tensor,
        context: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
        ef: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits over the vocabulary at every position.

        Args:
            tokens_in: ``(b, n)`` ids in ``[0, vocab_size]`` (``vocab_size`` is [MASK]).
            context: ``(b, m, dim)`` from :meth:`encode_ecg`.
            cond_mask: ``(b,)`` bool; False replaces that sample's context (ECG, view and EF) by
                the null condition and drops its ECG frame embedding.
            view, ef: the extra conditions, see :meth:`with_extra_conditions`.
            frames: ``(b, t', dim)`` from :meth:`encode_ecg_frames`; ``None`` is the null
                condition's (no frame embedding).

        Returns:
            ``(b, n, vocab_size)``.
        """
        context = self.with_extra_conditions(context, view, ef)
        if cond_mask is not None:
            null = self.null_context(context.shape[0], context.shape[1]).to(context.dtype)
            context = torch.where(rearrange(cond_mask, "b -> b 1 1"), context, null)
        x = self.token_embed(tokens_in) + self.pos_embed  # (b, n, d)
        bias = self._frame_bias(frames, cond_mask)
        if bias is not None:
            x = x + bias.to(x.dtype)
        for block in self.blocks:
            x = block(x, context)
        return self.to_logits(self.norm(x))  # (b, n, vocab)

    # ---- training -----------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        ecg: torch.Tensor,
        view: torch.Tensor | None = None,
        ef: torch.Tensor | None = None,
        lead_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked-token loss with a schedule-drawn mask ratio per sample.

        Uses the global torch RNG (seed it for reproducibility). In training mode it also drops
        leads (``lead_dropout``) and primes rows (``prime_prob``), see the module docstring.

        Args:
            tokens: ``(b, t', h', w')`` or ``(b, n)`` ids.
            ecg: ``(b, 12, L)`` float.
            view, ef: ``(b,)`` echo view ids / ejection fractions, when the config conditions on them.
            lead_mask: ``(b, 12)`` bool, the recorded leads (default: the non-zero ones).

        Returns:
            ``(loss, {"loss", "masked_acc", "mask_ratio"})``: cross-entropy over masked positions only.
        """
        tokens = self._flatten_tokens(tokens)
        b, n = tokens.shape
        device = tokens.device
        # the schedule's ratio, truncated to [mask_ratio_min, mask_ratio_max] (tunable bounds)
        lo, hi = self.cfg.mask_ratio_min, self.cfg.mask_ratio_max
        ratio = lo + (hi - lo) * get_schedule(self.cfg.schedule)(torch.rand(b, device=device))  # (b,)
        num_masked = (ratio * n).floor().long().clamp(1, n)  # (b,), at least one target
        mask = _random_subset(b, n, num_masked, device)  # (b, n) bool
        if self.training and self.cfg.prime_prob > 0:
            mask = self._prime_rows(mask)
        if self.training and self.cfg.lead_dropout > 0:
            ecg, lead_mask = self.drop_leads(ecg, lead_mask)

        cond_mask = None
        if self.training:
            # always built in training (all True when cond_dropout = 0) so null_cond is in the graph
            # every step and DDP needs no find_unused_parameters
            cond_mask = torch.rand(b, device=device) >= self.cfg.cond_dropout
        logits = self.logits(tokens.masked_fill(mask, self.mask_id), self.encode_ecg(ecg, lead_mask), cond_mask,
                             view=view, ef=ef, frames=self.encode_ecg_frames(ecg, lead_mask))

        loss = F.cross_entropy(logits[mask], tokens[mask])
        with torch.no_grad():
            acc = (logits[mask].argmax(-1) == tokens[mask]).float().mean().item()
        metrics = {"loss": loss.item(), "masked_acc": acc, "mask_ratio": mask.float().mean().item()}
        return loss, metrics

    def _prime_rows(self, mask: torch.Tensor) -> torch.Tensor:
        """Unmask the leading token frames of a ``prime_prob`` share of the rows: half of them the
        first token frame (a given first frame), half ``chain_prime_token_frames`` (a chained
        window's start). Every row keeps at least one masked target."""
        b, n = mask.shape
        device = mask.device
        hw = self.cfg.token_grid[1] * self.cfg.token_grid[2]
        primed = torch.rand(b, device=device) < self.cfg.prime_prob  # (b,)
        chained = torch.rand(b, device=device) < 0.5
        frames = torch.where(chained, self.cfg.chain_prime_token_frames, 1) * primed  # (b,)
        given = torch.arange(n, device=device)[None] < rearrange(frames * hw, "b -> b 1")  # (b, n)
        mask = mask & ~given
        # keep at least one target: a row left with none gets its first unprimed position masked
        empty = ~mask.any(-1)
        if bool(empty.any()):
            first_free = (frames * hw).clamp(max=n - 1)
            mask[empty, first_free[empty]] = True
        return mask

    @torch.no_grad()
    def masked_eval(
        self,
        tokens: torch.Tensor,
        ecg: torch.Tensor,
        mask_ratio: float = 0.5,
        generator: torch.Generator | None = None,
        view: torch.Tensor | None = None,
        ef: torch.Tensor | None = None,
        lead_mask: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Cross-entropy and accuracy on a fixed fraction of masked tokens, conditioned, eval mode.

        Args:
            tokens: ``(b, t', h', w')`` or ``(b, n)`` ids.
            ecg: ``(b, 12, L)``.
            mask_ratio: fraction of positions masked (at least one).
            generator: RNG for which positions are masked; ``None`` uses the global one.
            view, ef: the extra conditions, when the config has them.

        Returns:
            ``{"ce": ..., "acc": ...}`` over the masked positions.
        """
        was_training = self.training
        self.eval()
        try:
            tokens = self._flatten_tokens(tokens)
            b, n = tokens.shape
            k = min(max(1, int(math.floor(mask_ratio * n))), n)
            num_masked = torch.full((b,), k, dtype=torch.long, device=tokens.device)
            mask = _random_subset(b, n, num_masked, tokens.device, generator)
            logits = self.logits(tokens.masked_fill(mask, self.mask_id), self.encode_ecg(ecg, lead_mask),
                                 view=view, ef=ef, frames=self.encode_ecg_frames(ecg, lead_mask))
            ce = F.cross_entropy(logits[mask], tokens[mask]).item()
            acc = (logits[mask].argmax(-1) == tokens[mask]).float().mean().item()
        finally:
            self.train(was_training)
        return {"ce": ce, "acc": acc}

    # ---- sampling -----------------------------------------------------------------------------

    def sampling_cache(self, context: torch.Tensor, guided: bool,
                       frames: torch.Tensor | None = None,
                       negative: "tuple[torch.Tensor, torch.Tensor | None] | None" = None) -> "SamplingCache":
        """What stays fixed across the decoding steps of one sample: per-block cross-attention
        keys/values of ``context`` (with any view/EF embeddings added), the per-token ECG frame
        embedding (from ``frames``, :meth:`encode_ecg_frames`) and, when guided, each block's
        cross-attention output under the null condition.

        A context of identical null tokens makes attention uniform over equal values, so the null
        branch's cross-attention is one constant vector per block, whatever the query.

        ``negative`` (guided only): ``(context, frames)`` of a negative ECG that replaces the null
        condition in the guided branch (its own cross-attention keys/values and frame embedding).
        """
        kv = [tuple(t.contiguous() for t in block.cross_attn.context_kv(context)) for block in self.blocks]
        null_out = []
        if guided and negative is not None:
            neg_context, neg_frames = negative
            neg_kv = [tuple(t.contiguous() for t in block.cross_attn.context_kv(neg_context))
                      for block in self.blocks]
            return SamplingCache(kv=kv, null_out=[], frame_bias=self._frame_bias(frames, None), neg_kv=neg_kv,
                                 neg_frame_bias=self._frame_bias(neg_frames, None))
        if guided:
            null = self.null_context(1, 1).to(context.dtype)  # (1, 1, d)
            query = torch.zeros_like(null)  # any query gives the same output
            null_out = [block.cross_attn(query, null) for block in self.blocks]  # (1, 1, d) each
        return SamplingCache(kv=kv, null_out=null_out, frame_bias=self._frame_bias(frames, None))

    def sampling_hidden(self, tokens_in: torch.Tensor, cache: "SamplingCache") -> torch.Tensor:
        """Final-norm hidden states for decoding: the same network as :meth:`logits` minus the
        vocabulary projection, for the conditional rows and (guided) the null-conditioned rows.

        Args:
            tokens_in: ``(b, n)`` ids in ``[0, vocab_size]``.
            cache: from :meth:`sampling_cache` for this batch's context.

        Returns:
            ``(b, n, dim)``, or ``(2b, n, dim)`` when guided: rows ``[0, b)`` conditional,
            ``[b, 2b)`` null-conditioned (conditioned on the negative ECG when the cache has one).
        """
        b = tokens_in.shape[0]
        negative = cache.neg_kv is not None
        guided = bool(cache.null_out) or negative
        x = self.token_embed(tokens_in) + self.pos_embed  # (b, n, d)
        # with an ECG frame embedding the branches differ from the input on; without one they
        # see the same ids and the first self-attention is shared
        split_at_input = guided and cache.frame_bias is not None
        if cache.frame_bias is not None:
            other = x + cache.neg_frame_bias if negative and cache.neg_frame_bias is not None else x
            x = torch.cat([x + cache.frame_bias, other]) if guided else x + cache.frame_bias
        for i, block in enumerate(self.blocks):  # residual updates in place: no new activations
            x += block.attn(block.norm_attn(x))
            if i == 0 and guided and not split_at_input:
                x = torch.cat([x, x])  # (2b, n, d)
            cond = x[:b]  # a view: the updates below write into x
            cond += block.cross_attn(block.norm_cross(cond), kv=cache.kv[i])
            if negative:
                uncond = x[b:]
                uncond += block.cross_attn(block.norm_cross(uncond), kv=cache.neg_kv[i])
            elif guided:
                x[b:] += cache.null_out[i]
            x += block.mlp(block.norm_mlp(x))
        return self.norm(x)

    def generate(self, ecg: torch.Tensor, **options: Any) -> torch.Tensor:
        """Token ids ``(b, t', h', w')`` for each ECG: :func:`echopulse.models.sampling.sample` on
        this model, with its keyword options (``steps``, ``guidance``, ``seed``, ...)."""
        return sample(self, ecg, **options)


@dataclass
class SamplingCache:
    """Per-sample constants of decoding (see :meth:`MaskGIT.sampling_cache`)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block: (b, heads, m, head_dim) keys, values
    null_out: list[torch.Tensor]  # per block: (1, 1, dim) null cross-attention output; [] unguided
    frame_bias: torch.Tensor | None = None  # (b, n, dim) ECG frame embedding per token, or None
    neg_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per block, of the negative ECG
    neg_frame_bias: torch.Tensor | None = None  # (b, n, dim) the negative ECG's frame embedding


def _random_subset(
    b: int, n: int, counts: torch.Tensor, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(b, n)`` bool with exactly ``counts[i]`` uniformly chosen True positions in row ``i``."""
    # draw on the generator's device (a CPU generator gives the same mask on any device)
    noise_device = generator.device if generator is not None else device
    scores = torch.rand(b, n, device=noise_device, generator=generator).to(device)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)  # (b, n): rank of each position's score
    return ranks < rearrange(counts, "b -> b 1")
