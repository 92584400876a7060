"""The tokenizer's quantizers: FSQ (the default) and VQ with an EMA codebook (an option).

Finite scalar quantization (Mentzer et al., 2023) needs no codebook and no auxiliary loss. Each
of the ``d = len(levels)`` channels is squashed into a bounded range and rounded to one of
``levels[i]`` values; the implicit codebook is the product grid, ``prod(levels)`` codes. Rounding
uses a straight-through estimator, so gradients pass as if it were the identity.

Both quantizers map ``(..., d)`` latents to ``(z_q, indices)`` and back with ``indices_to_codes``;
:func:`codebook_stats` measures how much of a codebook a batch uses.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return z + (z.round() - z).detach()


class FSQ(nn.Module):
    """Finite scalar quantizer over ``len(levels)`` channels.

    Args:
        levels: number of quantization levels per channel, e.g. ``(8, 5, 5, 5)``.
    """

    def __init__(self, levels: tuple[int, ...], eps: float = 1e-3):
        super().__init__()
        if not levels or any(int(level) < 2 for level in levels):
            raise ValueError(f"FSQ levels must all be >= 2, got {tuple(levels)}")
        self.levels_tuple = tuple(int(level) for level in levels)
        self.eps = eps
        levels_t = torch.tensor(self.levels_tuple, dtype=torch.int64)
        # mixed-radix place values: index = sum(digit_i * basis_i)
        basis = torch.cumprod(torch.tensor((1,) + self.levels_tuple[:-1], dtype=torch.int64), dim=0)
        # buffers are derived from `levels`, so they stay out of the checkpoint
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels_tuple)

    @property
    def codebook_size(self) -> int:
        n = 1
        for level in self.levels_tuple:
            n *= level
        return n

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).to(torch.float32)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z`` so that rounding yields exactly ``levels[i]`` integer values per channel."""
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize.

        Args:
            z: ``(..., d)`` with ``d = len(levels)``.

        Returns:
            ``(z_q, indices)``: codes ``(..., d)`` in [-1, 1] (straight-through) and ``(...)`` long.
        """
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ expects last dim {self.dim}, got shape {tuple(z.shape)}")
        # fp32 even under autocast: bf16 cannot place every level boundary exactly
        z_q = round_ste(self.bound(z.float())) / self._half_width()  # (..., d) in [-1, 1]
        return z_q, self.codes_to_indices(z_q)

    def codes_to_indices(self, z_q: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` codes -> ``(...)`` long indices in ``[0, codebook_size)``."""
        half_width = self._half_width()
        digits = (z_q.detach().float() * half_width + half_width).round().long()  # (..., d)
        return (digits * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """``(...)`` long indices -> ``(..., d)`` float codes in [-1, 1]."""
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"FSQ indices must lie in [0, {self.codebook_size}), "
                f"got [{int(indices.min())}, {int(indices.max())}]"
            )
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels  # (..., d)
        half_width = self._half_width()
        return (digits.float() - half_width) / half_width

    def extra_repr(self) -> str:
        return f"levels={self.levels_tuple}, codebook_size={self.codebook_size}"


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """How much of a codebook one batch of ids uses.

    Args:
        indices: long ids of any shape, in ``[0, codebook_size)``.
        codebook_size: number of codes.

    Returns:
        ``(usage, perplexity)``: the fraction of codes that occur at least once, and
        ``exp(entropy)`` of the ids' histogram (1 when one code takes everything, ``codebook_size``
        when all are used equally often).
    """
    flat = indices.detach().reshape(-1).long()
    if flat.numel() == 0:
        return 0.0, 0.0
    counts = torch.bincount(flat, minlength=codebook_size).float()
    probs = counts / counts.sum()
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return float((counts > 0).sum()) / codebook_size, float(torch.exp(entropy))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class VectorQuantizerEMA(nn.Module):
    """Vector quantizer whose codebook follows exponential moving averages (van den Oord et al.,
    2017; Razavi et al., 2019), with dead-code restart.

    The codebook is not trained by gradients: each training step moves every code towards the
    mean of the encoder outputs assigned to it (EMA of counts and sums). The encoder is pulled
    towards its codes by a commitment loss the caller adds (``commitment_loss``). A code that no
    output chose for ``restart_after`` consecutive training steps is re-initialised from a random
    encoder output of the current batch, so the codebook cannot collapse onto a few codes.

    The codebook starts as random encoder outputs of the first training batch. Under
    ``torch.distributed`` the counts and sums are all-reduced before the update, and the first
    codebook and restarted codes are broadcast from rank 0, so every rank keeps the same codebook.
    All state is in persistent buffers (``embed``, ``ema_cluster_size``, ``ema_embed_sum``,
    ``unused_steps``, ``initialized``), so it lands in the checkpoint.

    Args:
        codebook_size: number of codes ``K``.
        dim: code width ``d``.
        decay: EMA decay per training step.
        restart_after: training steps without use before a code is restarted; 0 disables restarts.
        eps: Laplace smoothing of the cluster sizes.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, restart_after: int = 20,
                 eps: float = 1e-5):
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"VQ needs codebook_size >= 2 and dim >= 1, got {codebook_size} and {dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"VQ EMA decay must be in (0, 1), got {decay}")
        if restart_after < 0:
            raise ValueError(f"VQ restart_after must be >= 0, got {restart_after}")
        self.num_codes = int(codebook_size)
        self.code_dim = int(dim)
        self.decay = float(decay)
        self.restart_after = int(restart_after)
        self.eps = float(eps)
        embed = torch.randn(codebook_size, dim)
        self.register_buffer("embed", embed)  # (K, d)
        self.register_buffer("ema_cluster_size", torch.ones(codebook_size))  # (K,)
        self.register_buffer("ema_embed_sum", embed.clone())  # (K, d)
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.int64))  # (K,)
        # the first training batch replaces the random codebook (random codes far from the
        # encoder's outputs would leave all but one unused until restarts kick in)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def dim(self) -> int:
        return self.code_dim

    @property
    def codebook_size(self) -> int:
        return self.num_codes

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize (and, in training mode with gradients enabled, update the codebook).

        Args:
            z: ``(..., d)``.

        Returns:
            ``(z_q, indices)``: nearest codes ``(..., d)`` with a straight-through gradient to
            ``z``, and ``(...)`` long ids.
        """
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"VQ expects last dim {self.code_dim}, got shape {tuple(z.shape)}")
        flat = z.detach().float().reshape(-1, self.code_dim)  # (n, d), fp32 even under autocast
        distances = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)
        )  # (n, K)
        indices = distances.argmin(dim=1)  # (n,)
        if self.training and torch.is_grad_enabled():
            self._update(flat, indices)
        codes = F.embedding(indices, self.embed).view(*z.shape[:-1], self.code_dim)
        z_q = z.float() + (codes - z.float()).detach()  # straight-through
        return z_q, indices.view(z.shape[:-1])

    @torch.no_grad()
    def _init_from_data(self, flat: torch.Tensor) -> None:
        pick = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
        new = flat[pick]
        if flat.shape[0] < self.num_codes:  # repeated samples: jitter them apart
            new = new + 0.01 * new.std().clamp_min(1e-3) * torch.randn_like(new)
        if _distributed():
            torch.distributed.broadcast(new, src=0)
        self.embed.copy_(new)
        self.ema_embed_sum.copy_(new)
        self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        if not bool(self.initialized):
            self._init_from_data(flat)
            distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
                         + self.embed.pow(2).sum(1))
            indices.copy_(distances.argmin(dim=1))
        onehot = F.one_hot(indices, self.num_codes).to(flat.dtype)  # (n, K)
        counts = onehot.sum(0)  # (K,)
        sums = onehot.t() @ flat  # (K, d)
        if _distributed():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a rarely used code from dividing by ~0
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.embed.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))

        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        if self.restart_after > 0:
            dead = self.unused_steps >= self.restart_after
            if bool(dead.any()):
                self._restart(dead, flat)

    def _restart(self, dead: torch.Tensor, flat: torch.Tensor) -> None:
        # `dead` is the same on every rank (it follows all-reduced counts); the replacement vectors
        # come from rank 0's batch so the codebooks stay identical
        n_dead = int(dead.sum())
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = self.embed.clone()
        new[dead] = flat[pick]
        if _distributed():
            torch.distributed.broadcast(new, src=0)
        self.embed.copy_(new)
        self.ema_embed_sum[dead] = new[dead]
        self.ema_cluster_size[dead] = 1.0
        self.unused_steps[dead] = 0
        logger.debug("VQ restarted %d dead codes", n_dead)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """``(...)`` long ids -> ``(..., d)`` codes."""
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(
                f"VQ indices must lie in [0, {self.num_codes}), "
                f"got [{int(indices.min())}, {int(indices.max())}]"
            )
        return F.embedding(indices, self.embed)

    def extra_repr(self) -> str:
        return (f"codebook_size={self.num_codes}, dim={self.code_dim}, decay={self.decay}, "
                f"restart_after={self.restart_after}")


QUANTIZERS = ("fsq", "vq")


def build_quantizer(cfg) -> nn.Module:
    """The quantizer a :class:`~echopulse.config.TokenizerConfig` names (``"fsq"`` or ``"vq"``)."""
    if cfg.quantizer == "fsq":
        return FSQ(cfg.fsq_levels)
    if cfg.quantizer == "vq":
        return VectorQuantizerEMA(cfg.vq_codebook_size, cfg.vq_dim, decay=cfg.vq_ema_decay,
                                  restart_after=cfg.vq_restart_after)
    raise ValueError(f"unknown quantizer {cfg.quantizer!r}; known: {', '.join(QUANTIZERS)}")
