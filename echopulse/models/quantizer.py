"""Finite scalar quantization (Mentzer et al., 2023): no codebook, no auxiliary loss.

Each of the ``d = len(levels)`` channels is squashed into a bounded range and rounded to one of
``levels[i]`` values; the implicit codebook is the product grid, ``prod(levels)`` codes. Rounding
uses a straight-through estimator, so gradients pass as if it were the identity.
"""

from __future__ import annotations

import torch
from torch import nn


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
